// Building blocks of the AVX512-BF16 kernels (isa_avx512bf16.cpp): bf16 conversions, the
// 4-bit decode straight to bf16, the two weight-panel packings, the vdpbf16ps register
// tile and the per-thread scratch. Included once, inside that TU's anonymous namespace
// (compiled with -mavx512bf16), after quant_math.h.
//
// vdpbf16ps (`_mm512_dpbf16_ps(acc, a, b)`) adds, per fp32 lane j, a[2j]·b[2j] + a[2j+1]·b[2j+1]:
// its operands are *pairs* of bf16 along the reduction dimension. So every operand here is
// laid out as 32-bit pairs: x, dy (row-major bf16) already are — pair p of a row is elements
// 2p, 2p+1 — and a weight panel stores, for each reduction pair, 64 output columns of pairs.
//
//   forward   y[m, n]  = Σ_k x[m, k] W[n, k]     panel [K/2 pairs][64 n][2]  (a 32-bit transpose)
//   backward  dx[m, k] = Σ_n dy[m, n] W[n, k]    panel [N/2 pairs][64 k][2]  (a 16-bit interleave)
//
// and the register tile C[MR rows][64 cols] += bcast(a[row, pair]) · panel[pair][64] serves both.

// ------------------------------------------------------------------ per-thread scratch
// Grow-only buffers, one set per thread (OpenMP's threads persist across calls): no large
// allocation per call once the largest shape has been seen.
enum ScratchSlot : int {
  kSlotPanel,
  kSlotTile,
  kSlotCoef,
  kSlotMat,
  kSlotPadA,
  kSlotTrans,
  kSlotCount
};

template <class T>
T* scratch(ScratchSlot slot, int64_t count) {
  struct alignas(64) Line {
    unsigned char bytes[64];
  };
  struct Buf {
    std::unique_ptr<Line[]> data;
    int64_t vectors = 0;
  };
  thread_local Buf bufs[kSlotCount];
  Buf& b = bufs[slot];
  const int64_t need = (count * static_cast<int64_t>(sizeof(T)) + 63) / 64 + 1;
  if (b.vectors < need) {
    b.data.reset(new Line[need]);
    b.vectors = need;
  }
  return reinterpret_cast<T*>(b.data.get());
}

// ------------------------------------------------------------------ conversions
inline __m512 bf16x16_to_f32(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 bf16x16_to_f32_masked(const uint16_t* p, __mmask16 mask) {
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
// Round to nearest even (vcvtneps2bf16); NaN stays NaN.
inline void store_bf16x16(uint16_t* p, __m512 v, __mmask16 mask) {
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  _mm256_mask_storeu_epi16(p, mask, h);
}
// Masks of the first `count` lanes (none when count <= 0).
inline __mmask16 lanes16(int64_t count) {
  if (count <= 0) return 0;
  return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
}
inline __mmask32 lanes32(int64_t count) {
  if (count <= 0) return 0;
  return count >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << count) - 1);
}
// A pair of bf16 at p as one 32-bit value (memcpy: p need not be 4-byte aligned).
inline int32_t load_pair(const uint16_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh>(v); }
inline __m512 dp(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, as_bh(a), as_bh(b));
}

// ------------------------------------------------------------------ weight rows as bf16
// A 4-bit W (layout in quant_math.h) as the bf16 kernels read it.
struct Quant4 {
  const api::WeightArgs& w;
  float table16[16];
  explicit Quant4(const api::WeightArgs& args) : w(args) {
    lorart::fill_code_table(static_cast<lorart::Scheme>(args.scheme), table16);
  }
  float group_param(const void* p, int64_t n, int64_t g) const {
    const int64_t i = n * (w.k / w.group_size) + g;
    if (w.scale_dtype == DType::kF32) return static_cast<const float*>(p)[i];
    return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  }
  const uint8_t* row(int64_t n) const { return w.qweight + n * (w.k / 2); }
  // The 16 values of group g of row n as bf16, in the low 16 words: vpermw's table. A
  // multiply, then an add, as lorart.quant's dequantize rounds them (before bf16).
  __m512i table_bf16(int64_t n, int64_t g) const {
    const float scale = group_param(w.scales, n, g);
    const float offset = w.offsets ? group_param(w.offsets, n, g) : 0.0f;
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(table16), _mm512_set1_ps(scale)),
                                   _mm512_set1_ps(offset));
    return _mm512_zextsi256_si512(reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
};

// 16 packed bytes (32 codes, k in natural order) -> 32 bf16 values: dword j = byte j, its
// low word gets the low nibble (k = 2j) and its high word the high nibble (k = 2j + 1),
// then one vpermw looks all 32 up in the group's table.
inline __m512i decode_bf16(const uint8_t* p, __m512i table) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i idx =
      _mm512_and_si512(_mm512_or_si512(b, _mm512_slli_epi32(b, 12)), _mm512_set1_epi32(0x000F000F));
  return _mm512_permutexvar_epi16(idx, table);
}

