// Arithmetic shared by the C++ CPU kernels and the CUDA kernels: the 4-bit
// code tables, nibble unpacking, group dequantization and adapter rank offsets.
// Compiled for both (LORART_HD expands to __host__ __device__ under nvcc), so the
// CPU tests exercise exactly the helpers the GPU kernels use.
//
// Packed layout of a lorart QuantizedWeight W [N, K] (see lorart/quant.py):
//   qweight  uint8 [N, K/2]   byte j of row n holds the code of k = 2j in its low
//                             nibble and of k = 2j + 1 in its high nibble
//   scales   f16|f32 [N, K/g] one per group of g consecutive k
//   offsets  same as scales, asym only (nullptr otherwise)
//   value(n, k) = scales[n, k/g] * table[q(n, k)] + offsets[n, k/g]
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORART_HD __host__ __device__ __forceinline__
#else
#define LORART_HD inline
#endif

namespace lorart {

// kInt8: the 8-bit layout (int8 codes [N, K], code value q itself); no 16-entry table.
enum class Scheme : int { kAsym = 0, kSym = 1, kNf4 = 2, kInt8 = 3 };

// The 16 NormalFloat-4 values of QLoRA (Dettmers et al. 2023), as float32.
LORART_HD float nf4_value(int q) {
  constexpr float kNf4[16] = {
      -1.0f,
      -0.6961928009986877f,
      -0.5250730514526367f,
      -0.39491748809814453f,
      -0.28444138169288635f,
      -0.18477343022823334f,
      -0.09105003625154495f,
      0.0f,
      0.07958029955625534f,
      0.16093020141124725f,
      0.24611230194568634f,
      0.33791524171638489f,
      0.44070982933044434f,
      0.56261700391769409f,
      0.72295683622360229f,
      1.0f,
  };
  return kNf4[q & 15];
}

// The value a code stands for before the group scale: q, q - 8 or NF4[q].
LORART_HD float code_value(Scheme scheme, int q) {
  switch (scheme) {
    case Scheme::kAsym:
    case Scheme::kInt8:  // an 8-bit code is its own value
      return static_cast<float>(q);
    case Scheme::kSym:
      return static_cast<float>(q - 8);
    default:
      return nf4_value(q);
  }
}

// Fill a 16-entry lookup table for a scheme (kernels index it by code).
LORART_HD void fill_code_table(Scheme scheme, float table[16]) {
  for (int q = 0; q < 16; ++q) table[q] = code_value(scheme, q);
}

// Code of element k in a packed row (low nibble = even k, high nibble = odd k).
LORART_HD int unpack_code(const uint8_t* row, int64_t k) {
  const uint8_t byte = row[k >> 1];
  return (k & 1) ? (byte >> 4) : (byte & 15);
}

LORART_HD float dequantize_value(float code_value, float scale, float offset) {
  return scale * code_value + offset;
}

// Rank offsets of a packed adapter stack: adapter s owns rows
// [rank_offsets[s], rank_offsets[s + 1]) of A and the same columns of B.
LORART_HD int64_t adapter_rank(const int64_t* rank_offsets, int s) {
  return rank_offsets[s + 1] - rank_offsets[s];
}

// IEEE half and bfloat16 bits to float, for hosts without native types.
LORART_HD float bf16_bits_to_float(uint16_t bits) {
  union {
    uint32_t u;
    float f;
  } v;
  v.u = static_cast<uint32_t>(bits) << 16;
  return v.f;
}

// Round-to-nearest-even float -> bfloat16 bits (NaN stays NaN).
LORART_HD uint16_t float_to_bf16_bits(float f) {
  union {
    uint32_t u;
    float f;
  } v;
  v.f = f;
  if ((v.u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((v.u >> 16) | 0x40);
  const uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
  return static_cast<uint16_t>((v.u + rounding) >> 16);
}

LORART_HD float fp16_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  union {
    uint32_t u;
    float f;
  } v;
  v.u = bits;
  return v.f;
}

}  // namespace lorart
