// Device helpers of the decode kernels: 16-bit activation types, the m16n8k16 tensor-core
// MMA, wide loads and 4-bit code decoding. Needs sm_80+ (bf16 MMA).
//
// How a GEMV maps onto mma.m16n8k16 ("swap AB": weights are the A operand):
//   A [16 n x 16 k]  16 output features of W, row-major as W is stored
//   B [16 k x 8 m]   up to 8 activation rows (x is [M, K] row-major = B column-major)
//   C [16 n x 8 m]   y transposed, fp32
// A sum over k does not care in which order k is visited, so each MMA step may feed
// any 16 k to its 16 k-slots as long as A and B use the same assignment. Lane
// (g = lane / 4, t = lane % 4) holds k-slots {2t, 2t+1, 2t+8, 2t+9} of A (rows g and
// g+8) and of B (column g). We give those slots, in step s = 0..7 of a 128-k chunk,
// the actual k = chunk + 32 t + 4 s + {0, 1, 2, 3}. Over the 8 steps a lane then
// needs exactly 32 *contiguous* k per row: one 16-byte load of packed codes (or four
// of fp16 weights) per row, and four 16-byte loads of x per activation row, with no
// shuffles and no change of the packed layout.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "common/quant_math.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "lorart CUDA decode kernels need sm_80 or newer (bf16 tensor-core MMA)"
#endif

namespace lorart::cuda {

// k covered by one warp iteration: 8 MMA steps of 16, or 32 contiguous k per lane.
constexpr int kChunkK = 128;
constexpr int kLaneK = 32;

template <typename T>
struct ActTraits;

template <>
struct ActTraits<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  // Two floats to one 32-bit register, `lo` in the low half (the lower k-slot).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t bits) {
    __half2 h;
    memcpy(&h, &bits, sizeof(bits));
    return __half22float2(h);
  }
};

template <>
struct ActTraits<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) {
    return __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t bits;
    memcpy(&bits, &h, sizeof(bits));
    return bits;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t bits) {
    __nv_bfloat162 h;
    memcpy(&h, &bits, sizeof(bits));
    return __bfloat1622float2(h);
  }
};

// D = A B + D for one m16n8k16 tile, fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                  uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
      "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 16-byte load of weights that are read exactly once: bypass L1 so the activations,
// which every warp of the block re-reads, stay cached there. `p` must be 16-byte aligned.
__device__ __forceinline__ uint4 load_streaming(const void* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}

// 16-byte read-only load that may stay in L1 (activations). `p` 16-byte aligned.
__device__ __forceinline__ uint4 load_cached(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

__device__ __forceinline__ void store_words(uint32_t* dst, uint4 v) {
  dst[0] = v.x;
  dst[1] = v.y;
  dst[2] = v.z;
  dst[3] = v.w;
}

// One 16-bit element's raw bits, or 0 (also +0.0 as a float) when out of range.
__device__ __forceinline__ uint32_t load_bits16(const void* base, int64_t index, bool valid) {
  return valid ? static_cast<uint32_t>(__ldg(reinterpret_cast<const unsigned short*>(base) + index))
               : 0u;
}

// 32 contiguous 16-bit elements starting at `row + k0` (k0 + 32 <= row length or
// masked by `limit`) as 16 words, element 2i in the low half of word i. Vector path
// when `kVec` (row pointer and k0 16-byte aligned), one element at a time otherwise.
template <bool kVec>
__device__ __forceinline__ void load_lane_k(const void* row, int64_t k0, int64_t limit,
                                            bool row_valid, uint32_t (&words)[16]) {
  if constexpr (kVec) {
    const auto* p = reinterpret_cast<const unsigned short*>(row) + k0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // limit % 8 == 0 on this path, so a 16-byte piece is wholly inside or outside.
      const bool ok = row_valid && k0 + 8 * i < limit;
      const uint4 v = ok ? load_cached(p + 8 * i) : make_uint4(0, 0, 0, 0);
      store_words(words + 4 * i, v);
    }
  } else {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int64_t k = k0 + 2 * i;
      const uint32_t lo = load_bits16(row, k, row_valid && k < limit);
      const uint32_t hi = load_bits16(row, k + 1, row_valid && k + 1 < limit);
      words[i] = lo | (hi << 16);
    }
  }
}

// Same for weights that are streamed once (dense base): L1 bypass on the vector path.
template <bool kVec>
__device__ __forceinline__ void load_lane_k_streaming(const void* row, int64_t k0, int64_t limit,
                                                      bool row_valid, uint32_t (&words)[16]) {
  if constexpr (kVec) {
    const auto* p = reinterpret_cast<const unsigned short*>(row) + k0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool ok = row_valid && k0 + 8 * i < limit;
      const uint4 v = ok ? load_streaming(p + 8 * i) : make_uint4(0, 0, 0, 0);
      store_words(words + 4 * i, v);
    }
  } else {
    load_lane_k<false>(row, k0, limit, row_valid, words);
  }
}

// The value of code q (0..15) before scaling for asym (q) and sym (q - 8), without a
// table lookup or an int->float conversion: 0x4B000000 | q is the float 2^23 + q, and
// subtracting 2^23 (+ 8 for sym), both exact in fp32, leaves q (or q - 8) exactly.
// Bit-for-bit equal to lorart::code_value(kAsym|kSym, q); nf4 uses the shared table.
__device__ __forceinline__ float code_value_arith(uint32_t q, float code_bias) {
  return __uint_as_float(0x4B000000u | q) - code_bias;
}

template <typename T>
__device__ __forceinline__ float load_scale(const T* p, int64_t index) {
  if constexpr (sizeof(T) == 2) {
    return __half2float(__ldg(p + index));
  } else {
    return __ldg(p + index);
  }
}

}  // namespace lorart::cuda
