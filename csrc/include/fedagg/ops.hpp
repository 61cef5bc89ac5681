// Multithreaded drivers of the kernels, and the selection logic of the rules.
// Inputs are validated here (the Python layer validates too, with friendlier
// messages); violations throw fedagg::InvalidArgument.
#pragma once
#include <cstdint>
#include <vector>

#include "fedagg/rows.hpp"

namespace fedagg {

// Batcher's odd-even merge sort on n positions (n padded to a power of two,
// comparators touching padding dropped: padding acts as +inf and never moves).
// With `prune`, comparators that cannot affect the positions in `needed` are
// dropped. Comparators only permute values, so the positions not needed still
// hold, as a multiset, exactly the values not needed: a trimmed sum only needs
// the extreme ranks placed. With block16, the first stages (which sort aligned
// groups of 16 positions) are left to the kernel's in-register sort.
Network sorting_network(int n, const std::vector<int>& needed = {}, bool prune = false,
                        bool block16 = false);
// Exhaustive 0-1 principle check of the network for n <= 20 (tests).
bool network_sorts_all_01(int n);

void weighted_sum(const Rows& rows, const double* coef, float* out);
void axpy_f64(double* acc, const float* x, double w, std::size_t d);
// acc[j] += w[0] * x_0[j], then += w[1] * x_1[j], ...: the rounding of n axpy_f64 calls in that
// order, in one pass over acc (each product rounded to double, then added: no FMA).
void fold_f64(double* acc, const Rows& rows, const double* w);
// Full symmetric n x n matrix of squared distances, zero diagonal.
std::vector<double> pairwise_sqdist(const Rows& rows);
// The same in float64 arithmetic throughout (slow; for inputs whose float32
// differences overflow).
std::vector<double> pairwise_sqdist_exact(const Rows& rows);
std::vector<double> sqdist_to(const Rows& rows, const float* x);
std::vector<double> sqnorms(const Rows& rows);
// Coordinate-wise rules. Return true if a NaN/Inf was seen.
bool coordinate_median(const Rows& rows, float* out);
bool trimmed_mean(const Rows& rows, int f, float* out);
bool bulyan_reduce(const Rows& rows, int f, float* out);
std::vector<std::uint8_t> nonfinite_rows(const Rows& rows);
// out[i] = sum_k A[i * n + k] rows[k], for i < m.
void mix(const Rows& rows, const double* A, int m, float* const* out);

// Selection on the distance matrix.
std::vector<double> krum_scores(const double* D, int n, int f);
std::vector<std::int64_t> bulyan_select(const double* D, int n, int f);
std::vector<double> nnm_mixing(const double* D, int n, int f);

}  // namespace fedagg
