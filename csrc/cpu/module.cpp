// pybind11 entry point of lorart._C: the CPU kernels' thin boundary.
//
// No libtorch: lorart/backend/cpu.py passes every buffer as (data pointer, element count)
// (a Python tuple (int, int); (0, 0) = absent), sizes and row strides of tensors it has
// already validated. This file checks what it can (each buffer holds what the shapes
// need, enums, shapes against the packed layout), fills the argument structs and calls
// the kernel table of the instruction set chosen at run time, without the GIL. Every
// argument has a name (py::arg), so calls from Python can and do pass them by keyword.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/quant_math.h"
#include "cpu/decode_plan.h"  // decode (#15)
#include "cpu/int8_cpu.h"
#include "cpu/lora_cpu.h"

namespace py = pybind11;
using lorart::cpu::DType;
using lorart::cpu::KernelTable;

namespace {

// Every -m flag an ISA's TU is compiled with (CMakeLists.txt) has its run-time check here:
// a CPU with avx512f but without, say, avx512dq must not run code the compiler was allowed
// to emit dq instructions into.
bool machine_has(const std::string& isa) {
  if (isa == "scalar") return lorart::cpu::kernels_scalar() != nullptr;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  if (isa == "avx2") return lorart::cpu::kernels_avx2() != nullptr && avx2;
  if (isa == "avx512") return lorart::cpu::kernels_avx512() != nullptr && avx512;
  if (isa == "avx512bf16") {
    return lorart::cpu::kernels_avx512bf16() != nullptr && avx512 &&
           __builtin_cpu_supports("avx512bf16");
  }
#endif
  return false;
}

const KernelTable* table_for(const std::string& isa) {
  if (isa == "scalar") return lorart::cpu::kernels_scalar();
  if (isa == "avx2") return lorart::cpu::kernels_avx2();
  if (isa == "avx512") return lorart::cpu::kernels_avx512();
  if (isa == "avx512bf16") return lorart::cpu::kernels_avx512bf16();
  return nullptr;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"avx512bf16", "avx512", "avx2", "scalar"})
    if (machine_has(isa)) out.emplace_back(isa);
  return out;
}

// Best ISA of this machine, or LORART_CPU_ISA when set (an ISA the CPU lacks is an error).
const KernelTable* initial_table() {
  const char* env = std::getenv("LORART_CPU_ISA");
  if (env != nullptr && *env != '\0') {
    if (!machine_has(env))
      throw std::invalid_argument(std::string("LORART_CPU_ISA=") + env +
                                  " is not available on this CPU");
    return table_for(env);
  }
  return table_for(available_isas().front());
}

std::atomic<const KernelTable*>& active() {
  static std::atomic<const KernelTable*> table{initial_table()};
  return table;
}

void set_isa(const std::string& isa) {
  if (isa != "scalar" && isa != "avx2" && isa != "avx512" && isa != "avx512bf16")
    throw std::invalid_argument("isa must be 'scalar', 'avx2', 'avx512' or 'avx512bf16', got '" +
                                isa + "'");
  if (!machine_has(isa)) throw std::invalid_argument("isa '" + isa + "' is not available here");
  active().store(table_for(isa));
}

template <class T>
const T* ptr(uintptr_t p) {
  return reinterpret_cast<const T*>(p);
}

// A tensor's data pointer and element count, as passed from Python.
using Buffer = std::pair<uintptr_t, int64_t>;

// The buffer's pointer after checking it holds at least `need` elements (absent: nullptr,
// allowed only when `optional`).
uintptr_t checked(const Buffer& buf, int64_t need, const char* what, bool optional = false) {
  if (buf.first == 0) {
    if (optional) return 0;
    throw std::invalid_argument(std::string(what) + " is required");
  }
  if (buf.second < need)
    throw std::invalid_argument(std::string(what) + " has " + std::to_string(buf.second) +
                                " elements; the shapes need " + std::to_string(need));
  return buf.first;
}

// Elements a row-strided [rows, cols] matrix spans.
int64_t span(int64_t rows, int64_t cols, int64_t ld) {
  return rows > 0 ? (rows - 1) * ld + cols : 0;
}

DType dtype_of(int code, const char* what) {
  if (code != 0 && code != 1)
    throw std::invalid_argument(std::string(what) +
                                ": dtype code must "
                                "be 0 (float32) or 1 (bfloat16)");
  return static_cast<DType>(code);
}

