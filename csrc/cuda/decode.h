// Host interface of the CUDA decode kernels (decode.cu), free of CUDA types so the
// pybind11 boundary (module.cpp) compiles with the host compiler alone.
//
// One fused layer for M <= 16 rows (decode):
//   y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + sum_j t[m, j] B[n, lo_s + j]
// with s = adapter_ids[m] (-1: base only; adapter_ids == nullptr: every row uses
// adapter 0), lo_s = rank_offsets[s], j < rank_offsets[s + 1] - lo_s, and
//   t[m, j] = lora_scales[s] * sum_k x[m, k] A[lo_s + j, k]      (the shrink kernel)
#pragma once

#include <cstdint>

namespace lorart::cuda {

enum class Act : int { kF16 = 0, kBF16 = 1 };

// Largest M the decode kernels take (one mma n-tile pair of 8 rows each).
constexpr int64_t kMaxRows = 16;

struct DecodeArgs {
  void* y;                      // [M, N] act
  const void* x;                // [M, K] act, contiguous
  const void* weight;           // 4-bit: uint8 [N, K/2]; int8: int8 [N, K]; dense: act [N, K]
  const void* scales;           // [N, K/group] f16|f32 (quantized only)
  const void* offsets;          // like scales: asym always, int8 optionally, else nullptr
  const void* bias;             // [N] act or nullptr
  const void* lora_b;           // [N, ldb] act or nullptr (no adapters)
  const float* lora_t;          // [M, ldt] fp32, already scaled; nullptr iff lora_b is
  const int64_t* rank_offsets;  // [S + 1] device; needed with lora_b
  const int32_t* adapter_ids;   // [M] device in -1..S-1, or nullptr = adapter 0
  int64_t m = 0, n = 0, k = 0;
  int64_t ldb = 0;     // row stride of lora_b (R)
  int64_t ldt = 0;     // row stride of lora_t (max rank)
  int group_size = 0;  // 32..256 (16..256 for int8)
  int scheme = 0;      // lorart::Scheme: 0 asym, 1 sym, 2 nf4, 3 int8
  bool quantized = false;
  bool scales_f32 = false;
  Act act = Act::kF16;
};

struct ShrinkArgs {
  float* t;                     // [M, ldt] fp32 out; only j < rank of the row's adapter written
  const void* x;                // [M, K] act
  const void* lora_a;           // [R, K] act
  const int64_t* rank_offsets;  // [S + 1] device
  const float* lora_scales;     // [S] device fp32
  const int32_t* adapter_ids;   // [M] or nullptr = adapter 0
  int64_t m = 0, k = 0;
  int64_t ldt = 0;  // max rank over the adapters (grid size along j)
  Act act = Act::kF16;
};

// Both throw std::invalid_argument for bad sizes or alignment and std::runtime_error
// naming the CUDA call (or kernel launch) that failed. `stream` is a cudaStream_t.
void launch_decode(const DecodeArgs& args, std::uintptr_t stream);
void launch_shrink(const ShrinkArgs& args, std::uintptr_t stream);

// cudaRuntimeGetVersion / cudaDriverGetVersion (0 when no driver is installed).
int runtime_version();
int driver_version();

}  // namespace lorart::cuda
