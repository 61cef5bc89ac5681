// fedagg._core: the CPU backend. Arrays arrive already validated by the Python
// layer (fedagg/_arrays.py); the checks here keep bad calls from crashing.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <string>

#include "fedagg/check.hpp"
#include "fedagg/checksum.hpp"
#include "fedagg/coef_math.hpp"
#include "fedagg/kernels.hpp"
#include "fedagg/noise.hpp"
#include "fedagg/philox.hpp"
#include "fedagg/ops.hpp"
#include "fedagg/sort_math.hpp"
#include "fedagg/quant.hpp"
#include "fedagg/secagg.hpp"
#include "fedagg/sparse.hpp"
#include "fedagg/threadpool.hpp"

namespace py = pybind11;
using fedagg::Elem;
using fedagg::Rows;

namespace {

using f32 = py::array_t<float, py::array::forcecast>;
using f64 = py::array_t<double, py::array::c_style | py::array::forcecast>;

void require_f32(const py::array& a, const char* what) {
  if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4)
    throw py::type_error(std::string(what) + " must be a float32 array");
}

// What an updates array holds: float32; float16 (IEEE binary16); uint16, read as bfloat16 bit
// patterns (NumPy has no bfloat16: fedagg passes torch's bfloat16 tensors viewed as uint16).
// Half precision only where `half` (the ops that read it through float32 tiles).
Elem elem_of(const py::array& a, const std::string& what, bool half) {
  const char kind = a.dtype().kind();
  if (kind == 'f' && a.itemsize() == 4) return Elem::F32;
  if (half && kind == 'f' && a.itemsize() == 2) return Elem::F16;
  if (half && kind == 'u' && a.itemsize() == 2) return Elem::BF16;
  throw py::type_error(what + (half ? " must be a float32, float16 or bfloat16 (as uint16) array"
                                    : " must be a float32 array"));
}

// The updates: a 2-D array whose rows are contiguous, or a sequence of contiguous arrays of one
// size and one element type (elem_of). Keeps borrowed pointers only; the caller keeps the
// arrays alive for the call.
Rows to_rows(const py::object& obj, bool half = true) {
  Rows rows;
  if (py::isinstance<py::array>(obj)) {
    py::array a = py::reinterpret_borrow<py::array>(obj);
    const Elem e = elem_of(a, "updates", half);
    if (e != Elem::F32) rows.elem.assign(static_cast<std::size_t>(a.shape(0)), e);
    if (a.ndim() != 2) throw py::value_error("updates must be a 2-D (n, d) array");
    if (a.shape(1) > 1 && a.strides(1) != a.itemsize())
      throw py::value_error("updates must be contiguous along the coordinate axis");
    rows.d = static_cast<std::size_t>(a.shape(1));
    const char* base = static_cast<const char*>(a.data());
    for (py::ssize_t i = 0; i < a.shape(0); ++i)
      rows.ptr.push_back(reinterpret_cast<const float*>(base + i * a.strides(0)));
  } else if (py::isinstance<py::list>(obj) || py::isinstance<py::tuple>(obj)) {
    py::sequence seq = py::reinterpret_borrow<py::sequence>(obj);
    bool first = true;
    for (py::size_t i = 0; i < seq.size(); ++i) {
      py::object item = seq[i];
      if (!py::isinstance<py::array>(item))
        throw py::type_error("updates[" + std::to_string(i) + "] must be a float32 array");
      py::array a = py::reinterpret_borrow<py::array>(item);
      rows.elem.push_back(elem_of(a, "updates[" + std::to_string(i) + "]", half));
      if (!(a.flags() & py::array::c_style))
        throw py::value_error("updates[" + std::to_string(i) + "] must be C-contiguous");
      const auto size = static_cast<std::size_t>(a.size());
      if (first) rows.d = size;
      else if (size != rows.d)
        throw py::value_error("updates[" + std::to_string(i) + "] has " + std::to_string(size) +
                              " coordinates, expected " + std::to_string(rows.d));
      first = false;
      rows.ptr.push_back(static_cast<const float*>(a.data()));
    }
  } else {
    throw py::type_error("updates must be a 2-D array or a list of arrays");
  }
  if (rows.ptr.empty()) throw py::value_error("updates is empty");
  bool any_half = false;
  for (Elem e : rows.elem) any_half |= e != Elem::F32;
  if (!any_half) rows.elem.clear();
  return rows;
}

// A contiguous float32 vector's data (any shape, read as flat).
const float* vector_f32(const py::array& a, const char* what) {
  require_f32(a, what);
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be contiguous");
  return static_cast<const float*>(a.data());
}

// Indices are uint32 while they fit, else uint64.
template <class Fn>
py::tuple with_index(std::size_t d, Fn&& fn) {
  if (d <= 0xffffffffull) return fn(std::uint32_t{});
  return fn(std::uint64_t{});
}

py::array_t<float> new_out(std::size_t d) { return py::array_t<float>(static_cast<py::ssize_t>(d)); }

