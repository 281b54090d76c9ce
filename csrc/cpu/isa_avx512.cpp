// AVX-512 (F + BW) kernels: 16 float lanes; a code's value is one vpermps lookup in a
// 16-entry table held in a register, so asym, sym and nf4 share one instruction path.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/int8_cpu.h"  // formats (#14): 8-bit kernels
#include "cpu/lora_cpu.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace {
// Per-TU copies of the shared helpers: inline functions compiled with -mavx512f must not be
// merged by the linker with the baseline copies the scalar TU uses.
#include "common/quant_math.h"

struct V {
  static constexpr int W = 16;
  static constexpr bool kWideDecode = true;  // registers for 4 W rows x 4 x rows
  using R = __m512;
  struct Table {
    __m512 values;
  };
  static R zero() { return _mm512_setzero_ps(); }
  static R load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static R set1(float f) { return _mm512_set1_ps(f); }
  static R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static R add(R a, R b) { return _mm512_add_ps(a, b); }
  static float hsum(R v) { return _mm512_reduce_add_ps(v); }
  static float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
  static R load_bf16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  // p[2j] = lo[j], p[2j + 1] = hi[j] (natural k order of a chunk).
  static void store_natural(float* p, R lo, R hi) {
    const __m512 a = _mm512_unpacklo_ps(lo, hi), b = _mm512_unpackhi_ps(lo, hi);
    const __m512i first = _mm512_set_epi32(23, 22, 21, 20, 7, 6, 5, 4, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i second =
        _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 27, 26, 25, 24, 11, 10, 9, 8);
    _mm512_storeu_ps(p, _mm512_permutex2var_ps(a, first, b));
    _mm512_storeu_ps(p + 16, _mm512_permutex2var_ps(a, second, b));
  }
  // Round to nearest even, NaN kept NaN (as float_to_bf16_bits).
  static void store_bf16(uint16_t* p, R v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, lsb), _mm512_set1_epi32(0x7fff)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan,
                              _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static Table make_table(const float* table16, float scale, float offset) {
    const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(table16), _mm512_set1_ps(scale));
    return {_mm512_add_ps(t, _mm512_set1_ps(offset))};
  }
  // 16 bytes -> 32 codes; vpermps reads only the low 4 bits of each index, so the low
  // nibble needs no mask.
  static constexpr int lane_byte(int j) { return j; }  // lane j holds byte j
  static void decode(const uint8_t* p, const Table& t, R& lo, R& hi) {
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    lo = _mm512_permutexvar_ps(b, t.values);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t.values);
  }
};

#include "cpu/int8_impl.h"
#include "cpu/kernels_impl.h"
}  // namespace

const ::lorart::cpu::KernelTable* ::lorart::cpu::kernels_avx512() {
  static const KernelTable table{"avx512", &forward<V>, &backward<V>, &dequantize<V>, &lora_add<V>};
  return &table;
}

const ::lorart::cpu::Int8KernelTable* ::lorart::cpu::int8_kernels_avx512() {
  static const Int8KernelTable table{"avx512", &int8k::forward<V>, &int8k::dequantize<V>};
  return &table;
}

#else
const ::lorart::cpu::KernelTable* ::lorart::cpu::kernels_avx512() { return nullptr; }
const ::lorart::cpu::Int8KernelTable* ::lorart::cpu::int8_kernels_avx512() { return nullptr; }
#endif
