// One-row GEMV with int8 activations (issue #15): the way llama.cpp runs its Q4/Q8 dot
// products, for lorart's own layouts, as an opt-in of the batch-1 decoder.
//
//     x  [K] float32  ->  per group g of 32:  d_g = max|x_g| / 127,  q_x = round(x / d_g)
//                         (or 16-bit: d_g = max|x_g| / 32767)
//     y[n] = Σ_g  s[n,g] · d_g · Σ_{k∈g} q_w[n,k] q_x[k]  +  o[n,g] · d_g · Σ_{k∈g} q_x[k]
//
// 4-bit (lorart.quant, codes 0..15, byte j = k 2j low nibble, 2j+1 high): asym w = s·q + o,
// sym w = s·(q − 8) (o = −8·s). 8-bit (int8 layout): w = s·q (+ o). Group size 32 only
// (every GGUF 4/8-bit format converts to it). y is the float32 product of the dequantized
// W with the rounded x̂ = d·q_x, as llama.cpp's Q8_1 dot products: the offset term uses the
// rounded x's sum, not x's own. With x's own sum the error would be Σ (w − o)(x̂ − x)
// instead of Σ w (x̂ − x); for asym groups w − o spans [0, max − min], about twice w's
// magnitude, so SmolLM2's logits were 3.9e-2 from float32 that way instead of 2.2e-2
// (2026-12-03). The integer dot products run on AVX512-VNNI (vpdpbusd/vpdpwssd); a scalar
// version of the same arithmetic is the reference and the fallback.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/lora_cpu.h"

namespace lorart {
namespace cpu {

// x quantized once per call, laid out for the kernels.
struct Q8Activation {
  int64_t k = 0;
  int bits = 8;               // 8: q holds x; 16: q16 holds x (d = max|x| / 32767)
  std::vector<int8_t> q;      // 4-bit: per 128-k chunk [64 even k | 64 odd k]; 8-bit: natural
  std::vector<int16_t> q16;   // the same layout, 16-bit
  std::vector<float> d;       // [K/32] scale per group
  std::vector<float> sum;     // [K/32] d · Σ q_x over the group (the rounded x's sum)
  std::vector<float> d_lane;  // per 16 int32 lanes of a chunk: d of the lane's group
  std::vector<float> s_lane;  // same, sum / (lanes per group)
};

// The weight of one 4-bit or 8-bit layer, group size 32.
struct Q8Weight {
  int64_t n = 0, k = 0;
  bool int8 = false;               // int8 codes [N, K], else packed 4-bit [N, K/2]
  const uint8_t* codes = nullptr;  // bytes of either
  const void* scales = nullptr;    // [N, K/32]
  const void* offsets = nullptr;   // [N, K/32] or nullptr
  bool scales_f16 = false;
  bool sym = false;  // 4-bit sym: offset = -8 · scale
};

// One call's activation as plain pointers, for the VNNI TU (decode_q8_vnni.cpp).
struct Q8Raw {
  const Q8Weight* w;
  const int8_t* q;
  const int16_t* q16;
  const float* d_lane;
  const float* s_lane;
  int bits;
};
// decode_q8_vnni.cpp: rows n0..n1 of y, and the per-group rounding of x (natural order).
void q8_rows_vnni(const Q8Raw& x, float* y, int64_t n0, int64_t n1);
void q8_quantize_groups_vnni(const float* x, int64_t groups, int8_t* q, int16_t* q16, float* d,
                             float* sum);

// Whether this CPU runs the VNNI kernels (else q8_gemv runs the scalar reference).
bool q8_has_vnni();

// Quantize x [K] for w's layout (4-bit: chunked even/odd order; 8-bit: natural) to `bits`
// 8 (vpdpbusd) or 16 (vpdpwssd: x rounded to 1/65534 of its group's range, which keeps the
// float32 path's results to ~1e-4 relative or better while still running integer dot products).
void q8_quantize(const float* x, int64_t k, bool for_int8, Q8Activation* out, bool vnni,
                 int bits = 8);

// y[n0..n1) = rows of W · x (no bias); all threads when the work is large.
void q8_gemv(const Q8Weight& w, const Q8Activation& x, float* y, bool vnni);

}  // namespace cpu
}  // namespace lorart
