// AVX512-BF16 kernels for bfloat16 x: the "avx512bf16" kernel table. Its base products run
// on vdpbf16ps (2 multiply-adds per fp32 lane, twice the fp32 FMA rate) over weights
// decoded straight to bf16; everything it does not cover (float32 x, the 1-4 row decode
// GEMV, dequantize, dA/dB) is the avx512 table's.
//
// forward, many rows (panel GEMM): per 64-column block of W and 2048-k depth, the block is
//   dequantized once into a per-thread panel (256 KiB, L2) that every 6-row tile of x
//   reuses; the 6x64 fp32 tile stays in registers for the whole depth and leaves through
//   the epilogue (bias, the per-row adapter's expand t[m]·B_sᵀ, bf16 store): one pass over y.
// forward, few rows (row streaming): W rows decoded to bf16 in registers, 8 rows of x per
//   decode, no panel; same epilogue on the task's 64 columns.
// backward: dx = dy·W + u·A_s (u = c_s·dy·B_s) as the panel GEMM with W's rows interleaved
//   in pairs along N, and u·A_s in the epilogue.
//
// The shrink t = c_s·x·A_sᵀ and u = c_s·dy·B_s run once per row before the GEMM (M·r dots).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/lora_cpu.h"

#if defined(__AVX512BF16__) && defined(__AVX512F__) && defined(__AVX512BW__) && \
    defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__F16C__)
#include <immintrin.h>

namespace {
// Per-TU copies of the shared helpers (see isa_avx512.cpp).
#include "common/quant_math.h"

namespace api = ::lorart::cpu;
using api::DType;

#include "cpu/bf16_blocks.h"

// Below this many multiply-adds a loop runs on one thread (as kParallelMinWork in
// kernels_impl.h: waking the team costs more).
constexpr int64_t kParallelMinWork = int64_t{1} << 16;
// Rows of x from which the forward uses the panel GEMM instead of row streaming.
// Measured (bf16, rank 16, 2 threads, shared machine, 2026-12-02; see lorart/backend/cpu.py):
// the panel's packing costs as much as 8-16 rows of streaming decode.
constexpr int64_t kPanelMinRows = 48;
constexpr int64_t kPanelDepth = 2048;  // k (or n) per panel: 2048/2 pairs x 64 x 4 B = 256 KiB
constexpr int kStreamRows = 8;         // rows of x per decode in the row-streaming kernel

const api::KernelTable& fallback() { return *api::kernels_avx512(); }

inline int row_adapter(const api::AdapterArgs& l, int64_t m) {
  return l.adapter_ids ? l.adapter_ids[m] : 0;
}
inline int64_t max_rank(const api::AdapterArgs& l) {
  if (l.a == nullptr) return 0;
  int64_t r = 0;
  for (int s = 0; s < l.num_adapters; ++s) r = std::max(r, lorart::adapter_rank(l.rank_offsets, s));
  return r;
}
inline int64_t round_up(int64_t v, int64_t to) { return (v + to - 1) / to * to; }

// Σ_k a[k]·b[k] for two bf16 rows, fp32 accumulation.
float dot_bf16(const uint16_t* a, const uint16_t* b, int64_t k) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; kk += 32) {
    const __mmask32 m = lanes32(k - kk);
    acc = dp(acc, _mm512_maskz_loadu_epi16(m, a + kk), _mm512_maskz_loadu_epi16(m, b + kk));
  }
  return _mm512_reduce_add_ps(acc);
}

// coef[m, j] = c_s · rows[m] · mat[lo_s + j] (j < r_s, zero beyond): the shrink t = x·Aᵀ
// (mat = A [R, K]) or, for the backward, u = dy·B (mat = Bᵀ as bf16).
void lora_coefficients(const api::AdapterArgs& l, const uint16_t* rows, int64_t ld, int64_t m,
                       const uint16_t* mat, int64_t ldmat, int64_t k, int64_t tr, float* coef) {
#pragma omp parallel for schedule(static) if (m * tr * k > kParallelMinWork)
  for (int64_t i = 0; i < m; ++i) {
    const int s = row_adapter(l, i);
    const int64_t r = s >= 0 ? lorart::adapter_rank(l.rank_offsets, s) : 0;
    for (int64_t j = 0; j < tr; ++j)
      coef[i * tr + j] =
          j < r ? l.scales[s] * dot_bf16(rows + i * ld, mat + (l.rank_offsets[s] + j) * ldmat, k)
                : 0.0f;
  }
}

// mat [rows, ld] (fp32, columns >= cols zeroed) from a bf16 source read as src(r, c).
template <class F>
void to_f32_matrix(int64_t rows, int64_t cols, int64_t ld, float* mat, F src) {
#pragma omp parallel for schedule(static) if (rows * cols > kParallelMinWork)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < ld; ++c) mat[r * ld + c] = c < cols ? src(r, c) : 0.0f;
}

