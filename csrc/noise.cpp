#include "fedagg/noise.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "fedagg/check.hpp"
#include "fedagg/clones.hpp"
#include "fedagg/kernels.hpp"
#include "fedagg/philox.hpp"
#include "fedagg/quant_math.hpp"
#include "fedagg/threadpool.hpp"

// This file is compiled with -ffp-contract=off -fno-math-errno (CMakeLists.txt):
// no FMA contraction, so the Gaussian transform rounds like the CUDA kernel's.

namespace fedagg {
namespace {

constexpr int kLanes = 16;  // Philox blocks per vector step: 64 normals

// 64 normals of blocks [block0, block0 + 16), lane-major: n[r][l] is word r of
// block l. Lanes outermost, rounds unrolled inside: the lane loop vectorizes.
// W: the lane word type (64-bit lanes suit AVX-512's 64-bit multiply, 32-bit
// lanes AVX2's); the words and so the normals are the same either way.
template <class W>
inline void normals64_body(std::uint64_t seed, std::uint64_t block0, float n[4][kLanes]) {
  const std::uint32_t k0 = static_cast<std::uint32_t>(seed), k1 = static_cast<std::uint32_t>(seed >> 32);
  std::uint32_t w[4][kLanes];
#pragma GCC ivdep
  for (int l = 0; l < kLanes; ++l) {
    const std::uint64_t b = block0 + static_cast<std::uint64_t>(l);
    W c0 = static_cast<W>(b & 0xFFFFFFFFu), c1 = static_cast<W>(b >> 32), c2 = 0, c3 = 0;
#pragma GCC unroll 10
    for (std::uint32_t r = 0; r < 10; ++r)
      philox::round(c0, c1, c2, c3, k0 + r * philox::kW0, k1 + r * philox::kW1);
    w[0][l] = static_cast<std::uint32_t>(c0);
    w[1][l] = static_cast<std::uint32_t>(c1);
    w[2][l] = static_cast<std::uint32_t>(c2);
    w[3][l] = static_cast<std::uint32_t>(c3);
  }
  for (int l = 0; l < kLanes; ++l) philox::box_muller(w[0][l], w[1][l], n[0][l], n[1][l]);
  for (int l = 0; l < kLanes; ++l) philox::box_muller(w[2][l], w[3][l], n[2][l], n[3][l]);
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target("arch=x86-64-v4"))) void normals64_v4(std::uint64_t seed, std::uint64_t block0,
                                                             float n[4][kLanes]) {
  normals64_body<std::uint64_t>(seed, block0, n);
}
__attribute__((target_clones("arch=x86-64-v3", "default"))) void normals64_v3(std::uint64_t seed,
                                                                              std::uint64_t block0,
                                                                              float n[4][kLanes]) {
  normals64_body<std::uint32_t>(seed, block0, n);
}
// AVX-512 when the kernel dispatch uses it (so fedagg._core._force_isa tests the other path too).
inline void normals64(std::uint64_t seed, std::uint64_t block0, float n[4][kLanes]) {
  if (std::strcmp(kernels().isa, "avx512") == 0) normals64_v4(seed, block0, n);
  else normals64_v3(seed, block0, n);
}
#else
inline void normals64(std::uint64_t seed, std::uint64_t block0, float n[4][kLanes]) {
  normals64_body<std::uint32_t>(seed, block0, n);
}
#endif

FEDAGG_CLONES void emit(float* out, const float n[4][kLanes], float stddev, bool add) {
  for (int l = 0; l < kLanes; ++l)
    for (int r = 0; r < 4; ++r) {
      const float v = stddev * n[r][l];
      out[4 * l + r] = add ? out[4 * l + r] + v : v;
    }
}

void gaussian_range(float* out, std::size_t count, float stddev, std::uint64_t seed, std::uint64_t g, bool add) {
  float one[4];
  std::size_t j = 0;
  // Scalar up to a block boundary, 16 blocks at a time, then the tail.
  while (j < count && (g + j) % 4 != 0) {
    philox::normal4(seed, (g + j) / 4, one);
    const float v = stddev * one[(g + j) % 4];
    out[j] = add ? out[j] + v : v;
    ++j;
  }
  float n[4][kLanes];
  for (; j + 4 * kLanes <= count; j += 4 * kLanes) {
    normals64(seed, (g + j) / 4, n);
    emit(out + j, n, stddev, add);
  }
  for (; j < count; ++j) {
    philox::normal4(seed, (g + j) / 4, one);
    const float v = stddev * one[(g + j) % 4];
    out[j] = add ? out[j] + v : v;
  }
}

// ---------------------------------------------------------------- exact discrete Gaussian
using u128 = unsigned __int128;

// The Philox words of one coordinate: counter (coordinate, draw), its own key.
struct Stream {
  std::uint64_t coord;
  std::uint32_t k0, k1;
  std::uint64_t draw = 0;
  std::uint32_t buf[4] = {0, 0, 0, 0};
  int pos = 4;

