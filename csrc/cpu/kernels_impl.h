// The CPU kernels, written once over a small SIMD vocabulary `V` and compiled once per
// instruction set: isa_scalar.cpp, isa_avx2.cpp and isa_avx512.cpp each define V and
// include this file inside an anonymous namespace, so every ISA gets its own copies
// (compiled with its own -m flags) and the linker can never mix them.
//
// V provides: W (float lanes), R (register), zero, load, store, set1, fma, add, hsum,
// load_bf16 (W bfloat16 -> W float), half_to_float, Table + make_table(table16, scale,
// offset) (the 16 dequantized values of one group), and decode(bytes, table, lo, hi):
// W packed bytes -> the values of their W low nibbles (even k) in `lo` and W high nibbles
// (odd k) in `hi`, lane j holding byte lane_byte(j) of the W bytes.
//
// Layout trick shared by every quantized kernel: a "chunk" is 2W consecutive k. decode()
// yields a chunk's values in a fixed permuted order (lo lane j = k 2·lane_byte(j), hi lane
// j = k 2·lane_byte(j) + 1), so x (and dx) are kept in that same order inside each chunk;
// a dot product over k does not care about the order, and each ISA picks the order its
// cheapest unpack produces. Only the borders (x in, dx out) permute.
//
// Requires (by the including TU): <algorithm>, <cstring>, <memory>, <omp.h>, lora_cpu.h,
// quant_math.h included inside the same anonymous namespace (as `lorart::`).

namespace api = ::lorart::cpu;
using api::DType;

using FloatBuf = std::unique_ptr<float[]>;

// Below this much work (multiply-adds or elements) a loop runs on one thread: waking the
// OpenMP team costs more, and on a shared machine a descheduled team member can stall a
// tiny region for a whole scheduler tick (measured: 8x64 decode 6 us alone, ms in a team).
constexpr int64_t kParallelMinWork = int64_t{1} << 16;

inline FloatBuf alloc_floats(int64_t n) { return FloatBuf(new float[n > 0 ? n : 1]); }

inline int64_t dtype_size(DType dt) { return dt == DType::kF32 ? 4 : 2; }

inline const void* advance(const void* p, DType dt, int64_t elems) {
  return static_cast<const char*>(p) + elems * dtype_size(dt);
}

inline float load_f32(const void* p, DType dt, int64_t i) {
  if (dt == DType::kF32) return static_cast<const float*>(p)[i];
  const uint16_t bits = static_cast<const uint16_t*>(p)[i];
  return dt == DType::kBF16 ? lorart::bf16_bits_to_float(bits) : lorart::fp16_bits_to_float(bits);
}

// Outputs are float32 or bfloat16 (float16 inputs never reach the C++ backend).
inline void store_out(void* p, DType dt, int64_t i, float v) {
  if (dt == DType::kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = lorart::float_to_bf16_bits(v);
  }
}

// ------------------------------------------------------------------ adapters
inline int row_adapter(const api::AdapterArgs& l, int64_t m) {
  return l.adapter_ids ? l.adapter_ids[m] : 0;
}
inline bool has_lora(const api::AdapterArgs& l) { return l.a != nullptr && l.num_adapters > 0; }
inline int64_t max_rank(const api::AdapterArgs& l) {
  int64_t r = 0;
  for (int s = 0; s < l.num_adapters; ++s) r = std::max(r, lorart::adapter_rank(l.rank_offsets, s));
  return r;
}

// ------------------------------------------------------------------ vector helpers
// sum_i x[i] * w[i] with w float32 or bfloat16, fp32 accumulation.
template <class V>
float dot(const float* x, const void* w, DType dt, int64_t k) {
  constexpr int W = V::W;
  typename V::R acc0 = V::zero(), acc1 = V::zero();
  int64_t i = 0;
  if (dt == DType::kF32) {
    const float* wf = static_cast<const float*>(w);
    for (; i + 2 * W <= k; i += 2 * W) {
      acc0 = V::fma(V::load(x + i), V::load(wf + i), acc0);
      acc1 = V::fma(V::load(x + i + W), V::load(wf + i + W), acc1);
    }
    for (; i + W <= k; i += W) acc0 = V::fma(V::load(x + i), V::load(wf + i), acc0);
  } else {
    const uint16_t* wb = static_cast<const uint16_t*>(w);
    for (; i + 2 * W <= k; i += 2 * W) {
      acc0 = V::fma(V::load(x + i), V::load_bf16(wb + i), acc0);
      acc1 = V::fma(V::load(x + i + W), V::load_bf16(wb + i + W), acc1);
    }
    for (; i + W <= k; i += W) acc0 = V::fma(V::load(x + i), V::load_bf16(wb + i), acc0);
  }
  float s = V::hsum(V::add(acc0, acc1));
  for (; i < k; ++i) s += x[i] * load_f32(w, dt, i);
  return s;
}

