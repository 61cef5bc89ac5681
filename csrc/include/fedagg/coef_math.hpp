// Robust-rule math in coefficient space, shared by the CPU and CUDA backends.
//
// Every iterate of smoothed Weiszfeld and of centered clipping is an affine
// combination z = sum_k a_k x_k of the inputs (sum_k a_k = 1). Its squared
// distance to input i then follows from the matrix D of pairwise squared
// distances alone:
//     ||z - x_i||^2 = (D a)_i - 1/2 a^T D a,
// so the iterations never touch the d-dimensional data; one pass builds D and
// one pass forms sum_k a_k x_k at the end. D is built from exact coordinate
// differences (no Gram-matrix cancellation).
//
// Functions here take raw pointers and caller-provided scratch, so they compile
// unchanged for host and device.
#pragma once
#include <cmath>

#include "fedagg/hd.hpp"

namespace fedagg {
namespace coef {

// dist2[i] = max(0, (D a)_i - 1/2 a^T D a); Da is scratch of length n.
FEDAGG_HD inline void sqdist_to_combination(const double* D, int n, const double* a, double* Da,
                                            double* dist2) {
  double q = 0.0;
  for (int i = 0; i < n; ++i) {
    double s = 0.0;
    for (int k = 0; k < n; ++k) s += D[i * n + k] * a[k];
    Da[i] = s;
    q += a[i] * s;
  }
  for (int i = 0; i < n; ++i) {
    double v = Da[i] - 0.5 * q;
    dist2[i] = v > 0.0 ? v : 0.0;
  }
}

// In-place ascending heap sort (no recursion, no allocation: runs on a device too).
FEDAGG_HD inline void heap_sort(double* v, int m) {
  auto sift = [v](int root, int end) {
    while (2 * root + 1 < end) {
      int child = 2 * root + 1;
      if (child + 1 < end && v[child] < v[child + 1]) ++child;
      if (!(v[root] < v[child])) return;
      double t = v[root];
      v[root] = v[child];
      v[child] = t;
      root = child;
    }
  };
  for (int i = m / 2 - 1; i >= 0; --i) sift(i, m);
  for (int end = m - 1; end > 0; --end) {
    double t = v[0];
    v[0] = v[end];
    v[end] = t;
    sift(0, end);
  }
}

// Sum of the q smallest of v[0..m) (v is reordered): quickselect, then the q
// values are summed in ascending order, so equal multisets give equal sums
// bit for bit (duplicated updates get exactly equal scores).
FEDAGG_HD inline double sum_smallest(double* v, int m, int q) {
  if (q <= 0) return 0.0;
  if (q > m) q = m;
  int lo = 0, hi = m - 1;
  while (lo < hi) {
    double pivot = v[lo + (hi - lo) / 2];
    int i = lo, j = hi;
    while (i <= j) {
      while (v[i] < pivot) ++i;
      while (v[j] > pivot) --j;
      if (i <= j) {
        double t = v[i];
        v[i] = v[j];
        v[j] = t;
        ++i;
        --j;
      }
    }
    if (q - 1 <= j) hi = j;
    else if (q - 1 >= i) lo = i;
    else break;
  }
  heap_sort(v, q);
  double s = 0.0;
  for (int i = 0; i < q; ++i) s += v[i];
  return s;
}

// Krum scores (Blanchard et al. 2017) restricted to the members of `active`
// (active[i] != 0): score_i = sum of the squared distances from x_i to its
// `neighbours` closest other active vectors. Inactive entries get +inf.
// scratch: n doubles.
FEDAGG_HD inline void krum_scores(const double* D, int n, const unsigned char* active,
                                  int neighbours, double* scores, double* scratch) {
  for (int i = 0; i < n; ++i) {
    if (active && !active[i]) {
      scores[i] = INFINITY;
      continue;
    }
    int m = 0;
    for (int k = 0; k < n; ++k)
      if (k != i && (!active || active[k])) scratch[m++] = D[i * n + k];
    scores[i] = sum_smallest(scratch, m, neighbours);
  }
}

// Smoothed Weiszfeld (RFA, Pillutla et al. 2022) in coefficient space.
// alpha: n non-negative weights summing to 1. On return `a` holds the
// coefficients of the estimate. Returns the number of iterations run and sets
// *objective to sum_i alpha_i ||z - x_i||. scratch: 2n doubles.
FEDAGG_HD inline int weiszfeld(const double* D, int n, const double* alpha, double nu, int maxiter,
                               double tol, double* a, double* objective, double* scratch) {
  double* Da = scratch;
  double* dist = scratch + n;
  for (int i = 0; i < n; ++i) a[i] = alpha[i];
  sqdist_to_combination(D, n, a, Da, dist);
  double obj = 0.0;
  for (int i = 0; i < n; ++i) obj += alpha[i] * sqrt(dist[i]);
  int it = 0;
  while (it < maxiter) {
    ++it;
    double total = 0.0;
    for (int i = 0; i < n; ++i) {
      double r = sqrt(dist[i]);
      a[i] = alpha[i] / (r > nu ? r : nu);
      total += a[i];
    }
    for (int i = 0; i < n; ++i) a[i] /= total;
    sqdist_to_combination(D, n, a, Da, dist);
    double next = 0.0;
    for (int i = 0; i < n; ++i) next += alpha[i] * sqrt(dist[i]);
    double change = obj - next;
    if (change < 0) change = -change;
    obj = next;
    if (change <= tol * next) break;
  }
  *objective = obj;
  return it;
}

// Centered clipping (Karimireddy et al. 2021) in coefficient space. Index 0 of
// the (n+1) x (n+1) matrix D is the starting point v_0 (the previous
// aggregate); indices 1..n are the updates, with weights w (summing to 1).
// Runs `iters` steps v <- v + sum_i w_i (x_i - v) min(1, tau / ||x_i - v||).
// On return a[0..n] are the coefficients of v over (v_0, x_1..x_n); returns the
// number of updates clipped in the last step. scratch: 2(n+1) doubles.
FEDAGG_HD inline int centered_clipping(const double* D, int n, const double* w, double tau,
                                       int iters, double* a, double* scratch) {
  const int m = n + 1;
  double* Da = scratch;
  double* dist = scratch + m;
  for (int k = 0; k < m; ++k) a[k] = 0.0;
  a[0] = 1.0;
  int clipped = 0;
  for (int l = 0; l < iters; ++l) {
    sqdist_to_combination(D, m, a, Da, dist);
    double moved = 0.0;
    clipped = 0;
    // v_new = v (1 - sum c_i) + sum c_i x_i with c_i = w_i min(1, tau / r_i).
    for (int i = 0; i < n; ++i) {
      double r = sqrt(dist[i + 1]);
      double c = w[i];
      if (r > tau) {
        c *= tau / r;
        ++clipped;
      }
      scratch[i] = c;  // Da is no longer needed this step
      moved += c;
    }
    for (int k = 0; k < m; ++k) a[k] *= (1.0 - moved);
    for (int i = 0; i < n; ++i) a[i + 1] += scratch[i];
  }
  return clipped;
}

}  // namespace coef
}  // namespace fedagg
