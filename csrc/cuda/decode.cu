// CUDA decode kernels: y = x Wᵀ + bias + per-row LoRA for M <= 16 rows, W packed 4-bit
// (asym / sym / nf4, groups of 32..256 along K), 8-bit (int8 codes, groups of 16..256,
// optional offsets; int8_lane.cuh) or dense fp16/bf16.
//
// Two launches per layer:
//  1. shrink_kernel (only with adapters): t[m, j] = c_s · x[m] · A_s[j], fp32 [M, max_rank],
//     one block per (j, m).
//     A separate launch because every output block needs all of t: computing it inside
//     the fused kernel would re-read A_s once per block (N/16 times) or need a grid-wide
//     barrier. The tiny launch reads each used A row once; t (<= 16 x 128 floats) then
//     sits in L2 for the fused kernel.
//  2. decode_kernel: one block of 8 warps per 16 * NT output features. The packed weight
//     is streamed once with 16-byte loads that bypass L1 (each byte is used once; the
//     next chunk's loads are issued before the current one is dequantized),
//     dequantized in registers into fp16/bf16, and multiplied with all M rows on the
//     tensor cores (mma.m16n8k16, fp32 accumulation; see fragments.cuh for the k-order
//     trick that makes the packed layout MMA-friendly without re-packing). The 8 warps
//     split K (warp w takes 128-k chunks w, w+8, ...), their partial sums meet in
//     shared memory, and the epilogue adds bias and each row's own adapter
//     (sum_j t[m, j] B[n, lo_s + j]) before writing y once.
//     Dequantization: fp16 activations with fp16 scales (asym/sym) take a packed-half
//     path (two weights per LOP3 + HSUB2 + HFMA2); bf16, fp32 scales and nf4 take an
//     fp32 path (quant_math.h's dequantize_value, then one rounding to the MMA type).
//     8-bit codes always take the fp32 path (int8_loop: 32 bytes per row per lane, two
//     streaming loads, a scale per 16-k half so groups of 16 work), one n-tile per block.
//
// Activations are read by each warp straight from global memory through L1 rather
// than staged in shared memory: with split-K every 128-k chunk of x is used by exactly
// one warp of a block (no reuse a stage would buy, only a barrier per tile), the NT
// n-tiles of a warp reuse the x fragments from registers, and blocks share x through
// L2 (x is at most 16 x K x 2 bytes, e.g. 256 KiB at K = 8192).
//
// None of this has run on a GPU yet: the tile shapes (8 warps, NT in {1, 2}, the NT
// switch point, one chunk of prefetch, 2 blocks per SM) are reasoned, not measured.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "common/quant_math.h"
#include "cuda/check.cuh"
#include "cuda/decode.h"
#include "cuda/fragments.cuh"
#include "cuda/int8_lane.cuh"