const double* square(const f64& D, int& n, const char* what) {
  if (D.ndim() != 2 || D.shape(0) != D.shape(1))
    throw py::value_error(std::string(what) + " must be a square 2-D array");
  n = static_cast<int>(D.shape(0));
  return D.data();
}

template <class Fn>
py::tuple coordinate_rule(const py::object& updates, Fn&& fn) {
  Rows rows = to_rows(updates);
  auto out = new_out(rows.d);
  float* o = out.mutable_data();
  bool bad;
  {
    py::gil_scoped_release release;
    bad = fn(rows, o);
  }
  return py::make_tuple(out, bad);
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "fedagg CPU kernels (C++, multithreaded, runtime ISA dispatch)";
  py::register_exception<fedagg::InvalidArgument>(m, "InvalidArgument", PyExc_ValueError);

  m.def("isa", [] { return std::string(fedagg::kernels().isa); },
        "Instruction set of the kernels in use.");
  m.def("available_isas", [] {
    std::vector<std::string> out;
    for (const char* name : {"avx512", "avx2", "base"})
      if (fedagg::kernel_table(name)) out.emplace_back(name);
    return out;
  });
  m.def("_force_isa", [](const std::string& isa) { fedagg::force_isa(isa.c_str()); },
        py::arg("isa"), "Testing: run the kernels of a lower instruction set ('' = best).");
  m.def("widen", [](const py::array& x) {
    const Elem e = elem_of(x, "x", true);
    if (e == Elem::F32 || !(x.flags() & py::array::c_style))
      throw py::type_error("x must be a C-contiguous float16 or bfloat16 (as uint16) array");
    py::array_t<float> out(x.request().shape);
    const auto* src = static_cast<const std::uint16_t*>(x.data());
    float* dst = out.mutable_data();
    const auto len = static_cast<std::size_t>(x.size());
    {
      py::gil_scoped_release release;
      fedagg::kernels().widen(src, static_cast<int>(e), dst, len);
    }
    return out;
  }, py::arg("x"), "x widened to float32, exactly: float16, or bfloat16 bit patterns as uint16.");
  m.def("num_threads", &fedagg::num_threads);
  m.def("set_num_threads", [](int n) {
    py::gil_scoped_release release;
    fedagg::set_num_threads(n);
  }, py::arg("n"));

  m.def("weighted_sum", [](const py::object& updates, const f64& coef) {
    Rows rows = to_rows(updates);
    if (coef.ndim() != 1 || static_cast<std::size_t>(coef.shape(0)) != rows.n())
      throw py::value_error("coef must have one entry per update");
    auto out = new_out(rows.d);
    float* o = out.mutable_data();
    {
      py::gil_scoped_release release;
      fedagg::weighted_sum(rows, coef.data(), o);
    }
    return out;
  }, py::arg("updates"), py::arg("coef"));

  m.def("axpy_f64", [](py::array_t<double, py::array::c_style> acc, const py::array& x, double w) {
    require_f32(x, "x");
    if (!(x.flags() & py::array::c_style) || acc.ndim() != 1 || x.size() != acc.size())
      throw py::value_error("acc and x must be contiguous with the same size");
    double* a = acc.mutable_data();
    const float* p = static_cast<const float*>(x.data());
    const auto d = static_cast<std::size_t>(acc.size());
    py::gil_scoped_release release;
    fedagg::axpy_f64(a, p, w, d);
  }, py::arg("acc"), py::arg("x"), py::arg("w"));

  m.def("fold_f64", [](py::array_t<double, py::array::c_style> acc, const py::object& updates, const f64& w) {
    Rows rows = to_rows(updates, false);
    if (acc.ndim() != 1 || static_cast<std::size_t>(acc.shape(0)) != rows.d)
      throw py::value_error("acc must be a float64 vector as long as each update");
    if (w.ndim() != 1 || static_cast<std::size_t>(w.shape(0)) != rows.n())
      throw py::value_error("w must have one entry per update");
    double* a = acc.mutable_data();
    py::gil_scoped_release release;
    fedagg::fold_f64(a, rows, w.data());
  }, py::arg("acc"), py::arg("updates"), py::arg("w"));

  auto matrix = [](std::vector<double>&& v, std::size_t n, std::size_t m) {
    py::array_t<double> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(m)});
    std::copy(v.begin(), v.end(), out.mutable_data());
    return out;
  };
  auto vector = [](std::vector<double>&& v) {
    py::array_t<double> out(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), out.mutable_data());
    return out;
  };

  m.def("pairwise_sqdist", [matrix](const py::object& updates, bool exact) {
    Rows rows = to_rows(updates);
    std::vector<double> D;
    {
      py::gil_scoped_release release;
      D = exact ? fedagg::pairwise_sqdist_exact(rows) : fedagg::pairwise_sqdist(rows);
    }
    return matrix(std::move(D), rows.n(), rows.n());
  }, py::arg("updates"), py::arg("exact") = false,
     "n x n squared Euclidean distances; exact=True computes in float64 throughout.");

  m.def("sqdist_to", [vector](const py::object& updates, const py::array& x) {
    Rows rows = to_rows(updates);
    require_f32(x, "x");
    if (!(x.flags() & py::array::c_style) || static_cast<std::size_t>(x.size()) != rows.d)
      throw py::value_error("x must be contiguous with d coordinates");
    const float* p = static_cast<const float*>(x.data());
    std::vector<double> r;
    {
      py::gil_scoped_release release;
      r = fedagg::sqdist_to(rows, p);
    }
    return vector(std::move(r));
  }, py::arg("updates"), py::arg("x"));

  m.def("sqnorms", [vector](const py::object& updates) {
    Rows rows = to_rows(updates);
    std::vector<double> r;
    {
      py::gil_scoped_release release;
      r = fedagg::sqnorms(rows);
    }
    return vector(std::move(r));
  }, py::arg("updates"));

  m.def("coordinate_median", [](const py::object& updates) {
    return coordinate_rule(updates, [](const Rows& r, float* o) { return fedagg::coordinate_median(r, o); });
  }, py::arg("updates"), "Returns (median, saw_nonfinite).");
  m.def("trimmed_mean", [](const py::object& updates, int f) {
    return coordinate_rule(updates, [f](const Rows& r, float* o) { return fedagg::trimmed_mean(r, f, o); });
  }, py::arg("updates"), py::arg("f"), "Returns (mean of ranks [f, n-f), saw_nonfinite).");
  m.def("bulyan_reduce", [](const py::object& updates, int f) {
    return coordinate_rule(updates, [f](const Rows& r, float* o) { return fedagg::bulyan_reduce(r, f, o); });
  }, py::arg("updates"), py::arg("f"),
     "Bulyan's coordinate stage on theta rows: mean of the theta - 2f values closest to the median.");

  m.def("nonfinite_rows", [](const py::object& updates) {
    Rows rows = to_rows(updates);
    std::vector<std::uint8_t> bad;
    {
      py::gil_scoped_release release;
      bad = fedagg::nonfinite_rows(rows);
    }
    py::array_t<bool> out(static_cast<py::ssize_t>(bad.size()));
    for (std::size_t i = 0; i < bad.size(); ++i) out.mutable_data()[i] = bad[i] != 0;
    return out;
  }, py::arg("updates"));

  m.def("mix", [](const py::object& updates, const f64& A) {
    Rows rows = to_rows(updates);
    if (A.ndim() != 2 || static_cast<std::size_t>(A.shape(1)) != rows.n())
      throw py::value_error("A must be an (m, n) matrix");
    const int mrows = static_cast<int>(A.shape(0));
    py::array_t<float> out({static_cast<py::ssize_t>(mrows), static_cast<py::ssize_t>(rows.d)});
    std::vector<float*> ptrs(mrows);
    for (int i = 0; i < mrows; ++i) ptrs[i] = out.mutable_data() + static_cast<std::size_t>(i) * rows.d;
    {
      py::gil_scoped_release release;
      fedagg::mix(rows, A.data(), mrows, ptrs.data());
    }
    return out;
  }, py::arg("updates"), py::arg("A"), "Rows of A @ updates, accumulated in float64.");

  m.def("krum_scores", [vector](const f64& D, int f) {
    int n;
    const double* d = square(D, n, "D");
    return vector(fedagg::krum_scores(d, n, f));
  }, py::arg("D"), py::arg("f"));
  m.def("bulyan_select", [](const f64& D, int f) {
    int n;
    const double* d = square(D, n, "D");
    auto s = fedagg::bulyan_select(d, n, f);
    py::array_t<std::int64_t> out(static_cast<py::ssize_t>(s.size()));
    std::copy(s.begin(), s.end(), out.mutable_data());
    return out;
  }, py::arg("D"), py::arg("f"));
  m.def("nnm_mixing", [matrix](const f64& D, int f) {
    int n;
    const double* d = square(D, n, "D");
    return matrix(fedagg::nnm_mixing(d, n, f), n, n);
  }, py::arg("D"), py::arg("f"));
  m.def("weiszfeld", [vector](const f64& D, const f64& alpha, double nu, int maxiter, double tol) {
    int n;
    const double* d = square(D, n, "D");
    if (alpha.ndim() != 1 || alpha.shape(0) != n) throw py::value_error("alpha must have n entries");
    FEDAGG_CHECK(nu > 0 && maxiter >= 0 && tol >= 0, "need nu > 0, maxiter >= 0, tol >= 0");
    std::vector<double> a(n), scratch(2 * static_cast<std::size_t>(n));
    double obj = 0.0;
    int it = fedagg::coef::weiszfeld(d, n, alpha.data(), nu, maxiter, tol, a.data(), &obj, scratch.data());
    return py::make_tuple(vector(std::move(a)), it, obj);
  }, py::arg("D"), py::arg("alpha"), py::arg("nu"), py::arg("maxiter"), py::arg("tol"),
     "Smoothed Weiszfeld on the distance matrix; returns (coefficients, iterations, objective).");
  m.def("centered_clipping", [vector](const f64& D, const f64& w, double tau, int iters) {
    int m1;
    const double* d = square(D, m1, "D");
    const int n = m1 - 1;
    if (n < 1 || w.ndim() != 1 || w.shape(0) != n) throw py::value_error("w must have n entries, D (n+1) x (n+1)");
    FEDAGG_CHECK(tau > 0 && iters >= 1, "need tau > 0 and iters >= 1");
    std::vector<double> a(m1), scratch(2 * static_cast<std::size_t>(m1));
    int clipped = fedagg::coef::centered_clipping(d, n, w.data(), tau, iters, a.data(), scratch.data());
    return py::make_tuple(vector(std::move(a)), clipped);
  }, py::arg("D"), py::arg("w"), py::arg("tau"), py::arg("iters"),
     "Centered clipping on the distance matrix (index 0 = start point); returns (coefficients, clipped).");

  // ---- sparse codecs
  m.def("topk", [](const py::array& x, long long k) {
    const float* p = vector_f32(x, "x");
    const auto d = static_cast<std::size_t>(x.size());
    if (k < 1 || static_cast<std::size_t>(k) > d) throw py::value_error("k must satisfy 1 <= k <= d");
    const auto kk = static_cast<std::size_t>(k);
    return with_index(d, [&](auto tag) {
      using Index = decltype(tag);
      py::array_t<Index> idx(static_cast<py::ssize_t>(kk));
      py::array_t<float> val(static_cast<py::ssize_t>(kk));
      Index* ip = idx.mutable_data();
      float* vp = val.mutable_data();
      {
        py::gil_scoped_release release;
        fedagg::topk(p, d, kk, ip, vp);
      }
      return py::make_tuple(idx, val);
    });
  }, py::arg("x"), py::arg("k"),
     "The k coordinates of largest magnitude, in index order (ties: lowest indices).");

  m.def("gather_at_least", [](const py::array& x, float threshold) {
    const float* p = vector_f32(x, "x");
    const auto d = static_cast<std::size_t>(x.size());
    if (!(threshold >= 0.0f) || !std::isfinite(threshold)) throw py::value_error("threshold must be finite and >= 0");
    return with_index(d, [&](auto tag) {
      using Index = decltype(tag);
      fedagg::GatherPlan plan;
      {
        py::gil_scoped_release release;
        plan = fedagg::plan_gather(p, d, fedagg::magnitude_key(threshold));
      }
      const std::size_t m = plan.total_gt + plan.total_eq;
      py::array_t<Index> idx(static_cast<py::ssize_t>(m));
      py::array_t<float> val(static_cast<py::ssize_t>(m));
      Index* ip = idx.mutable_data();
      float* vp = val.mutable_data();
      {
        py::gil_scoped_release release;
        fedagg::gather(p, d, plan, m, ip, vp);
      }
      return py::make_tuple(idx, val);
    });
  }, py::arg("x"), py::arg("threshold"), "Every coordinate with |x| >= threshold, in index order.");

  m.def("scatter_add", [](py::array_t<double, py::array::c_style> acc, const py::array& idx,
                          const py::array& val, double w) {
    const float* v = vector_f32(val, "values");
    if (acc.ndim() != 1) throw py::value_error("acc must be 1-D");
    if (idx.ndim() != 1 || idx.size() != val.size() || !(idx.flags() & py::array::c_style))
      throw py::value_error("indices and values must be contiguous 1-D arrays of one length");
    const auto d = static_cast<std::size_t>(acc.size());
    const auto m = static_cast<std::size_t>(idx.size());
    double* a = acc.mutable_data();
    auto run = [&](auto* ip) {
      for (std::size_t i = 0; i < m; ++i)
        if (static_cast<std::size_t>(ip[i]) >= d)
          throw py::value_error("index " + std::to_string(ip[i]) + " out of range for d = " + std::to_string(d));
      py::gil_scoped_release release;
      fedagg::scatter_add(a, d, ip, v, m, w);
    };
    if (py::isinstance<py::array_t<std::uint32_t>>(idx) && idx.dtype().kind() == 'u' && idx.itemsize() == 4)
      run(static_cast<const std::uint32_t*>(idx.data()));
    else if (py::isinstance<py::array_t<std::uint64_t>>(idx) && idx.dtype().kind() == 'u' && idx.itemsize() == 8)
      run(static_cast<const std::uint64_t*>(idx.data()));
    else
      throw py::type_error("indices must be uint32 or uint64");
  }, py::arg("acc"), py::arg("idx"), py::arg("val"), py::arg("w"), "acc[idx] += w * val (float64).");

  // ---- quantizers (see fedagg/quant.hpp); sizes are checked here, layouts in the kernels
  auto nbuckets = [](std::size_t d, long long bucket) {
    if (bucket < 8 || bucket % 8 != 0 || bucket > (1 << 20))
      throw py::value_error("bucket must be a multiple of 8 in [8, 2^20]");
    return (d + static_cast<std::size_t>(bucket) - 1) / static_cast<std::size_t>(bucket);
  };
  auto need = [](const py::array& a, std::size_t n, const char* what, char kind, int itemsize) {
    if (a.ndim() != 1 || static_cast<std::size_t>(a.size()) != n || !(a.flags() & py::array::c_style) ||
        a.dtype().kind() != kind || a.itemsize() != itemsize)
      throw py::value_error(std::string(what) + ": expected a contiguous 1-D array of " + std::to_string(n) +
                            " elements of the right dtype");
  };
  auto acc_of = [](py::array_t<double, py::array::c_style>& acc) {
    if (acc.ndim() != 1 || acc.size() < 1) throw py::value_error("acc must be a non-empty 1-D float64 array");
    return static_cast<std::size_t>(acc.size());
  };

  m.def("quantize_uniform", [nbuckets](const py::array& x, int bits, long long bucket, std::uint64_t seed) {
    const float* p = vector_f32(x, "x");
    const auto d = static_cast<std::size_t>(x.size());
    if (d < 1) throw py::value_error("x is empty");
    if (bits != 1 && bits != 2 && bits != 4 && bits != 8) throw py::value_error("bits must be 1, 2, 4 or 8");
    const std::size_t nb = nbuckets(d, bucket);
    py::array_t<float> lo(static_cast<py::ssize_t>(nb)), step(static_cast<py::ssize_t>(nb));
    py::array_t<std::uint8_t> codes(static_cast<py::ssize_t>((d * bits + 7) / 8));
    float* l = lo.mutable_data(); float* s = step.mutable_data(); std::uint8_t* c = codes.mutable_data();
    {
      py::gil_scoped_release release;
      fedagg::quantize_uniform(p, d, bits, static_cast<std::size_t>(bucket), seed, l, s, c);
    }
    return py::make_tuple(lo, step, codes);
  }, py::arg("x"), py::arg("bits"), py::arg("bucket"), py::arg("seed"));

  m.def("dequantize_uniform_add", [nbuckets, need, acc_of](py::array_t<double, py::array::c_style> acc,
        const py::array& lo, const py::array& step, const py::array& codes, int bits, long long bucket, double w) {
    const std::size_t d = acc_of(acc);
    if (bits != 1 && bits != 2 && bits != 4 && bits != 8) throw py::value_error("bits must be 1, 2, 4 or 8");
    const std::size_t nb = nbuckets(d, bucket);
    need(lo, nb, "lo", 'f', 4); need(step, nb, "step", 'f', 4); need(codes, (d * bits + 7) / 8, "codes", 'u', 1);
    double* a = acc.mutable_data();
    py::gil_scoped_release release;
    fedagg::dequantize_uniform_add(static_cast<const float*>(lo.data()), static_cast<const float*>(step.data()),
                                   static_cast<const std::uint8_t*>(codes.data()), d, bits,
                                   static_cast<std::size_t>(bucket), w, a);
  }, py::arg("acc"), py::arg("lo"), py::arg("step"), py::arg("codes"), py::arg("bits"), py::arg("bucket"), py::arg("w"));

  m.def("quantize_qsgd", [nbuckets](const py::array& x, int s, long long bucket, std::uint64_t seed) {
    const float* p = vector_f32(x, "x");
    const auto d = static_cast<std::size_t>(x.size());
    if (d < 1) throw py::value_error("x is empty");
    if (s < 1 || s > 127) throw py::value_error("levels s must be in [1, 127]");
    const std::size_t nb = nbuckets(d, bucket);
    py::array_t<float> norm(static_cast<py::ssize_t>(nb));
    py::array_t<std::int8_t> codes(static_cast<py::ssize_t>(d));
    float* nr = norm.mutable_data(); std::int8_t* c = codes.mutable_data();
    {
      py::gil_scoped_release release;
      fedagg::quantize_qsgd(p, d, s, static_cast<std::size_t>(bucket), seed, nr, c);
    }
    return py::make_tuple(norm, codes);
  }, py::arg("x"), py::arg("s"), py::arg("bucket"), py::arg("seed"));

  m.def("dequantize_qsgd_add", [nbuckets, need, acc_of](py::array_t<double, py::array::c_style> acc,
        const py::array& norm, const py::array& codes, int s, long long bucket, double w) {
    const std::size_t d = acc_of(acc);
    if (s < 1 || s > 127) throw py::value_error("levels s must be in [1, 127]");
    const std::size_t nb = nbuckets(d, bucket);
    need(norm, nb, "norm", 'f', 4); need(codes, d, "codes", 'i', 1);
    double* a = acc.mutable_data();
    py::gil_scoped_release release;
    fedagg::dequantize_qsgd_add(static_cast<const float*>(norm.data()), static_cast<const std::int8_t*>(codes.data()),
                                d, s, static_cast<std::size_t>(bucket), w, a);
  }, py::arg("acc"), py::arg("norm"), py::arg("codes"), py::arg("s"), py::arg("bucket"), py::arg("w"));

  m.def("quantize_sign", [nbuckets](const py::array& x, long long bucket) {
    const float* p = vector_f32(x, "x");
    const auto d = static_cast<std::size_t>(x.size());
    if (d < 1) throw py::value_error("x is empty");
    const std::size_t nb = nbuckets(d, bucket);
    py::array_t<float> scale(static_cast<py::ssize_t>(nb));
    py::array_t<std::uint8_t> bits(static_cast<py::ssize_t>((d + 7) / 8));
    float* sc = scale.mutable_data(); std::uint8_t* b = bits.mutable_data();
    {
      py::gil_scoped_release release;
      fedagg::quantize_sign(p, d, static_cast<std::size_t>(bucket), sc, b);
    }
    return py::make_tuple(scale, bits);
  }, py::arg("x"), py::arg("bucket"));

  m.def("dequantize_sign_add", [nbuckets, need, acc_of](py::array_t<double, py::array::c_style> acc,
        const py::array& scale, const py::array& bits, long long bucket, double w) {
    const std::size_t d = acc_of(acc);
    const std::size_t nb = nbuckets(d, bucket);
    need(scale, nb, "scale", 'f', 4); need(bits, (d + 7) / 8, "bits", 'u', 1);
    double* a = acc.mutable_data();
    py::gil_scoped_release release;
    fedagg::dequantize_sign_add(static_cast<const float*>(scale.data()), static_cast<const std::uint8_t*>(bits.data()),
                                d, static_cast<std::size_t>(bucket), w, a);
  }, py::arg("acc"), py::arg("scale"), py::arg("bits"), py::arg("bucket"), py::arg("w"));

  m.def("sign_vote_add", [need](py::array_t<std::int32_t, py::array::c_style> votes, const py::array& bits) {
    if (votes.ndim() != 1 || votes.size() < 1) throw py::value_error("votes must be a non-empty 1-D int32 array");
    const auto d = static_cast<std::size_t>(votes.size());
    need(bits, (d + 7) / 8, "bits", 'u', 1);
    std::int32_t* v = votes.mutable_data();
    py::gil_scoped_release release;
    fedagg::sign_vote_add(static_cast<const std::uint8_t*>(bits.data()), d, v);
  }, py::arg("votes"), py::arg("bits"));

  m.def("hadamard_rotate", [](py::array_t<float, py::array::c_style> x, long long block, std::uint64_t seed,
                              bool inverse) {
    if (x.ndim() != 1) throw py::value_error("x must be 1-D");
    const auto len = static_cast<std::size_t>(x.size());
    if (block < 2 || (block & (block - 1)) != 0 || len % static_cast<std::size_t>(block) != 0)
      throw py::value_error("block must be a power of two >= 2 dividing len(x)");
    float* p = x.mutable_data();
    py::gil_scoped_release release;
    fedagg::hadamard_rotate(p, len, static_cast<std::size_t>(block), seed, inverse);
  }, py::arg("x"), py::arg("block"), py::arg("seed"), py::arg("inverse"),
     "In place: forward H D x / sqrt(B) per block, or its inverse.");

  auto contiguous_bytes = [](const py::buffer_info& info, const char* what) {
    if (info.ndim > 1 || (info.ndim == 1 && info.strides[0] != info.itemsize))
      throw py::value_error(std::string(what) + " needs a contiguous buffer");
    return static_cast<std::size_t>(info.size) * static_cast<std::size_t>(info.itemsize);
  };
  m.def("crc32c", [contiguous_bytes](const py::buffer& data, std::uint32_t crc) {
    const py::buffer_info info = data.request();  // any contiguous buffer: bytes, memoryview, arrays
    const std::size_t n = contiguous_bytes(info, "crc32c");
    py::gil_scoped_release release;
    return fedagg::crc32c(info.ptr, n, crc);
  }, py::arg("data"), py::arg("crc") = 0,
     "CRC32C of a contiguous buffer; pass a previous result as crc to continue it.");
  m.def("crc32c_with", [contiguous_bytes](const std::string& impl, const py::buffer& data, std::uint32_t crc) {
    const py::buffer_info info = data.request();
    const std::size_t n = contiguous_bytes(info, "crc32c");
    try {
      py::gil_scoped_release release;
      return fedagg::crc32c_with(impl.c_str(), info.ptr, n, crc);
    } catch (const std::invalid_argument& e) {
      throw py::value_error(e.what());
    }
  }, py::arg("impl"), py::arg("data"), py::arg("crc") = 0,
     "crc32c with one implementation ('software', 'sse4.2', 'vpclmulqdq'); ValueError if the CPU lacks it.");
  m.def("crc32c_best", &fedagg::crc32c_best, "The CRC32C implementation this CPU runs.");

  m.def("copy_crc32c", [](const py::buffer& dst, const py::buffer& src, bool check_finite) {
    const py::buffer_info d = dst.request(true), s = src.request();
    auto bytes = [](const py::buffer_info& i) {
      if (i.ndim > 1 || (i.ndim == 1 && i.strides[0] != i.itemsize))
        throw py::value_error("copy_crc32c needs contiguous buffers");
      return static_cast<std::size_t>(i.size) * static_cast<std::size_t>(i.itemsize);
    };
    const std::size_t n = bytes(s);
    if (bytes(d) != n) throw py::value_error("copy_crc32c: dst and src sizes differ");
    if (check_finite && n % 4 != 0) throw py::value_error("copy_crc32c: check_finite needs whole float32s");
    bool finite = true;
    std::uint32_t crc;
    {
      py::gil_scoped_release release;
      crc = fedagg::copy_crc32c(d.ptr, s.ptr, n, check_finite ? &finite : nullptr);
    }
    return py::make_tuple(crc, finite);
  }, py::arg("dst"), py::arg("src"), py::arg("check_finite") = false,
     "Copy src into the writable dst in one pass; returns (CRC32C(src), every float32 finite).");

  // ---- privacy noise (see fedagg/noise.hpp); outputs are written in place, so
  // they must be exactly the dtype, contiguous and writable (no silent copies).
  auto writable = [](const py::array& a, char kind, int itemsize, const char* what) {
    if (a.ndim() != 1 || !(a.flags() & py::array::c_style) || !a.writeable() || a.dtype().kind() != kind ||
        a.itemsize() != itemsize)
      throw py::type_error(std::string(what) + " must be a writable contiguous 1-D " +
                           (kind == 'f' ? "float32" : "int64") + " array");
    return static_cast<std::size_t>(a.size());
  };
  m.def("gaussian_noise", [writable](py::array out, double stddev, std::uint64_t seed, std::uint64_t offset, bool add) {
    const std::size_t d = writable(out, 'f', 4, "out");
    if (!std::isfinite(stddev) || stddev < 0) throw py::value_error("stddev must be finite and >= 0");
    float* p = static_cast<float*>(out.mutable_data());
    py::gil_scoped_release release;
    fedagg::gaussian_noise(p, d, static_cast<float>(stddev), seed, offset, add);
  }, py::arg("out"), py::arg("stddev"), py::arg("seed"), py::arg("offset"), py::arg("add"),
     "out[j] (+)= stddev * normal number (offset + j) of the Philox4x32-10 stream `seed`.");
  m.def("discrete_gaussian", [writable](py::array out, std::uint64_t num, std::uint64_t den, std::uint64_t seed,
                                        std::uint64_t offset, bool add) {
    const std::size_t d = writable(out, 'i', 8, "out");
    std::int64_t* p = static_cast<std::int64_t*>(out.mutable_data());
    py::gil_scoped_release release;
    fedagg::discrete_gaussian(p, d, num, den, seed, offset, add);
  }, py::arg("out"), py::arg("num"), py::arg("den"), py::arg("seed"), py::arg("offset"), py::arg("add"),
     "out[j] (+)= an exact sample of the discrete Gaussian N_Z(0, num / den).");
  m.def("secagg_apply_masks", [](py::array data, const py::bytes& seeds, const std::vector<int>& signs, int bits) {
    if (data.ndim() != 1 || !(data.flags() & py::array::c_style) || !data.writeable() ||
        data.dtype().kind() != 'u' || data.itemsize() != 4)
      throw py::type_error("data must be a writable contiguous 1-D uint32 array");
    const std::string k = seeds;
    if (k.size() != 32 * signs.size())
      throw py::value_error("seeds must hold 32 bytes per sign (" + std::to_string(signs.size()) + " signs, " +
                            std::to_string(k.size()) + " bytes)");
    std::vector<std::int8_t> s(signs.size());
    for (std::size_t i = 0; i < signs.size(); ++i) {
      if (signs[i] != 1 && signs[i] != -1) throw py::value_error("signs must be +1 or -1");
      s[i] = static_cast<std::int8_t>(signs[i]);
    }
    if (bits < 1 || bits > 32) throw py::value_error("bits must be in [1, 32]");
    auto* p = static_cast<std::uint32_t*>(data.mutable_data());
    const auto d = static_cast<std::size_t>(data.size());
    py::gil_scoped_release release;
    fedagg::apply_masks(p, d, reinterpret_cast<const std::uint8_t*>(k.data()), s.data(), s.size(), bits);
  }, py::arg("data"), py::arg("seeds"), py::arg("signs"), py::arg("bits"),
     "data[j] = (data[j] + sum_i signs[i] * PRG(seeds[i]) word j) mod 2^bits, in place, every mask fused in one "
     "pass: PRG(seed) is the AES-128-CTR keystream under key seed[:16] from the initial counter block seed[16:32] "
     "(SP 800-38A, as OpenSSL), as little-endian uint32 words. Raises on a CPU without AES instructions "
     "(secagg_prg_path() == 'none').");
  m.def("secagg_prg_path", [] { return std::string(fedagg::prg_path()); },
        "The AES instructions secagg_apply_masks uses now: 'vaes', 'aesni', 'armv8' or 'none'.");
  m.def("round_to_grid", [](const py::array_t<double, py::array::c_style | py::array::forcecast>& x, double step,
                            std::uint64_t seed, std::uint64_t offset) {
    if (x.ndim() != 1) throw py::value_error("x must be 1-D");
    const double* p = x.data();
    const auto d = static_cast<std::size_t>(x.size());
    py::array_t<std::int64_t> out(static_cast<py::ssize_t>(d));
    std::int64_t* o = out.mutable_data();
    bool ok;
    {
      py::gil_scoped_release release;
      ok = fedagg::round_to_grid(p, d, step, seed, offset, o);
    }
    return py::make_tuple(out, ok);
  }, py::arg("x"), py::arg("step"), py::arg("seed"), py::arg("offset") = 0,
     "floor(x / step + u_{offset+j}), u ~ U[0, 1): unbiased integers; ok is False on NaN, Inf or overflow.");
  m.def("round_to_ring", [](const py::array_t<float, py::array::c_style>& x, double step, std::uint64_t seed,
                            std::uint64_t offset, int bits) {
    if (x.ndim() != 1) throw py::value_error("x must be 1-D");
    if (bits < 1 || bits > 32) throw py::value_error("bits must be in [1, 32]");
    const float* p = x.data();
    const auto d = static_cast<std::size_t>(x.size());
    py::array_t<std::uint32_t> out(static_cast<py::ssize_t>(d));
    std::uint32_t* o = out.mutable_data();
    bool ok;
    double norm2 = 0.0;
    {
      py::gil_scoped_release release;
      ok = fedagg::round_to_ring(p, d, step, seed, offset, bits, o, &norm2);
    }
    return py::make_tuple(out, norm2, ok);
  }, py::arg("x"), py::arg("step"), py::arg("seed"), py::arg("offset"), py::arg("bits"),
     "round_to_grid of a float32 vector into Z_2^bits (uint32), with the integers' squared L2 norm: "
     "(ring, norm2, ok).");
  m.def("philox4x32_10", [](std::array<std::uint32_t, 4> c, std::array<std::uint32_t, 2> k) {
    fedagg::philox::philox4x32_10(c[0], c[1], c[2], c[3], k[0], k[1]);
    return c;
  }, py::arg("counter"), py::arg("key"), "The Philox4x32-10 bijection (for known-answer tests).");

  // The CUDA backend's per-coordinate code (fedagg/sort_math.hpp), run here on
  // the CPU so the CPU tests check what the GPU runs.
  m.def("_register_sort_reduce", [](const py::array_t<float, py::array::c_style>& X, int mode, int f) {
    if (X.ndim() != 2) throw py::value_error("X must be (n, m)");
    const int n = static_cast<int>(X.shape(0));
    const py::ssize_t cols = X.shape(1);
    if (n < 1 || n > 64) throw py::value_error("register sorting takes 1 <= n <= 64");
    if (mode < 0 || mode > 2 || f < 0 || 2 * f >= n) throw py::value_error("bad mode or f");
    py::array_t<float> out(cols);
    py::array_t<bool> bad_cols(cols);
    const float* x = X.data();
    for (py::ssize_t j = 0; j < cols; ++j) {
      float tmp[64];
      bool bad = false;
      auto load = [&](int i) { return x[i * cols + j]; };
      auto stage = [&](int i, float v) { tmp[i] = v; };
      auto staged = [&](int i) { return tmp[i]; };
      float r;
      if (n <= 8) r = fedagg::sortmath::reduce_coordinate<8>(load, n, mode, f, stage, staged, bad);
      else if (n <= 16) r = fedagg::sortmath::reduce_coordinate<16>(load, n, mode, f, stage, staged, bad);
      else if (n <= 32) r = fedagg::sortmath::reduce_coordinate<32>(load, n, mode, f, stage, staged, bad);
      else r = fedagg::sortmath::reduce_coordinate<64>(load, n, mode, f, stage, staged, bad);
      out.mutable_data()[j] = r;
      bad_cols.mutable_data()[j] = bad;
    }
    return py::make_tuple(out, bad_cols);
  }, py::arg("X"), py::arg("mode"), py::arg("f"));

  m.def("_network_sorts_all_01", &fedagg::network_sorts_all_01, py::arg("n"));
  m.def("_network_size", [](int n) { return fedagg::sorting_network(n).lo.size(); }, py::arg("n"));
  m.def("sorting_network", [](int n) {
    const auto net = fedagg::sorting_network(n);
    py::array_t<std::uint32_t> lo(static_cast<py::ssize_t>(net.lo.size())), hi(static_cast<py::ssize_t>(net.hi.size()));
    std::copy(net.lo.begin(), net.lo.end(), lo.mutable_data());
    std::copy(net.hi.begin(), net.hi.end(), hi.mutable_data());
    return py::make_tuple(lo, hi);
  }, py::arg("n"), "Batcher's full sorting network on n positions: (lo, hi) comparator arrays.");
}