// sum_i x[i] * w[i] for k shorter than one vector (the LoRA expand at rank 8 under
// AVX-512): a plain loop per dtype, without dot()'s horizontal sum of empty vectors and
// per-element dtype switch. It took the rank-8 LoRA epilogue of a 16-row 576x576 decode
// from ~33 to ~14 us (2 threads, this AVX-512 machine).
inline float short_dot(const float* x, const void* w, DType dt, int64_t k) {
  float s = 0.0f;
  if (dt == DType::kF32) {
    const float* wf = static_cast<const float*>(w);
    for (int64_t i = 0; i < k; ++i) s += x[i] * wf[i];
  } else {
    const uint16_t* wb = static_cast<const uint16_t*>(w);
    for (int64_t i = 0; i < k; ++i) s += x[i] * lorart::bf16_bits_to_float(wb[i]);
  }
  return s;
}

// y[i] += alpha * x[i] with x float32 or bfloat16.
template <class V>
void axpy(float alpha, const void* x, DType dt, int64_t k, float* y) {
  constexpr int W = V::W;
  const typename V::R va = V::set1(alpha);
  int64_t i = 0;
  if (dt == DType::kF32) {
    const float* xf = static_cast<const float*>(x);
    for (; i + W <= k; i += W) V::store(y + i, V::fma(va, V::load(xf + i), V::load(y + i)));
  } else {
    const uint16_t* xb = static_cast<const uint16_t*>(x);
    for (; i + W <= k; i += W) V::store(y + i, V::fma(va, V::load_bf16(xb + i), V::load(y + i)));
  }
  for (; i < k; ++i) y[i] += alpha * load_f32(x, dt, i);
}

// Rows of src [m, k] (row stride ld, float32 or bfloat16) as float32; no copy when possible.
template <class V>
const float* rows_as_f32(const void* src, DType dt, int64_t m, int64_t k, int64_t ld,
                         FloatBuf& storage, int64_t* ld_out) {
  if (dt == DType::kF32) {
    *ld_out = ld;
    return static_cast<const float*>(src);
  }
  storage = alloc_floats(m * k);
  float* dst = storage.get();
#pragma omp parallel for schedule(static) if (m * k > kParallelMinWork)
  for (int64_t i = 0; i < m; ++i) {
    const uint16_t* row = static_cast<const uint16_t*>(src) + i * ld;
    int64_t j = 0;
    for (; j + V::W <= k; j += V::W) V::store(dst + i * k + j, V::load_bf16(row + j));
    for (; j < k; ++j) dst[i * k + j] = lorart::bf16_bits_to_float(row[j]);
  }
  *ld_out = k;
  return dst;
}

// x [m, k] -> the chunk-permuted layout [m, k] (see the file comment); k % 2W == 0.
template <class V>
FloatBuf permute_rows(const float* x, int64_t ld, int64_t m, int64_t k) {
  constexpr int W = V::W;
  FloatBuf out = alloc_floats(m * k);
  float* xp = out.get();
#pragma omp parallel for schedule(static) if (m * k > kParallelMinWork)
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t c = 0; c < k; c += 2 * W) {
      for (int j = 0; j < W; ++j) {
        xp[i * k + c + j] = x[i * ld + c + V::lane_byte(j) * 2];
        xp[i * k + c + W + j] = x[i * ld + c + V::lane_byte(j) * 2 + 1];
      }
    }
  }
  return out;
}

