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

void check_layout(long long d, int bits, long long bucket) {
  if (d < 1) throw py::value_error("d must be >= 1");
  if (bits != 1 && bits != 2 && bits != 4 && bits != 8) throw py::value_error("bits must be 1, 2, 4 or 8");
  if (bucket < 8 || bucket % 8 != 0 || bucket > (1 << 20))
    throw py::value_error("bucket must be a multiple of 8 in [8, 2^20]");
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
                           std::uintptr_t nonfinite, std::uintptr_t s) {
    check_sizes(n, d);
    py::gil_scoped_release release;
    g::weighted_sum(rows(r), n, static_cast<std::size_t>(d), ptr<const double>(coef), ptr<float>(out),
                    nonfinite ? ptr<int>(nonfinite) : nullptr, stream(s));
  }, py::arg("rows"), py::arg("n"), py::arg("d"), py::arg("coef"), py::arg("out"), py::arg("nonfinite"),
     py::arg("stream"), "out = sum_i coef[i] rows[i]; nonfinite (0: none) becomes nonzero on NaN/Inf output.");

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

  // ---- compression codecs: acc += w * decode(payload), buffers already on the device
  m.def("scatter_add", [](std::uintptr_t acc, std::uintptr_t idx, int index_bytes, std::uintptr_t val,
                          long long m_, double w, std::uintptr_t s) {
    if (index_bytes != 4 && index_bytes != 8) throw py::value_error("index_bytes must be 4 or 8");
    if (m_ < 0) throw py::value_error("m must be >= 0");
    py::gil_scoped_release release;
    g::scatter_add(ptr<double>(acc), ptr<const void>(idx), index_bytes, ptr<const float>(val),
                   static_cast<std::size_t>(m_), w, stream(s));
  }, py::arg("acc"), py::arg("idx"), py::arg("index_bytes"), py::arg("val"), py::arg("m"), py::arg("w"),
     py::arg("stream"));

  m.def("dequantize_uniform_add", [](std::uintptr_t acc, std::uintptr_t lo, std::uintptr_t step,
                                     std::uintptr_t codes, long long d, int bits, long long bucket, double w,
                                     std::uintptr_t s) {
    check_layout(d, bits, bucket);
    py::gil_scoped_release release;
    g::dequantize_uniform_add(ptr<double>(acc), ptr<const float>(lo), ptr<const float>(step),
                              ptr<const std::uint8_t>(codes), static_cast<std::size_t>(d), bits,
                              static_cast<std::size_t>(bucket), w, stream(s));
  }, py::arg("acc"), py::arg("lo"), py::arg("step"), py::arg("codes"), py::arg("d"), py::arg("bits"),
     py::arg("bucket"), py::arg("w"), py::arg("stream"));

  m.def("dequantize_qsgd_add", [](std::uintptr_t acc, std::uintptr_t norm, std::uintptr_t codes, long long d,
                                  int s_levels, long long bucket, double w, std::uintptr_t s) {
    check_layout(d, 8, bucket);
    if (s_levels < 1 || s_levels > 127) throw py::value_error("QSGD levels s must be in [1, 127]");
    py::gil_scoped_release release;
    g::dequantize_qsgd_add(ptr<double>(acc), ptr<const float>(norm), ptr<const std::int8_t>(codes),
                           static_cast<std::size_t>(d), s_levels, static_cast<std::size_t>(bucket), w, stream(s));
  }, py::arg("acc"), py::arg("norm"), py::arg("codes"), py::arg("d"), py::arg("s"), py::arg("bucket"),
     py::arg("w"), py::arg("stream"));

  m.def("dequantize_sign_add", [](std::uintptr_t acc, std::uintptr_t scale, std::uintptr_t signs, long long d,
                                  long long bucket, double w, std::uintptr_t s) {
    check_layout(d, 1, bucket);
    py::gil_scoped_release release;
    g::dequantize_sign_add(ptr<double>(acc), ptr<const float>(scale), ptr<const std::uint8_t>(signs),
                           static_cast<std::size_t>(d), static_cast<std::size_t>(bucket), w, stream(s));
  }, py::arg("acc"), py::arg("scale"), py::arg("signs"), py::arg("d"), py::arg("bucket"), py::arg("w"),
     py::arg("stream"));

  m.def("dequantize_levels_add", [](std::uintptr_t acc, std::uintptr_t scale, std::uintptr_t codes,
                                    std::uintptr_t levels, long long len, int bits, long long block, double w,
                                    std::uintptr_t s) {
    check_layout(len, bits, block);
    py::gil_scoped_release release;
    g::dequantize_levels_add(ptr<double>(acc), ptr<const float>(scale), ptr<const std::uint8_t>(codes),
                             ptr<const double>(levels), static_cast<std::size_t>(len), bits,
                             static_cast<std::size_t>(block), w, stream(s));
  }, py::arg("acc"), py::arg("scale"), py::arg("codes"), py::arg("levels"), py::arg("len"), py::arg("bits"),
     py::arg("block"), py::arg("w"), py::arg("stream"));

  m.def("sign_vote_add", [](std::uintptr_t votes, std::uintptr_t signs, long long d, std::uintptr_t s) {
    if (d < 1) throw py::value_error("d must be >= 1");
    py::gil_scoped_release release;
    g::sign_vote_add(ptr<std::int32_t>(votes), ptr<const std::uint8_t>(signs), static_cast<std::size_t>(d),
                     stream(s));
  }, py::arg("votes"), py::arg("signs"), py::arg("d"), py::arg("stream"));

  m.def("hadamard_rotate", [](std::uintptr_t x, long long len, long long B, std::uint64_t seed, bool inverse,
                              std::uintptr_t s) {
    if (B < 2 || (B & (B - 1)) != 0 || len < B || len % B != 0)
      throw py::value_error("block must be a power of two dividing the length");
    py::gil_scoped_release release;
    g::hadamard_rotate(ptr<float>(x), static_cast<std::size_t>(len), static_cast<std::size_t>(B), seed, inverse,
                       stream(s));
  }, py::arg("x"), py::arg("len"), py::arg("block"), py::arg("seed"), py::arg("inverse"), py::arg("stream"));

  m.def("gaussian_noise", [](std::uintptr_t out, long long d, double stddev, std::uint64_t seed,
                             std::uint64_t offset, bool add, std::uintptr_t s) {
    if (d < 0) throw py::value_error("d must be >= 0");
    if (!(stddev >= 0) || stddev > 3.4e38) throw py::value_error("stddev must be finite and >= 0");
    py::gil_scoped_release release;
    g::gaussian_noise(ptr<float>(out), static_cast<std::size_t>(d), static_cast<float>(stddev), seed, offset, add,
                      stream(s));
  }, py::arg("out"), py::arg("d"), py::arg("stddev"), py::arg("seed"), py::arg("offset"), py::arg("add"),
     py::arg("stream"));
}