  std::uint32_t next() {
    if (pos == 4) {
      buf[0] = static_cast<std::uint32_t>(coord);
      buf[1] = static_cast<std::uint32_t>(coord >> 32);
      buf[2] = static_cast<std::uint32_t>(draw);
      buf[3] = static_cast<std::uint32_t>(draw >> 32);
      philox::philox4x32_10(buf[0], buf[1], buf[2], buf[3], k0, k1);
      ++draw;
      pos = 0;
    }
    return buf[pos++];
  }

  // Uniform on {0, ..., n - 1}, n >= 1, by rejection (exact).
  u128 below(u128 n) {
    if (n == 1) return 0;
    const u128 top = n - 1;
    int bits = 0;
    while (bits < 128 && (top >> bits) != 0) ++bits;
    const u128 mask = bits == 128 ? ~u128(0) : ((u128(1) << bits) - 1);
    for (;;) {
      u128 v = 0;
      for (int got = 0; got < bits; got += 32) v = (v << 32) | next();
      v &= mask;
      if (v < n) return v;
    }
  }

  bool bernoulli(u128 num, u128 den) { return below(den) < num; }  // P = num / den

  // Bernoulli(exp(-num / den)) for 0 <= num <= den (CKS 2020, Algorithm 1).
  bool bern_exp_unit(u128 num, u128 den) {
    for (u128 k = 1;; ++k) {
      if (den > ~u128(0) / (k + 1)) throw std::overflow_error("discrete Gaussian: Bernoulli denominator overflow");
      if (!bernoulli(num, den * k)) return (k & 1) == 1;
    }
  }

  // Bernoulli(exp(-num / den)) for any num >= 0.
  bool bern_exp(u128 num, u128 den) {
    while (num > den) {
      if (!bern_exp_unit(1, 1)) return false;
      num -= den;
    }
    return bern_exp_unit(num, den);
  }

  // Discrete Laplace with scale t (CKS 2020, Algorithm 2).
  std::int64_t laplace(std::uint64_t t) {
    for (;;) {
      const std::uint64_t u = static_cast<std::uint64_t>(below(t));
      if (!bern_exp(u, t)) continue;
      std::uint64_t v = 0;
      while (bern_exp_unit(1, 1)) ++v;
      const std::uint64_t x = u + t * v;
      const bool negative = bernoulli(1, 2);
      if (negative && x == 0) continue;
      return negative ? -static_cast<std::int64_t>(x) : static_cast<std::int64_t>(x);
    }
  }