namespace lorart::cuda {
namespace {

// 8 warps split K: a 4096 x 4096 layer has only 256 blocks of 16 features, so the
// bytes in flight per SM come from warps per block and from unrolling the k-loop.
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
// Use two 16-row n-tiles per block (x fragments reused twice) once there are at least
// this many single-tile blocks per SM, i.e. when parallelism is plentiful anyway.
constexpr int64_t kTwoTileBlocksPerSm = 8;

// Dequantize one lane's 32 codes of one weight row for MMA step s into A registers
// a[r] (k + 0, k + 1) and a[2 + r] (k + 2, k + 3), where r = 0 for row g, 1 for row g+8.
template <typename T, bool kTable>
__device__ __forceinline__ void dequant_step(const uint32_t (&codes)[4], int s, float scale,
                                             float offset, float code_bias, const float* table,
                                             uint32_t& lo_pair, uint32_t& hi_pair) {
  // Step s uses bytes 2s and 2s+1 of the lane's 16 bytes: codes 4s .. 4s+3.
  const uint32_t bits = codes[s >> 1] >> ((s & 1) * 16);
  float v[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t q = (bits >> (4 * j)) & 15u;
    const float cv = kTable ? table[q] : code_value_arith(q, code_bias);
    v[j] = dequantize_value(cv, scale, offset);
  }
  lo_pair = ActTraits<T>::pack(v[0], v[1]);
  hi_pair = ActTraits<T>::pack(v[2], v[3]);
}

// fp16 fast path (fp16 activations, fp16 scales, asym/sym): two codes per instruction.
// (v & 0x000f000f) | 0x64006400 turns the nibbles at bits 0 and 16 of v into the fp16
// pair (1024 + q_a, 1024 + q_b); subtracting 1024 (1032 for sym) is exact, and one
// HFMA2 q * scale + offset rounds once, so each weight is the correctly rounded fp16 of
// its exact value (no worse than the fp32 path's rounding). Word w of a lane's codes
// (codes 8w .. 8w+7 of its 32) yields, shifted by 0, 4, 8, 12 bits, the pairs
// (8w, 8w+4), (8w+1, 8w+5), (8w+2, 8w+6), (8w+3, 8w+7): MMA step 2w takes the first two
// as its (slot 2t, 2t+1) and (slot 2t+8, 2t+9) registers, step 2w+1 the last two.
// permute_x_pairs gives the activations the same k-order.
__device__ __forceinline__ uint32_t dequant_pair_f16(uint32_t v, __half2 code_bias, __half2 scale,
                                                     __half2 offset) {
  const uint32_t bits = (v & 0x000f000fu) | 0x64006400u;
  __half2 q;
  memcpy(&q, &bits, sizeof(bits));
  const __half2 w = __hfma2(__hsub2(q, code_bias), scale, offset);
  uint32_t out;
  memcpy(&out, &w, sizeof(out));
  return out;
}

__device__ __forceinline__ void dequant_step_f16(const uint32_t (&codes)[4], int s,
                                                 __half2 code_bias, __half2 scale, __half2 offset,
                                                 uint32_t& lo_pair, uint32_t& hi_pair) {
  const uint32_t word = codes[s >> 1] >> ((s & 1) * 8);  // step 2w+1 starts at nibble 2
  lo_pair = dequant_pair_f16(word, code_bias, scale, offset);
  hi_pair = dequant_pair_f16(word >> 4, code_bias, scale, offset);
}

// Reorder one lane's 16 activation words (pairs (2i, 2i+1)) into the fast path's k-order:
// words 4w .. 4w+3 become (8w, 8w+4), (8w+1, 8w+5), (8w+2, 8w+6), (8w+3, 8w+7).
__device__ __forceinline__ void permute_x_pairs(uint32_t (&words)[16]) {
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const uint32_t x01 = words[4 * w], x23 = words[4 * w + 1];
    const uint32_t x45 = words[4 * w + 2], x67 = words[4 * w + 3];
    words[4 * w] = __byte_perm(x01, x45, 0x5410);      // (x0, x4)
    words[4 * w + 1] = __byte_perm(x01, x45, 0x7632);  // (x1, x5)
    words[4 * w + 2] = __byte_perm(x23, x67, 0x5410);  // (x2, x6)
    words[4 * w + 3] = __byte_perm(x23, x67, 0x7632);  // (x3, x7)
  }
}

// One lane's packed codes and group parameters of rows g and g + 8 for one chunk.
struct QuantLane {
  uint32_t codes[2][4];
  float scale[2];
  float offset[2];
};

template <typename ScaleT>
__device__ __forceinline__ void load_quant_lane(const DecodeArgs& args, int64_t row0, int64_t k0,
                                                QuantLane& q) {
  const auto* qweight = static_cast<const uint8_t*>(args.weight);
  const auto* scales = static_cast<const ScaleT*>(args.scales);
  const auto* offsets = static_cast<const ScaleT*>(args.offsets);
  const int64_t N = args.n, K = args.k;
  const int64_t groups = K / args.group_size;
  const int64_t group = k0 / args.group_size;  // a lane's 32 k lie in one group
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t n = row0 + 8 * r;
    // K % 32 == 0 for packed weights, so a lane's 32 k are all in or all out.
    const bool ok = n < N && k0 < K;
    const uint4 v = ok ? load_streaming(qweight + n * (K / 2) + k0 / 2) : make_uint4(0, 0, 0, 0);
    store_words(q.codes[r], v);
    q.scale[r] = ok ? load_scale(scales, n * groups + group) : 0.0f;
    q.offset[r] = ok && offsets != nullptr ? load_scale(offsets, n * groups + group) : 0.0f;
  }
}

