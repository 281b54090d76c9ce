# lorart._C_cuda: the CUDA decode kernels, a pybind11 module separate from lorart._C so
# the CPU module never links the CUDA runtime. Included by the top-level CMakeLists.txt
# when a CUDA compiler is found, and by .ci/cuda_check on its own (needs Python and
# pybind11 found by the includer).
#
# Targets sm_80 (A100) and sm_90 (H100/H200) as SASS, plus compute_90 PTX so newer GPUs
# can JIT it. Override with -DLORART_CUDA_ARCHITECTURES="80-real;90" syntax.
set(LORART_CUDA_ARCHITECTURES "80-real;90" CACHE STRING "CUDA architectures for _C_cuda")
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES ${LORART_CUDA_ARCHITECTURES})
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

set(LORART_CUDA_DIR ${CMAKE_CURRENT_LIST_DIR})

# Kernels compiled by nvcc into a static library; the pybind11 boundary by the host
# compiler (pybind11's headers never pass through nvcc).
add_library(lorart_cuda_kernels STATIC ${LORART_CUDA_DIR}/decode.cu)
target_include_directories(lorart_cuda_kernels PRIVATE ${LORART_CUDA_DIR}/..)
set_target_properties(lorart_cuda_kernels PROPERTIES
  CUDA_ARCHITECTURES "${LORART_CUDA_ARCHITECTURES}"
  CUDA_STANDARD 17
  CUDA_STANDARD_REQUIRED ON
  POSITION_INDEPENDENT_CODE ON
  CUDA_VISIBILITY_PRESET hidden
  CXX_VISIBILITY_PRESET hidden)
# ptxas reports register spills and local-memory use as warnings. LORART_CUDA_WERROR=ON
# (set by .ci/cuda_check) makes every warning an error; package builds keep it OFF so a
# newer nvcc's new warnings never break `pip install` on a user's machine.
option(LORART_CUDA_WERROR "Treat CUDA kernel build warnings as errors" OFF)
target_compile_options(lorart_cuda_kernels PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:-O3 -Xcompiler=-Wall,-Wextra -Xptxas=-warn-spills,-warn-lmem-usage>)
if(LORART_CUDA_WERROR)
  target_compile_options(lorart_cuda_kernels PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:--Werror=all-warnings -Xcompiler=-Werror -Xptxas=-Werror>)
endif()
target_link_libraries(lorart_cuda_kernels PUBLIC CUDA::cudart_static)

pybind11_add_module(_C_cuda ${LORART_CUDA_DIR}/module.cpp)
target_include_directories(_C_cuda PRIVATE ${LORART_CUDA_DIR}/..)
target_link_libraries(_C_cuda PRIVATE lorart_cuda_kernels)
string(REPLACE ";" " " LORART_CUDA_ARCHS_TEXT "${LORART_CUDA_ARCHITECTURES}")
target_compile_definitions(_C_cuda PRIVATE LORART_CUDA_ARCHS="${LORART_CUDA_ARCHS_TEXT}")
if(CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
  target_compile_options(_C_cuda PRIVATE -O2 -Wall -Wextra)
  if(LORART_CUDA_WERROR)
    target_compile_options(_C_cuda PRIVATE -Werror)
  endif()
endif()

install(TARGETS _C_cuda LIBRARY DESTINATION lorart)