// Row n of W, k in [k0, k0 + 32) as 32 bf16 (zero past K or past N). Quantized: k0 is a
// multiple of 32, so the chunk lies inside one group (g >= 32).
struct WeightRows {
  const api::WeightArgs& w;
  const Quant4& q;
  __m512i chunk(int64_t n, int64_t k0) const {
    if (n >= w.n || k0 >= w.k) return _mm512_setzero_si512();
    if (w.quantized) return decode_bf16(q.row(n) + k0 / 2, q.table_bf16(n, k0 / w.group_size));
    const uint16_t* row = static_cast<const uint16_t*>(w.dense) + n * w.k;
    return _mm512_maskz_loadu_epi16(lanes32(w.k - k0), row + k0);
  }
};

// ------------------------------------------------------------------ panel packing
constexpr int kPanelCols = 64;  // output columns of a panel and of the register tile (4 zmm)

// 16x16 transpose of 32-bit elements (r[i] lane j -> r[j] lane i).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Two rounds of 128-bit lane shuffles finish it.
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// Forward panel: panel[p][c] = pair (k0 + 2p, k0 + 2p + 1) of W row n0 + c, for
// p < kc / 2 (kc a multiple of 32) and c < 64.
inline void pack_forward_panel(const WeightRows& wr, int64_t n0, int64_t k0, int64_t kc,
                               int32_t* panel) {
  for (int64_t kk = 0; kk < kc; kk += 32) {
    for (int cg = 0; cg < kPanelCols; cg += 16) {
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = wr.chunk(n0 + cg + i, k0 + kk);
      transpose16x16(r);
      for (int p = 0; p < 16; ++p)
        _mm512_storeu_si512(panel + (kk / 2 + p) * kPanelCols + cg, r[p]);
    }
  }
}

// Backward panel: panel[q][c] = (W[n0 + 2q, k0 + c], W[n0 + 2q + 1, k0 + c]) for q < nc / 2
// (nc even) and c < 64: rows n and n + 1 interleaved word by word.
inline void pack_backward_panel(const WeightRows& wr, int64_t n0, int64_t nc, int64_t k0,
                                int32_t* panel) {
  // unpack{lo,hi}_epi16 interleave within 128-bit lanes; these qword indices put the
  // pairs of k 0..15 and 16..31 of a 32-k chunk in order.
  const __m512i first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t q = 0; q < nc / 2; ++q) {
    const int64_t n = n0 + 2 * q;
    for (int cg = 0; cg < kPanelCols; cg += 32) {
      const __m512i a = wr.chunk(n, k0 + cg), b = wr.chunk(n + 1, k0 + cg);
      const __m512i lo = _mm512_unpacklo_epi16(a, b), hi = _mm512_unpackhi_epi16(a, b);
      _mm512_storeu_si512(panel + q * kPanelCols + cg, _mm512_permutex2var_epi64(lo, first, hi));
      _mm512_storeu_si512(panel + q * kPanelCols + cg + 16,
                          _mm512_permutex2var_epi64(lo, second, hi));
    }
  }
}

// ------------------------------------------------------------------ register tile
// acc[MR][4] += a[i, pair p] (broadcast) · panel[p][0..63] for p < pairs: 4·MR vdpbf16ps per
// pair against 4 panel loads and MR broadcasts. MR = 6 keeps 24 accumulators in registers.
constexpr int kTileRows = 6;

template <int MR>
inline void tile_dp(int64_t pairs, const uint16_t* a, int64_t lda, const int32_t* panel,
                    __m512 acc[kTileRows][4]) {
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t* bp = panel + p * kPanelCols;
    const __m512i b0 = _mm512_loadu_si512(bp), b1 = _mm512_loadu_si512(bp + 16);
    const __m512i b2 = _mm512_loadu_si512(bp + 32), b3 = _mm512_loadu_si512(bp + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512i ai = _mm512_set1_epi32(load_pair(a + i * lda + 2 * p));
      acc[i][0] = dp(acc[i][0], ai, b0);
      acc[i][1] = dp(acc[i][1], ai, b1);
      acc[i][2] = dp(acc[i][2], ai, b2);
      acc[i][3] = dp(acc[i][3], ai, b3);
    }
  }
}

inline void tile_dp_rows(int mr, int64_t pairs, const uint16_t* a, int64_t lda,
                         const int32_t* panel, __m512 acc[kTileRows][4]) {
  switch (mr) {
    case 1:
      tile_dp<1>(pairs, a, lda, panel, acc);
      break;
    case 2:
      tile_dp<2>(pairs, a, lda, panel, acc);
      break;
    case 3:
      tile_dp<3>(pairs, a, lda, panel, acc);
      break;
    case 4:
      tile_dp<4>(pairs, a, lda, panel, acc);
      break;
    case 5:
      tile_dp<5>(pairs, a, lda, panel, acc);
      break;
    default:
      tile_dp<6>(pairs, a, lda, panel, acc);
      break;
  }
}
