// The 8-bit (``int8``) CPU kernels' plain-C boundary: argument structs filled by the
// int8 binding block of module.cpp, and one kernel table per instruction set (defined by
// isa_scalar.cpp, isa_avx2.cpp and isa_avx512.cpp, which include int8_impl.h).
//
// Layout (lorart/quant.py): W [N, K] as int8 codes q [N, K], row-major; per group of g
// consecutive k (g in 16..256) a scale and an optional offset [N, K/g] (fp32 or fp16):
//     W[n, k] = scales[n, k/g] * q[n, k] + offsets[n, k/g]
#pragma once

#include <cstdint>

#include "cpu/lora_cpu.h"

namespace lorart {
namespace cpu {

struct Int8WeightArgs {
  int64_t n = 0, k = 0;
  const int8_t* q = nullptr;        // [N, K]
  const void* scales = nullptr;     // [N, K/g]
  const void* offsets = nullptr;    // [N, K/g] or nullptr
  DType scale_dtype = DType::kF32;  // kF32 or kF16
  int group_size = 0;               // 16, 32, 64, 128, 256
};

struct Int8ForwardArgs {
  int64_t m = 0;
  DType dtype = DType::kF32;  // of x, bias, A, B and y: kF32 or kBF16
  const void* x = nullptr;    // [M, K], row stride ldx, unit column stride
  int64_t ldx = 0;
  const void* bias = nullptr;  // [N] or nullptr
  void* y = nullptr;           // [M, N], row stride ldy
  int64_t ldy = 0;
  Int8WeightArgs w;
  AdapterArgs lora;  // as for the 4-bit kernels (lora_cpu.h)
};

// forward: y = x Wᵀ + bias + LoRA, the decode GEMV (W dequantized on the fly, read once for
// up to 4 rows of x) up to decode_max_rows rows, else the many-row path (W dequantized a
// block of rows at a time into a per-thread buffer, reused by every row of x).
// dequantize: out [n1 - n0, K] (float32 or bfloat16) = rows n0..n1 of W.
struct Int8KernelTable {
  const char* name;
  void (*forward)(const Int8ForwardArgs&, int64_t decode_max_rows);
  void (*dequantize)(const Int8WeightArgs&, int64_t n0, int64_t n1, DType out_dtype, void* out);
};

const Int8KernelTable* int8_kernels_scalar();
const Int8KernelTable* int8_kernels_avx2();
const Int8KernelTable* int8_kernels_avx512();

}  // namespace cpu
}  // namespace lorart
