// Int8-activation one-row GEMV (see decode_q8.h): the scalar reference, the activation
// layout and the dispatch; the AVX512-VNNI version of the same arithmetic lives in
// decode_q8_vnni.cpp (compiled with its own -m flags) and runs only after q8_has_vnni().
//
// Lanes: vpdpbusd sums 4 adjacent byte products into one int32 lane. 4-bit W: a 64-byte
// load holds 128 k (4 groups); its low nibbles are the even k, high nibbles the odd k, so
// x is stored per 128-k chunk as [64 even | 64 odd] and lane L of both products belongs
// to group L/4. 8-bit W: a 64-byte load is 64 k (2 groups), lane L in group L/8; x is
// stored as is and offset by +128 to be vpdpbusd's unsigned operand (Σ(x+128)w − 128Σw).
#include "cpu/decode_q8.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#define LORART_Q8_X86 1  // the VNNI kernels exist (decode_q8_vnni.cpp, its own -m flags)
#endif

namespace lorart {
namespace cpu {
namespace {
#include "common/quant_math.h"

constexpr int64_t kGroup = 32;
constexpr int64_t kRowBlock = 64;                       // W rows per parallel task
constexpr int64_t kParallelMinWork = int64_t{1} << 18;  // weights below: one thread

inline int64_t chunk_k(bool int8) { return int8 ? 64 : 128; }

inline float scale_at(const Q8Weight& w, int64_t i, const void* p) {
  return w.scales_f16 ? lorart::fp16_bits_to_float(static_cast<const uint16_t*>(p)[i])
                      : static_cast<const float*>(p)[i];
}

// ------------------------------------------------------------------ scalar reference
void rows_scalar(const Q8Weight& w, const Q8Activation& x, float* y, int64_t n0, int64_t n1) {
  const int64_t groups = w.k / kGroup, ck = chunk_k(w.int8);
  for (int64_t n = n0; n < n1; ++n) {
    float acc = 0.0f;
    for (int64_t g = 0; g < groups; ++g) {
      int64_t isum = 0;
      for (int64_t kk = g * kGroup; kk < (g + 1) * kGroup; ++kk) {
        int32_t qw, qx;
        size_t at;
        if (w.int8) {
          qw = static_cast<int8_t>(w.codes[n * w.k + kk]);
          at = static_cast<size_t>(kk);
        } else {
          const uint8_t byte = w.codes[n * (w.k / 2) + kk / 2];
          qw = (kk % 2 == 0) ? (byte & 0x0F) : (byte >> 4);
          const int64_t c = kk / ck, j = (kk % ck) / 2;  // chunked even/odd order
          at = static_cast<size_t>(c * ck + (kk % 2) * 64 + j);
        }
        qx = x.bits == 16 ? x.q16[at] : x.q[at];
        isum += qw * qx;
      }
      const float s = scale_at(w, n * groups + g, w.scales);
      const float o = w.offsets ? scale_at(w, n * groups + g, w.offsets) : w.sym ? -8.0f * s : 0.0f;
      acc += s * x.d[static_cast<size_t>(g)] * static_cast<float>(isum) +
             o * x.sum[static_cast<size_t>(g)];
    }
    y[n] = acc;
  }
}

void quantize_groups_scalar(const float* x, int64_t groups, int8_t* q, int16_t* q16, float* d,
                            float* sum) {
  const float qmax = q16 != nullptr ? 32767.0f : 127.0f;
  for (int64_t g = 0; g < groups; ++g) {
    float amax = 0.0f;
    for (int64_t i = 0; i < kGroup; ++i) amax = std::max(amax, std::fabs(x[g * kGroup + i]));
    const float dg = amax / qmax, id = dg != 0.0f ? 1.0f / dg : 0.0f;
    d[g] = dg;
    int32_t qsum = 0;
    for (int64_t i = 0; i < kGroup; ++i) {
      const float v = std::nearbyint(x[g * kGroup + i] * id);
      qsum += static_cast<int32_t>(v);
      if (q16 != nullptr)
        q16[g * kGroup + i] = static_cast<int16_t>(v);
      else
        q[g * kGroup + i] = static_cast<int8_t>(v);
    }
    sum[g] = dg * static_cast<float>(qsum);  // the rounded x's sum (see decode_q8.h)
  }
}

}  // namespace

bool q8_has_vnni() {
#ifdef LORART_Q8_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

template <class T>
void lay_out(const std::vector<T>& natural, int64_t k, int64_t ck, bool for_int8,
             std::vector<T>* out) {
  const int64_t chunks = (k + ck - 1) / ck;
  out->assign(static_cast<size_t>(chunks * ck), 0);
  if (for_int8) {
    std::copy(natural.begin(), natural.end(), out->begin());
    return;
  }
  for (int64_t kk = 0; kk < k; ++kk)
    (*out)[static_cast<size_t>((kk / ck) * ck + (kk % 2) * 64 + (kk % ck) / 2)] =
        natural[static_cast<size_t>(kk)];
}

void q8_quantize(const float* x, int64_t k, bool for_int8, Q8Activation* out, bool vnni, int bits) {
  const int64_t groups = k / kGroup, ck = chunk_k(for_int8), chunks = (k + ck - 1) / ck;
  out->k = k;
  out->bits = bits;
  out->d.resize(static_cast<size_t>(groups));
  out->sum.resize(static_cast<size_t>(groups));
  std::vector<int8_t> natural8(bits == 8 ? static_cast<size_t>(k) : 0);
  std::vector<int16_t> natural16(bits == 16 ? static_cast<size_t>(k) : 0);
  int8_t* q8 = bits == 8 ? natural8.data() : nullptr;
  int16_t* q16 = bits == 16 ? natural16.data() : nullptr;
#ifdef LORART_Q8_X86
  if (vnni)
    q8_quantize_groups_vnni(x, groups, q8, q16, out->d.data(), out->sum.data());
  else
#endif
    quantize_groups_scalar(x, groups, q8, q16, out->d.data(), out->sum.data());
  if (bits == 16)
    lay_out(natural16, k, ck, for_int8, &out->q16);
  else
    lay_out(natural8, k, ck, for_int8, &out->q);
  // Per-lane copies of d and sum (see the top of the file): lane L of chunk c is in group
  // c·(ck/32) + L / lanes_per_group.
  const int64_t per = for_int8 ? 8 : 4, gpc = ck / kGroup;
  out->d_lane.assign(static_cast<size_t>(chunks * 16), 0.0f);
  out->s_lane.assign(static_cast<size_t>(chunks * 16), 0.0f);
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t lane = 0; lane < 16; ++lane) {
      const int64_t g = c * gpc + lane / per;
      if (g >= groups) continue;
      out->d_lane[static_cast<size_t>(c * 16 + lane)] = out->d[static_cast<size_t>(g)];
      out->s_lane[static_cast<size_t>(c * 16 + lane)] =
          out->sum[static_cast<size_t>(g)] / static_cast<float>(per);
    }
}

void q8_gemv(const Q8Weight& w, const Q8Activation& x, float* y, bool vnni) {
  const int64_t blocks = (w.n + kRowBlock - 1) / kRowBlock;
#pragma omp parallel for schedule(static) if (w.n * w.k > kParallelMinWork)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * kRowBlock, n1 = std::min(w.n, n0 + kRowBlock);
#ifdef LORART_Q8_X86
    if (vnni) {
      const Q8Raw raw{&w, x.q.data(), x.q16.data(), x.d_lane.data(), x.s_lane.data(), x.bits};
      q8_rows_vnni(raw, y, n0, n1);
      continue;
    }
#endif
    rows_scalar(w, x, y, n0, n1);
  }
}

}  // namespace cpu
}  // namespace lorart
