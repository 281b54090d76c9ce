// pybind11 entry point of lorart._C: the CPU kernels' thin boundary.
//
// No libtorch: lorart/backend/cpu.py passes data pointers (as integers), sizes and row
// strides of tensors it has already validated; this file checks what it can (sizes,
// enums, alignment of shapes to the packed layout), fills the argument structs and
// calls the kernel table of the instruction set chosen at run time, without the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common/quant_math.h"
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

DType dtype_of(int code, const char* what) {
  if (code != 0 && code != 1)
    throw std::invalid_argument(std::string(what) +
                                ": dtype code must "
                                "be 0 (float32) or 1 (bfloat16)");
  return static_cast<DType>(code);
}

// Fill WeightArgs: scheme -1 = dense W [N, K] in x's dtype, else 0/1/2 = asym/sym/nf4.
lorart::cpu::WeightArgs weight_args(int64_t n, int64_t k, int scheme, uintptr_t weight,
                                    uintptr_t scales, uintptr_t offsets, int scale_dtype,
                                    int group_size) {
  lorart::cpu::WeightArgs w;
  w.n = n;
  w.k = k;
  if (n < 0 || k < 0) throw std::invalid_argument("weight: N and K must be >= 0");
  if (scheme == -1) {
    w.dense = ptr<void>(weight);
    return w;
  }
  if (scheme < 0 || scheme > 2) throw std::invalid_argument("scheme must be -1, 0, 1 or 2");
  if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256)
    throw std::invalid_argument("group_size must be 32, 64, 128 or 256");
  if (k % group_size != 0) throw std::invalid_argument("K must be a multiple of group_size");
  if ((scheme == 0) != (offsets != 0))
    throw std::invalid_argument("offsets must be given for asym and only for asym");
  if (scale_dtype != 0 && scale_dtype != 2)
    throw std::invalid_argument("scale dtype code must be 0 (float32) or 2 (float16)");
  w.quantized = true;
  w.qweight = ptr<uint8_t>(weight);
  w.scales = ptr<void>(scales);
  w.offsets = offsets ? ptr<void>(offsets) : nullptr;
  w.scale_dtype = static_cast<DType>(scale_dtype);
  w.group_size = group_size;
  w.scheme = scheme;
  return w;
}

// rank_offsets/scales are kept alive by the caller's frame (the vectors below).
lorart::cpu::AdapterArgs adapter_args(uintptr_t a, uintptr_t b, int64_t total_rank,
                                      const std::vector<int64_t>& rank_offsets,
                                      const std::vector<float>& scales, uintptr_t ids) {
  lorart::cpu::AdapterArgs l;
  if (a == 0) return l;
  if (rank_offsets.size() != scales.size() + 1)
    throw std::invalid_argument("rank_offsets must have one entry more than scales");
  if (!rank_offsets.empty() && rank_offsets.back() > total_rank)
    throw std::invalid_argument("rank_offsets exceed the adapter stack's rank R");
  l.a = ptr<void>(a);
  l.b = ptr<void>(b);
  l.total_rank = total_rank;
  l.rank_offsets = rank_offsets.data();
  l.scales = scales.data();
  l.num_adapters = static_cast<int>(scales.size());
  l.adapter_ids = ids ? ptr<int32_t>(ids) : nullptr;
  return l;
}

// y [M, N] = x [M, K] Wᵀ + bias + LoRA (see lorart/backend/cpu.py for the argument list).
void forward(int64_t m, int dtype, uintptr_t x, int64_t ldx, int64_t n, int64_t k, int scheme,
             uintptr_t weight, uintptr_t scales, uintptr_t offsets, int scale_dtype, int group_size,
             uintptr_t bias, uintptr_t a, uintptr_t b, int64_t total_rank,
             const std::vector<int64_t>& rank_offsets, const std::vector<float>& lora_scales,
             uintptr_t ids, uintptr_t y, int64_t ldy, int64_t decode_max_rows) {
  lorart::cpu::ForwardArgs args;
  args.m = m;
  args.dtype = dtype_of(dtype, "x");
  args.x = ptr<void>(x);
  args.ldx = ldx;
  args.bias = bias ? ptr<void>(bias) : nullptr;
  args.y = reinterpret_cast<void*>(y);
  args.ldy = ldy;
  args.w = weight_args(n, k, scheme, weight, scales, offsets, scale_dtype, group_size);
  args.lora = adapter_args(a, b, total_rank, rank_offsets, lora_scales, ids);
  const KernelTable* table = active().load();
  py::gil_scoped_release release;
  table->forward(args, decode_max_rows);
}