// Fill WeightArgs: scheme -1 = dense W [N, K] in x's dtype, else 0/1/2 = asym/sym/nf4.
// weight: dense W [N, K] or packed codes uint8 [N, K/2]; scales/offsets [N, K/group].
lorart::cpu::WeightArgs weight_args(int64_t n, int64_t k, int scheme, const Buffer& weight,
                                    const Buffer& scales, const Buffer& offsets, int scale_dtype,
                                    int group_size) {
  lorart::cpu::WeightArgs w;
  w.n = n;
  w.k = k;
  if (n < 0 || k < 0) throw std::invalid_argument("weight: N and K must be >= 0");
  if (scheme == -1) {
    w.dense = ptr<void>(checked(weight, n * k, "weight [N, K]"));
    return w;
  }
  if (scheme < 0 || scheme > 2) throw std::invalid_argument("scheme must be -1, 0, 1 or 2");
  if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256)
    throw std::invalid_argument("group_size must be 32, 64, 128 or 256");
  if (k % group_size != 0) throw std::invalid_argument("K must be a multiple of group_size");
  if ((scheme == 0) != (offsets.first != 0))
    throw std::invalid_argument("offsets must be given for asym and only for asym");
  if (scale_dtype != 0 && scale_dtype != 2)
    throw std::invalid_argument("scale dtype code must be 0 (float32) or 2 (float16)");
  w.quantized = true;
  w.qweight = ptr<uint8_t>(checked(weight, n * (k / 2), "qweight [N, K/2]"));
  w.scales = ptr<void>(checked(scales, n * (k / group_size), "scales [N, K/group]"));
  w.offsets = ptr<void>(checked(offsets, n * (k / group_size), "offsets [N, K/group]", true));
  w.scale_dtype = static_cast<DType>(scale_dtype);
  w.group_size = group_size;
  w.scheme = scheme;
  return w;
}

// a [R, K], b [N, R], ids int32 [M] (absent: every row uses adapter 0).
// rank_offsets/scales are kept alive by the caller's frame (the vectors below).
lorart::cpu::AdapterArgs adapter_args(int64_t m, int64_t n, int64_t k, const Buffer& a,
                                      const Buffer& b, int64_t total_rank,
                                      const std::vector<int64_t>& rank_offsets,
                                      const std::vector<float>& scales, const Buffer& ids) {
  lorart::cpu::AdapterArgs l;
  if (a.first == 0) return l;
  if (rank_offsets.size() != scales.size() + 1)
    throw std::invalid_argument("rank_offsets must have one entry more than scales");
  if (!rank_offsets.empty() && rank_offsets.back() > total_rank)
    throw std::invalid_argument("rank_offsets exceed the adapter stack's rank R");
  l.a = ptr<void>(checked(a, total_rank * k, "a [R, K]"));
  l.b = ptr<void>(checked(b, n * total_rank, "b [N, R]"));
  l.total_rank = total_rank;
  l.rank_offsets = rank_offsets.data();
  l.scales = scales.data();
  l.num_adapters = static_cast<int>(scales.size());
  l.adapter_ids = ptr<int32_t>(checked(ids, m, "adapter_ids [M]", true));
  return l;
}

// y [M, N] = x [M, K] Wᵀ + bias + LoRA (see lorart/backend/cpu.py for the argument list).
void forward(int64_t m, int dtype, const Buffer& x, int64_t ldx, int64_t n, int64_t k, int scheme,
             const Buffer& weight, const Buffer& scales, const Buffer& offsets, int scale_dtype,
             int group_size, const Buffer& bias, const Buffer& a, const Buffer& b,
             int64_t total_rank, const std::vector<int64_t>& rank_offsets,
             const std::vector<float>& lora_scales, const Buffer& ids, const Buffer& y, int64_t ldy,
             int64_t decode_max_rows) {
  lorart::cpu::ForwardArgs args;
  args.m = m;
  args.dtype = dtype_of(dtype, "x");
  args.x = ptr<void>(checked(x, span(m, k, ldx), "x [M, K]"));
  args.ldx = ldx;
  args.bias = ptr<void>(checked(bias, n, "bias [N]", true));
  args.y = reinterpret_cast<void*>(checked(y, span(m, n, ldy), "y [M, N]"));
  args.ldy = ldy;
  args.w = weight_args(n, k, scheme, weight, scales, offsets, scale_dtype, group_size);
  args.lora = adapter_args(m, n, k, a, b, total_rank, rank_offsets, lora_scales, ids);
  const KernelTable* table = active().load();
  py::gil_scoped_release release;
  table->forward(args, decode_max_rows);
}

