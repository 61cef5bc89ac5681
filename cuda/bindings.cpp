// fedagg._cuda: the CUDA backend. Takes device pointers and a stream handle as
// integers: the Python layer (fedagg/_gpu.py) gets them from the caller's
// tensors (torch or CuPy, via __cuda_array_interface__ / data_ptr), keeps
// those tensors alive, allocates outputs with the caller's framework, and
// passes the caller's current stream. This module never links libtorch.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "fedagg_cuda.hpp"

namespace py = pybind11;
namespace g = fedagg::gpu;

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}
cudaStream_t stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
const float* const* rows(std::uintptr_t p) { return ptr<const float* const>(p); }

void check_sizes(int n, long long d) {
  if (n < 1) throw py::value_error("need at least one update");
  if (d < 1) throw py::value_error("updates have no coordinates");
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "fedagg CUDA kernels (launched on the caller's stream)";
  static py::exception<g::CudaError> cuda_error(m, "CudaError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const g::CudaError& e) {
      if (e.code == cudaErrorMemoryAllocation) PyErr_SetString(PyExc_MemoryError, e.what());
      else py::set_error(cuda_error, e.what());
    }
  });

  m.def("device_count", &g::device_count, "CUDA devices visible to this process (0 without a driver).");
  m.def("max_sorted_n", &g::max_sorted_n, "Largest n of the coordinate-wise rules on the GPU.");

  m.def("weighted_sum", [](std::uintptr_t r, int n, long long d, std::uintptr_t coef, std::uintptr_t out,
                           std::uintptr_t s) {
    check_sizes(n, d);
    py::gil_scoped_release release;
    g::weighted_sum(rows(r), n, static_cast<std::size_t>(d), ptr<const double>(coef), ptr<float>(out), stream(s));
  }, py::arg("rows"), py::arg("n"), py::arg("d"), py::arg("coef"), py::arg("out"), py::arg("stream"));

  m.def("pairwise_sqdist", [](std::uintptr_t r, int n, long long d, std::uintptr_t D, std::uintptr_t s) {
    check_sizes(n, d);
    py::gil_scoped_release release;
    g::pairwise_sqdist(rows(r), n, static_cast<std::size_t>(d), ptr<double>(D), stream(s));
  }, py::arg("rows"), py::arg("n"), py::arg("d"), py::arg("D"), py::arg("stream"));

  m.def("sqdist_to", [](std::uintptr_t r, int n, long long d, std::uintptr_t x, std::uintptr_t out,
                        std::uintptr_t s) {
    check_sizes(n, d);
    py::gil_scoped_release release;
    g::sqdist_to(rows(r), n, static_cast<std::size_t>(d), ptr<const float>(x), ptr<double>(out), stream(s));
  }, py::arg("rows"), py::arg("n"), py::arg("d"), py::arg("x"), py::arg("out"), py::arg("stream"),
     "x = 0 gives squared norms.");

  m.def("nonfinite_rows", [](std::uintptr_t r, int n, long long d, std::uintptr_t out, std::uintptr_t s) {
    check_sizes(n, d);
    py::gil_scoped_release release;
    g::nonfinite_rows(rows(r), n, static_cast<std::size_t>(d), ptr<int>(out), stream(s));
  }, py::arg("rows"), py::arg("n"), py::arg("d"), py::arg("out"), py::arg("stream"));

  m.def("sorted_reduce", [](std::uintptr_t r, int n, long long d, int mode, int f, std::uintptr_t lo,
                            std::uintptr_t hi, long long net_size, std::uintptr_t out, std::uintptr_t flag,
                            std::uintptr_t s) {
    check_sizes(n, d);
    if (mode < 0 || mode > 2) throw py::value_error("mode must be 0, 1 or 2");
    if (f < 0 || (mode == 1 && 2 * f >= n) || (mode == 2 && 2 * f >= n))
      throw py::value_error("f out of range for n");
    py::gil_scoped_release release;
    g::sorted_reduce(rows(r), n, static_cast<std::size_t>(d), mode, f, ptr<const unsigned>(lo),
                     ptr<const unsigned>(hi), static_cast<std::size_t>(net_size), ptr<float>(out),
                     ptr<int>(flag), stream(s));
  }, py::arg("rows"), py::arg("n"), py::arg("d"), py::arg("mode"), py::arg("f"), py::arg("net_lo"),
     py::arg("net_hi"), py::arg("net_size"), py::arg("out"), py::arg("flag"), py::arg("stream"));
}
