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
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/quant_math.h"
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
}