// dx [M, K], da [R, K] (fp32), db [N, R] (fp32) for a frozen base; 0 = not needed.
void backward(int64_t m, int dtype, const Buffer& dy, int64_t lddy, const Buffer& x, int64_t ldx,
              int64_t n, int64_t k, int scheme, const Buffer& weight, const Buffer& scales,
              const Buffer& offsets, int scale_dtype, int group_size, const Buffer& a,
              const Buffer& b, int64_t total_rank, const std::vector<int64_t>& rank_offsets,
              const std::vector<float>& lora_scales, const Buffer& ids, const Buffer& dx,
              int64_t lddx, const Buffer& da, const Buffer& db) {
  lorart::cpu::BackwardArgs args;
  args.m = m;
  args.dtype = dtype_of(dtype, "x");
  args.dy = ptr<void>(checked(dy, span(m, n, lddy), "dy [M, N]"));
  args.lddy = lddy;
  args.x = ptr<void>(checked(x, span(m, k, ldx), "x [M, K]"));
  args.ldx = ldx;
  args.w = weight_args(n, k, scheme, weight, scales, offsets, scale_dtype, group_size);
  args.lora = adapter_args(m, n, k, a, b, total_rank, rank_offsets, lora_scales, ids);
  args.dx = reinterpret_cast<void*>(checked(dx, span(m, k, lddx), "dx [M, K]", true));
  args.lddx = lddx;
  args.da = reinterpret_cast<float*>(checked(da, total_rank * k, "da [R, K]", true));
  args.db = reinterpret_cast<float*>(checked(db, n * total_rank, "db [N, R]", true));
  const KernelTable* table = active().load();
  py::gil_scoped_release release;
  table->backward(args);
}

// out [n1 - n0, K] = rows n0..n1 of a quantized W, dequantized (dtype 0 fp32, 1 bf16).
void dequantize(int64_t n, int64_t k, int scheme, const Buffer& weight, const Buffer& scales,
                const Buffer& offsets, int scale_dtype, int group_size, int64_t n0, int64_t n1,
                const Buffer& out, int dtype) {
  const lorart::cpu::WeightArgs w =
      weight_args(n, k, scheme, weight, scales, offsets, scale_dtype, group_size);
  if (!w.quantized) throw std::invalid_argument("dequantize: the weight is not quantized");
  if (n0 < 0 || n1 > n || n0 > n1) throw std::invalid_argument("dequantize: bad row range");
  const DType dt = dtype_of(dtype, "out");
  const KernelTable* table = active().load();
  py::gil_scoped_release release;
  void* dst = reinterpret_cast<void*>(checked(out, (n1 - n0) * k, "out [n1 - n0, K]"));
  table->dequantize(w, n0, n1, dt, dst);
}

// y [M, N] (holding x Wᵀ + bias) += the LoRA terms.
void lora_add(int64_t m, int dtype, const Buffer& x, int64_t ldx, int64_t n, int64_t k,
              const Buffer& a, const Buffer& b, int64_t total_rank,
              const std::vector<int64_t>& rank_offsets, const std::vector<float>& lora_scales,
              const Buffer& ids, const Buffer& y, int64_t ldy) {
  lorart::cpu::ForwardArgs args;
  args.m = m;
  args.dtype = dtype_of(dtype, "x");
  args.x = ptr<void>(checked(x, span(m, k, ldx), "x [M, K]"));
  args.ldx = ldx;
  args.y = reinterpret_cast<void*>(checked(y, span(m, n, ldy), "y [M, N]"));
  args.ldy = ldy;
  args.w.n = n;
  args.w.k = k;
  args.lora = adapter_args(m, n, k, a, b, total_rank, rank_offsets, lora_scales, ids);
  const KernelTable* table = active().load();
  py::gil_scoped_release release;
  table->lora_add(args);
}