// out[m, c0 .. c0 + 64) = acc + bias + Σ_j coef[m, j] · mat[lo_s + j][c0 ..]: the epilogue of
// every kernel here, on a 64-column row segment still in registers.
struct Epilogue {
  uint16_t* out;
  int64_t ldout, cols;
  const uint16_t* bias;  // [cols] or nullptr
  const api::AdapterArgs* lora;
  const float* coef;  // [M, tr] or nullptr
  int64_t tr;
  const float* mat;  // [R_used, ldmat] fp32, zero past cols
  int64_t ldmat;

  void row(int64_t m, int64_t c0, __m512 v[4]) const {
    const int64_t left = cols - c0;
    if (bias)
      for (int c = 0; c < 4; ++c)
        v[c] =
            _mm512_add_ps(v[c], bf16x16_to_f32_masked(bias + c0 + 16 * c, lanes16(left - 16 * c)));
    const int s = coef ? row_adapter(*lora, m) : -1;
    if (s >= 0) {
      const int64_t lo = lora->rank_offsets[s], r = lorart::adapter_rank(lora->rank_offsets, s);
      for (int64_t j = 0; j < r; ++j) {
        const __m512 cj = _mm512_set1_ps(coef[m * tr + j]);
        const float* mj = mat + (lo + j) * ldmat + c0;
        for (int c = 0; c < 4; ++c) v[c] = _mm512_fmadd_ps(cj, _mm512_loadu_ps(mj + 16 * c), v[c]);
      }
    }
    for (int c = 0; c < 4 && 16 * c < left; ++c)
      store_bf16x16(out + m * ldout + c0 + 16 * c, v[c], lanes16(left - 16 * c));
  }
};

// A bf16 matrix whose rows the tile reads in pairs: as given when the reduction length is
// even, else copied with one zero column (a pair must not read past a row's end).
const uint16_t* paired_rows(const void* src, int64_t m, int64_t len, int64_t ld, int64_t* ld_out) {
  const uint16_t* s = static_cast<const uint16_t*>(src);
  if (len % 2 == 0) {
    *ld_out = ld;
    return s;
  }
  uint16_t* d = scratch<uint16_t>(kSlotPadA, m * (len + 1));
  for (int64_t i = 0; i < m; ++i) {
    std::memcpy(d + i * (len + 1), s + i * ld, len * sizeof(uint16_t));
    d[i * (len + 1) + len] = 0;
  }
  *ld_out = len + 1;
  return d;
}

// C [M, cols] = a [M, depth] · Wpanels, with pack(c0, d0, dc, panel) filling the panel of
// columns c0..c0+64 and depth d0..d0+dc (dc a multiple of 32, zero past the real depth).
template <class Pack>
void panel_gemm(int64_t m, int64_t cols, int64_t depth, const uint16_t* a, int64_t lda,
                const Epilogue& epi, Pack pack) {
  const int64_t blocks = (cols + kPanelCols - 1) / kPanelCols;
#pragma omp parallel for schedule(dynamic) if (m * cols * depth > kParallelMinWork)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t c0 = blk * kPanelCols;
    int32_t* panel = scratch<int32_t>(kSlotPanel, kPanelDepth / 2 * kPanelCols);
    float* partial = depth > kPanelDepth ? scratch<float>(kSlotTile, m * kPanelCols) : nullptr;
    for (int64_t d0 = 0; d0 < std::max<int64_t>(depth, 1); d0 += kPanelDepth) {
      const int64_t dc = std::min(kPanelDepth, depth - d0);
      const bool first = d0 == 0, last = d0 + kPanelDepth >= depth;
      if (dc > 0) pack(c0, d0, round_up(dc, 32), panel);
      const int64_t pairs = (dc + 1) / 2;
      for (int64_t m0 = 0; m0 < m; m0 += kTileRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kTileRows, m - m0));
        __m512 acc[kTileRows][4];
        for (int i = 0; i < kTileRows; ++i)
          for (int c = 0; c < 4; ++c)
            acc[i][c] = first || i >= mr
                            ? _mm512_setzero_ps()
                            : _mm512_loadu_ps(partial + (m0 + i) * kPanelCols + 16 * c);
        tile_dp_rows(mr, pairs, a + m0 * lda + d0, lda, panel, acc);
        for (int i = 0; i < mr; ++i) {
          if (last) {
            epi.row(m0 + i, c0, acc[i]);
          } else {
            for (int c = 0; c < 4; ++c)
              _mm512_storeu_ps(partial + (m0 + i) * kPanelCols + 16 * c, acc[i][c]);
          }
        }
      }
    }
  }
}