// B fragments of one chunk: activation rows g (and g + 8 when MT = 16), zero beyond M, K.
template <typename T, int MT, bool kVec, bool kHalf2>
__device__ __forceinline__ void load_x_lane(const DecodeArgs& args, int g, int64_t k0,
                                            uint32_t (&xw)[MT / 8][16]) {
  const auto* x = static_cast<const T*>(args.x);
#pragma unroll
  for (int h = 0; h < MT / 8; ++h) {
    const int64_t m = g + 8 * h;
    const bool row_ok = m < args.m;
    load_lane_k<kVec>(x + (row_ok ? m : 0) * args.k, k0, args.k, row_ok, xw[h]);
    if constexpr (kHalf2) permute_x_pairs(xw[h]);
  }
}

// The k-loop of one warp over a packed weight: accumulates its share of K into acc.
// The next chunk's codes and scales are loaded before this chunk is dequantized, so
// each lane keeps 2 x NT x 2 16-byte weight loads in flight (only 8 registers each).
template <typename T, typename ScaleT, int MT, int NT, bool kTable>
__device__ __forceinline__ void quant_loop(const DecodeArgs& args, int64_t n_base, int warp, int g,
                                           int t, const float* table, float (&acc)[NT][MT / 8][4]) {
  constexpr int kMHalves = MT / 8;
  constexpr bool kHalf2 = !kTable && std::is_same_v<T, __half> && std::is_same_v<ScaleT, __half>;
  const bool sym = args.scheme == static_cast<int>(Scheme::kSym);
  const float code_bias = sym ? 8388616.0f : 8388608.0f;
  const __half2 code_bias2 = __float2half2_rn(sym ? 1032.0f : 1024.0f);
  const int64_t num_chunks = (args.k + kChunkK - 1) / kChunkK;
  const int64_t lane_k = kLaneK * t;

  QuantLane next[NT];
  if (warp < num_chunks) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      load_quant_lane<ScaleT>(args, n_base + 16 * nt + g, warp * kChunkK + lane_k, next[nt]);
    }
  }
#pragma unroll 1
  for (int64_t chunk = warp; chunk < num_chunks; chunk += kWarps) {
    QuantLane cur[NT];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) cur[nt] = next[nt];
    const int64_t following = chunk + kWarps;
    if (following < num_chunks) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        load_quant_lane<ScaleT>(args, n_base + 16 * nt + g, following * kChunkK + lane_k, next[nt]);
      }
    }
    uint32_t xw[kMHalves][16];
    load_x_lane<T, MT, true, kHalf2>(args, g, chunk * kChunkK + lane_k, xw);

#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const QuantLane& q = cur[nt];
      __half2 scale2[2], offset2[2];
      if constexpr (kHalf2) {  // fp16 scales: the round trip through float is exact
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          scale2[r] = __float2half2_rn(q.scale[r]);
          offset2[r] = __float2half2_rn(q.offset[r]);
        }
      }
#pragma unroll
      for (int s = 0; s < kChunkK / 16; ++s) {
        uint32_t a[4];
        if constexpr (kHalf2) {
          dequant_step_f16(q.codes[0], s, code_bias2, scale2[0], offset2[0], a[0], a[2]);
          dequant_step_f16(q.codes[1], s, code_bias2, scale2[1], offset2[1], a[1], a[3]);
        } else {
          dequant_step<T, kTable>(q.codes[0], s, q.scale[0], q.offset[0], code_bias, table, a[0],
                                  a[2]);
          dequant_step<T, kTable>(q.codes[1], s, q.scale[1], q.offset[1], code_bias, table, a[1],
                                  a[3]);
        }
#pragma unroll
        for (int h = 0; h < kMHalves; ++h) {
          mma_16816<T>(acc[nt][h], a, xw[h][2 * s], xw[h][2 * s + 1]);
        }
      }
    }
  }
}

