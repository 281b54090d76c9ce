// The AVX512-VNNI kernels of decode_q8.h (see the lane layout at the top of decode_q8.cpp),
// compiled with -mavx512f -mavx512bw -mavx512vl -mavx512vnni -mfma -mf16c (CMakeLists.txt),
// called only after q8_has_vnni(). Plain pointers in and out (Q8Raw): no std:: inline code
// is instantiated here, so the linker cannot hand an AVX-512 copy of it to the baseline TUs.
#include <cstdint>

#include "cpu/decode_q8.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512VNNI__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

namespace lorart {
namespace cpu {
namespace {

constexpr int64_t kGroup = 32;
inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t chunk_k(bool int8) { return int8 ? 64 : 128; }

// ------------------------------------------------------------------ AVX512-VNNI
// 16 floats of one row's per-group parameters for chunk c: group (first + L / per) in lane L.
inline __m512 lane_params(const Q8Weight& w, const void* p, int64_t first, int64_t count,
                          __m512i idx) {
  const __mmask8 m = static_cast<__mmask8>((1u << count) - 1);
  __m128 v;
  if (w.scales_f16) {
    v = _mm_cvtph_ps(_mm_maskz_loadu_epi16(m, static_cast<const uint16_t*>(p) + first));
  } else {
    v = _mm_maskz_loadu_ps(m, static_cast<const float*>(p) + first);
  }
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v));
}

// Chunk c of a weight row (64 bytes; the row's last chunk may be shorter: masked load).
inline __m512i load_chunk(const uint8_t* row, int64_t c, int64_t chunk_bytes, int64_t row_bytes) {
  const int64_t bytes = min64(chunk_bytes, row_bytes - c * chunk_bytes);
  return bytes == 64 ? _mm512_loadu_si512(row + c * 64)
                     : _mm512_maskz_loadu_epi8((__mmask64{1} << bytes) - 1, row + c * 64);
}

void rows_vnni(const Q8Weight& w, const Q8Raw& x, float* y, int64_t n0, int64_t n1) {
  const int64_t groups = w.k / kGroup, ck = chunk_k(w.int8), gpc = ck / kGroup;
  const int64_t chunks = (w.k + ck - 1) / ck;
  const int64_t row_bytes = w.int8 ? w.k : w.k / 2, chunk_bytes = ck / (w.int8 ? 1 : 2);
  const __m512i idx = w.int8 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                             : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i low4 = _mm512_set1_epi8(0x0F), bias = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i ones = _mm512_set1_epi8(1);
  const bool with_offset = w.offsets != nullptr || w.sym;
  const __m512 minus8 = _mm512_set1_ps(-8.0f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * row_bytes;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i wv = load_chunk(row, c, chunk_bytes, row_bytes);
      const int8_t* xq = x.q + c * ck;
      __m512i ai;
      if (w.int8) {
        const __m512i xu = _mm512_xor_si512(_mm512_loadu_si512(xq), bias);
        ai = _mm512_dpbusd_epi32(_mm512_setzero_si512(), xu, wv);
        const __m512i wsum = _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv);
        ai = _mm512_sub_epi32(ai, _mm512_slli_epi32(wsum, 7));
      } else {
        const __m512i lo = _mm512_and_si512(wv, low4);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
        ai = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
        ai = _mm512_dpbusd_epi32(ai, hi, _mm512_loadu_si512(xq + 64));
      }
      const int64_t first = n * groups + c * gpc, count = min64(gpc, groups - c * gpc);
      const __m512 s = lane_params(w, w.scales, first, count, idx);
      const __m512 d = _mm512_loadu_ps(x.d_lane + c * 16);
      acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ai), d), s, acc);
      if (with_offset) {
        const __m512 o =
            w.offsets ? lane_params(w, w.offsets, first, count, idx) : _mm512_mul_ps(s, minus8);
        acc = _mm512_fmadd_ps(o, _mm512_loadu_ps(x.s_lane + c * 16), acc);
      }
    }
    y[n] = _mm512_reduce_add_ps(acc);
  }
}

