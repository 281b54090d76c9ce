// pybind11 entry point of lorart._C: the CPU kernels' thin boundary.
#include <pybind11/pybind11.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorart C++ kernels (no libtorch: raw pointers and sizes from Python)";
}