// ------------------------------------------------------------------ quantized weight
struct QuantView {
  const api::WeightArgs& w;
  float table16[16];
  explicit QuantView(const api::WeightArgs& args) : w(args) {
    lorart::fill_code_table(static_cast<lorart::Scheme>(args.scheme), table16);
  }
  // fp16 scales go through V::half_to_float (one F16C instruction on x86): the software
  // conversion cost as much as unpacking a whole group.
  template <class V>
  float scale_value(const void* p, int64_t n, int64_t g) const {
    const int64_t i = n * (w.k / w.group_size) + g;
    if (w.scale_dtype == DType::kF32) return static_cast<const float*>(p)[i];
    return V::half_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  // The 16 values codes stand for in group g of row n: table * scale + offset, rounded
  // as lorart.quant's dequantize rounds them (a multiply, then an add).
  template <class V>
  typename V::Table group_table(int64_t n, int64_t g) const {
    return V::make_table(table16, scale_value<V>(w.scales, n, g),
                         w.offsets ? scale_value<V>(w.offsets, n, g) : 0.0f);
  }
  const uint8_t* row(int64_t n) const { return w.qweight + n * (w.k / 2); }
};

// ------------------------------------------------------------------ decode (few rows)
// W rows ahead whose bytes the decode GEMV prefetches (one 4-row block ahead: measured at
// 4096x4096 g128, one thread: 1 row 0.40 -> 0.33 ms, 3 rows 1.35 -> see bench).
constexpr int64_t kPrefetchRows = 4;
// out[i * NT + j] = x_i · W[n0 + j] for MT rows of chunk-permuted x and NT rows of W:
// each packed byte is read and unpacked once for all MT rows.
template <class V, int MT, int NT>
void gemv_quant(const QuantView& q, int64_t n0, const float* xp, int64_t k, int64_t k_begin,
                int64_t k_end, float* out) {
  constexpr int W = V::W;
  using R = typename V::R;
  const int64_t g = q.w.group_size;
  // Two accumulators (even/odd k) per output while registers allow, to hide FMA latency;
  // one when MT x NT outputs already give enough independent chains.
  constexpr int kSplit = MT * NT <= 8 ? 2 : 1;
  R acc[MT][NT][kSplit];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j)
      for (int h = 0; h < kSplit; ++h) acc[i][j][h] = V::zero();
  // Software prefetch of the same bytes kPrefetchRows rows ahead (the next block, usually
  // the same thread's next step): on the dev machine it took the single-thread 4096x4096
  // GEMV from ~400 to ~330 us (torch's int4 kernel: ~410 in the same runs).
  const uint8_t* rows[NT];
  const uint8_t* ahead[NT];
  for (int j = 0; j < NT; ++j) {
    rows[j] = q.row(n0 + j);
    ahead[j] = n0 + kPrefetchRows + j < q.w.n ? q.row(n0 + kPrefetchRows + j) : rows[j];
  }
  for (int64_t gi = k_begin / g; gi < k_end / g; ++gi) {
    typename V::Table tab[NT];
    for (int j = 0; j < NT; ++j) {
      tab[j] = q.template group_table<V>(n0 + j, gi);
      __builtin_prefetch(ahead[j] + (gi * g) / 2);
    }
    for (int64_t kk = gi * g; kk < (gi + 1) * g; kk += 2 * W) {
      for (int j = 0; j < NT; ++j) {
        R lo, hi;
        V::decode(rows[j] + kk / 2, tab[j], lo, hi);
        for (int i = 0; i < MT; ++i) {
          acc[i][j][0] = V::fma(lo, V::load(xp + i * k + kk), acc[i][j][0]);
          acc[i][j][kSplit - 1] = V::fma(hi, V::load(xp + i * k + kk + W), acc[i][j][kSplit - 1]);
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j)
      out[i * NT + j] =
          V::hsum(kSplit == 2 ? V::add(acc[i][j][0], acc[i][j][kSplit - 1]) : acc[i][j][0]);
}

// out[i] = x_i · W[n] for MT rows of natural-order x and a dense W (float32 or bfloat16).
template <class V, int MT>
void gemv_dense(const api::WeightArgs& w, DType dt, int64_t n, const float* x, int64_t ldx,
                float* out) {
  constexpr int W = V::W;
  using R = typename V::R;
  const int64_t k = w.k;
  const void* wrow = advance(w.dense, dt, n * k);
  R acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = V::zero();
  int64_t kk = 0;
  for (; kk + W <= k; kk += W) {
    const R wv = dt == DType::kF32 ? V::load(static_cast<const float*>(wrow) + kk)
                                   : V::load_bf16(static_cast<const uint16_t*>(wrow) + kk);
    for (int i = 0; i < MT; ++i) acc[i] = V::fma(wv, V::load(x + i * ldx + kk), acc[i]);
  }
  for (int i = 0; i < MT; ++i) {
    float s = V::hsum(acc[i]);
    for (int64_t t = kk; t < k; ++t) s += x[i * ldx + t] * load_f32(wrow, dt, t);
    out[i] = s;
  }
}

// t[m, r] = scale_s · x[m] · A[lo_s + r] for r < rank_s (zero beyond): the LoRA shrink.
template <class V>
FloatBuf lora_shrink(const api::AdapterArgs& l, DType dt, const float* x, int64_t ldx, int64_t m,
                     int64_t k, int64_t tr) {
  FloatBuf t = alloc_floats(m * tr);
  float* tp = t.get();
#pragma omp parallel for schedule(static) if (m * tr * k > kParallelMinWork)
  for (int64_t idx = 0; idx < m * tr; ++idx) {
    const int64_t i = idx / tr, r = idx % tr;
    const int s = row_adapter(l, i);
    float v = 0.0f;
    if (s >= 0 && r < lorart::adapter_rank(l.rank_offsets, s)) {
      const void* arow = advance(l.a, dt, (l.rank_offsets[s] + r) * k);
      v = l.scales[s] * dot<V>(x + i * ldx, arow, dt, k);
    }
    tp[idx] = v;
  }
  return t;
}

// y[m, n] = acc + bias[n] + t[m] · B_s[n]: the epilogue every forward path shares.
template <class V>
void finish(const api::ForwardArgs& a, const float* t, int64_t tr, int64_t m, int64_t n,
            float acc) {
  if (a.bias) acc += load_f32(a.bias, a.dtype, n);
  const api::AdapterArgs& l = a.lora;
  if (t != nullptr) {
    const int s = row_adapter(l, m);
    if (s >= 0) {
      const int64_t lo = l.rank_offsets[s], r = lorart::adapter_rank(l.rank_offsets, s);
      const void* brow = advance(l.b, a.dtype, n * l.total_rank + lo);
      acc +=
          r < V::W ? short_dot(t + m * tr, brow, a.dtype, r) : dot<V>(t + m * tr, brow, a.dtype, r);
    }
  }
  store_out(a.y, a.dtype, m * a.ldy + n, acc);
}

// Bᵀ [rank_offsets[S], N] in float32, so the many-row epilogue adds the LoRA expand as
// contiguous axpys over N instead of one short dot product per output element.
template <class V>
FloatBuf lora_b_transposed(const api::AdapterArgs& l, DType dt, int64_t n) {
  const int64_t rused = l.rank_offsets[l.num_adapters];
  FloatBuf bt = alloc_floats(rused * n);
#pragma omp parallel for schedule(static) if (rused * n > kParallelMinWork)
  for (int64_t r = 0; r < rused; ++r)
    for (int64_t j = 0; j < n; ++j) bt[r * n + j] = load_f32(l.b, dt, j * l.total_rank + r);
  return bt;
}

// y[m, :] = row + bias + t[m] · B_sᵀ, vectorized over N (row [N] fp32 is clobbered).
template <class V>
void finish_row(const api::ForwardArgs& a, const float* t, int64_t tr, const float* bt, int64_t m,
                float* row) {
  constexpr int W = V::W;
  const int64_t n = a.w.n;
  if (a.bias) axpy<V>(1.0f, a.bias, a.dtype, n, row);
  const api::AdapterArgs& l = a.lora;
  const int s = t != nullptr ? row_adapter(l, m) : -1;
  if (s >= 0) {
    const int64_t lo = l.rank_offsets[s], r = lorart::adapter_rank(l.rank_offsets, s);
    for (int64_t j = 0; j < r; ++j) axpy<V>(t[m * tr + j], bt + (lo + j) * n, DType::kF32, n, row);
  }
  if (a.dtype == DType::kF32) {
    std::memcpy(static_cast<float*>(a.y) + m * a.ldy, row, n * sizeof(float));
  } else {
    uint16_t* dst = static_cast<uint16_t*>(a.y) + m * a.ldy;
    int64_t j = 0;
    for (; j + W <= n; j += W) V::store_bf16(dst + j, V::load(row + j));
    for (; j < n; ++j) dst[j] = lorart::float_to_bf16_bits(row[j]);
  }
}

// Rows of x sharing one unpack of W in the decode GEMV. 4 rows x 4 W rows (16 AVX-512
// accumulators) beat 8 rows x 2 W rows: 8 rows 1.5 vs 3.0 ms at 4096x4096, one thread.
constexpr int kDecodeRowTile = 4;

constexpr int kDecodeCols = 4;  // rows of W per decode step

// out[i * 4 + j] = x_i · W[n0 + j] for i < MT, j < nt <= 4. Four rows of W run at once
// when V has the registers (V::kWideDecode): with two at a time the 3- and 4-row GEMV
// ran ~2.2x slower (1.35 vs 0.61 ms at 3 rows, 4096x4096, one thread).
template <class V, int MT>
void gemv_quant_cols(const QuantView& q, int64_t n0, int nt, const float* xb, int64_t k,
                     int64_t k_begin, int64_t k_end, float* out) {
  if (V::kWideDecode && MT <= 4 && nt == 4) {
    float part[MT * 4];
    gemv_quant<V, MT, 4>(q, n0, xb, k, k_begin, k_end, part);
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < 4; ++j) out[i * 4 + j] = part[i * 4 + j];
    return;
  }
  for (int j0 = 0; j0 < nt; j0 += 2) {
    float part[MT * 2];
    const int cols = nt - j0 >= 2 ? 2 : 1;
    if (cols == 2) {
      gemv_quant<V, MT, 2>(q, n0 + j0, xb, k, k_begin, k_end, part);
    } else {
      gemv_quant<V, MT, 1>(q, n0 + j0, xb, k, k_begin, k_end, part);
    }
    for (int i = 0; i < MT; ++i)
      for (int c = 0; c < cols; ++c) out[i * 4 + j0 + c] = part[i * cols + c];
  }
}

constexpr int64_t kDecodeTaskBlocks = 16;  // blocks of kDecodeCols W rows per task (64 rows)
constexpr int64_t kDecodeDepth = 1024;     // k per pass when x has > 2 rows (multiple of g)

// Tasks of 64 W rows; with more than two rows of x the reduction runs in 1024-k passes so
// the x rows being read (8 x 4 KB) stay in L1 across the task's W rows: reading whole
// rows of x from L2 for every W row pair bounded the 4-row GEMV at ~4x the 1-row time.
template <class V>
void forward_decode(const api::ForwardArgs& a, const float* x, int64_t ldx, const float* xp,
                    const float* t, int64_t tr) {
  const api::WeightArgs& w = a.w;
  const int64_t m = a.m, n = w.n, k = w.k;
  const QuantView q(w);
  const int64_t kblock = w.quantized && m > 2 ? std::min(k, kDecodeDepth) : std::max<int64_t>(k, 1);
  const int64_t row_tile = kDecodeRowTile;
  const int64_t task_rows = kDecodeTaskBlocks * kDecodeCols;
#pragma omp parallel for schedule(dynamic) if (m * n * k > kParallelMinWork)
  for (int64_t task = 0; task < (n + task_rows - 1) / task_rows; ++task) {
    const int64_t t0 = task * task_rows, t1 = std::min(n, t0 + task_rows);
    for (int64_t m0 = 0; m0 < m; m0 += row_tile) {
      const int mt = static_cast<int>(std::min<int64_t>(row_tile, m - m0));
      float sums[kDecodeRowTile][kDecodeTaskBlocks * kDecodeCols] = {};
      for (int64_t kb = 0; kb < std::max<int64_t>(k, 1); kb += kblock) {
        const int64_t ke = std::min(k, kb + kblock);
        for (int64_t n0 = t0; n0 < t1; n0 += kDecodeCols) {
          const int nt = static_cast<int>(std::min<int64_t>(kDecodeCols, t1 - n0));
          float out[kDecodeRowTile * kDecodeCols];
          if (w.quantized) {
            const float* xb = xp + m0 * k;
#define LORART_GEMV_ROWS(MT)                               \
  case MT:                                                 \
    gemv_quant_cols<V, MT>(q, n0, nt, xb, k, kb, ke, out); \
    break;
            switch (mt) {
              LORART_GEMV_ROWS(1)
              LORART_GEMV_ROWS(2)
              LORART_GEMV_ROWS(3)
              LORART_GEMV_ROWS(4)
            }
#undef LORART_GEMV_ROWS
          } else {
            for (int i0 = 0; i0 < mt; i0 += 4) {
              const int mi = std::min(4, mt - i0);
              const float* xb = x + (m0 + i0) * ldx;
              for (int j = 0; j < nt; ++j) {
                float col[4];
                switch (mi) {
                  case 1:
                    gemv_dense<V, 1>(w, a.dtype, n0 + j, xb, ldx, col);
                    break;
                  case 2:
                    gemv_dense<V, 2>(w, a.dtype, n0 + j, xb, ldx, col);
                    break;
                  case 3:
                    gemv_dense<V, 3>(w, a.dtype, n0 + j, xb, ldx, col);
                    break;
                  default:
                    gemv_dense<V, 4>(w, a.dtype, n0 + j, xb, ldx, col);
                    break;
                }
                for (int i = 0; i < mi; ++i) out[(i0 + i) * kDecodeCols + j] = col[i];
              }
            }
          }
          for (int i = 0; i < mt; ++i)
            for (int j = 0; j < nt; ++j) sums[i][n0 - t0 + j] += out[i * kDecodeCols + j];
        }
      }
      for (int i = 0; i < mt; ++i)
        for (int64_t j = t0; j < t1; ++j) finish<V>(a, t, tr, m0 + i, j, sums[i][j - t0]);
    }
  }
}

// ------------------------------------------------------------------ GEMM (many rows)
constexpr int kGemmRows = 6;         // MR: rows of the register tile (MR x 2 vectors)
constexpr int64_t kGemmDepth = 256;  // KC: reduction block; a multiple of every group size
// Strips of 2W output columns one thread owns for the whole reduction: no barrier per KC
// block (on a shared machine each barrier can wait a scheduler tick for a descheduled
// thread), and the A block [M, KC] stays in L2 across the block's 8 strips.
constexpr int64_t kStripsPerBlock = 8;
constexpr int64_t kGemmTileRows = 96;  // rows of W per dequantized tile (96 x 256 fp32 in L2)

// c[MR, 2W] (+)= a[MR, kc] · bp[kc, 2W] with bp packed row-major (2W floats per k).
template <class V, int MR>
void micro_kernel(int64_t kc, const float* a, int64_t lda, const float* bp, float* c, int64_t ldc,
                  bool first) {
  constexpr int W = V::W;
  using R = typename V::R;
  R acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = V::zero();
  for (int64_t kk = 0; kk < kc; ++kk) {
    const R b0 = V::load(bp + kk * 2 * W), b1 = V::load(bp + kk * 2 * W + W);
    for (int i = 0; i < MR; ++i) {
      const R ai = V::set1(a[i * lda + kk]);
      acc[i][0] = V::fma(ai, b0, acc[i][0]);
      acc[i][1] = V::fma(ai, b1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * ldc;
    if (!first) {
      acc[i][0] = V::add(acc[i][0], V::load(ci));
      acc[i][1] = V::add(acc[i][1], V::load(ci + W));
    }
    V::store(ci, acc[i][0]);
    V::store(ci + W, acc[i][1]);
  }
}

template <class V>
void micro_rows(int64_t mr, int64_t kc, const float* a, int64_t lda, const float* bp, float* c,
                int64_t ldc, bool first) {
  switch (mr) {
    case 1:
      micro_kernel<V, 1>(kc, a, lda, bp, c, ldc, first);
      break;
    case 2:
      micro_kernel<V, 2>(kc, a, lda, bp, c, ldc, first);
      break;
    case 3:
      micro_kernel<V, 3>(kc, a, lda, bp, c, ldc, first);
      break;
    case 4:
      micro_kernel<V, 4>(kc, a, lda, bp, c, ldc, first);
      break;
    case 5:
      micro_kernel<V, 5>(kc, a, lda, bp, c, ldc, first);
      break;
    default:
      micro_kernel<V, 6>(kc, a, lda, bp, c, ldc, first);
      break;
  }
}

// C[m, Npad] (+)= A[m, :] · panel, for every row block of A; panel packed [kc, 2W].
template <class V>
void gemm_rows(int64_t m, int64_t kc, const float* a, int64_t lda, const float* bp, float* c,
               int64_t ldc, bool first) {
  for (int64_t m0 = 0; m0 < m; m0 += kGemmRows)
    micro_rows<V>(std::min<int64_t>(kGemmRows, m - m0), kc, a + m0 * lda, lda, bp, c + m0 * ldc,
                  ldc, first);
}

// Rows n0..n0+nb of W, k in [k0, k0 + kc), as float32 into tile [nb, KC] (k in the
// chunk-permuted order when quantized, natural when dense): contiguous vector stores.
template <class V>
void dequantize_tile(const api::WeightArgs& w, const QuantView& q, DType dt, int64_t n0, int64_t nb,
                     int64_t k0, int64_t kc, float* tile) {
  constexpr int W = V::W;
  for (int64_t r = 0; r < nb; ++r) {
    float* dst = tile + r * kGemmDepth;
    const int64_t n = n0 + r;
    if (w.quantized) {
      const uint8_t* row = q.row(n);
      for (int64_t kk = k0; kk < k0 + kc; kk += w.group_size) {
        const typename V::Table tab = q.template group_table<V>(n, kk / w.group_size);
        for (int64_t c = kk; c < kk + w.group_size; c += 2 * W) {
          typename V::R lo, hi;
          V::decode(row + c / 2, tab, lo, hi);
          V::store(dst + c - k0, lo);
          V::store(dst + c - k0 + W, hi);
        }
      }
    } else if (dt == DType::kF32) {
      std::memcpy(dst, static_cast<const float*>(w.dense) + n * w.k + k0, kc * sizeof(float));
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(w.dense) + n * w.k + k0;
      int64_t kk = 0;
      for (; kk + W <= kc; kk += W) V::store(dst + kk, V::load_bf16(src + kk));
      for (; kk < kc; ++kk) dst[kk] = lorart::bf16_bits_to_float(src[kk]);
    }
  }
}

// y = x Wᵀ computed as yᵀ [N, M] = W xᵀ: a tile of W rows is dequantized once per KC
// block into L2 (row-major, as the unpack produces it) and is the broadcast operand of
// the MR x 2W register tile; xᵀ is packed once per call into [M/2W][K][2W] panels.
// (The first version packed Wᵀ instead: its strided scalar stores cost 17 ms of the
// 18 ms of an 8-row 4096x4096 call.)
template <class V>
void forward_gemm(const api::ForwardArgs& a, const float* x, int64_t ldx, const float* t,
                  int64_t tr) {
  constexpr int NR = 2 * V::W;
  const api::WeightArgs& w = a.w;
  const int64_t m = a.m, n = w.n, k = w.k;
  const int64_t mstrips = (m + NR - 1) / NR, mpad = mstrips * NR;
  const QuantView q(w);
  FloatBuf xpk = alloc_floats(mstrips * k * NR);
#pragma omp parallel for schedule(static) if (m * k > kParallelMinWork)
  for (int64_t st = 0; st < mstrips; ++st)
    for (int64_t kk = 0; kk < k; ++kk)
      for (int c = 0; c < NR; ++c) {
        const int64_t i = st * NR + c;
        xpk[(st * k + kk) * NR + c] = i < m ? x[i * ldx + kk] : 0.0f;
      }
  FloatBuf yt = alloc_floats(n * mpad);
  if (k == 0) std::fill(yt.get(), yt.get() + n * mpad, 0.0f);
  const int64_t blocks = (n + kGemmTileRows - 1) / kGemmTileRows;
#pragma omp parallel if (m * n * k > kParallelMinWork)
  {
    FloatBuf tile = alloc_floats(kGemmTileRows * kGemmDepth);
#pragma omp for schedule(dynamic)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * kGemmTileRows, nb = std::min(kGemmTileRows, n - n0);
      for (int64_t k0 = 0; k0 < k; k0 += kGemmDepth) {
        const int64_t kc = std::min(kGemmDepth, k - k0);
        dequantize_tile<V>(w, q, a.dtype, n0, nb, k0, kc, tile.get());
        for (int64_t st = 0; st < mstrips; ++st)
          gemm_rows<V>(nb, kc, tile.get(), kGemmDepth, xpk.get() + (st * k + k0) * NR,
                       yt.get() + n0 * mpad + st * NR, mpad, k0 == 0);
      }
    }
  }
  FloatBuf bt = t != nullptr ? lora_b_transposed<V>(a.lora, a.dtype, n) : nullptr;
#pragma omp parallel if (m * n > kParallelMinWork)
  {
    FloatBuf row = alloc_floats(n);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) row[j] = yt[j * mpad + i];
      finish_row<V>(a, t, tr, bt.get(), i, row.get());
    }
  }
}

// Dispatch between the fused decode GEMV and the tiled GEMM; the crossover is measured and
// documented in lorart/backend/cpu.py (DECODE_MAX_ROWS) and passed in as decode_max_rows.
template <class V>
void forward(const api::ForwardArgs& a, int64_t decode_max_rows) {
  const api::WeightArgs& w = a.w;
  const int64_t m = a.m, k = w.k;
  if (m == 0 || w.n == 0) return;
  FloatBuf x_store, xp_store, t_store;
  int64_t ldx = 0;
  const float* x = rows_as_f32<V>(a.x, a.dtype, m, k, a.ldx, x_store, &ldx);
  const int64_t tr = has_lora(a.lora) ? max_rank(a.lora) : 0;
  const float* t = nullptr;
  if (tr > 0) {
    t_store = lora_shrink<V>(a.lora, a.dtype, x, ldx, m, k, tr);
    t = t_store.get();
  }
  const float* xg = x;  // the A operand of the base product, in the weight's k order
  int64_t ldg = ldx;
  if (w.quantized) {
    xp_store = permute_rows<V>(x, ldx, m, k);
    xg = xp_store.get();
    ldg = k;
  }
  if (m <= decode_max_rows) {
    forward_decode<V>(a, x, ldx, xg, t, tr);
  } else {
    forward_gemm<V>(a, xg, ldg, t, tr);
  }
}

// ------------------------------------------------------------------ library-GEMM path
// Rows n0..n1 of W dequantized in natural k order into out [n1 - n0, K] (fp32 or bf16):
// the operand of a library GEMM when many bf16 rows make that faster than the fused
// kernels (see lorart/backend/cpu.py, LIBRARY_GEMM_MIN_ROWS).
template <class V>
void dequantize(const api::WeightArgs& w, int64_t n0, int64_t n1, DType dt, void* out) {
  constexpr int NR = 2 * V::W;
  const QuantView q(w);
  const int64_t k = w.k, g = w.group_size;
#pragma omp parallel if ((n1 - n0) * k > kParallelMinWork)
  {
    FloatBuf row_store = alloc_floats(k);
    float* row = row_store.get();
#pragma omp for schedule(static)
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* src = q.row(n);
      for (int64_t gi = 0; gi < k / g; ++gi) {
        const typename V::Table tab = q.template group_table<V>(n, gi);
        for (int64_t c = gi * g; c < (gi + 1) * g; c += NR) {
          typename V::R lo, hi;
          V::decode(src + c / 2, tab, lo, hi);
          V::store_natural(row + c, lo, hi);
        }
      }
      if (dt == DType::kF32) {
        std::memcpy(static_cast<float*>(out) + (n - n0) * k, row, k * sizeof(float));
      } else {
        uint16_t* dst = static_cast<uint16_t*>(out) + (n - n0) * k;
        for (int64_t c = 0; c < k; c += V::W) V::store_bf16(dst + c, V::load(row + c));
      }
    }
  }
}