// The k-loop of one warp over 8-bit codes, shaped like quant_loop (next chunk's codes and
// scales loaded before this one is dequantized): 2 rows x 2 16-byte loads in flight a lane.
template <typename T, typename ScaleT, int MT>
__device__ __forceinline__ void int8_loop(const DecodeArgs& args, int64_t n_base, int warp, int g,
                                          int t, float (&acc)[1][MT / 8][4]) {
  constexpr int kMHalves = MT / 8;
  const int64_t num_chunks = (args.k + kChunkK - 1) / kChunkK;
  const int64_t lane_k = kLaneK * t;
  Int8Lane next;
  if (warp < num_chunks) load_int8_lane<ScaleT>(args, n_base + g, warp * kChunkK + lane_k, next);
#pragma unroll 1
  for (int64_t chunk = warp; chunk < num_chunks; chunk += kWarps) {
    const Int8Lane q = next;
    const int64_t following = chunk + kWarps;
    if (following < num_chunks) {
      load_int8_lane<ScaleT>(args, n_base + g, following * kChunkK + lane_k, next);
    }
    uint32_t xw[kMHalves][16];
    load_x_lane<T, MT, true, false>(args, g, chunk * kChunkK + lane_k, xw);
#pragma unroll
    for (int s = 0; s < kChunkK / 16; ++s) {
      const int h = s >> 2;  // 16-k half of the lane's 32 k
      uint32_t a[4];
      dequant_int8_step<T>(q.codes[0][s], q.scale[0][h], q.offset[0][h], a[0], a[2]);
      dequant_int8_step<T>(q.codes[1][s], q.scale[1][h], q.offset[1][h], a[1], a[3]);
#pragma unroll
      for (int hm = 0; hm < kMHalves; ++hm) {
        mma_16816<T>(acc[0][hm], a, xw[hm][2 * s], xw[hm][2 * s + 1]);
      }
    }
  }
}

// The k-loop of one warp over a dense fp16/bf16 weight (64 bytes per row per lane and
// chunk already keep enough loads in flight; no prefetch).
template <typename T, int MT, int NT, bool kVec>
__device__ __forceinline__ void dense_loop(const DecodeArgs& args, int64_t n_base, int warp, int g,
                                           int t, float (&acc)[NT][MT / 8][4]) {
  constexpr int kMHalves = MT / 8;
  const int64_t N = args.n, K = args.k;
  const auto* weight = static_cast<const T*>(args.weight);
  const int64_t num_chunks = (K + kChunkK - 1) / kChunkK;
#pragma unroll 1
  for (int64_t chunk = warp; chunk < num_chunks; chunk += kWarps) {
    const int64_t k0 = chunk * kChunkK + kLaneK * t;  // this lane's 32 contiguous k
    uint32_t xw[kMHalves][16];
    load_x_lane<T, MT, kVec, false>(args, g, k0, xw);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t w[2][16];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t n = n_base + 16 * nt + g + 8 * r;
        const bool row_ok = n < N;
        load_lane_k_streaming<kVec>(weight + (row_ok ? n : 0) * K, k0, K, row_ok, w[r]);
      }
#pragma unroll
      for (int s = 0; s < kChunkK / 16; ++s) {
        const uint32_t a[4] = {w[0][2 * s], w[1][2 * s], w[0][2 * s + 1], w[1][2 * s + 1]};
#pragma unroll
        for (int h = 0; h < kMHalves; ++h) {
          mma_16816<T>(acc[nt][h], a, xw[h][2 * s], xw[h][2 * s + 1]);
        }
      }
    }
  }
}

