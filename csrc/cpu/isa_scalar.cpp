// Portable kernels (one float lane, no intrinsics): compile on any CPU, and are the
// reference the SIMD paths are tested against besides lorart.reference.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/int8_cpu.h"  // formats (#14): 8-bit kernels
#include "cpu/lora_cpu.h"

namespace {
// Per-TU copies of the shared helpers (see isa_avx512.cpp).
#include "common/quant_math.h"

struct V {
  static constexpr int W = 1;
  static constexpr bool kWideDecode = false;  // 16 registers: 2 W rows at a time
  using R = float;
  struct Table {
    float values[16];
  };
  static R zero() { return 0.0f; }
  static R load(const float* p) { return *p; }
  static void store(float* p, R v) { *p = v; }
  static R set1(float f) { return f; }
  static R fma(R a, R b, R c) { return a * b + c; }
  static R add(R a, R b) { return a + b; }
  static float hsum(R v) { return v; }
  static float half_to_float(uint16_t h) { return lorart::fp16_bits_to_float(h); }
  static R load_bf16(const uint16_t* p) { return lorart::bf16_bits_to_float(*p); }
  static void store_natural(float* p, R lo, R hi) {
    p[0] = lo;
    p[1] = hi;
  }
  static void store_bf16(uint16_t* p, R v) { *p = lorart::float_to_bf16_bits(v); }
  static Table make_table(const float* table16, float scale, float offset) {
    Table t;
    for (int q = 0; q < 16; ++q)
      t.values[q] = lorart::dequantize_value(table16[q], scale, 0.0f) + offset;
    return t;
  }
  static constexpr int lane_byte(int j) { return j; }  // lane j holds byte j
  static void decode(const uint8_t* p, const Table& t, R& lo, R& hi) {
    lo = t.values[*p & 15];
    hi = t.values[*p >> 4];
  }
};

#include "cpu/int8_impl.h"
#include "cpu/kernels_impl.h"
}  // namespace

const ::lorart::cpu::KernelTable* ::lorart::cpu::kernels_scalar() {
  static const KernelTable table{"scalar", &forward<V>, &backward<V>, &dequantize<V>, &lora_add<V>};
  return &table;
}

const ::lorart::cpu::Int8KernelTable* ::lorart::cpu::int8_kernels_scalar() {
  static const Int8KernelTable table{"scalar", &int8k::forward<V>, &int8k::dequantize<V>};
  return &table;
}