  // Discrete Gaussian N_Z(0, p / q) (CKS 2020, Algorithm 3), t = floor(sigma) + 1.
  std::int64_t gaussian(std::uint64_t p, std::uint64_t q, std::uint64_t t) {
    const u128 den = u128(2) * p * q * u128(t) * t;
    for (;;) {
      const std::int64_t y = laplace(t);
      const u128 ay = static_cast<u128>(y < 0 ? -y : y);
      // gamma = (|y| t q - p)^2 / (2 p q t^2)
      const u128 ytq = ay * t * q;
      const u128 a = ytq >= p ? ytq - p : p - ytq;
      if (a >> 64) {
        // gamma >= 2^128 / den >= 64: accept with probability < e^-64, which
        // needs 64 straight successes of Bernoulli(1/e) to even be possible.
        bool all = true;
        for (int i = 0; i < 64 && all; ++i) all = bern_exp_unit(1, 1);
        if (!all) continue;
        throw std::overflow_error("discrete Gaussian: a sample beyond the exact range (probability < 1e-27)");
      }
      if (bern_exp(a * a, den)) return y;
    }
  }
};

std::uint64_t isqrt_ratio(std::uint64_t p, std::uint64_t q) {  // floor(sqrt(p / q))
  std::uint64_t s = static_cast<std::uint64_t>(std::sqrt(static_cast<double>(p) / static_cast<double>(q)));
  while (s > 0 && u128(s) * s * q > p) --s;
  while (u128(s + 1) * (s + 1) * q <= p) ++s;
  return s;
}

}  // namespace

void gaussian_noise(float* out, std::size_t d, float stddev, std::uint64_t seed, std::uint64_t offset, bool add) {
  FEDAGG_CHECK(std::isfinite(stddev) && stddev >= 0.0f, "stddev must be finite and >= 0");
  constexpr std::size_t kChunk = std::size_t(1) << 16;
  parallel_for((d + kChunk - 1) / kChunk, [&](std::size_t t, int) {
    const std::size_t j0 = t * kChunk, j1 = std::min(d, j0 + kChunk);
    gaussian_range(out + j0, j1 - j0, stddev, seed, offset + j0, add);
  });
}

void discrete_gaussian(std::int64_t* out, std::size_t d, std::uint64_t num, std::uint64_t den, std::uint64_t seed,
                       std::uint64_t offset, bool add) {
  FEDAGG_CHECK(num >= 1 && den >= 1 && num < (std::uint64_t(1) << 40) && den < (std::uint64_t(1) << 40),
               "sigma^2 = num / den needs 1 <= num, den < 2^40");
  const std::uint64_t t = isqrt_ratio(num, den) + 1;
  // A key of its own: the same seed never gives correlated Gaussian and discrete streams.
  const std::uint32_t k0 = static_cast<std::uint32_t>(seed) ^ 0x5851F42Du;
  const std::uint32_t k1 = static_cast<std::uint32_t>(seed >> 32) ^ 0x4C957F2Du;
  constexpr std::size_t kChunk = 4096;
  parallel_for((d + kChunk - 1) / kChunk, [&](std::size_t c, int) {
    const std::size_t j1 = std::min(d, (c + 1) * kChunk);
    for (std::size_t j = c * kChunk; j < j1; ++j) {
      Stream s{offset + j, k0, k1};
      const std::int64_t v = s.gaussian(num, den, t);
      out[j] = add ? out[j] + v : v;
    }
  });
}

namespace {
// floor(x[j] / step + u_j) for every j, u_j = uniform01(seed, offset + j), in parallel chunks;
// put(j, q) stores the integer and returns what it adds to its chunk's sum (summed in chunk
// order, so the total does not depend on the thread count). False on NaN, Inf or beyond int64.
template <class T, class Put>
bool round_chunks(const T* x, std::size_t d, double step, std::uint64_t seed, std::uint64_t offset, Put put,
                  double* total) {
  FEDAGG_CHECK(std::isfinite(step) && step > 0.0, "grid step must be finite and > 0");
  const double inv = 1.0 / step;
  constexpr std::size_t kChunk = std::size_t(1) << 15;
  const std::size_t nt = (d + kChunk - 1) / kChunk;
  std::vector<char> ok(nt, 1);
  std::vector<double> part(nt, 0.0);
  parallel_for(nt, [&](std::size_t c, int) {
    const std::size_t j1 = std::min(d, (c + 1) * kChunk);
    double s = 0.0;
    for (std::size_t j = c * kChunk; j < j1; ++j) {
      const double v = static_cast<double>(x[j]) * inv + uniform01(seed, offset + j);
      if (!(std::fabs(v) < 4.0e18)) {  // NaN, Inf, or beyond int64
        ok[c] = 0;
        put(j, 0.0);
        continue;
      }
      s += put(j, std::floor(v));
    }
    part[c] = s;
  });
  double sum = 0.0;
  for (double p : part) sum += p;
  *total = sum;
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}
}  // namespace

