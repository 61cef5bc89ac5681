// Per-coordinate sorting-network rules for one coordinate's n values held in
// registers: the CUDA backend runs reduce_coordinate<N> once per thread; the
// CPU build compiles the same code (fedagg._core._register_sort_reduce) so the
// CPU tests check it against the float64 references.
//
// Modes: 0 median (even n: mean of the two middle values, in float64),
// 1 mean of sorted ranks [f, n - f) (float64 sum), 2 Bulyan's coordinate stage:
// mean of the n - 2f values closest to the median (ties keep the left value).
#pragma once
#include <cmath>
#include <utility>

#include "fedagg/hd.hpp"

namespace fedagg {
namespace sortmath {

// Batcher's odd-even merge sort for N (a power of two), built at compile time.
template <int N>
struct Batcher {
  unsigned char a[N * 16 > 16 ? N * 16 : 16], b[N * 16 > 16 ? N * 16 : 16];
  int size;
};

template <int N>
FEDAGG_HD constexpr Batcher<N> make_batcher() {
  Batcher<N> s{};
  for (int p = 1; p < N; p <<= 1)
    for (int k = p; k >= 1; k >>= 1)
      for (int j = k % p; j + k < N; j += 2 * k)
        for (int i = 0; i < k && i < N - j - k; ++i)
          if ((i + j) / (2 * p) == (i + j + k) / (2 * p)) {
            s.a[s.size] = static_cast<unsigned char>(i + j);
            s.b[s.size] = static_cast<unsigned char>(i + j + k);
            ++s.size;
          }
  return s;
}

template <int N>
struct Network {
  static constexpr Batcher<N> value = make_batcher<N>();
};

template <int A, int B, int N>
FEDAGG_HD inline void compare_swap(float (&v)[N]) {
  const float x = v[A], y = v[B];
  v[A] = fminf(x, y);
  v[B] = fmaxf(x, y);
}

// The comparators expand at compile time (template arguments), so every
// index is a constant and v stays in registers.
template <int N, int... C>
FEDAGG_HD inline void apply_network(float (&v)[N], std::integer_sequence<int, C...>) {
  (compare_swap<Network<N>::value.a[C], Network<N>::value.b[C]>(v), ...);
}

template <int N>
FEDAGG_HD inline void sort_registers(float (&v)[N]) {
  apply_network<N>(v, std::make_integer_sequence<int, Network<N>::value.size>());
}

// Folds over compile-time indices, predicated on run-time values (a run-time
// index into v would move it to local memory on the GPU).
template <int N, int... I>
FEDAGG_HD inline float pick(const float (&v)[N], int k, std::integer_sequence<int, I...>) {
  float r = 0.0f;
  ((r = (I == k) ? v[I] : r), ...);
  return r;
}

template <int N, int... I>
FEDAGG_HD inline double sum_ranks(const float (&v)[N], int a, int b, std::integer_sequence<int, I...>) {
  double s = 0.0;
  ((s += (I >= a && I < b) ? static_cast<double>(v[I]) : 0.0), ...);
  return s;
}

// Bulyan's window mean on sorted values s(0..n) (any indexable storage).
template <class Get>
FEDAGG_HD inline float bulyan_window(Get s, int n, int f) {
  const int beta = n - 2 * f;
  const double med = (n & 1) ? static_cast<double>(s((n - 1) / 2))
                             : (static_cast<double>(s(n / 2 - 1)) + s(n / 2)) * 0.5;
  int lo = 0;
  for (int a = 0; a < 2 * f; ++a) lo += (med - s(a)) > (static_cast<double>(s(beta + a)) - med);
  double sum = 0.0;
  for (int k = lo; k < lo + beta; ++k) sum += s(k);
  return static_cast<float>(sum / beta);
}

// One coordinate: load(i) for i < n (padded to N with +inf, which sorts to the
// top and is never read), sort, reduce. stage(i, x) / staged(i) give Bulyan's
// window run-time indexing. Sets bad if a NaN or Inf was loaded.
template <int N, class Load, class Stage, class Staged>
FEDAGG_HD inline float reduce_coordinate(Load load, int n, int mode, int f, Stage stage, Staged staged,
                                         bool& bad) {
  float v[N];
  FEDAGG_UNROLL
  for (int i = 0; i < N; ++i) {
    if (i < n) {
      v[i] = load(i);
      bad |= !(v[i] - v[i] == 0.0f);  // NaN for NaN and +-Inf
    } else {
      v[i] = INFINITY;
    }
  }
  sort_registers<N>(v);
  constexpr auto idx = std::make_integer_sequence<int, N>();
  if (mode == 0) {
    const float lo = pick<N>(v, (n - 1) / 2, idx);
    if (n & 1) return lo;
    return static_cast<float>((static_cast<double>(lo) + pick<N>(v, n / 2, idx)) * 0.5);
  }
  if (mode == 1) return static_cast<float>(sum_ranks<N>(v, f, n - f, idx) / (n - 2 * f));
  FEDAGG_UNROLL
  for (int i = 0; i < N; ++i) stage(i, v[i]);
  return bulyan_window(staged, n, f);
}

}  // namespace sortmath
}  // namespace fedagg