// Two blocks (16 warps) per SM caps registers at 128, which every wide-load variant
// fits without spilling (ptxas -warn-spills is an error in the build); the narrow dense
// fallback (odd K) needs ~160 and gets one block per SM.
// kInt8 (with kQuant): 8-bit codes through int8_loop (NT = 1).
template <typename T, typename ScaleT, int MT, int NT, bool kQuant, bool kVec, bool kInt8>
__global__ void __launch_bounds__(kThreads, kVec ? 2 : 1) decode_kernel(const DecodeArgs args) {
  constexpr int kMHalves = MT / 8;
  constexpr int kTileN = 16 * NT;
  __shared__ float table[16];
  __shared__ float partial[kWarps][kTileN][MT];

  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kTileN;

  bool use_table = false;
  if constexpr (kQuant && !kInt8) {
    // One thread, constant indices: the fully unrolled fill keeps quant_math.h's NF4
    // constants out of local memory (a per-thread dynamic index would spill them).
    if (threadIdx.x == 0) fill_code_table(static_cast<Scheme>(args.scheme), table);
    __syncthreads();
    use_table = args.scheme == static_cast<int>(Scheme::kNf4);
  }

  float acc[NT][kMHalves][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int h = 0; h < kMHalves; ++h) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][h][e] = 0.0f;
    }
  }
  // The branch is uniform and hoisted out of the k-loop: nf4 looks codes up in the
  // shared table, asym/sym compute them (no shared-memory traffic per element).
  if constexpr (kInt8) {
    static_assert(kQuant && NT == 1, "8-bit codes: quantized, one n-tile per block");
    int8_loop<T, ScaleT, MT>(args, n_base, warp, g, t, acc);
  } else if constexpr (kQuant) {
    if (use_table) {
      quant_loop<T, ScaleT, MT, NT, true>(args, n_base, warp, g, t, table, acc);
    } else {
      quant_loop<T, ScaleT, MT, NT, false>(args, n_base, warp, g, t, table, acc);
    }
  } else {
    dense_loop<T, MT, NT, kVec>(args, n_base, warp, g, t, acc);
  }

  // C fragment of lane (g, t): e = 0, 1 -> (n = g, m = 2t + e); e = 2, 3 -> (n = g + 8, ...).
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int h = 0; h < kMHalves; ++h) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        partial[warp][16 * nt + g + 8 * (e >> 1)][8 * h + 2 * t + (e & 1)] = acc[nt][h][e];
      }
    }
  }
  __syncthreads();

  // Epilogue: consecutive threads take consecutive n, so y rows are written coalesced.
  using Traits = ActTraits<T>;
  const int64_t M = args.m, N = args.n;
  const auto* bias = static_cast<const T*>(args.bias);
  const auto* lora_b = static_cast<const T*>(args.lora_b);
  auto* y = static_cast<T*>(args.y);
  for (int idx = static_cast<int>(threadIdx.x); idx < kTileN * MT; idx += kThreads) {
    const int n_local = idx % kTileN;
    const int m = idx / kTileN;
    const int64_t n = n_base + n_local;
    if (m >= M || n >= N) continue;
    float v = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][n_local][m];  // fixed order
    if (bias != nullptr) v += Traits::to_float(bias[n]);
    if (lora_b != nullptr) {
      const int s = args.adapter_ids != nullptr ? args.adapter_ids[m] : 0;
      if (s >= 0) {
        const int64_t lo = args.rank_offsets[s];
        const int64_t rank = adapter_rank(args.rank_offsets, s);
        const T* b_row = lora_b + n * args.ldb + lo;
        const float* t_row = args.lora_t + m * args.ldt;
        for (int64_t j = 0; j < rank; ++j) v += t_row[j] * Traits::to_float(b_row[j]);
      }
    }
    y[m * N + n] = Traits::from_float(v);
  }
}

// One block per (rank index j, row m): t[m, j] = c_s · x[m] · A[lo_s + j], fp32. A whole
// block splits K so each dot product is a few loads deep per thread (latency, not a
// long serial loop, is what a decode-sized shrink is bound by).
template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) shrink_kernel(const ShrinkArgs args) {
  using Traits = ActTraits<T>;
  __shared__ float warp_sums[kWarps];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
  const int64_t j = blockIdx.x;
  const int64_t m = blockIdx.y;
  const int s = args.adapter_ids != nullptr ? args.adapter_ids[m] : 0;
  // Uniform over the block (depends on blockIdx only), so no thread misses the barrier.
  if (s < 0 || j >= adapter_rank(args.rank_offsets, s)) return;
  const int64_t K = args.k;
  const auto* x_row = static_cast<const T*>(args.x) + m * K;
  const auto* a_row = static_cast<const T*>(args.lora_a) + (args.rank_offsets[s] + j) * K;

  float sum = 0.0f;
  if constexpr (kVec) {  // K % 8 == 0 and 16-byte aligned rows
    for (int64_t k = 8 * static_cast<int64_t>(threadIdx.x); k < K; k += 8 * kThreads) {
      uint32_t xv[4], av[4];
      store_words(xv, load_cached(x_row + k));
      store_words(av, load_cached(a_row + k));
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 xf = Traits::unpack(xv[i]);
        const float2 af = Traits::unpack(av[i]);
        sum = fmaf(xf.x, af.x, sum);
        sum = fmaf(xf.y, af.y, sum);
      }
    }
  } else {
    for (int64_t k = threadIdx.x; k < K; k += kThreads) {
      sum = fmaf(Traits::to_float(x_row[k]), Traits::to_float(a_row[k]), sum);
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (lane == 0) warp_sums[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += warp_sums[w];  // fixed order: deterministic
    args.t[m * args.ldt + j] = total * args.lora_scales[s];
  }
}

// ------------------------------------------------------------------------ host side
bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument("lorart CUDA: " + message);
}

