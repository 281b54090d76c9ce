// Error checking for every CUDA runtime call and kernel launch: a failure becomes a
// C++ exception naming the call, which pybind11 turns into a Python RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace lorart::cuda {

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("lorart CUDA: ") + what + " failed with " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") at " + file +
                           ":" + std::to_string(line));
}

}  // namespace lorart::cuda

#define LORART_CUDA_CHECK(call) ::lorart::cuda::check_cuda((call), #call, __FILE__, __LINE__)

// After a <<<...>>> launch: configuration errors surface here, not at the next call.
#define LORART_CUDA_CHECK_LAUNCH(kernel_name) \
  ::lorart::cuda::check_cuda(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)