template <class V>
void lora_add(const api::ForwardArgs& a) {
  const int64_t m = a.m, n = a.w.n, k = a.w.k;
  if (m == 0 || n == 0 || !has_lora(a.lora)) return;
  FloatBuf x_store;
  int64_t ldx = 0;
  const float* x = rows_as_f32<V>(a.x, a.dtype, m, k, a.ldx, x_store, &ldx);
  const int64_t tr = max_rank(a.lora);
  FloatBuf t = lora_shrink<V>(a.lora, a.dtype, x, ldx, m, k, tr);
  FloatBuf bt = lora_b_transposed<V>(a.lora, a.dtype, n);
  api::ForwardArgs no_bias = a;
  no_bias.bias = nullptr;
#pragma omp parallel if (m * n * tr > kParallelMinWork)
  {
    FloatBuf row_store = alloc_floats(n);
    float* row = row_store.get();
#pragma omp for schedule(static)
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) row[j] = load_f32(a.y, a.dtype, i * a.ldy + j);
      finish_row<V>(no_bias, t.get(), tr, bt.get(), i, row);
    }
  }
}

// ------------------------------------------------------------------ backward
// Pack W[n0:n0+nc, k0:k0+2W] (k in chunk-permuted order when quantized), zero past K.
template <class V>
void pack_w(const api::WeightArgs& w, const QuantView& q, DType dt, int64_t n0, int64_t nc,
            int64_t k0, float* bp) {
  constexpr int W = V::W, NR = 2 * W;
  for (int64_t i = 0; i < nc; ++i) {
    const int64_t n = n0 + i;
    if (w.quantized) {
      typename V::R lo, hi;
      V::decode(q.row(n) + k0 / 2, q.template group_table<V>(n, k0 / w.group_size), lo, hi);
      V::store(bp + i * NR, lo);
      V::store(bp + i * NR + W, hi);
    } else {
      const void* wrow = advance(w.dense, dt, n * w.k);
      for (int kk = 0; kk < NR; ++kk)
        bp[i * NR + kk] = k0 + kk < w.k ? load_f32(wrow, dt, k0 + kk) : 0.0f;
    }
  }
}