// Sum of `count` floats read once, all threads: a streaming-read bandwidth probe for
// benchmarks/bandwidth.py (the compiler vectorizes the inner loop at baseline SSE2).
double stream_sum(uintptr_t data, int64_t count) {
  const float* p = ptr<float>(data);
  double total = 0.0;
  py::gil_scoped_release release;
#pragma omp parallel for reduction(+ : total) schedule(static)
  for (int64_t blk = 0; blk < (count + 4095) / 4096; ++blk) {
    float acc[16] = {0};
    const int64_t lo = blk * 4096, hi = std::min<int64_t>(count, lo + 4096);
    int64_t i = lo;
    for (; i + 16 <= hi; i += 16)
      for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
    for (; i < hi; ++i) acc[0] += p[i];
    for (float v : acc) total += v;
  }
  return total;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// ---- formats (#14): the 8-bit (int8) layout's kernels (csrc/cpu/int8_cpu.h) -------------
// Same ISA as the 4-bit table in use. Arguments as lorart/backend/cpu_int8.py passes them.
// "avx512bf16" (the default where the CPU has it) runs the avx512 8-bit kernels: they need
// no bf16 dot product, and without this line it fell through to the scalar table (~10x
// slower: 2048x2048, 1 row, 3.4 ms vs 0.26 ms).
const lorart::cpu::Int8KernelTable* int8_table() {
  const std::string isa = active().load()->name;
  const lorart::cpu::Int8KernelTable* table = nullptr;  // nullptr: ISA not in this build
  if (isa == "avx512" || isa == "avx512bf16") table = lorart::cpu::int8_kernels_avx512();
  if (isa == "avx2") table = lorart::cpu::int8_kernels_avx2();
  return table != nullptr ? table : lorart::cpu::int8_kernels_scalar();
}

// W [N, K] int8 codes with scales/offsets [N, K/g] (scale dtype 0 fp32, 2 fp16).
lorart::cpu::Int8WeightArgs int8_weight_args(int64_t n, int64_t k, const Buffer& codes,
                                             const Buffer& scales, const Buffer& offsets,
                                             int scale_dtype, int group_size) {
  if (n < 0 || k < 0) throw std::invalid_argument("int8 weight: N and K must be >= 0");
  if (group_size != 16 && group_size != 32 && group_size != 64 && group_size != 128 &&
      group_size != 256)
    throw std::invalid_argument("int8 weight: group_size must be 16, 32, 64, 128 or 256");
  if (k % group_size != 0) throw std::invalid_argument("int8 weight: K % group_size != 0");
  if (scale_dtype != 0 && scale_dtype != 2)
    throw std::invalid_argument("int8 weight: scale dtype code must be 0 (fp32) or 2 (fp16)");
  const int64_t groups = n * (k / group_size);
  lorart::cpu::Int8WeightArgs w;
  w.n = n;
  w.k = k;
  w.q = ptr<int8_t>(checked(codes, n * k, "codes [N, K]"));
  w.scales = ptr<void>(checked(scales, groups, "scales [N, K/group]"));
  w.offsets = ptr<void>(checked(offsets, groups, "offsets [N, K/group]", true));
  w.scale_dtype = static_cast<DType>(scale_dtype);
  w.group_size = group_size;
  return w;
}

// y [M, N] = x [M, K] Wᵀ + bias + LoRA for an int8 W.
void int8_forward(int64_t m, int dtype, const Buffer& x, int64_t ldx, int64_t n, int64_t k,
                  const Buffer& codes, const Buffer& scales, const Buffer& offsets, int scale_dtype,
                  int group_size, const Buffer& bias, const Buffer& a, const Buffer& b,
                  int64_t total_rank, const std::vector<int64_t>& rank_offsets,
                  const std::vector<float>& lora_scales, const Buffer& ids, const Buffer& y,
                  int64_t ldy, int64_t decode_max_rows) {
  if (m < 0) throw std::invalid_argument("int8_forward: M must be >= 0");
  lorart::cpu::Int8ForwardArgs args;
  args.m = m;
  args.dtype = dtype_of(dtype, "x");
  args.x = ptr<void>(checked(x, span(m, k, ldx), "x [M, K]"));
  args.ldx = ldx;
  args.bias = ptr<void>(checked(bias, n, "bias [N]", true));
  args.y = reinterpret_cast<void*>(checked(y, span(m, n, ldy), "y [M, N]"));
  args.ldy = ldy;
  args.w = int8_weight_args(n, k, codes, scales, offsets, scale_dtype, group_size);
  args.lora = adapter_args(m, n, k, a, b, total_rank, rank_offsets, lora_scales, ids);
  const lorart::cpu::Int8KernelTable* table = int8_table();
  py::gil_scoped_release release;
  table->forward(args, decode_max_rows);
}

// out [n1 - n0, K] (dtype 0 fp32, 1 bf16) = rows n0..n1 of an int8 W, dequantized.
void int8_dequantize(int64_t n, int64_t k, const Buffer& codes, const Buffer& scales,
                     const Buffer& offsets, int scale_dtype, int group_size, int64_t n0, int64_t n1,
                     const Buffer& out, int dtype) {
  const lorart::cpu::Int8WeightArgs w =
      int8_weight_args(n, k, codes, scales, offsets, scale_dtype, group_size);
  if (n0 < 0 || n1 > n || n0 > n1) throw std::invalid_argument("int8_dequantize: bad row range");
  const DType dt = dtype_of(dtype, "out");
  void* dst = reinterpret_cast<void*>(checked(out, (n1 - n0) * k, "out [n1 - n0, K]"));
  const lorart::cpu::Int8KernelTable* table = int8_table();
  py::gil_scoped_release release;
  table->dequantize(w, n0, n1, dt, dst);
}
// ---- end formats (#14) ------------------------------------------------------------------

// ---- decode (#15): the batch-1 decode step in C++ (csrc/cpu/decode_plan.h) -------------
// Built once per decode session by lorart/runtime/cplan.py: every buffer is checked here
// against the shapes, then the plan keeps the pointers (Python keeps the tensors alive).
using lorart::cpu::DecodePlan;

std::unique_ptr<DecodePlan> make_plan(int64_t n_head, int64_t n_kv, int64_t head_dim,
                                      int64_t hidden, int64_t inter, int64_t max_len, int64_t vocab,
                                      double attn_scale, const Buffer& cos, const Buffer& sin,
                                      const Buffer& final_norm, double final_eps) {
  if (n_head <= 0 || n_kv <= 0 || n_head % n_kv != 0)
    throw std::invalid_argument("decode plan: n_head must be a positive multiple of n_kv");
  if (head_dim <= 0 || head_dim > 512 || head_dim % 2 != 0)
    throw std::invalid_argument("decode plan: head_dim must be even and <= 512");
  if (hidden <= 0 || inter <= 0 || max_len <= 0 || vocab <= 0)
    throw std::invalid_argument("decode plan: hidden, inter, max_len, vocab must be > 0");
  lorart::cpu::PlanDims d;
  d.n_head = n_head;
  d.n_kv = n_kv;
  d.head_dim = head_dim;
  d.hidden = hidden;
  d.inter = inter;
  d.max_len = max_len;
  d.vocab = vocab;
  d.attn_scale = static_cast<float>(attn_scale);
  d.cos = ptr<float>(checked(cos, max_len * head_dim, "cos [max_len, head_dim]"));
  d.sin = ptr<float>(checked(sin, max_len * head_dim, "sin [max_len, head_dim]"));
  d.final_norm = ptr<float>(checked(final_norm, hidden, "final_norm [H]"));
  d.final_eps = static_cast<float>(final_eps);
  return std::make_unique<DecodePlan>(d);
}

// A 4-bit or dense (scheme -1) float32 linear group, with its one adapter folded in.
int plan_add_linear(DecodePlan& plan, int64_t n, int64_t k, int scheme, const Buffer& weight,
                    const Buffer& scales, const Buffer& offsets, int scale_dtype, int group_size,
                    const Buffer& bias, const Buffer& a, const Buffer& b, int64_t total_rank,
                    std::vector<int64_t> rank_offsets, std::vector<float> lora_scales) {
  lorart::cpu::PlanLinear l;
  l.n = n;
  l.k = k;
  l.f.dtype = DType::kF32;
  l.f.ldx = k;
  l.f.ldy = n;
  l.f.bias = ptr<void>(checked(bias, n, "bias [N]", true));
  l.f.w = weight_args(n, k, scheme, weight, scales, offsets, scale_dtype, group_size);
  l.f.lora = adapter_args(1, n, k, a, b, total_rank, plan.keep_offsets(std::move(rank_offsets)),
                          plan.keep_scales(std::move(lora_scales)), Buffer{0, 0});
  return plan.add_linear(l);
}

// An 8-bit (int8 layout) float32 linear group (the Q8_0 output layer).
int plan_add_int8_linear(DecodePlan& plan, int64_t n, int64_t k, const Buffer& codes,
                         const Buffer& scales, const Buffer& offsets, int scale_dtype,
                         int group_size, const Buffer& bias) {
  lorart::cpu::PlanLinear l;
  l.int8 = true;
  l.n = n;
  l.k = k;
  l.f8.dtype = DType::kF32;
  l.f8.ldx = k;
  l.f8.ldy = n;
  l.f8.bias = ptr<void>(checked(bias, n, "bias [N]", true));
  l.f8.w = int8_weight_args(n, k, codes, scales, offsets, scale_dtype, group_size);
  return plan.add_linear(l);
}

// The adapter of linear `idx`, applied after its base kernel: a [rank, K], bt [rank, N]
// (float32, scale folded in), bt[r] nonzero only in columns lo[r]..hi[r].
void plan_set_lora(DecodePlan& plan, int idx, const Buffer& a, const Buffer& bt, int64_t rank,
                   std::vector<int64_t> lo, std::vector<int64_t> hi) {
  if (idx < 0 || idx >= static_cast<int>(plan.linears().size()))
    throw std::invalid_argument("set_lora: no such linear in the plan");
  lorart::cpu::PlanLinear& l = plan.linear_at(idx);
  if (l.rank != 0 || (!l.int8 && l.f.lora.a != nullptr))
    throw std::invalid_argument("set_lora: the linear already has an adapter");
  if (rank < 0 || static_cast<int64_t>(lo.size()) != rank ||
      static_cast<int64_t>(hi.size()) != rank)
    throw std::invalid_argument("set_lora: lo and hi need one entry per rank");
  for (int64_t r = 0; r < rank; ++r)
    if (lo[r] < 0 || lo[r] > hi[r] || hi[r] > l.n)
      throw std::invalid_argument("set_lora: column range of rank " + std::to_string(r) +
                                  " outside 0..N");
  l.lora_a = ptr<float>(checked(a, rank * l.k, "a [rank, K]"));
  l.lora_bt = ptr<float>(checked(bt, rank * l.n, "bt [rank, N]"));
  l.rank = rank;
  l.lo = std::move(lo);
  l.hi = std::move(hi);
}

// Switch linear `idx` to int8 activations (decode_q8.h); false (unchanged) when its
// weight is not a group-32 asym/sym 4-bit or 8-bit layout.
bool plan_set_q8(DecodePlan& plan, int idx, int bits) {
  if (bits != 8 && bits != 16) throw std::invalid_argument("set_q8: bits must be 8 or 16");
  if (idx < 0 || idx >= static_cast<int>(plan.linears().size()))
    throw std::invalid_argument("set_q8: no such linear in the plan");
  lorart::cpu::PlanLinear& l = plan.linear_at(idx);
  lorart::cpu::Q8Weight q;
  q.n = l.n;
  q.k = l.k;
  if (l.int8) {
    const auto& w = l.f8.w;
    if (w.group_size != 32) return false;
    q.int8 = true;
    q.codes = reinterpret_cast<const uint8_t*>(w.q);
    q.scales = w.scales;
    q.offsets = w.offsets;
    q.scales_f16 = w.scale_dtype == DType::kF16;
  } else {
    const auto& w = l.f.w;
    if (!w.quantized || w.group_size != 32 || (w.scheme != 0 && w.scheme != 1)) return false;
    q.codes = w.qweight;
    q.scales = w.scales;
    q.offsets = w.offsets;
    q.scales_f16 = w.scale_dtype == DType::kF16;
    q.sym = w.scheme == 1;
  }
  l.qw = q;
  l.q8 = true;
  l.q8_bits = bits;
  return true;
}

// y [N] = the int8-activation GEMV of decode_q8.h (tests: vnni false = scalar reference).
void q8_gemv_binding(int64_t n, int64_t k, bool int8, const Buffer& codes, const Buffer& scales,
                     const Buffer& offsets, bool scales_f16, bool sym, const Buffer& x,
                     const Buffer& y, bool vnni, int bits) {
  if (bits != 8 && bits != 16) throw std::invalid_argument("q8_gemv: bits must be 8 or 16");
  if (n < 0 || k <= 0 || k % 32 != 0)
    throw std::invalid_argument("q8_gemv: K must be a positive multiple of 32");
  if (vnni && !lorart::cpu::q8_has_vnni())
    throw std::invalid_argument("q8_gemv: this CPU has no AVX512-VNNI");
  lorart::cpu::Q8Weight w;
  w.n = n;
  w.k = k;
  w.int8 = int8;
  w.codes = ptr<uint8_t>(checked(codes, int8 ? n * k : n * k / 2, "codes"));
  w.scales = ptr<void>(checked(scales, n * (k / 32), "scales [N, K/32]"));
  w.offsets = ptr<void>(checked(offsets, n * (k / 32), "offsets [N, K/32]", true));
  w.scales_f16 = scales_f16;
  w.sym = sym;
  const float* xp = ptr<float>(checked(x, k, "x [K]"));
  float* yp = reinterpret_cast<float*>(checked(y, n, "y [N]"));
  py::gil_scoped_release release;
  lorart::cpu::Q8Activation xq;
  lorart::cpu::q8_quantize(xp, k, int8, &xq, vnni, bits);
  lorart::cpu::q8_gemv(w, xq, yp, vnni);
}

void plan_check_linear(const DecodePlan& plan, int idx, int64_t n, int64_t k, const char* what) {
  if (idx < 0 || idx >= static_cast<int>(plan.linears().size()))
    throw std::invalid_argument(std::string(what) + ": no such linear in the plan");
  const auto& l = plan.linears()[static_cast<size_t>(idx)];
  if (l.n != n || l.k != k)
    throw std::invalid_argument(std::string(what) + " must be [" + std::to_string(n) + ", " +
                                std::to_string(k) + "], got [" + std::to_string(l.n) + ", " +
                                std::to_string(l.k) + "]");
}

void plan_add_layer(DecodePlan& plan, const Buffer& attn_norm, double attn_eps,
                    const Buffer& mlp_norm, double mlp_eps, int qkv, int o, int gate_up, int down,
                    const Buffer& k_cache, const Buffer& v_cache) {
  const auto& d = plan.dims();
  plan_check_linear(plan, qkv, (d.n_head + 2 * d.n_kv) * d.head_dim, d.hidden, "qkv");
  plan_check_linear(plan, o, d.hidden, d.n_head * d.head_dim, "o");
  plan_check_linear(plan, gate_up, 2 * d.inter, d.hidden, "gate_up");
  plan_check_linear(plan, down, d.hidden, d.inter, "down");
  lorart::cpu::PlanLayer l;
  l.attn_norm = ptr<float>(checked(attn_norm, d.hidden, "attn_norm [H]"));
  l.mlp_norm = ptr<float>(checked(mlp_norm, d.hidden, "mlp_norm [H]"));
  l.attn_eps = static_cast<float>(attn_eps);
  l.mlp_eps = static_cast<float>(mlp_eps);
  l.qkv = qkv;
  l.o = o;
  l.gate_up = gate_up;
  l.down = down;
  const int64_t cache = d.n_kv * d.max_len * d.head_dim;
  l.k_cache = reinterpret_cast<float*>(checked(k_cache, cache, "k_cache [n_kv, max_len, hd]"));
  l.v_cache = reinterpret_cast<float*>(checked(v_cache, cache, "v_cache [n_kv, max_len, hd]"));
  plan.add_layer(l);
}

void plan_step(DecodePlan& plan, const Buffer& x, int64_t pos, const Buffer& logits) {
  const auto& d = plan.dims();
  if (plan.dims().lm_head < 0) throw std::invalid_argument("decode plan: no lm_head set");
  float* xp = reinterpret_cast<float*>(checked(x, d.hidden, "x [H]"));
  float* lp = reinterpret_cast<float*>(checked(logits, d.vocab, "logits [vocab]"));
  const KernelTable* table = active().load();
  const lorart::cpu::Int8KernelTable* table8 = int8_table();
  py::gil_scoped_release release;
  plan.step(table, table8, xp, pos, lp);
}
// ---- end decode (#15) -------------------------------------------------------------------

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorart C++ kernels (no libtorch: raw pointers and sizes from Python)";
  // Buffers are (pointer, element count) tuples; see the top of this file.
  m.def("cpu_forward", &forward, py::arg("m"), py::arg("dtype"), py::arg("x"), py::arg("ldx"),
        py::arg("n"), py::arg("k"), py::arg("scheme"), py::arg("weight"), py::arg("scales"),
        py::arg("offsets"), py::arg("scale_dtype"), py::arg("group_size"), py::arg("bias"),
        py::arg("a"), py::arg("b"), py::arg("total_rank"), py::arg("rank_offsets"),
        py::arg("lora_scales"), py::arg("adapter_ids"), py::arg("y"), py::arg("ldy"),
        py::arg("decode_max_rows"), "Fused base + LoRA forward (see lorart/backend/cpu.py)");
  m.def("cpu_backward", &backward, py::arg("m"), py::arg("dtype"), py::arg("dy"), py::arg("lddy"),
        py::arg("x"), py::arg("ldx"), py::arg("n"), py::arg("k"), py::arg("scheme"),
        py::arg("weight"), py::arg("scales"), py::arg("offsets"), py::arg("scale_dtype"),
        py::arg("group_size"), py::arg("a"), py::arg("b"), py::arg("total_rank"),
        py::arg("rank_offsets"), py::arg("lora_scales"), py::arg("adapter_ids"), py::arg("dx"),
        py::arg("lddx"), py::arg("da"), py::arg("db"), "Fused LoRA backward for a frozen base");
  m.def("cpu_dequantize", &dequantize, py::arg("n"), py::arg("k"), py::arg("scheme"),
        py::arg("weight"), py::arg("scales"), py::arg("offsets"), py::arg("scale_dtype"),
        py::arg("group_size"), py::arg("n0"), py::arg("n1"), py::arg("out"), py::arg("dtype"),
        "Rows n0..n1 of a 4-bit W, dequantized");
  m.def("cpu_lora_add", &lora_add, py::arg("m"), py::arg("dtype"), py::arg("x"), py::arg("ldx"),
        py::arg("n"), py::arg("k"), py::arg("a"), py::arg("b"), py::arg("total_rank"),
        py::arg("rank_offsets"), py::arg("lora_scales"), py::arg("adapter_ids"), py::arg("y"),
        py::arg("ldy"), "y += LoRA(x) for y = x W^T + bias");
  m.def("set_isa", &set_isa, py::arg("isa"),
        "Force 'scalar', 'avx2', 'avx512' or 'avx512bf16' kernels");
  m.def("isa", []() { return std::string(active().load()->name); }, "The ISA in use");
  m.def("available_isas", &available_isas, "ISAs this build and CPU support, best first");
  m.def("stream_sum", &stream_sum, py::arg("data"), py::arg("count"),
        "Bandwidth probe: sum of count float32 at data");
  m.def("max_threads", &max_threads, "OpenMP threads the kernels use");
  m.def("cpu_int8_forward", &int8_forward, py::arg("m"), py::arg("dtype"), py::arg("x"),
        py::arg("ldx"), py::arg("n"), py::arg("k"), py::arg("codes"), py::arg("scales"),
        py::arg("offsets"), py::arg("scale_dtype"), py::arg("group_size"), py::arg("bias"),
        py::arg("a"), py::arg("b"), py::arg("total_rank"), py::arg("rank_offsets"),
        py::arg("lora_scales"), py::arg("adapter_ids"), py::arg("y"), py::arg("ldy"),
        py::arg("decode_max_rows"), "8-bit W: fused base + LoRA forward");
  m.def(
      "int8_isa", []() { return std::string(int8_table()->name); },
      "The ISA of the 8-bit kernels in use (follows the active ISA)");
  m.def("cpu_int8_dequantize", &int8_dequantize, py::arg("n"), py::arg("k"), py::arg("codes"),
        py::arg("scales"), py::arg("offsets"), py::arg("scale_dtype"), py::arg("group_size"),
        py::arg("n0"), py::arg("n1"), py::arg("out"), py::arg("dtype"),
        "Rows of an 8-bit W, dequantized");

  // decode (#15): the batch-1 decode step in C++ (lorart/runtime/cplan.py builds it).
  m.def("cpu_q8_gemv", &q8_gemv_binding, py::arg("n"), py::arg("k"), py::arg("int8"),
        py::arg("codes"), py::arg("scales"), py::arg("offsets"), py::arg("scales_f16"),
        py::arg("sym"), py::arg("x"), py::arg("y"), py::arg("vnni"), py::arg("bits") = 8,
        "y [N] = W x with x rounded to int8 per group of 32 (decode_q8.h)");
  m.def("cpu_has_vnni", &lorart::cpu::q8_has_vnni, "Whether AVX512-VNNI kernels run here");
  py::class_<DecodePlan>(m, "DecodePlan", "Batch-1 Llama decode step over the kernel tables")
      .def(py::init(&make_plan), py::arg("n_head"), py::arg("n_kv"), py::arg("head_dim"),
           py::arg("hidden"), py::arg("inter"), py::arg("max_len"), py::arg("vocab"),
           py::arg("attn_scale"), py::arg("cos"), py::arg("sin"), py::arg("final_norm"),
           py::arg("final_eps"))
      .def("add_linear", &plan_add_linear, py::arg("n"), py::arg("k"), py::arg("scheme"),
           py::arg("weight"), py::arg("scales"), py::arg("offsets"), py::arg("scale_dtype"),
           py::arg("group_size"), py::arg("bias"), py::arg("a"), py::arg("b"),
           py::arg("total_rank"), py::arg("rank_offsets"), py::arg("lora_scales"))
      .def("add_int8_linear", &plan_add_int8_linear, py::arg("n"), py::arg("k"), py::arg("codes"),
           py::arg("scales"), py::arg("offsets"), py::arg("scale_dtype"), py::arg("group_size"),
           py::arg("bias"))
      .def("set_lora", &plan_set_lora, py::arg("index"), py::arg("a"), py::arg("bt"),
           py::arg("rank"), py::arg("lo"), py::arg("hi"))
      .def("set_q8", &plan_set_q8, py::arg("index"), py::arg("bits") = 8,
           "Int8 activations for this linear; False when its layout has no such kernel")
      .def("add_layer", &plan_add_layer, py::arg("attn_norm"), py::arg("attn_eps"),
           py::arg("mlp_norm"), py::arg("mlp_eps"), py::arg("qkv"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("k_cache"), py::arg("v_cache"))
      .def(
          "set_lm_head",
          [](DecodePlan& plan, int idx) {
            const auto& d = plan.dims();
            plan_check_linear(plan, idx, d.vocab, d.hidden, "lm_head");
            plan.dims().lm_head = idx;
          },
          py::arg("index"))
      .def("step", &plan_step, py::arg("x"), py::arg("pos"), py::arg("logits"),
           "x [H] (embedding in, final hidden state out), logits [vocab] out");
}