int sm_count() {
  int device = 0;
  LORART_CUDA_CHECK(cudaGetDevice(&device));
  int count = 0;
  LORART_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

template <typename T, typename ScaleT, int MT, int NT, bool kQuant, bool kVec, bool kInt8>
void launch_tiles(const DecodeArgs& args, cudaStream_t stream) {
  const int64_t blocks = (args.n + 16 * NT - 1) / (16 * NT);
  require(blocks <= 0x7fffffff, "N too large for one grid");
  decode_kernel<T, ScaleT, MT, NT, kQuant, kVec, kInt8>
      <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
  LORART_CUDA_CHECK_LAUNCH("decode_kernel");
}

template <typename T, typename ScaleT, bool kQuant, bool kVec, bool kInt8 = false>
void dispatch_tiles(const DecodeArgs& args, cudaStream_t stream) {
  // Two n-tiles per block for 4-bit weights only. Dense weights: 4x the bytes per k of
  // packed ones, so the x traffic a second n-tile saves matters 4x less, and the extra 32
  // weight registers would cost occupancy; 8-bit codes: 32 registers of codes per n-tile
  // and prefetch already, so a second tile would spill under the 2-blocks-per-SM cap.
  constexpr bool kTwoTileKernels = kQuant && !kInt8;
  const bool two_tiles = kTwoTileKernels && (args.n + 15) / 16 >= kTwoTileBlocksPerSm * sm_count();
  if (args.m <= 8) {
    if constexpr (kTwoTileKernels) {
      if (two_tiles) return launch_tiles<T, ScaleT, 8, 2, kQuant, kVec, kInt8>(args, stream);
    }
    return launch_tiles<T, ScaleT, 8, 1, kQuant, kVec, kInt8>(args, stream);
  }
  if constexpr (kTwoTileKernels) {
    if (two_tiles) return launch_tiles<T, ScaleT, 16, 2, kQuant, kVec, kInt8>(args, stream);
  }
  return launch_tiles<T, ScaleT, 16, 1, kQuant, kVec, kInt8>(args, stream);
}

template <typename T>
void dispatch_weight(const DecodeArgs& args, cudaStream_t stream) {
  if (args.quantized && args.scheme == static_cast<int>(Scheme::kInt8)) {
    if (args.scales_f32) return dispatch_tiles<T, float, true, true, true>(args, stream);
    return dispatch_tiles<T, __half, true, true, true>(args, stream);
  }
  if (args.quantized) {
    if (args.scales_f32) return dispatch_tiles<T, float, true, true>(args, stream);
    return dispatch_tiles<T, __half, true, true>(args, stream);
  }
  // Wide 16-byte loads need K % 8 == 0 (rows start 16-byte aligned) and aligned bases;
  // odd K takes the element-wise path (same kernel, narrow loads).
  const bool vec = args.k % 8 == 0 && aligned16(args.x) && aligned16(args.weight);
  if (vec) return dispatch_tiles<T, float, false, true>(args, stream);
  return dispatch_tiles<T, float, false, false>(args, stream);
}

void validate(const DecodeArgs& a) {
  require(a.m >= 1 && a.m <= kMaxRows, "decode kernels take 1.." + std::to_string(kMaxRows) +
                                           " rows, got M=" + std::to_string(a.m));
  require(a.n >= 1 && a.k >= 1, "N and K must be positive");
  require(a.y != nullptr && a.x != nullptr && a.weight != nullptr, "y, x and weight are required");
  require(a.act == Act::kF16 || a.act == Act::kBF16, "act must be float16 or bfloat16");
  if (a.quantized) {
    const int g = a.group_size;
    const bool int8 = a.scheme == static_cast<int>(Scheme::kInt8);
    require(g == 32 || g == 64 || g == 128 || g == 256 || (int8 && g == 16),
            "group_size must be 32, 64, 128 or 256 (also 16 for int8), got " + std::to_string(g));
    require(a.k % g == 0, "K must be a multiple of group_size");
    require(
        a.scheme >= 0 && a.scheme <= 3,
        "scheme must be 0 (asym), 1 (sym), 2 (nf4) or 3 (int8), got " + std::to_string(a.scheme));
    require(a.scales != nullptr, "scales are required for a quantized weight");
    require(int8 || (a.offsets != nullptr) == (a.scheme == static_cast<int>(Scheme::kAsym)),
            "offsets must be given for scheme asym, may be for int8, and not for sym or nf4");
    // K % g == 0 (K % 32 for 4-bit, K % 16 for int8) makes every row of the codes (K/2 or
    // K bytes) and of x (2K bytes) 16-byte aligned once the base pointers are; the Python
    // wrapper copies unaligned views.
    require(aligned16(a.weight), "qweight must be 16-byte aligned");
    require(aligned16(a.x), "x must be 16-byte aligned for a quantized weight");
  }
  require((a.lora_b == nullptr) == (a.lora_t == nullptr), "lora_b and lora_t go together");
  if (a.lora_b != nullptr) {
    require(a.rank_offsets != nullptr, "rank_offsets are required with adapters");
    require(a.ldb >= 1 && a.ldt >= 1, "ldb and ldt must be positive with adapters");
  }
}

}  // namespace

