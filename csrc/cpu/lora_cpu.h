// The CPU backend's plain-C boundary: argument structs filled by module.cpp from the
// pointers, sizes and strides the Python wrapper passes, and one table of kernels per
// instruction set (isa_scalar.cpp, isa_avx2.cpp, isa_avx512.cpp, isa_avx512bf16.cpp),
// chosen at run time.
#pragma once

#include <cstdint>

namespace lorart {
namespace cpu {

// Element type of x, W (dense), A, B, bias, y and dy (all share x's dtype), and of scales.
enum class DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// The base weight W [N, K]: dense (x's dtype, row-major, contiguous) or 4-bit packed.
struct WeightArgs {
  int64_t n = 0, k = 0;
  bool quantized = false;
  const void* dense = nullptr;       // [N, K] x's dtype
  const uint8_t* qweight = nullptr;  // [N, K/2]
  const void* scales = nullptr;      // [N, K/g]
  const void* offsets = nullptr;     // [N, K/g] asym only, else nullptr
  DType scale_dtype = DType::kF32;   // kF32 or kF16
  int group_size = 0;                // 32, 64, 128, 256
  int scheme = 0;                    // lorart::Scheme
};

// Packed adapters (see lorart/adapters.py): a [R, K], b [N, R] in x's dtype.
struct AdapterArgs {
  const void* a = nullptr;  // nullptr: base only
  const void* b = nullptr;
  int64_t total_rank = 0;                 // R, the row stride of b
  const int64_t* rank_offsets = nullptr;  // [S + 1]
  const float* scales = nullptr;          // [S]
  int num_adapters = 0;
  const int32_t* adapter_ids = nullptr;  // [M] in -1..S-1, or nullptr: every row uses 0
};

struct ForwardArgs {
  int64_t m = 0;
  DType dtype = DType::kF32;
  const void* x = nullptr;  // [M, K], row stride ldx, unit column stride
  int64_t ldx = 0;
  const void* bias = nullptr;  // [N] or nullptr
  void* y = nullptr;           // [M, N], row stride ldy
  int64_t ldy = 0;
  WeightArgs w;
  AdapterArgs lora;
};

struct BackwardArgs {
  int64_t m = 0;
  DType dtype = DType::kF32;
  const void* dy = nullptr;  // [M, N], row stride lddy
  int64_t lddy = 0;
  const void* x = nullptr;  // [M, K], row stride ldx
  int64_t ldx = 0;
  WeightArgs w;
  AdapterArgs lora;
  void* dx = nullptr;  // [M, K] x's dtype, row stride lddx; nullptr: not needed
  int64_t lddx = 0;
  float* da = nullptr;  // [R, K] float32, zero-filled by the caller; nullptr: not needed
  float* db = nullptr;  // [N, R] float32, zero-filled by the caller
};

// forward's decode_max_rows: rows at or below which it runs the fused decode GEMV (measured
// in lorart/backend/cpu.py); tests pass it explicitly to exercise both paths at small shapes.
struct KernelTable {
  const char* name;
  void (*forward)(const ForwardArgs&, int64_t decode_max_rows);
  void (*backward)(const BackwardArgs&);
  // out [n1 - n0, K] (float32 or bfloat16) = rows n0..n1 of a quantized W, dequantized.
  void (*dequantize)(const WeightArgs&, int64_t n0, int64_t n1, DType out_dtype, void* out);
  // y += LoRA(x) for a y that already holds x Wᵀ + bias (the library-GEMM path).
  void (*lora_add)(const ForwardArgs&);
};

// Each returns nullptr when its TU was built without the ISA (e.g. on aarch64).
const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();
// avx512 plus AVX512-BF16 (vdpbf16ps) GEMMs for bfloat16 x; everything else as avx512.
const KernelTable* kernels_avx512bf16();

}  // namespace cpu
}  // namespace lorart