template <class V>
void backward(const api::BackwardArgs& a) {
  constexpr int W = V::W, NR = 2 * W;
  const api::WeightArgs& w = a.w;
  const api::AdapterArgs& l = a.lora;
  const int64_t m = a.m, n = w.n, k = w.k;
  if (m == 0) return;
  FloatBuf dy_store, x_store, u_store, t_store, bt_store;
  int64_t lddy = 0, ldx = 0;
  const float* dy = rows_as_f32<V>(a.dy, a.dtype, m, n, a.lddy, dy_store, &lddy);
  const float* x = rows_as_f32<V>(a.x, a.dtype, m, k, a.ldx, x_store, &ldx);
  const int64_t tr = has_lora(l) ? max_rank(l) : 0;
  const int64_t rused = tr > 0 ? l.rank_offsets[l.num_adapters] : 0;
  // u[m, r] = scale_s · dy[m] · B_s[:, r] (shared by dx and dA), via Bᵀ [rused, N] in fp32.
  if (tr > 0) {
    bt_store = alloc_floats(rused * n);
    float* bt = bt_store.get();
#pragma omp parallel for schedule(static) if (rused * n > kParallelMinWork)
    for (int64_t r = 0; r < rused; ++r)
      for (int64_t j = 0; j < n; ++j) bt[r * n + j] = load_f32(l.b, a.dtype, j * l.total_rank + r);
    u_store = alloc_floats(m * tr);
    float* u = u_store.get();
#pragma omp parallel for schedule(static) if (m * tr * n > kParallelMinWork)
    for (int64_t idx = 0; idx < m * tr; ++idx) {
      const int64_t i = idx / tr, r = idx % tr;
      const int s = row_adapter(l, i);
      float v = 0.0f;
      if (s >= 0 && r < lorart::adapter_rank(l.rank_offsets, s))
        v = l.scales[s] * dot<V>(dy + i * lddy, bt + (l.rank_offsets[s] + r) * n, DType::kF32, n);
      u[idx] = v;
    }
  }
  if (a.dx) {
    // dx = dy · W, W dequantized one [256, 2W] panel at a time, never whole.
    const QuantView q(w);
    const int64_t strips = (k + NR - 1) / NR, kpad = strips * NR;
    FloatBuf dxacc = alloc_floats(m * kpad);
    const int64_t blocks = (strips + kStripsPerBlock - 1) / kStripsPerBlock;
#pragma omp parallel if (m * n * k > kParallelMinWork)
    {
      FloatBuf bp = alloc_floats(kGemmDepth * NR);
#pragma omp for schedule(dynamic)
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t j1 = std::min(strips, (blk + 1) * kStripsPerBlock);
        for (int64_t n0 = 0; n0 < n; n0 += kGemmDepth) {
          const int64_t nc = std::min(kGemmDepth, n - n0);
          for (int64_t j = blk * kStripsPerBlock; j < j1; ++j) {
            pack_w<V>(w, q, a.dtype, n0, nc, j * NR, bp.get());
            gemm_rows<V>(m, nc, dy + n0, lddy, bp.get(), dxacc.get() + j * NR, kpad, n0 == 0);
          }
        }
      }
    }
    if (n == 0) std::fill(dxacc.get(), dxacc.get() + m * kpad, 0.0f);
#pragma omp parallel if (m * k > kParallelMinWork)
    {
      FloatBuf row_store = alloc_floats(k);
      float* row = row_store.get();
#pragma omp for schedule(static)
      for (int64_t i = 0; i < m; ++i) {
        const float* acc = dxacc.get() + i * kpad;
        if (w.quantized) {
          for (int64_t c = 0; c < k; c += NR)
            for (int jj = 0; jj < W; ++jj) {
              row[c + V::lane_byte(jj) * 2] = acc[c + jj];
              row[c + V::lane_byte(jj) * 2 + 1] = acc[c + W + jj];
            }
        } else {
          std::memcpy(row, acc, k * sizeof(float));
        }
        const int s = tr > 0 ? row_adapter(l, i) : -1;
        if (s >= 0) {
          const int64_t lo = l.rank_offsets[s], r = lorart::adapter_rank(l.rank_offsets, s);
          for (int64_t j = 0; j < r; ++j)
            axpy<V>(u_store[i * tr + j], advance(l.a, a.dtype, (lo + j) * k), a.dtype, k, row);
        }
        for (int64_t j = 0; j < k; ++j) store_out(a.dx, a.dtype, i * a.lddx + j, row[j]);
      }
    }
  }
  if (tr > 0 && a.da && a.db) {
    t_store = lora_shrink<V>(l, a.dtype, x, ldx, m, k, tr);
    const float* t = t_store.get();
    const float* u = u_store.get();
    // dA_s[r] = Σ_{rows of s} u[m, r] x[m]: threads own disjoint k ranges (no races).
#pragma omp parallel for schedule(static) if (m * tr * k > kParallelMinWork)
    for (int64_t k0 = 0; k0 < k; k0 += kGemmDepth) {
      const int64_t kc = std::min(kGemmDepth, k - k0);
      for (int64_t i = 0; i < m; ++i) {
        const int s = row_adapter(l, i);
        if (s < 0) continue;
        const int64_t lo = l.rank_offsets[s], r = lorart::adapter_rank(l.rank_offsets, s);
        for (int64_t j = 0; j < r; ++j)
          axpy<V>(u[i * tr + j], x + i * ldx + k0, DType::kF32, kc, a.da + (lo + j) * k + k0);
      }
    }
    // dB_s[:, r] = Σ_{rows of s} t[m, r] dy[m], accumulated as Bᵀ, threads own n ranges.
    float* dbt = bt_store.get();
    std::fill(dbt, dbt + rused * n, 0.0f);
#pragma omp parallel for schedule(static) if (m * tr * n > kParallelMinWork)
    for (int64_t n0 = 0; n0 < n; n0 += kGemmDepth) {
      const int64_t nc = std::min(kGemmDepth, n - n0);
      for (int64_t i = 0; i < m; ++i) {
        const int s = row_adapter(l, i);
        if (s < 0) continue;
        const int64_t lo = l.rank_offsets[s], r = lorart::adapter_rank(l.rank_offsets, s);
        for (int64_t j = 0; j < r; ++j)
          axpy<V>(t[i * tr + j], dy + i * lddy + n0, DType::kF32, nc, dbt + (lo + j) * n + n0);
      }
    }
#pragma omp parallel for schedule(static) if (n * rused > kParallelMinWork)
    for (int64_t j = 0; j < n; ++j)
      for (int64_t r = 0; r < rused; ++r) a.db[j * l.total_rank + r] = dbt[r * n + j];
  }
}
