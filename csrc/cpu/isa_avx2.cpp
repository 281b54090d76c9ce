// AVX2 + FMA kernels: 8 float lanes; a code's value is looked up with two 8-entry vpermps
// and a blend on the code's bit 3, so asym, sym and nf4 share one instruction path.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/int8_cpu.h"  // formats (#14): 8-bit kernels
#include "cpu/lora_cpu.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace {
// Per-TU copies of the shared helpers (see isa_avx512.cpp).
#include "common/quant_math.h"

struct V {
  static constexpr int W = 8;
  static constexpr bool kWideDecode = false;  // 16 registers: 2 W rows at a time
  using R = __m256;
  struct Table {
    __m256 low8, high8;  // values of codes 0..7 and 8..15
  };
  static R zero() { return _mm256_setzero_ps(); }
  static R load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static R set1(float f) { return _mm256_set1_ps(f); }
  static R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm256_add_ps(a, b); }
  static float hsum(R v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  static R load_bf16(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  // p[2j] = lo[j], p[2j + 1] = hi[j] (natural k order of a chunk).
  static void store_natural(float* p, R lo, R hi) {
    const __m256 a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi);
    _mm256_storeu_ps(p, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(p + 8, _mm256_permute2f128_ps(a, b, 0x31));
  }
  static void store_bf16(uint16_t* p, R v) {
    alignas(32) float f[8];
    _mm256_store_ps(f, v);
    for (int i = 0; i < 8; ++i) p[i] = lorart::float_to_bf16_bits(f[i]);
  }
  static Table make_table(const float* table16, float scale, float offset) {
    const __m256 s = _mm256_set1_ps(scale), o = _mm256_set1_ps(offset);
    return {_mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(table16), s), o),
            _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(table16 + 8), s), o)};
  }
  // idx's bits 0..2 pick within a half; `select`'s sign bit (the code's bit 3) picks the half.
  static R lookup(const Table& t, __m256i idx, __m256i select) {
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t.low8, idx),
                            _mm256_permutevar8x32_ps(t.high8, idx), _mm256_castsi256_ps(select));
  }
  // 8 bytes -> 16 codes.
  static constexpr int lane_byte(int j) { return j; }  // lane j holds byte j
  static void decode(const uint8_t* p, const Table& t, R& lo, R& hi) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    lo = lookup(t, b, _mm256_slli_epi32(b, 28));
    hi = lookup(t, _mm256_srli_epi32(b, 4), _mm256_slli_epi32(b, 24));
  }
};

#include "cpu/int8_impl.h"
#include "cpu/kernels_impl.h"
}  // namespace

const ::lorart::cpu::KernelTable* ::lorart::cpu::kernels_avx2() {
  static const KernelTable table{"avx2", &forward<V>, &backward<V>, &dequantize<V>, &lora_add<V>};
  return &table;
}

const ::lorart::cpu::Int8KernelTable* ::lorart::cpu::int8_kernels_avx2() {
  static const Int8KernelTable table{"avx2", &int8k::forward<V>, &int8k::dequantize<V>};
  return &table;
}

#else
const ::lorart::cpu::KernelTable* ::lorart::cpu::kernels_avx2() { return nullptr; }
const ::lorart::cpu::Int8KernelTable* ::lorart::cpu::int8_kernels_avx2() { return nullptr; }
#endif
