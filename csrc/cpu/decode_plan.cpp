// DecodePlan::step: one batch-1 Llama decode step in C++ (see decode_plan.h).
//
// The glue loops are tiny (hidden 576, head_dim 64, positions up to a few thousand) but
// run 30x per step; the few that touch every cached position (attention) are compiled
// for AVX-512 / AVX2 / baseline with GCC/Clang function multiversioning (target_clones:
// the loader picks the clone for the running CPU), so this TU needs no ISA flags of its own.
#include "cpu/decode_plan.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && \
    !defined(__SANITIZE_ADDRESS__)
#define LORART_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LORART_CLONES
#endif

namespace lorart {
namespace cpu {
namespace {

// sum_i a[i] b[i] with 16 independent partial sums (vectorizes without -ffast-math).
LORART_CLONES float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  float s = 0;
  for (; i < n; ++i) s += a[i] * b[i];
  for (float v : acc) s += v;
  return s;
}

// y[i] += c x[i]
LORART_CLONES void axpy(float* y, float c, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += c * x[i];
}

// out = x / sqrt(mean(x²) + eps) · w   (as transformers' LlamaRMSNorm in float32)
void rms_norm(const float* x, const float* w, float eps, int64_t n, float* out) {
  const float ms = dot(x, x, n) / static_cast<float>(n);
  const float r = 1.0f / std::sqrt(ms + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// In place on `heads` rows of head_dim: x·cos + roll(x, d/2)·sin± (HF rotate_half).
void rope(float* x, int64_t heads, int64_t hd, const float* cos, const float* sin) {
  const int64_t half = hd / 2;
  float tmp[512];
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * hd;
    std::memcpy(tmp, v, sizeof(float) * hd);
    for (int64_t i = 0; i < hd; ++i) v[i] = tmp[i] * cos[i] + tmp[(i + half) % hd] * sin[i];
  }
}

// out [hd] = softmax(scale · q · K[0..len)ᵀ) V[0..len) for one head; K, V [len, hd] rows.
void attend(const float* q, const float* k, const float* v, int64_t len, int64_t hd, float scale,
            float* scores, float* out) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < len; ++t) {
    scores[t] = scale * dot(q, k + t * hd, hd);
    mx = std::max(mx, scores[t]);
  }
  float sum = 0;
  for (int64_t t = 0; t < len; ++t) {
    scores[t] = std::exp(scores[t] - mx);
    sum += scores[t];
  }
  std::fill(out, out + hd, 0.0f);
  for (int64_t t = 0; t < len; ++t) axpy(out, scores[t] / sum, v + t * hd, hd);
}

}  // namespace

void DecodePlan::linear(const KernelTable* table, const Int8KernelTable* table8, int idx,
                        const float* x, float* y) {
  PlanLinear& l = linears_[static_cast<size_t>(idx)];
  if (l.q8) {
    q8_quantize(x, l.k, l.qw.int8, &xq_, vnni_, l.q8_bits);
    q8_gemv(l.qw, xq_, y, vnni_);
    const float* bias = static_cast<const float*>(l.int8 ? l.f8.bias : l.f.bias);
    if (bias != nullptr)
      for (int64_t j = 0; j < l.n; ++j) y[j] += bias[j];
  } else if (l.int8) {
    l.f8.m = 1;
    l.f8.x = x;
    l.f8.y = y;
    table8->forward(l.f8, 4);
  } else {
    l.f.m = 1;
    l.f.x = x;
    l.f.y = y;
    table->forward(l.f, 1);
  }
  for (int64_t r = 0; r < l.rank; ++r) {
    const float t = dot(x, l.lora_a + r * l.k, l.k);
    const int64_t lo = l.lo[static_cast<size_t>(r)], hi = l.hi[static_cast<size_t>(r)];
    axpy(y + lo, t, l.lora_bt + r * l.n + lo, hi - lo);
  }
}

void DecodePlan::step(const KernelTable* table, const Int8KernelTable* table8, float* x,
                      int64_t pos, float* logits) {
  const PlanDims& d = dims_;
  if (pos < 0 || pos >= d.max_len) throw std::invalid_argument("decode step: pos out of range");
  const int64_t hd = d.head_dim, nh = d.n_head, nkv = d.n_kv, hidden = d.hidden;
  const int64_t group = nh / nkv, len = pos + 1;
  h_.resize(static_cast<size_t>(std::max(hidden, d.inter)));
  qkv_.resize(static_cast<size_t>((nh + 2 * nkv) * hd));
  attn_.resize(static_cast<size_t>(nh * hd));
  gu_.resize(static_cast<size_t>(2 * d.inter));
  tmp_.resize(static_cast<size_t>(hidden));
  scores_.resize(static_cast<size_t>(d.max_len));
  const float* cos = d.cos + pos * hd;
  const float* sin = d.sin + pos * hd;
  for (const PlanLayer& L : layers_) {
    rms_norm(x, L.attn_norm, L.attn_eps, hidden, h_.data());
    linear(table, table8, L.qkv, h_.data(), qkv_.data());
    float* q = qkv_.data();
    float* k = q + nh * hd;
    float* v = k + nkv * hd;
    rope(q, nh + nkv, hd, cos, sin);  // q and k heads are adjacent
    for (int64_t j = 0; j < nkv; ++j) {
      std::memcpy(L.k_cache + (j * d.max_len + pos) * hd, k + j * hd, sizeof(float) * hd);
      std::memcpy(L.v_cache + (j * d.max_len + pos) * hd, v + j * hd, sizeof(float) * hd);
    }
    for (int64_t h = 0; h < nh; ++h) {
      const int64_t j = h / group;
      attend(q + h * hd, L.k_cache + j * d.max_len * hd, L.v_cache + j * d.max_len * hd, len, hd,
             d.attn_scale, scores_.data(), attn_.data() + h * hd);
    }
    linear(table, table8, L.o, attn_.data(), tmp_.data());
    for (int64_t i = 0; i < hidden; ++i) x[i] += tmp_[i];
    rms_norm(x, L.mlp_norm, L.mlp_eps, hidden, h_.data());
    linear(table, table8, L.gate_up, h_.data(), gu_.data());
    const float* g = gu_.data();
    const float* u = g + d.inter;
    for (int64_t i = 0; i < d.inter; ++i) h_[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
    linear(table, table8, L.down, h_.data(), tmp_.data());
    for (int64_t i = 0; i < hidden; ++i) x[i] += tmp_[i];
  }
  rms_norm(x, d.final_norm, d.final_eps, hidden, h_.data());
  std::memcpy(x, h_.data(), sizeof(float) * hidden);
  linear(table, table8, d.lm_head, x, logits);
}

}  // namespace cpu
}  // namespace lorart