// dx [M, K], da [R, K] (fp32), db [N, R] (fp32) for a frozen base; 0 = not needed.
void backward(int64_t m, int dtype, uintptr_t dy, int64_t lddy, uintptr_t x, int64_t ldx, int64_t n,
              int64_t k, int scheme, uintptr_t weight, uintptr_t scales, uintptr_t offsets,
              int scale_dtype, int group_size, uintptr_t a, uintptr_t b, int64_t total_rank,
              const std::vector<int64_t>& rank_offsets, const std::vector<float>& lora_scales,
              uintptr_t ids, uintptr_t dx, int64_t lddx, uintptr_t da, uintptr_t db) {
  lorart::cpu::BackwardArgs args;
  args.m = m;
  args.dtype = dtype_of(dtype, "x");
  args.dy = ptr<void>(dy);
  args.lddy = lddy;
  args.x = ptr<void>(x);
  args.ldx = ldx;
  args.w = weight_args(n, k, scheme, weight, scales, offsets, scale_dtype, group_size);
  args.lora = adapter_args(a, b, total_rank, rank_offsets, lora_scales, ids);
  args.dx = dx ? reinterpret_cast<void*>(dx) : nullptr;
  args.lddx = lddx;
  args.da = da ? reinterpret_cast<float*>(da) : nullptr;
  args.db = db ? reinterpret_cast<float*>(db) : nullptr;
  const KernelTable* table = active().load();
  py::gil_scoped_release release;
  table->backward(args);
}

// out [n1 - n0, K] = rows n0..n1 of a quantized W, dequantized (dtype 0 fp32, 1 bf16).
void dequantize(int64_t n, int64_t k, int scheme, uintptr_t weight, uintptr_t scales,
                uintptr_t offsets, int scale_dtype, int group_size, int64_t n0, int64_t n1,
                uintptr_t out, int dtype) {
  const lorart::cpu::WeightArgs w =
      weight_args(n, k, scheme, weight, scales, offsets, scale_dtype, group_size);
  if (!w.quantized) throw std::invalid_argument("dequantize: the weight is not quantized");
  if (n0 < 0 || n1 > n || n0 > n1) throw std::invalid_argument("dequantize: bad row range");
  const DType dt = dtype_of(dtype, "out");
  const KernelTable* table = active().load();
  py::gil_scoped_release release;
  table->dequantize(w, n0, n1, dt, reinterpret_cast<void*>(out));
}

// y [M, N] (holding x Wᵀ + bias) += the LoRA terms.
void lora_add(int64_t m, int dtype, uintptr_t x, int64_t ldx, int64_t n, int64_t k, uintptr_t a,
              uintptr_t b, int64_t total_rank, const std::vector<int64_t>& rank_offsets,
              const std::vector<float>& lora_scales, uintptr_t ids, uintptr_t y, int64_t ldy) {
  lorart::cpu::ForwardArgs args;
  args.m = m;
  args.dtype = dtype_of(dtype, "x");
  args.x = ptr<void>(x);
  args.ldx = ldx;
  args.y = reinterpret_cast<void*>(y);
  args.ldy = ldy;
  args.w.n = n;
  args.w.k = k;
  args.lora = adapter_args(a, b, total_rank, rank_offsets, lora_scales, ids);
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorart C++ kernels (no libtorch: raw pointers and sizes from Python)";
  m.def("cpu_forward", &forward, "Fused base + LoRA forward (see lorart/backend/cpu.py)");
  m.def("cpu_backward", &backward, "Fused LoRA backward for a frozen base");
  m.def("cpu_dequantize", &dequantize, "Rows of a 4-bit W, dequantized");
  m.def("cpu_lora_add", &lora_add, "y += LoRA(x) for y = x W^T + bias");
  m.def("set_isa", &set_isa, py::arg("isa"),
        "Force 'scalar', 'avx2', 'avx512' or 'avx512bf16' kernels");
  m.def("isa", []() { return std::string(active().load()->name); }, "The ISA in use");
  m.def("available_isas", &available_isas, "ISAs this build and CPU support, best first");
  m.def("stream_sum", &stream_sum, "Bandwidth probe: sum of count float32 at data");
  m.def("max_threads", &max_threads, "OpenMP threads the kernels use");
}