void launch_decode(const DecodeArgs& args, std::uintptr_t stream) {
  validate(args);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  if (args.act == Act::kF16) return dispatch_weight<__half>(args, s);
  return dispatch_weight<__nv_bfloat16>(args, s);
}

void launch_shrink(const ShrinkArgs& a, std::uintptr_t stream) {
  require(a.m >= 1 && a.m <= kMaxRows, "shrink takes 1.." + std::to_string(kMaxRows) + " rows");
  require(a.k >= 1 && a.ldt >= 1, "K and the max rank must be positive");
  require(a.t != nullptr && a.x != nullptr && a.lora_a != nullptr && a.rank_offsets != nullptr &&
              a.lora_scales != nullptr,
          "t, x, lora_a, rank_offsets and lora_scales are required");
  require(a.act == Act::kF16 || a.act == Act::kBF16, "act must be float16 or bfloat16");
  auto s = reinterpret_cast<cudaStream_t>(stream);
  require(a.ldt <= 0x7fffffff, "max rank too large for one grid");
  const dim3 grid(static_cast<unsigned>(a.ldt), static_cast<unsigned>(a.m));
  const bool vec = a.k % 8 == 0 && aligned16(a.x) && aligned16(a.lora_a);
  if (a.act == Act::kF16) {
    if (vec) {
      shrink_kernel<__half, true><<<grid, kThreads, 0, s>>>(a);
    } else {
      shrink_kernel<__half, false><<<grid, kThreads, 0, s>>>(a);
    }
  } else {
    if (vec) {
      shrink_kernel<__nv_bfloat16, true><<<grid, kThreads, 0, s>>>(a);
    } else {
      shrink_kernel<__nv_bfloat16, false><<<grid, kThreads, 0, s>>>(a);
    }
  }
  LORART_CUDA_CHECK_LAUNCH("shrink_kernel");
}

int runtime_version() {
  int v = 0;
  LORART_CUDA_CHECK(cudaRuntimeGetVersion(&v));
  return v;
}

int driver_version() {
  int v = 0;
  // No driver installed is an answer (0), not an error, for status reporting.
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

}  // namespace lorart::cuda