bool round_to_grid(const double* x, std::size_t d, double step, std::uint64_t seed, std::uint64_t offset,
                   std::int64_t* out) {
  double unused;
  return round_chunks(x, d, step, seed, offset, [out](std::size_t j, double q) {
    out[j] = static_cast<std::int64_t>(q);
    return 0.0;
  }, &unused);
}

namespace {
constexpr int kRingLanes = 8;

// round_to_grid's floor(x / step + u) for n values into the ring, written to vectorize: the
// integer's low 32 bits come from the double's own (q + 1.5 x 2^52 holds q in its low mantissa
// bits, two's complement, for |q| < 2^51), and the squared norm goes into kRingLanes partial sums
// (lane j % kRingLanes), so every instruction set adds the same numbers in the same order.
// False if some value is NaN, Inf or beyond 2^51 in grid units.
FEDAGG_CLONES bool ring_range(const float* x, std::size_t n, double inv, std::uint64_t seed, std::uint64_t offset,
                              std::uint32_t mask, std::uint32_t* out, double* lanes) {
  constexpr double kLimit = 2251799813685248.0;  // 2^51
  constexpr double kShift = 6755399441055744.0;  // 1.5 x 2^52
  bool ok = true;
  for (std::size_t j0 = 0; j0 < n; j0 += kRingLanes) {
    const std::size_t m = std::min<std::size_t>(kRingLanes, n - j0);
    for (std::size_t k = 0; k < m; ++k) {
      const std::size_t j = j0 + k;
      const double v = static_cast<double>(x[j]) * inv + static_cast<double>(uniform01(seed, offset + j));
      ok &= std::fabs(v) < kLimit;  // false for NaN too
      const double q = std::floor(v);
      const double t = q + kShift;
      std::uint64_t bits;
      std::memcpy(&bits, &t, sizeof bits);
      out[j] = static_cast<std::uint32_t>(bits) & mask;
      lanes[k] += q * q;
    }
  }
  return ok;
}
}  // namespace

bool round_to_ring(const float* x, std::size_t d, double step, std::uint64_t seed, std::uint64_t offset, int bits,
                   std::uint32_t* out, double* norm2) {
  FEDAGG_CHECK(bits >= 1 && bits <= 32, "the ring needs 1 <= bits <= 32");
  FEDAGG_CHECK(std::isfinite(step) && step > 0.0, "grid step must be finite and > 0");
  const std::uint32_t mask = bits == 32 ? 0xffffffffu : ((std::uint32_t(1) << bits) - 1);
  const double inv = 1.0 / step;
  constexpr std::size_t kChunk = std::size_t(1) << 15;  // a multiple of kRingLanes: lanes line up
  const std::size_t nt = (d + kChunk - 1) / kChunk;
  std::vector<char> ok(nt, 1);
  std::vector<double> part(nt, 0.0);
  parallel_for(nt, [&](std::size_t c, int) {
    const std::size_t j0 = c * kChunk, j1 = std::min(d, j0 + kChunk);
    double lanes[kRingLanes] = {};
    ok[c] = ring_range(x + j0, j1 - j0, inv, seed, offset + j0, mask, out + j0, lanes);
    double s = 0.0;
    for (double l : lanes) s += l;
    part[c] = s;
  });
  double sum = 0.0;
  for (double p : part) sum += p;  // in chunk order: the same total on any thread count
  *norm2 = sum;
  return std::all_of(ok.begin(), ok.end(), [](char v) { return v != 0; });
}

}  // namespace fedagg
