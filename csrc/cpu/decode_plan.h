// A batch-1 Llama decode step run entirely in C++ over the existing kernel tables
// (issue #15): the per-layer "glue" between the linear kernels (RMSNorm, RoPE, KV-cache
// write, attention, SiLU·mul, residual adds) is a few microseconds of plain loops here,
// where ~15 small torch calls per layer cost ~7 ms per step on this 2-core CPU
// (2026-12-03, benchmarks/RESULTS.md, decode section).
//
//     x = embedding row (given)
//     for each layer:
//         h = rms_norm(x) · attn_norm;  [q|k|v] = qkv(h)          one fused kernel call
//         q, k = rope(q, k, pos);  cache[pos] = k, v
//         x += o(softmax(q kᵀ · scale) v)                            GQA: n_head / n_kv
//         h = rms_norm(x) · mlp_norm;  [g|u] = gate_up(h)
//         x += down(silu(g) · u)
//     logits = lm_head(rms_norm(x) · norm)
//
// The plan holds pointers only (weights, caches, rope tables stay owned by the Python
// objects that built it: lorart/runtime/cplan.py keeps them alive). float32 activations.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <vector>

#include "cpu/decode_q8.h"
#include "cpu/int8_cpu.h"
#include "cpu/lora_cpu.h"

namespace lorart {
namespace cpu {

// One linear layer group bound to a kernel: x, y, m are filled per call.
struct PlanLinear {
  bool int8 = false;   // Int8KernelTable (8-bit base) or KernelTable (4-bit / dense)
  ForwardArgs f;       // used when !int8
  Int8ForwardArgs f8;  // used when int8
  int64_t n = 0, k = 0;
  // The adapter, applied by the plan after the base kernel (instead of the kernel's per-
  // output LoRA epilogue, a rank-long dot per output: 40 us of a 60 us q/k/v call at rank
  // 24): t = x Aᵀ, then y[lo_r:hi_r] += t_r · Bᵀ[r, lo_r:hi_r], each a contiguous axpy.
  // [lo_r, hi_r) skips the zero blocks of a fused group's block-diagonal B.
  int64_t rank = 0;
  const float* lora_a = nullptr;   // [rank, K]
  const float* lora_bt = nullptr;  // [rank, N], the adapter's scale folded in
  std::vector<int64_t> lo, hi;     // [rank] each
  // Opt-in int8 activations (decode_q8.h): the base runs q8_gemv instead of the kernel
  // table, then the bias, then the adapter as above.
  bool q8 = false;
  int q8_bits = 8;  // activation bits: 8 or 16
  Q8Weight qw;
};

struct PlanLayer {
  const float* attn_norm = nullptr;  // [H]
  const float* mlp_norm = nullptr;   // [H]
  float attn_eps = 0, mlp_eps = 0;
  int qkv = -1, o = -1, gate_up = -1, down = -1;  // indices into DecodePlan::linears
  float* k_cache = nullptr;                       // [n_kv, max_len, head_dim]
  float* v_cache = nullptr;                       // [n_kv, max_len, head_dim]
};

struct PlanDims {
  int64_t n_head = 0, n_kv = 0, head_dim = 0, hidden = 0, inter = 0, max_len = 0, vocab = 0;
  float attn_scale = 0;
  const float* cos = nullptr;         // [max_len, head_dim]
  const float* sin = nullptr;         // [max_len, head_dim], first half negated (HF rotate_half)
  const float* final_norm = nullptr;  // [H]
  float final_eps = 0;
  int lm_head = -1;
};

class DecodePlan {
 public:
  explicit DecodePlan(const PlanDims& dims) : dims_(dims) {}

  // Owned copies of the adapter metadata a ForwardArgs points into (stable addresses).
  std::vector<int64_t>& keep_offsets(std::vector<int64_t> v) {
    offsets_.push_back(std::move(v));
    return offsets_.back();
  }
  std::vector<float>& keep_scales(std::vector<float> v) {
    scales_.push_back(std::move(v));
    return scales_.back();
  }
  int add_linear(const PlanLinear& l) {
    linears_.push_back(l);
    return static_cast<int>(linears_.size()) - 1;
  }
  void add_layer(const PlanLayer& l) { layers_.push_back(l); }
  PlanLinear& linear_at(int idx) { return linears_.at(static_cast<size_t>(idx)); }
  PlanDims& dims() { return dims_; }
  const std::vector<PlanLinear>& linears() const { return linears_; }
  const std::vector<PlanLayer>& layers() const { return layers_; }

  // x [H] (the token's embedding; overwritten with the last hidden state), logits [vocab].
  // decode_max_rows as for the kernel tables (1 row: always the decode GEMV).
  void step(const KernelTable* table, const Int8KernelTable* table8, float* x, int64_t pos,
            float* logits);

 private:
  void linear(const KernelTable* table, const Int8KernelTable* table8, int idx, const float* x,
              float* y);

  PlanDims dims_;
  std::vector<PlanLinear> linears_;
  std::vector<PlanLayer> layers_;
  std::deque<std::vector<int64_t>> offsets_;
  std::deque<std::vector<float>> scales_;
  std::vector<float> h_, qkv_, attn_, gu_, tmp_, scores_;  // scratch, sized on first step
  Q8Activation xq_;
  bool vnni_ = q8_has_vnni();
};

}  // namespace cpu
}  // namespace lorart
