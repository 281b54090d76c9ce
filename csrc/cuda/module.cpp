// pybind11 entry point of lorart._C_cuda: the CUDA decode kernels' thin boundary.
// Python passes raw device pointers (tensor.data_ptr()) as integers, sizes, and the
// current CUDA stream (torch.cuda.current_stream().cuda_stream); no libtorch here.
// Compiled by the host compiler; the kernels live in decode.cu.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "cuda/decode.h"

namespace py = pybind11;
using lorart::cuda::Act;

namespace {

template <typename P>
P ptr(std::uintptr_t address) {
  return reinterpret_cast<P>(address);
}

void lora_decode(std::uintptr_t y, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t scales,
                 std::uintptr_t offsets, std::uintptr_t bias, std::uintptr_t lora_b,
                 std::uintptr_t lora_t, std::uintptr_t rank_offsets, std::uintptr_t adapter_ids,
                 int64_t m, int64_t n, int64_t k, int64_t ldb, int64_t ldt, int group_size,
                 int scheme, bool quantized, bool scales_f32, int act, std::uintptr_t stream) {
  lorart::cuda::DecodeArgs a;
  a.y = ptr<void*>(y);
  a.x = ptr<const void*>(x);
  a.weight = ptr<const void*>(weight);
  a.scales = ptr<const void*>(scales);
  a.offsets = ptr<const void*>(offsets);
  a.bias = ptr<const void*>(bias);
  a.lora_b = ptr<const void*>(lora_b);
  a.lora_t = ptr<const float*>(lora_t);
  a.rank_offsets = ptr<const int64_t*>(rank_offsets);
  a.adapter_ids = ptr<const int32_t*>(adapter_ids);
  a.m = m;
  a.n = n;
  a.k = k;
  a.ldb = ldb;
  a.ldt = ldt;
  a.group_size = group_size;
  a.scheme = scheme;
  a.quantized = quantized;
  a.scales_f32 = scales_f32;
  a.act = static_cast<Act>(act);
  lorart::cuda::launch_decode(a, stream);
}

void lora_shrink(std::uintptr_t t, std::uintptr_t x, std::uintptr_t lora_a,
                 std::uintptr_t rank_offsets, std::uintptr_t lora_scales,
                 std::uintptr_t adapter_ids, int64_t m, int64_t k, int64_t ldt, int act,
                 std::uintptr_t stream) {
  lorart::cuda::ShrinkArgs a;
  a.t = ptr<float*>(t);
  a.x = ptr<const void*>(x);
  a.lora_a = ptr<const void*>(lora_a);
  a.rank_offsets = ptr<const int64_t*>(rank_offsets);
  a.lora_scales = ptr<const float*>(lora_scales);
  a.adapter_ids = ptr<const int32_t*>(adapter_ids);
  a.m = m;
  a.k = k;
  a.ldt = ldt;
  a.act = static_cast<Act>(act);
  lorart::cuda::launch_shrink(a, stream);
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "lorart CUDA decode kernels (raw device pointers and sizes from Python)";
  m.attr("MAX_ROWS") = lorart::cuda::kMaxRows;
#ifdef LORART_CUDA_ARCHS
  m.attr("ARCHS") = LORART_CUDA_ARCHS;
#else
  m.attr("ARCHS") = "";
#endif
  // Pointers are integers (0 = absent). y [M, N], x [M, K], weight uint8 [N, K/2]
  // (scheme 0-2: asym, sym, nf4), int8 [N, K] (scheme 3: the 8-bit layout, offsets
  // optional, groups from 16) or act [N, K] (dense), scales/offsets [N, K/group], bias
  // [N], lora_b [N, ldb], lora_t fp32 [M, ldt], rank_offsets int64 [S+1], adapter_ids
  // int32 [M]; act 0 = fp16, 1 = bf16.
  m.def("lora_decode", &lora_decode, py::arg("y"), py::arg("x"), py::arg("weight"),
        py::arg("scales"), py::arg("offsets"), py::arg("bias"), py::arg("lora_b"),
        py::arg("lora_t"), py::arg("rank_offsets"), py::arg("adapter_ids"), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("ldb"), py::arg("ldt"), py::arg("group_size"),
        py::arg("scheme"), py::arg("quantized"), py::arg("scales_f32"), py::arg("act"),
        py::arg("stream"), py::call_guard<py::gil_scoped_release>(),
        "Fused decode layer y = x W^T + bias + per-row LoRA expand, M <= 16 rows.");
  // t fp32 [M, ldt], x [M, K], lora_a [R, K], lora_scales fp32 [S].
  m.def("lora_shrink", &lora_shrink, py::arg("t"), py::arg("x"), py::arg("lora_a"),
        py::arg("rank_offsets"), py::arg("lora_scales"), py::arg("adapter_ids"), py::arg("m"),
        py::arg("k"), py::arg("ldt"), py::arg("act"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>(),
        "t[m, j] = scale_s * x[m] . A[rank_offsets[s] + j], s = adapter_ids[m] (-1 skipped).");
  m.def("runtime_version", &lorart::cuda::runtime_version, "CUDA runtime version built in");
  m.def("driver_version", &lorart::cuda::driver_version,
        "installed driver's CUDA version, 0 if none");
}
