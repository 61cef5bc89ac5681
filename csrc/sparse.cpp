#include "fedagg/sparse.hpp"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <vector>

#include "fedagg/check.hpp"
#include "fedagg/threadpool.hpp"

namespace fedagg {
namespace {

inline std::uint32_t key_of(float v) {
  std::uint32_t b;
  std::memcpy(&b, &v, sizeof b);
  return b & 0x7fffffffu;  // |v|
}

std::size_t chunk_for(std::size_t d) {
  const std::size_t threads = static_cast<std::size_t>(num_threads());
  return std::max<std::size_t>(1 << 16, (d + threads * 4 - 1) / (threads * 4));
}

// Per-task histograms of (key >> shift) & mask over keys whose higher bits equal `prefix`.
std::vector<std::size_t> histogram(const float* x, std::size_t d, int shift, std::uint32_t mask,
                                   int prefix_shift, std::uint32_t prefix) {
  const std::size_t chunk = chunk_for(d);
  const std::size_t ntasks = (d + chunk - 1) / chunk;
  const std::size_t B = static_cast<std::size_t>(mask) + 1;
  std::vector<std::size_t> h(ntasks * B, 0);
  parallel_for(ntasks, [&](std::size_t t, int) {
    std::size_t* ht = h.data() + t * B;
    const std::size_t e = std::min(d, (t + 1) * chunk);
    for (std::size_t j = t * chunk; j < e; ++j) {
      const std::uint32_t key = key_of(x[j]);
      if (prefix_shift >= 32 || (key >> prefix_shift) == prefix) ++ht[(key >> shift) & mask];
    }
  });
  std::vector<std::size_t> total(B, 0);
  for (std::size_t t = 0; t < ntasks; ++t)
    for (std::size_t b = 0; b < B; ++b) total[b] += h[t * B + b];
  return total;
}

}  // namespace

Threshold topk_threshold(const float* x, std::size_t d, std::size_t k) {
  FEDAGG_CHECK(k >= 1 && k <= d, "top-k needs 1 <= k <= d");
  // Radix select on the 31-bit key, three digits from the top: bits 20..30,
  // 9..19 and 0..8. After each level `prefix` holds key >> shift of the k-th
  // largest key and `above` counts the keys known to be larger.
  const int shifts[3] = {20, 9, 0};
  const std::uint32_t masks[3] = {0x7ffu, 0x7ffu, 0x1ffu};
  std::uint32_t prefix = 0;
  std::size_t above = 0;
  for (int level = 0; level < 3; ++level) {
    const int filter_shift = level == 0 ? 32 : shifts[level - 1];
    const auto h = histogram(x, d, shifts[level], masks[level], filter_shift, prefix);
    std::uint32_t digit = masks[level];
    while (above + h[digit] < k) {
      above += h[digit];
      FEDAGG_CHECK(digit > 0, "top-k radix select ran out of keys");
      --digit;
    }
    prefix = level == 0 ? digit : ((prefix << (shifts[level - 1] - shifts[level])) | digit);
  }
  return {prefix, above};
}

GatherPlan plan_gather(const float* x, std::size_t d, std::uint32_t key) {
  GatherPlan p;
  p.key = key;
  p.chunk = chunk_for(d);
  const std::size_t ntasks = (d + p.chunk - 1) / p.chunk;
  p.gt.assign(ntasks, 0);
  p.eq.assign(ntasks, 0);
  parallel_for(ntasks, [&](std::size_t c, int) {
    const std::size_t e = std::min(d, (c + 1) * p.chunk);
    std::size_t g = 0, q = 0;
    for (std::size_t j = c * p.chunk; j < e; ++j) {
      const std::uint32_t k = key_of(x[j]);
      g += k > key;
      q += k == key;
    }
    p.gt[c] = g;
    p.eq[c] = q;
  });
  for (std::size_t c = 0; c < ntasks; ++c) {
    p.total_gt += p.gt[c];
    p.total_eq += p.eq[c];
  }
  return p;
}

template <class Index>
void gather(const float* x, std::size_t d, const GatherPlan& p, std::size_t k, Index* idx, float* val) {
  FEDAGG_CHECK(k >= p.total_gt && k <= p.total_gt + p.total_eq, "gather count outside the plan");
  // Each chunk writes at its own offset: the output is in index order, and the
  // ties kept are the first by index.
  const std::size_t ntasks = p.gt.size();
  std::size_t ties_left = k - p.total_gt;
  std::vector<std::size_t> offset(ntasks), ties(ntasks);
  std::size_t pos = 0;
  for (std::size_t c = 0; c < ntasks; ++c) {
    ties[c] = std::min(p.eq[c], ties_left);
    ties_left -= ties[c];
    offset[c] = pos;
    pos += p.gt[c] + ties[c];
  }
  parallel_for(ntasks, [&](std::size_t c, int) {
    const std::size_t e = std::min(d, (c + 1) * p.chunk);
    std::size_t o = offset[c], tie_budget = ties[c];
    for (std::size_t j = c * p.chunk; j < e; ++j) {
      const std::uint32_t key = key_of(x[j]);
      if (key > p.key || (key == p.key && tie_budget > 0)) {
        if (key == p.key) --tie_budget;
        idx[o] = static_cast<Index>(j);
        val[o] = x[j];
        ++o;
      }
    }
  });
}

std::uint32_t magnitude_key(float v) { return key_of(v); }

template <class Index>
void scatter_add(double* acc, std::size_t d, const Index* idx, const float* val, std::size_t m,
                 double w) {
  (void)d;  // indices were checked against d by the caller
  for (std::size_t i = 0; i < m; ++i) acc[idx[i]] += w * static_cast<double>(val[i]);
}

template <class Index>
void topk(const float* x, std::size_t d, std::size_t k, Index* idx, float* val) {
  FEDAGG_CHECK(k >= 1 && k <= d, "top-k needs 1 <= k <= d");
  // Fast path for k << d: a strided sample gives a magnitude L that about
  // 1.25 k + 64 coordinates reach; one counting pass checks that at least k
  // do, one pass gathers them, and the exact top-k is selected among those
  // candidates. Otherwise (or if the sample misled), radix select on all of x.
  if (d >= (1u << 18) && k <= d / 8) {
    const std::size_t m = std::size_t(1) << 16, stride = d / m;
    std::vector<std::uint32_t> sample(m);
    for (std::size_t i = 0; i < m; ++i) sample[i] = key_of(x[i * stride]);
    const std::size_t want = std::min(m - 1, (k * m / d) * 5 / 4 + 64);
    std::nth_element(sample.begin(), sample.begin() + want, sample.end(), std::greater<>());
    const GatherPlan plan = plan_gather(x, d, sample[want]);
    const std::size_t reach = plan.total_gt + plan.total_eq;
    if (reach >= k) {
      std::vector<Index> cidx(reach);
      std::vector<float> cval(reach);
      gather(x, d, plan, reach, cidx.data(), cval.data());
      const Threshold t = topk_threshold(cval.data(), reach, k);
      const GatherPlan fine = plan_gather(cval.data(), reach, t.key);
      std::vector<Index> pos(k);
      gather(cval.data(), reach, fine, k, pos.data(), val);
      for (std::size_t i = 0; i < k; ++i) idx[i] = cidx[static_cast<std::size_t>(pos[i])];
      return;
    }
  }
  const Threshold t = topk_threshold(x, d, k);
  gather(x, d, plan_gather(x, d, t.key), k, idx, val);
}

template void topk<std::uint32_t>(const float*, std::size_t, std::size_t, std::uint32_t*, float*);
template void topk<std::uint64_t>(const float*, std::size_t, std::size_t, std::uint64_t*, float*);
template void gather<std::uint32_t>(const float*, std::size_t, const GatherPlan&, std::size_t, std::uint32_t*, float*);
template void gather<std::uint64_t>(const float*, std::size_t, const GatherPlan&, std::size_t, std::uint64_t*, float*);
template void scatter_add<std::uint32_t>(double*, std::size_t, const std::uint32_t*, const float*, std::size_t, double);
template void scatter_add<std::uint64_t>(double*, std::size_t, const std::uint64_t*, const float*, std::size_t, double);

}  // namespace fedagg
