// Sparse codecs' kernels: exact top-k by magnitude (radix select on the float
// bits of |x|), threshold gathers, and scatter-add of sparse updates.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedagg {

// Keys order magnitudes: for |x| the IEEE bits of a non-negative float order
// like the values (callers reject NaN).
std::uint32_t magnitude_key(float v);

// The key of the k-th largest |x| and how many keys are above it.
struct Threshold {
  std::uint32_t key;
  std::size_t above;
};
Threshold topk_threshold(const float* x, std::size_t d, std::size_t k);

// Counts per chunk of the keys above and equal to `key`, for gather().
struct GatherPlan {
  std::uint32_t key = 0;
  std::size_t chunk = 1;
  std::vector<std::size_t> gt, eq;
  std::size_t total_gt = 0, total_eq = 0;
};
GatherPlan plan_gather(const float* x, std::size_t d, std::uint32_t key);

// Writes k coordinates in ascending index order: every key above the plan's
// key, then the first (k - total_gt) keys equal to it. total_gt <= k <= total_gt + total_eq.
template <class Index>
void gather(const float* x, std::size_t d, const GatherPlan& plan, std::size_t k, Index* idx, float* val);

// The k coordinates of largest |x|, in ascending index order; ties keep the
// lowest indices.
template <class Index>
void topk(const float* x, std::size_t d, std::size_t k, Index* idx, float* val);

// acc[idx[i]] += w * val[i]; indices are checked against d by the caller.
template <class Index>
void scatter_add(double* acc, std::size_t d, const Index* idx, const float* val, std::size_t m,
                 double w);

}  // namespace fedagg
