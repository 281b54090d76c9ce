// The 8-bit (int8) CPU kernels, fused with LoRA, written once over the SIMD vocabulary `V`
// of the including ISA file (W, R, zero, load, store, set1, fma, add, hsum, load_bf16,
// half_to_float) and compiled once per instruction set, like kernels_impl.h. Everything
// lives in namespace `int8k` so it cannot collide with the 4-bit kernels' names.
//
//     y[i] = x[i] Wᵀ + bias + c_s · (x[i] A_sᵀ) B_sᵀ      s = adapter_ids[i] (-1: none)
//     W[n, k] = scale[n, k/g] · q[n, k] (+ offset[n, k/g])  (int8_cpu.h)
//
// A group (16..256 values) is always a whole number of vectors (W divides 16), so the
// inner loops have no tails. The dequantized weight is fma(q, scale, offset): one rounding
// where lorart.quant rounds twice, well inside the kernels' fp32-accumulation tolerance.
//
// Requires (by the including TU): lora_cpu.h, int8_cpu.h, <algorithm>, <cstring>,
// <memory>, quant_math.h inside the same anonymous namespace (as `lorart::`).

namespace int8k {

namespace api = ::lorart::cpu;
using api::DType;
using Buf = std::unique_ptr<float[]>;

// Below this many multiply-adds a region runs on one thread (as kernels_impl.h: waking the
// OpenMP team costs more than the work).
constexpr int64_t kParallelMinWork = int64_t{1} << 16;
constexpr int kRowTile = 4;        // rows of x sharing one read of W
constexpr int64_t kTaskRows = 32;  // W rows per parallel task (both paths)

inline Buf alloc(int64_t n) { return Buf(new float[n > 0 ? n : 1]); }

// W int8 codes -> W float lanes (the one ISA-specific step of these kernels).
template <class V>
inline typename V::R load_i8(const int8_t* p) {
  if constexpr (V::W == 16) {
#if defined(__AVX512F__)
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#endif
  } else if constexpr (V::W == 8) {
#if defined(__AVX2__)
    return _mm256_cvtepi32_ps(
        _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#endif
  } else {
    static_assert(V::W == 1, "int8 kernels: no int8 load for this vector width");
    return static_cast<float>(*p);
  }
}

inline float load_val(const void* p, DType dt, int64_t i) {
  if (dt == DType::kF32) return static_cast<const float*>(p)[i];
  const uint16_t bits = static_cast<const uint16_t*>(p)[i];
  return dt == DType::kBF16 ? lorart::bf16_bits_to_float(bits) : lorart::fp16_bits_to_float(bits);
}

inline void store_val(void* p, DType dt, int64_t i, float v) {
  if (dt == DType::kF32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = lorart::float_to_bf16_bits(v);
}

// Group g of row n: its scale and offset as float (fp16 through V's F16C conversion).
template <class V>
inline void group_params(const api::Int8WeightArgs& w, int64_t n, int64_t g, float* scale,
                         float* offset) {
  const int64_t i = n * (w.k / w.group_size) + g;
  auto read = [&](const void* p) {
    return w.scale_dtype == DType::kF32 ? static_cast<const float*>(p)[i]
                                        : V::half_to_float(static_cast<const uint16_t*>(p)[i]);
  };
  *scale = read(w.scales);
  *offset = w.offsets ? read(w.offsets) : 0.0f;
}

// dst[k] = W[n, k] as float32 for one row.
template <class V>
void dequantize_row(const api::Int8WeightArgs& w, int64_t n, float* dst) {
  const int8_t* q = w.q + n * w.k;
  for (int64_t g = 0; g < w.k / w.group_size; ++g) {
    float s, o;
    group_params<V>(w, n, g, &s, &o);
    const typename V::R vs = V::set1(s), vo = V::set1(o);
    for (int64_t kk = g * w.group_size; kk < (g + 1) * w.group_size; kk += V::W)
      V::store(dst + kk, V::fma(load_i8<V>(q + kk), vs, vo));
  }
}

// sum_i a[i] * b[i], both float32, k % W == 0 not required.
template <class V>
float dot_f32(const float* a, const float* b, int64_t k) {
  typename V::R acc0 = V::zero(), acc1 = V::zero();
  int64_t i = 0;
  for (; i + 2 * V::W <= k; i += 2 * V::W) {
    acc0 = V::fma(V::load(a + i), V::load(b + i), acc0);
    acc1 = V::fma(V::load(a + i + V::W), V::load(b + i + V::W), acc1);
  }
  for (; i + V::W <= k; i += V::W) acc0 = V::fma(V::load(a + i), V::load(b + i), acc0);
  float s = V::hsum(V::add(acc0, acc1));
  for (; i < k; ++i) s += a[i] * b[i];
  return s;
}

// ------------------------------------------------------------------ LoRA
inline int row_adapter(const api::AdapterArgs& l, int64_t i) {
  return l.adapter_ids ? l.adapter_ids[i] : 0;
}
inline bool has_lora(const api::AdapterArgs& l) { return l.a != nullptr && l.num_adapters > 0; }

// t [M, tr] = c_s · x_i A_sᵀ (zero beyond the row's rank), and the adapters' A and B as
// float32 ([R, K] and Bᵀ [R, N]) so the epilogue is contiguous axpys over N.
struct LoraF32 {
  Buf t, a, bt;
  int64_t tr = 0;
};

template <class V>
LoraF32 lora_prepare(const api::Int8ForwardArgs& f, const float* x, int64_t ldx) {
  const api::AdapterArgs& l = f.lora;
  LoraF32 out;
  if (!has_lora(l)) return out;
  const int64_t m = f.m, k = f.w.k, n = f.w.n;
  const int64_t rused = l.rank_offsets[l.num_adapters];
  for (int s = 0; s < l.num_adapters; ++s)
    out.tr = std::max(out.tr, lorart::adapter_rank(l.rank_offsets, s));
  out.a = alloc(rused * k);
  out.bt = alloc(rused * n);
  float* a = out.a.get();
  float* bt = out.bt.get();
#pragma omp parallel for schedule(static) if (rused * (k + n) > kParallelMinWork)
  for (int64_t r = 0; r < rused; ++r) {
    for (int64_t j = 0; j < k; ++j) a[r * k + j] = load_val(l.a, f.dtype, r * k + j);
    for (int64_t j = 0; j < n; ++j) bt[r * n + j] = load_val(l.b, f.dtype, j * l.total_rank + r);
  }
  out.t = alloc(m * out.tr);
  float* t = out.t.get();
  const int64_t tr = out.tr;
#pragma omp parallel for schedule(static) if (m * tr * k > kParallelMinWork)
  for (int64_t idx = 0; idx < m * tr; ++idx) {
    const int64_t i = idx / tr, r = idx % tr;
    const int s = row_adapter(l, i);
    float v = 0.0f;
    if (s >= 0 && r < lorart::adapter_rank(l.rank_offsets, s))
      v = l.scales[s] * dot_f32<V>(x + i * ldx, a + (l.rank_offsets[s] + r) * k, k);
    t[idx] = v;
  }
  return out;
}

// y[i, n0:n1] = acc[0:n1-n0] + bias + t_i · B_sᵀ (acc is clobbered).
template <class V>
void finish(const api::Int8ForwardArgs& f, const LoraF32& lora, int64_t i, int64_t n0, int64_t n1,
            float* acc) {
  const int64_t cols = n1 - n0, n = f.w.n;
  if (f.bias)
    for (int64_t j = 0; j < cols; ++j) acc[j] += load_val(f.bias, f.dtype, n0 + j);
  const api::AdapterArgs& l = f.lora;
  const int s = lora.t ? row_adapter(l, i) : -1;
  if (s >= 0) {
    const int64_t lo = l.rank_offsets[s], rank = lorart::adapter_rank(l.rank_offsets, s);
    for (int64_t r = 0; r < rank; ++r) {
      const float c = lora.t[i * lora.tr + r];
      const float* b = lora.bt.get() + (lo + r) * n + n0;
      for (int64_t j = 0; j < cols; ++j) acc[j] += c * b[j];
    }
  }
  for (int64_t j = 0; j < cols; ++j) store_val(f.y, f.dtype, i * f.ldy + n0 + j, acc[j]);
}

// ------------------------------------------------------------------ decode GEMV
// out[i * NT + j] = x_i · W[n0 + j] for MT rows of x, W dequantized on the fly: each code
// is read and converted once for all MT rows.
template <class V, int MT, int NT>
void gemv(const api::Int8WeightArgs& w, int64_t n0, const float* x, int64_t ldx, float* out) {
  using R = typename V::R;
  R acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = V::zero();
  const int64_t g = w.group_size;
  for (int64_t gi = 0; gi < w.k / g; ++gi) {
    R vs[NT], vo[NT];
    for (int j = 0; j < NT; ++j) {
      float s, o;
      group_params<V>(w, n0 + j, gi, &s, &o);
      vs[j] = V::set1(s);
      vo[j] = V::set1(o);
    }
    for (int64_t kk = gi * g; kk < (gi + 1) * g; kk += V::W) {
      for (int j = 0; j < NT; ++j) {
        const R wv = V::fma(load_i8<V>(w.q + (n0 + j) * w.k + kk), vs[j], vo[j]);
        for (int i = 0; i < MT; ++i) acc[i][j] = V::fma(wv, V::load(x + i * ldx + kk), acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) out[i * NT + j] = V::hsum(acc[i][j]);
}

// out[i * kTaskRows + (n - t0)] for rows m0..m0+MT of x and W rows t0..t1.
template <class V, int MT>
void gemv_task(const api::Int8WeightArgs& w, int64_t t0, int64_t t1, const float* x, int64_t ldx,
               float* out) {
  int64_t n = t0;
  for (; n + 2 <= t1; n += 2) {
    float part[MT * 2];
    gemv<V, MT, 2>(w, n, x, ldx, part);
    for (int i = 0; i < MT; ++i)
      for (int j = 0; j < 2; ++j) out[i * kTaskRows + n - t0 + j] = part[i * 2 + j];
  }
  if (n < t1) {
    float part[MT];
    gemv<V, MT, 1>(w, n, x, ldx, part);
    for (int i = 0; i < MT; ++i) out[i * kTaskRows + n - t0] = part[i];
  }
}

template <class V>
void forward_decode(const api::Int8ForwardArgs& f, const float* x, int64_t ldx,
                    const LoraF32& lora) {
  const int64_t m = f.m, n = f.w.n, k = f.w.k;
#pragma omp parallel for schedule(dynamic) if (m * n * k > kParallelMinWork)
  for (int64_t task = 0; task < (n + kTaskRows - 1) / kTaskRows; ++task) {
    const int64_t t0 = task * kTaskRows, t1 = std::min(n, t0 + kTaskRows);
    for (int64_t m0 = 0; m0 < m; m0 += kRowTile) {
      float out[kRowTile * kTaskRows];
      const float* xb = x + m0 * ldx;
      switch (std::min<int64_t>(kRowTile, m - m0)) {
        case 1:
          gemv_task<V, 1>(f.w, t0, t1, xb, ldx, out);
          break;
        case 2:
          gemv_task<V, 2>(f.w, t0, t1, xb, ldx, out);
          break;
        case 3:
          gemv_task<V, 3>(f.w, t0, t1, xb, ldx, out);
          break;
        default:
          gemv_task<V, 4>(f.w, t0, t1, xb, ldx, out);
          break;
      }
      for (int64_t i = m0; i < std::min(m, m0 + kRowTile); ++i)
        finish<V>(f, lora, i, t0, t1, out + (i - m0) * kTaskRows);
    }
  }
}

// ------------------------------------------------------------------ many rows
// out[i * ldo + j] = x_i · wbuf_j for MT rows of x and NT dequantized W rows (float32).
template <class V, int MT, int NT>
void tile_dot(const float* x, int64_t ldx, const float* wbuf, int64_t k, float* out, int64_t ldo) {
  using R = typename V::R;
  R acc[MT][NT];
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) acc[i][j] = V::zero();
  for (int64_t kk = 0; kk < k; kk += V::W) {
    R wv[NT];
    for (int j = 0; j < NT; ++j) wv[j] = V::load(wbuf + j * k + kk);
    for (int i = 0; i < MT; ++i) {
      const R xv = V::load(x + i * ldx + kk);
      for (int j = 0; j < NT; ++j) acc[i][j] = V::fma(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MT; ++i)
    for (int j = 0; j < NT; ++j) out[i * ldo + j] = V::hsum(acc[i][j]);
}

// Each task dequantizes kTaskRows rows of W once into a per-thread buffer and multiplies
// every row of x by them in 4x4 register tiles (4x2 and 4x1 at the task's end).
template <class V>
void forward_many(const api::Int8ForwardArgs& f, const float* x, int64_t ldx, const LoraF32& lora) {
  const int64_t m = f.m, n = f.w.n, k = f.w.k;
  const int64_t tasks = (n + kTaskRows - 1) / kTaskRows;
#pragma omp parallel if (m * n * k > kParallelMinWork)
  {
    Buf wbuf = alloc(kTaskRows * k);
    float out[kRowTile * kTaskRows];
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t t0 = task * kTaskRows, t1 = std::min(n, t0 + kTaskRows);
      for (int64_t r = t0; r < t1; ++r) dequantize_row<V>(f.w, r, wbuf.get() + (r - t0) * k);
      for (int64_t m0 = 0; m0 < m; m0 += kRowTile) {
        const int mt = static_cast<int>(std::min<int64_t>(kRowTile, m - m0));
        const float* xb = x + m0 * ldx;
        for (int64_t j = 0; j < t1 - t0;) {
          const float* wb = wbuf.get() + j * k;
          const int64_t left = t1 - t0 - j;
          const int nt = left >= 4 ? 4 : (left >= 2 ? 2 : 1);
#define LORART_INT8_TILE(MT)                                \
  if (nt == 4)                                              \
    tile_dot<V, MT, 4>(xb, ldx, wb, k, out + j, kTaskRows); \
  else if (nt == 2)                                         \
    tile_dot<V, MT, 2>(xb, ldx, wb, k, out + j, kTaskRows); \
  else                                                      \
    tile_dot<V, MT, 1>(xb, ldx, wb, k, out + j, kTaskRows);
          switch (mt) {
            case 1:
              LORART_INT8_TILE(1) break;
            case 2:
              LORART_INT8_TILE(2) break;
            case 3:
              LORART_INT8_TILE(3) break;
            default:
              LORART_INT8_TILE(4) break;
          }
#undef LORART_INT8_TILE
          j += nt;
        }
        for (int64_t i = m0; i < m0 + mt; ++i)
          finish<V>(f, lora, i, t0, t1, out + (i - m0) * kTaskRows);
      }
    }
  }
}

// ------------------------------------------------------------------ entry points
template <class V>
void forward(const api::Int8ForwardArgs& f, int64_t decode_max_rows) {
  if (f.m == 0 || f.w.n == 0) return;
  const int64_t m = f.m, k = f.w.k;
  // x as float32 rows (bf16 converted once; fp32 read in place).
  Buf xbuf;
  const float* x = static_cast<const float*>(f.x);
  int64_t ldx = f.ldx;
  if (f.dtype != DType::kF32) {
    xbuf = alloc(m * k);
#pragma omp parallel for schedule(static) if (m * k > kParallelMinWork)
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < k; ++j) xbuf[i * k + j] = load_val(f.x, f.dtype, i * f.ldx + j);
    x = xbuf.get();
    ldx = k;
  }
  const LoraF32 lora = lora_prepare<V>(f, x, ldx);
  if (m <= decode_max_rows)
    forward_decode<V>(f, x, ldx, lora);
  else
    forward_many<V>(f, x, ldx, lora);
}

template <class V>
void dequantize(const api::Int8WeightArgs& w, int64_t n0, int64_t n1, DType out_dtype, void* out) {
  const int64_t k = w.k;
#pragma omp parallel if ((n1 - n0) * k > kParallelMinWork)
  {
    Buf row = alloc(k);
#pragma omp for schedule(static)
    for (int64_t r = n0; r < n1; ++r) {
      float* dst = out_dtype == DType::kF32 ? static_cast<float*>(out) + (r - n0) * k : row.get();
      dequantize_row<V>(w, r, dst);
      if (out_dtype != DType::kF32)
        for (int64_t j = 0; j < k; ++j) store_val(out, out_dtype, (r - n0) * k + j, dst[j]);
    }
  }
}

}  // namespace int8k