// out[i][j] = x_{i} · W[n0 + j], i < MT, j < 2, over all K: W rows decoded once for MT rows.
template <int MT, bool kQuant>
void stream_dot(const api::WeightArgs& w, const Quant4& q, const uint16_t* x, int64_t ldx,
                int64_t n0, float out[kStreamRows][kPanelCols], int64_t col) {
  __m512 acc[MT][2];
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
  const int64_t k = w.k;
  const bool two = n0 + 1 < w.n;
  if (kQuant) {
    const int64_t g = w.group_size;
    const uint8_t* r0 = q.row(n0);
    const uint8_t* r1 = q.row(two ? n0 + 1 : n0);
    for (int64_t gi = 0; gi < k / g; ++gi) {
      const __m512i t0 = q.table_bf16(n0, gi), t1 = q.table_bf16(two ? n0 + 1 : n0, gi);
      for (int64_t kk = gi * g; kk < (gi + 1) * g; kk += 32) {
        const __m512i w0 = decode_bf16(r0 + kk / 2, t0), w1 = decode_bf16(r1 + kk / 2, t1);
        for (int i = 0; i < MT; ++i) {
          const __m512i xv = _mm512_loadu_si512(x + i * ldx + kk);
          acc[i][0] = dp(acc[i][0], xv, w0);
          acc[i][1] = dp(acc[i][1], xv, w1);
        }
      }
    }
  } else {
    const uint16_t* r0 = static_cast<const uint16_t*>(w.dense) + n0 * k;
    const uint16_t* r1 = two ? r0 + k : r0;
    for (int64_t kk = 0; kk < k; kk += 32) {
      const __mmask32 mk = lanes32(k - kk);
      const __m512i w0 = _mm512_maskz_loadu_epi16(mk, r0 + kk);
      const __m512i w1 = _mm512_maskz_loadu_epi16(mk, r1 + kk);
      for (int i = 0; i < MT; ++i) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mk, x + i * ldx + kk);
        acc[i][0] = dp(acc[i][0], xv, w0);
        acc[i][1] = dp(acc[i][1], xv, w1);
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    out[i][col] = _mm512_reduce_add_ps(acc[i][0]);
    if (two) out[i][col + 1] = _mm512_reduce_add_ps(acc[i][1]);
  }
}

template <bool kQuant>
void stream_rows(int mt, const api::WeightArgs& w, const Quant4& q, const uint16_t* x, int64_t ldx,
                 int64_t n0, float out[kStreamRows][kPanelCols], int64_t col) {
  switch (mt) {
#define LORART_STREAM_ROWS(MT)                          \
  case MT:                                              \
    stream_dot<MT, kQuant>(w, q, x, ldx, n0, out, col); \
    break;
    LORART_STREAM_ROWS(1)
    LORART_STREAM_ROWS(2)
    LORART_STREAM_ROWS(3)
    LORART_STREAM_ROWS(4)
    LORART_STREAM_ROWS(5)
    LORART_STREAM_ROWS(6)
    LORART_STREAM_ROWS(7)
    default:
      stream_dot<8, kQuant>(w, q, x, ldx, n0, out, col);
      break;
#undef LORART_STREAM_ROWS
  }
}

// y for few rows: tasks of 64 W rows; W rows decoded in pairs for 8 rows of x at a time.
void forward_stream(const api::ForwardArgs& a, const Quant4& q, const Epilogue& epi) {
  const api::WeightArgs& w = a.w;
  const int64_t m = a.m, n = w.n;
  const uint16_t* x = static_cast<const uint16_t*>(a.x);
  const int64_t tasks = (n + kPanelCols - 1) / kPanelCols;
#pragma omp parallel for schedule(dynamic) if (m * n * w.k > kParallelMinWork)
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t t0 = task * kPanelCols, t1 = std::min(n, t0 + kPanelCols);
    for (int64_t m0 = 0; m0 < m; m0 += kStreamRows) {
      const int mt = static_cast<int>(std::min<int64_t>(kStreamRows, m - m0));
      alignas(64) float sums[kStreamRows][kPanelCols] = {};
      for (int64_t n0 = t0; n0 < t1; n0 += 2) {
        if (w.quantized) {
          stream_rows<true>(mt, w, q, x + m0 * a.ldx, a.ldx, n0, sums, n0 - t0);
        } else {
          stream_rows<false>(mt, w, q, x + m0 * a.ldx, a.ldx, n0, sums, n0 - t0);
        }
      }
      for (int i = 0; i < mt; ++i) {
        __m512 v[4];
        for (int c = 0; c < 4; ++c) v[c] = _mm512_load_ps(&sums[i][16 * c]);
        epi.row(m0 + i, t0, v);
      }
    }
  }
}