// The 16-bit-activation version of rows_vnni: W codes widened to int16, vpdpwssd. Lane L
// of a 32-int16 product sums k pairs (2L, 2L+1) of its operand: 4-bit W, the evens/odds
// of the chunk's first (groups 0-1) or second half (groups 2-3), lane L in group L/8 of
// its half; 8-bit W, one group per 32 k.
void rows_vnni16(const Q8Weight& w, const Q8Raw& x, float* y, int64_t n0, int64_t n1) {
  const int64_t groups = w.k / kGroup, ck = chunk_k(w.int8), gpc = ck / kGroup;
  const int64_t chunks = (w.k + ck - 1) / ck;
  const int64_t row_bytes = w.int8 ? w.k : w.k / 2, chunk_bytes = ck / (w.int8 ? 1 : 2);
  const __m512i half_idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i idx4 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const bool with_offset = w.offsets != nullptr || w.sym;
  const __m512 minus8 = _mm512_set1_ps(-8.0f);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w.codes + n * row_bytes;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i wv = load_chunk(row, c, chunk_bytes, row_bytes);
      const int16_t* xq = x.q16 + c * ck;
      const int64_t first = n * groups + c * gpc, count = min64(gpc, groups - c * gpc);
      if (w.int8) {
        // halves h = 0, 1: k 32h..32h+31 = group 2c + h; lanes of one half share it.
        const __m512i a0 = _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm512_castsi512_si256(wv)),
                                             _mm512_loadu_si512(xq));
        const __m512i a1 = _mm512_madd_epi16(_mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(wv, 1)),
                                             _mm512_loadu_si512(xq + 32));
        // one int32 per half: reduce within the half, then scale per group below
        const __m512 s = lane_params(w, w.scales, first, count, half_idx);
        const __m512 d = _mm512_loadu_ps(x.d_lane + c * 16);
        const __m512i both = _mm512_mask_blend_epi32(
            0xFF00, _mm512_add_epi32(a0, _mm512_shuffle_i64x2(a0, a0, 0x4E)),
            _mm512_add_epi32(a1, _mm512_shuffle_i64x2(a1, a1, 0x4E)));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(both), d), s, acc);
        if (w.offsets != nullptr)
          acc = _mm512_fmadd_ps(lane_params(w, w.offsets, first, count, half_idx),
                                _mm512_loadu_ps(x.s_lane + c * 16), acc);
        continue;
      }
      const __m512i lo = _mm512_and_si512(wv, low4);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low4);
      // first half: evens j 0..31 (lo bytes 0..31), odds likewise; groups 0-1 of the chunk
      __m512i a = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(lo)),
                                    _mm512_loadu_si512(xq));
      a = _mm512_dpwssd_epi32(a, _mm512_cvtepu8_epi16(_mm512_castsi512_si256(hi)),
                              _mm512_loadu_si512(xq + 64));
      __m512i b = _mm512_madd_epi16(_mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(lo, 1)),
                                    _mm512_loadu_si512(xq + 32));
      b = _mm512_dpwssd_epi32(b, _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(hi, 1)),
                              _mm512_loadu_si512(xq + 96));
      const __m512 s = lane_params(w, w.scales, first, count, idx4);
      // a: lane L in group L/8 (0-1); b: group 2 + L/8. Fold both to the 4-group lanes of
      // d_lane/s (lane L in group L/4) by summing adjacent lane pairs of each.
      const __m512i perm =
          _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
      const __m512i perm1 =
          _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
      const __m512i ab = _mm512_add_epi32(_mm512_permutex2var_epi32(a, perm, b),
                                          _mm512_permutex2var_epi32(a, perm1, b));
      const __m512 d = _mm512_loadu_ps(x.d_lane + c * 16);
      acc = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ab), d), s, acc);
      if (with_offset) {
        const __m512 o =
            w.offsets ? lane_params(w, w.offsets, first, count, idx4) : _mm512_mul_ps(s, minus8);
        acc = _mm512_fmadd_ps(o, _mm512_loadu_ps(x.s_lane + c * 16), acc);
      }
    }
    y[n] = _mm512_reduce_add_ps(acc);
  }
}

// q[k] = round(x[k] / d_g) (nearest even, as the scalar path's nearbyintf), 32 at a time.
void quantize_groups_vnni(const float* x, int64_t groups, int8_t* q, int16_t* q16, float* d,
                          float* sum) {
  const float qmax = q16 != nullptr ? 32767.0f : 127.0f;
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 v0 = _mm512_loadu_ps(x + g * 32), v1 = _mm512_loadu_ps(x + g * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float dg = amax / qmax, id = dg != 0.0f ? 1.0f / dg : 0.0f;
    d[g] = dg;
    const __m512 vid = _mm512_set1_ps(id);
    const __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vid));
    const __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vid));
    // The rounded x's sum, for the offset term (see decode_q8.h).
    sum[g] = dg * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1)));
    if (q16 != nullptr) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + g * 32), _mm512_cvtsepi32_epi16(i0));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q16 + g * 32 + 16),
                          _mm512_cvtsepi32_epi16(i1));
      continue;
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * 32), _mm512_cvtsepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + g * 32 + 16), _mm512_cvtsepi32_epi8(i1));
  }
}

}  // namespace

void q8_rows_vnni(const Q8Raw& x, float* y, int64_t n0, int64_t n1) {
  if (x.bits == 16)
    rows_vnni16(*x.w, x, y, n0, n1);
  else
    rows_vnni(*x.w, x, y, n0, n1);
}

void q8_quantize_groups_vnni(const float* x, int64_t groups, int8_t* q, int16_t* q16, float* d,
                             float* sum) {
  quantize_groups_vnni(x, groups, q, q16, d, sum);
}

}  // namespace cpu
}  // namespace lorart

#else  // built without these instruction sets: q8_has_vnni() is false, never called

namespace lorart {
namespace cpu {
void q8_rows_vnni(const Q8Raw&, float*, int64_t, int64_t) {}
void q8_quantize_groups_vnni(const float*, int64_t, int8_t*, int16_t*, float*, float*) {}
}  // namespace cpu
}  // namespace lorart

#endif
