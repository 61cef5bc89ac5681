#include "fedagg/ops.hpp"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>
#include <set>

#include "fedagg/check.hpp"
#include "fedagg/coef_math.hpp"
#include "fedagg/kernels.hpp"
#include "fedagg/threadpool.hpp"

namespace fedagg {
namespace {

// Coordinate ranges handed to threads: large enough to amortize scheduling,
// small enough to balance; multiples of 64 keep vector groups aligned.
std::size_t task_size(std::size_t d, std::size_t minimum) {
  const std::size_t threads = static_cast<std::size_t>(num_threads());
  std::size_t t = d / (threads * 8) + 1;
  t = std::max(t, minimum);
  return (t + 63) / 64 * 64;
}

template <class Fn>
void for_ranges(std::size_t d, std::size_t chunk, Fn&& fn) {
  const std::size_t ntasks = (d + chunk - 1) / chunk;
  parallel_for(ntasks, [&](std::size_t t, int worker) {
    const std::size_t b = t * chunk;
    fn(b, std::min(d, b + chunk), worker);
  });
}

void check_rows(const Rows& rows) {
  FEDAGG_CHECK(rows.n() > 0, "need at least one update");
  FEDAGG_CHECK(rows.n() < (1u << 30), "too many updates");
  for (const float* p : rows.ptr) FEDAGG_CHECK(p != nullptr || rows.d == 0, "null update");
}

// The rows' coordinates [b, e) as float32 the kernels read: float32 rows as they are
// (fn(ptr, b, e, 0)); half-precision rows widened a tile at a time into this thread's buffer
// (fn(ptr, 0, len, origin): the kernel's coordinate j is the rows' origin + j), so a batch is
// never widened whole. `unit` is the kernel's own chunk (its float32 partial sums, its blocks):
// tiles are multiples of it, so the kernel sums the same chunks and gives the same bits as on
// the rows widened beforehand.
template <class Fn>
void tiled(const Rows& rows, std::size_t b, std::size_t e, std::size_t unit, Fn&& fn) {
  if (rows.all_f32()) {
    fn(rows.ptr.data(), b, e, std::size_t{0});
    return;
  }
  const std::size_t n = rows.n();
  const std::size_t tile = std::max<std::size_t>(1, (std::size_t(1) << 15) / (n * unit)) * unit;  // ~128 KB: in L2
  thread_local std::vector<float> buf;
  thread_local std::vector<const float*> ptr;
  if (buf.size() < n * tile) buf.resize(n * tile);
  if (ptr.size() < n) ptr.resize(n);
  const auto& k = kernels();
  for (std::size_t t0 = b; t0 < e; t0 += tile) {
    const std::size_t len = std::min(tile, e - t0);
    for (std::size_t i = 0; i < n; ++i) {
      const Elem el = rows.elem[i];
      if (el == Elem::F32) {  // a float32 row among half ones (a centre, a clipped row) is read in place
        ptr[i] = rows.ptr[i] + t0;
        continue;
      }
      float* dst = buf.data() + i * len;
      k.widen(reinterpret_cast<const std::uint16_t*>(rows.ptr[i]) + t0, static_cast<int>(el), dst, len);
      ptr[i] = dst;
    }
    fn(static_cast<const float* const*>(ptr.data()), std::size_t{0}, len, t0);
  }
}

// The element type every row holds (F32 for float32 rows; F32 too when they differ: not one half type).
Elem common_half(const Rows& rows) {
  if (rows.all_f32()) return Elem::F32;
  for (Elem e : rows.elem)
    if (e != rows.elem[0]) return Elem::F32;
  return rows.elem[0];
}

NetworkView view(const Network& net) {
  return {net.n, net.block, net.lo.data(), net.hi.data(), net.lo.size()};
}

bool sorted_reduce(const Rows& rows, const Network& net, int mode, int f, float* out) {
  check_rows(rows);
  std::atomic<bool> bad{false};
  const NetworkView nv = view(net);
  const auto& k = kernels();
  for_ranges(rows.d, task_size(rows.d, 4096), [&](std::size_t b, std::size_t e, int) {
    tiled(rows, b, e, 64, [&](const float* const* p, std::size_t kb, std::size_t ke, std::size_t o) {
      if (k.sorted_reduce(p, nv, mode, f, out + o, kb, ke)) bad.store(true);
    });
  });
  return bad.load();
}

}  // namespace

Network sorting_network(int n, const std::vector<int>& needed, bool prune, bool block16) {
  FEDAGG_CHECK(n >= 1, "sorting network needs n >= 1");
  Network net;
  net.n = n;
  net.block = block16 ? 16 : 0;
  const int first_p = block16 ? 16 : 1;
  int N = 1;
  while (N < n) N <<= 1;
  std::vector<std::pair<int, int>> comps;
  for (int p = first_p; p < N; p <<= 1)
    for (int k = p; k >= 1; k >>= 1)
      for (int j = k % p; j + k < N; j += 2 * k)
        for (int i = 0; i < std::min(k, N - j - k); ++i)
          if ((i + j) / (2 * p) == (i + j + k) / (2 * p) && i + j + k < n)
            comps.emplace_back(i + j, i + j + k);
  std::vector<bool> keep(comps.size(), true);
  if (prune) {
    std::vector<bool> live(n, false);
    for (int p : needed) live.at(p) = true;
    for (std::size_t c = comps.size(); c-- > 0;) {
      auto [a, b] = comps[c];
      if (live[a] || live[b]) live[a] = live[b] = true;
      else keep[c] = false;
    }
  }
  for (std::size_t c = 0; c < comps.size(); ++c)
    if (keep[c]) {
      net.lo.push_back(static_cast<std::uint32_t>(comps[c].first));
      net.hi.push_back(static_cast<std::uint32_t>(comps[c].second));
    }
  return net;
}

bool network_sorts_all_01(int n) {
  FEDAGG_CHECK(n >= 1 && n <= 20, "exhaustive check only for 1 <= n <= 20");
  const Network net = sorting_network(n);
  for (std::uint32_t bits = 0; bits < (1u << n); ++bits) {
    std::vector<int> v(n);
    for (int i = 0; i < n; ++i) v[i] = (bits >> i) & 1;
    for (std::size_t c = 0; c < net.lo.size(); ++c) {
      int& a = v[net.lo[c]];
      int& b = v[net.hi[c]];
      if (a > b) std::swap(a, b);
    }
    if (!std::is_sorted(v.begin(), v.end())) return false;
  }
  return true;
}

void weighted_sum(const Rows& rows, const double* coef, float* out) {
  check_rows(rows);
  const auto& k = kernels();
  const int n = static_cast<int>(rows.n());
  const Elem half = common_half(rows);
  const auto* hrows = reinterpret_cast<const std::uint16_t* const*>(rows.ptr.data());
  for_ranges(rows.d, task_size(rows.d, 16384), [&](std::size_t b, std::size_t e, int) {
    if (!rows.all_f32() && half != Elem::F32) {  // one half type: widened in the kernel's registers
      k.weighted_sum_half(hrows, static_cast<int>(half), n, coef, out, b, e);
      return;
    }
    tiled(rows, b, e, 1024, [&](const float* const* p, std::size_t kb, std::size_t ke, std::size_t o) {
      k.weighted_sum(p, n, coef, out + o, kb, ke);
    });
  });
}

void fold_f64(double* acc, const Rows& rows, const double* w) {
  FEDAGG_CHECK(rows.all_f32(), "fold_f64 takes float32 updates");
  const std::size_t d = rows.d, n = rows.n();
  if (n == 0 || d == 0) return;
  for_ranges(d, task_size(d, 65536), [&](std::size_t b, std::size_t e, int) {
    constexpr std::size_t kBlock = 2048;  // 16 KB of acc stays in L1 while each update streams through it
    for (std::size_t b0 = b; b0 < e; b0 += kBlock) {
      const std::size_t e0 = std::min(e, b0 + kBlock);
      for (std::size_t i = 0; i < n; ++i) {
        const float* x = rows.ptr[i];
        const double wi = w[i];
        for (std::size_t j = b0; j < e0; ++j) acc[j] += wi * static_cast<double>(x[j]);
      }
    }
  });
}

void axpy_f64(double* acc, const float* x, double w, std::size_t d) {
  Rows one;
  one.ptr.push_back(x);
  one.d = d;
  fold_f64(acc, one, &w);
}

namespace {
template <class Kernel>
std::vector<double> reduce_per_worker(std::size_t d, std::size_t width, std::size_t min_task,
                                      Kernel&& kernel) {
  const std::size_t T = static_cast<std::size_t>(num_threads());
  std::vector<double> partial(checked_mul(T, width, "per-thread partial sums"), 0.0);
  for_ranges(d, task_size(d, min_task), [&](std::size_t b, std::size_t e, int worker) {
    kernel(partial.data() + static_cast<std::size_t>(worker) * width, b, e);
  });
  std::vector<double> total(width, 0.0);
  for (std::size_t t = 0; t < T; ++t)
    for (std::size_t i = 0; i < width; ++i) total[i] += partial[t * width + i];
  return total;
}

void symmetrize(std::vector<double>& D, std::size_t n) {
  for (std::size_t i = 0; i < n; ++i) {
    D[i * n + i] = 0.0;
    for (std::size_t k = i + 1; k < n; ++k) D[k * n + i] = D[i * n + k];
  }
}
}  // namespace

namespace {
bool all_finite(const std::vector<double>& v) {
  for (double x : v)
    if (!std::isfinite(x)) return false;
  return true;
}
bool any_nonfinite_row(const Rows& rows) {
  for (auto b : nonfinite_rows(rows))
    if (b) return true;
  return false;
}
}  // namespace

// The fast kernels square float32 differences, which overflow for |x| >~ 1e19.
// A non-finite result from finite input is recomputed in float64; input with
// NaN/Inf is returned as is for the caller's policy.
std::vector<double> pairwise_sqdist(const Rows& rows) {
  check_rows(rows);
  const std::size_t n = rows.n();
  const auto& k = kernels();
  auto D = reduce_per_worker(rows.d, checked_mul(n, n, "distance matrix"), 16384,
                             [&](double* acc, std::size_t b, std::size_t e) {
                               tiled(rows, b, e, pair_chunk(static_cast<int>(n), k.lanes),
                                     [&](const float* const* p, std::size_t kb, std::size_t ke, std::size_t) {
                                       k.pairwise_sqdist(p, static_cast<int>(n), acc, kb, ke);
                                     });
                             });
  symmetrize(D, n);
  if (!all_finite(D) && !any_nonfinite_row(rows)) return pairwise_sqdist_exact(rows);
  return D;
}

std::vector<double> pairwise_sqdist_exact(const Rows& rows) {
  check_rows(rows);
  const std::size_t n = rows.n();
  auto D = reduce_per_worker(rows.d, checked_mul(n, n, "distance matrix"), 16384,
                             [&](double* acc, std::size_t b0, std::size_t e0) {
                               tiled(rows, b0, e0, 2048, [&](const float* const* p, std::size_t b, std::size_t e,
                                                             std::size_t) {
                                 for (std::size_t i = 0; i < n; ++i)
                                   for (std::size_t k = i + 1; k < n; ++k) {
                                     double s = 0.0;
                                     for (std::size_t j = b; j < e; ++j) {
                                       double t = static_cast<double>(p[i][j]) - static_cast<double>(p[k][j]);
                                       s += t * t;
                                     }
                                     acc[i * n + k] += s;
                                   }
                               });
                             });
  symmetrize(D, n);
  return D;
}

namespace {
// Row i: sum_j (rows[i][j] - x[j])^2 in float64 throughout (x may be null: zeros).
std::vector<double> sqdist_rows_exact(const Rows& rows, const float* x) {
  return reduce_per_worker(rows.d, rows.n(), 16384, [&](double* acc, std::size_t b0, std::size_t e0) {
    tiled(rows, b0, e0, 2048, [&](const float* const* p, std::size_t b, std::size_t e, std::size_t o) {
      for (std::size_t i = 0; i < rows.n(); ++i) {
        double s = 0.0;
        for (std::size_t j = b; j < e; ++j) {
          const double t = static_cast<double>(p[i][j]) - (x ? static_cast<double>(x[o + j]) : 0.0);
          s += t * t;
        }
        acc[i] += s;
      }
    });
  });
}
}  // namespace

std::vector<double> sqdist_to(const Rows& rows, const float* x) {
  check_rows(rows);
  const auto& k = kernels();
  auto r = reduce_per_worker(rows.d, rows.n(), 16384, [&](double* acc, std::size_t b, std::size_t e) {
    tiled(rows, b, e, 2048, [&](const float* const* p, std::size_t kb, std::size_t ke, std::size_t o) {
      k.sqdist_to(p, static_cast<int>(rows.n()), x + o, acc, kb, ke);
    });
  });
  if (!all_finite(r) && !any_nonfinite_row(rows) && !any_nonfinite_row(Rows{{x}, rows.d}))
    return sqdist_rows_exact(rows, x);
  return r;
}

std::vector<double> sqnorms(const Rows& rows) {
  check_rows(rows);
  const auto& k = kernels();
  auto r = reduce_per_worker(rows.d, rows.n(), 16384, [&](double* acc, std::size_t b, std::size_t e) {
    tiled(rows, b, e, 2048, [&](const float* const* p, std::size_t kb, std::size_t ke, std::size_t) {
      k.sqnorms(p, static_cast<int>(rows.n()), acc, kb, ke);
    });
  });
  if (!all_finite(r) && !any_nonfinite_row(rows)) return sqdist_rows_exact(rows, nullptr);
  return r;
}

bool coordinate_median(const Rows& rows, float* out) {
  const int n = static_cast<int>(rows.n());
  const Network net = sorting_network(n, {(n - 1) / 2, n / 2}, true, true);
  return sorted_reduce(rows, net, 0, 0, out);
}

bool trimmed_mean(const Rows& rows, int f, float* out) {
  const int n = static_cast<int>(rows.n());
  FEDAGG_CHECK(f >= 0 && 2 * f < n, "trimmed mean needs 0 <= f and 2f < n");
  // Only the f lowest and f highest ranks must be placed; the middle is summed as a set.
  std::vector<int> needed;
  for (int i = 0; i < f; ++i) {
    needed.push_back(i);
    needed.push_back(n - 1 - i);
  }
  return sorted_reduce(rows, sorting_network(n, needed, true, true), 1, f, out);
}

bool bulyan_reduce(const Rows& rows, int f, float* out) {
  const int n = static_cast<int>(rows.n());
  FEDAGG_CHECK(f >= 0 && 2 * f < n, "Bulyan's coordinate stage needs 0 <= f and 2f < theta");
  // Placed: the median ranks and the 2f ranks at each end (the window's
  // candidates); ranks [2f, n - 2f) are always in the window and summed as a set.
  std::vector<int> needed = {(n - 1) / 2, n / 2};
  for (int i = 0; i < 2 * f; ++i) {
    needed.push_back(i);
    needed.push_back(n - 1 - i);
  }
  return sorted_reduce(rows, sorting_network(n, needed, true, true), 2, f, out);
}

std::vector<std::uint8_t> nonfinite_rows(const Rows& rows) {
  check_rows(rows);
  std::vector<std::uint8_t> bad(rows.n(), 0);
  parallel_for(rows.n(), [&](std::size_t i, int) {
    bool any = false;
    // an all-ones exponent: Inf or NaN (binary16: 5 bits, bfloat16: float32's 8)
    const std::uint16_t ex = rows.elem_of(i) == Elem::F16 ? 0x7c00 : 0x7f80;
    if (rows.elem_of(i) == Elem::F32) {
      const float* p = rows.ptr[i];
      for (std::size_t j = 0; j < rows.d; ++j) any |= !std::isfinite(p[j]);
    } else {
      const auto* h = reinterpret_cast<const std::uint16_t*>(rows.ptr[i]);
      for (std::size_t j = 0; j < rows.d; ++j) any |= (h[j] & ex) == ex;
    }
    bad[i] = any;
  });
  return bad;
}

void mix(const Rows& rows, const double* A, int m, float* const* out) {
  check_rows(rows);
  const auto& k = kernels();
  const int n = static_cast<int>(rows.n());
  // Small coordinate chunks so the n input rows of a chunk stay in cache while
  // all m outputs are formed from them.
  std::size_t chunk = std::max<std::size_t>(256, (std::size_t(1) << 17) / rows.n()) / 64 * 64;
  const Elem half = common_half(rows);
  const auto* hrows = reinterpret_cast<const std::uint16_t* const*>(rows.ptr.data());
  for_ranges(rows.d, chunk, [&](std::size_t b, std::size_t e, int) {
    if (!rows.all_f32() && half != Elem::F32) {
      for (int i = 0; i < m; ++i)
        k.weighted_sum_half(hrows, static_cast<int>(half), n, A + static_cast<std::size_t>(i) * n, out[i], b, e);
      return;
    }
    tiled(rows, b, e, 1024, [&](const float* const* p, std::size_t kb, std::size_t ke, std::size_t o) {
      for (int i = 0; i < m; ++i) k.weighted_sum(p, n, A + static_cast<std::size_t>(i) * n, out[i] + o, kb, ke);
    });
  });
}

std::vector<double> krum_scores(const double* D, int n, int f) {
  FEDAGG_CHECK(n > 2 * f + 2, "Krum needs n > 2f + 2");
  std::vector<double> scores(n), scratch(n);
  coef::krum_scores(D, n, nullptr, n - f - 2, scores.data(), scratch.data());
  return scores;
}

std::vector<std::int64_t> bulyan_select(const double* D, int n, int f) {
  FEDAGG_CHECK(f >= 0 && n >= 4 * f + 3, "Bulyan needs n >= 4f + 3");
  const int theta = n - 2 * f;
  std::vector<unsigned char> active(n, 1);
  std::vector<double> scores(n), scratch(n);
  std::vector<std::int64_t> selected;
  for (int s = 0; s < theta; ++s) {
    const int remaining = n - s;
    coef::krum_scores(D, n, active.data(), std::max(0, remaining - f - 2), scores.data(),
                      scratch.data());
    int best = -1;
    for (int i = 0; i < n; ++i)
      if (active[i] && (best < 0 || scores[i] < scores[best])) best = i;
    active[best] = 0;
    selected.push_back(best);
  }
  return selected;
}

std::vector<double> nnm_mixing(const double* D, int n, int f) {
  FEDAGG_CHECK(f >= 0 && f < n, "NNM needs 0 <= f < n");
  const int keep = n - f;
  std::vector<double> A(static_cast<std::size_t>(n) * n, 0.0);
  std::vector<int> order(n);
  for (int i = 0; i < n; ++i) {
    std::iota(order.begin(), order.end(), 0);
    // Nearest first; the update itself (distance 0) before any tie.
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
      const double da = a == i ? -1.0 : D[i * n + a];
      const double db = b == i ? -1.0 : D[i * n + b];
      return da < db;
    });
    for (int t = 0; t < keep; ++t) A[static_cast<std::size_t>(i) * n + order[t]] = 1.0 / keep;
  }
  return A;
}

}  // namespace fedagg
