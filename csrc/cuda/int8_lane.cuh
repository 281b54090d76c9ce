// Device helpers of the 8-bit (int8) decode path of decode.cu: one lane's codes and group
// parameters, and their dequantization into MMA A registers.
//
// Layout (lorart/quant.py, scheme int8): codes int8 [N, K] row-major, one scale (and an
// optional offset) per group of g in {16, 32, 64, 128, 256} consecutive k:
//     W[n, k] = scales[n, k/g] * q[n, k] + offsets[n, k/g]     (offsets may be absent)
// As for 4-bit weights (fragments.cuh), lane t of a warp covers 32 contiguous k of a
// 128-k chunk: here 32 bytes per weight row, two 16-byte streaming loads. K is a multiple
// of g >= 16, so rows are 16-byte aligned and each 16-k half of a lane is wholly inside or
// outside K, and inside one group: half h (MMA steps 4h .. 4h+3) has its own scale.
#pragma once

#include <cstdint>

#include "common/quant_math.h"
#include "cuda/decode.h"
#include "cuda/fragments.cuh"

namespace lorart::cuda {

// One lane's codes and group parameters of rows g and g + 8 ([row][16-k half]).
struct Int8Lane {
  uint32_t codes[2][8];  // 32 codes a row, 4 a word, in k order
  float scale[2][2];
  float offset[2][2];
};

template <typename ScaleT>
__device__ __forceinline__ void load_int8_lane(const DecodeArgs& args, int64_t row0, int64_t k0,
                                               Int8Lane& q) {
  const auto* codes = static_cast<const int8_t*>(args.weight);
  const auto* scales = static_cast<const ScaleT*>(args.scales);
  const auto* offsets = static_cast<const ScaleT*>(args.offsets);
  const int64_t N = args.n, K = args.k;
  const int64_t groups = K / args.group_size;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t n = row0 + 8 * r;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t k = k0 + 16 * h;
      const bool ok = n < N && k < K;
      const uint4 v = ok ? load_streaming(codes + n * K + k) : make_uint4(0, 0, 0, 0);
      store_words(q.codes[r] + 4 * h, v);
      const int64_t index = n * groups + k / args.group_size;
      q.scale[r][h] = ok ? load_scale(scales, index) : 0.0f;
      q.offset[r][h] = ok && offsets != nullptr ? load_scale(offsets, index) : 0.0f;
    }
  }
}

// MMA step s takes the lane's k = 4s .. 4s+3, i.e. code word s: (k, k+1) into `lo_pair`,
// (k+2, k+3) into `hi_pair` (the slots dequant_step of decode.cu fills for 4-bit codes).
template <typename T>
__device__ __forceinline__ void dequant_int8_step(uint32_t word, float scale, float offset,
                                                  uint32_t& lo_pair, uint32_t& hi_pair) {
  float v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const auto q = static_cast<int8_t>((word >> (8 * j)) & 0xffu);
    v[j] = dequantize_value(static_cast<float>(q), scale, offset);
  }
  lo_pair = ActTraits<T>::pack(v[0], v[1]);
  hi_pair = ActTraits<T>::pack(v[2], v[3]);
}

}  // namespace lorart::cuda