void forward(const api::ForwardArgs& a, int64_t decode_max_rows) {
  const api::WeightArgs& w = a.w;
  const int64_t m = a.m, n = w.n, k = w.k;
  if (a.dtype != DType::kBF16 || m <= decode_max_rows || m == 0 || n == 0 || k == 0) {
    fallback().forward(a, decode_max_rows);
    return;
  }
  const api::AdapterArgs& l = a.lora;
  const int64_t tr = max_rank(l);
  Epilogue epi{static_cast<uint16_t*>(a.y),
               a.ldy,
               n,
               static_cast<const uint16_t*>(a.bias),
               &l,
               nullptr,
               tr,
               nullptr,
               round_up(n, kPanelCols)};
  if (tr > 0) {
    // t [M, tr] and Bᵀ [R_used, N] (fp32, exact: B is bf16) in the caller's scratch.
    float* t = scratch<float>(kSlotCoef, m * tr);
    lora_coefficients(l, static_cast<const uint16_t*>(a.x), a.ldx, m,
                      static_cast<const uint16_t*>(l.a), k, k, tr, t);
    const int64_t rused = l.rank_offsets[l.num_adapters];
    float* bt = scratch<float>(kSlotMat, rused * epi.ldmat);
    const uint16_t* b = static_cast<const uint16_t*>(l.b);
    to_f32_matrix(rused, n, epi.ldmat, bt, [&](int64_t r, int64_t c) {
      return lorart::bf16_bits_to_float(b[c * l.total_rank + r]);
    });
    epi.coef = t;
    epi.mat = bt;
  }
  const Quant4 q(w);
  if (m < kPanelMinRows) {
    forward_stream(a, q, epi);
    return;
  }
  const WeightRows wr{w, q};
  int64_t ldx = 0;
  const uint16_t* x = paired_rows(a.x, m, k, a.ldx, &ldx);
  panel_gemm(m, n, k, x, ldx, epi, [&](int64_t c0, int64_t d0, int64_t dc, int32_t* panel) {
    pack_forward_panel(wr, c0, d0, dc, panel);
  });
}

// ------------------------------------------------------------------ backward
void backward(const api::BackwardArgs& a) {
  const api::WeightArgs& w = a.w;
  const api::AdapterArgs& l = a.lora;
  const int64_t m = a.m, n = w.n, k = w.k;
  if (a.dtype != DType::kBF16 || a.dx == nullptr || m == 0 || n == 0 || k == 0) {
    fallback().backward(a);
    return;
  }
  const int64_t tr = max_rank(l);
  Epilogue epi{static_cast<uint16_t*>(a.dx), a.lddx, k, nullptr, &l, nullptr, tr, nullptr,
               round_up(k, kPanelCols)};
  if (tr > 0) {
    // u [M, tr] = c_s · dy · B_s via Bᵀ as bf16 [R_used, N]; A as fp32 [R_used, K].
    const int64_t rused = l.rank_offsets[l.num_adapters];
    uint16_t* bt = scratch<uint16_t>(kSlotTrans, rused * n);
    const uint16_t* b = static_cast<const uint16_t*>(l.b);
    for (int64_t r = 0; r < rused; ++r)
      for (int64_t j = 0; j < n; ++j) bt[r * n + j] = b[j * l.total_rank + r];
    float* u = scratch<float>(kSlotCoef, m * tr);
    lora_coefficients(l, static_cast<const uint16_t*>(a.dy), a.lddy, m, bt, n, n, tr, u);
    float* af = scratch<float>(kSlotMat, rused * epi.ldmat);
    const uint16_t* am = static_cast<const uint16_t*>(l.a);
    to_f32_matrix(rused, k, epi.ldmat, af,
                  [&](int64_t r, int64_t c) { return lorart::bf16_bits_to_float(am[r * k + c]); });
    epi.coef = u;
    epi.mat = af;
  }
  const Quant4 q(w);
  const WeightRows wr{w, q};
  int64_t lddy = 0;
  const uint16_t* dy = paired_rows(a.dy, m, n, a.lddy, &lddy);
  panel_gemm(m, k, n, dy, lddy, epi, [&](int64_t c0, int64_t d0, int64_t dc, int32_t* panel) {
    pack_backward_panel(wr, d0, dc, c0, panel);
  });
  if (tr > 0 && a.da && a.db) {
    api::BackwardArgs rest = a;
    rest.dx = nullptr;  // dA, dB per adapter: the avx512 kernels
    fallback().backward(rest);
  }
}

}  // namespace

const ::lorart::cpu::KernelTable* ::lorart::cpu::kernels_avx512bf16() {
  const KernelTable* base = kernels_avx512();
  if (base == nullptr) return nullptr;
  static const KernelTable table{"avx512bf16", &forward, &backward, base->dequantize,
                                 base->lora_add};
  return &table;
}

#else
const ::lorart::cpu::KernelTable* ::lorart::cpu::kernels_avx512bf16() { return nullptr; }
#endif
