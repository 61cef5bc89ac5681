#include "fedagg/quant.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "fedagg/check.hpp"
#include "fedagg/clones.hpp"
#include "fedagg/quant_math.hpp"
#include "fedagg/threadpool.hpp"


namespace fedagg {
namespace {

template <class Fn>
void for_buckets(std::size_t d, std::size_t bucket, Fn&& fn) {
  const std::size_t nb = (d + bucket - 1) / bucket;
  const std::size_t per_task = std::max<std::size_t>(1, (std::size_t(1) << 16) / bucket);
  const std::size_t ntasks = (nb + per_task - 1) / per_task;
  parallel_for(ntasks, [&](std::size_t t, int) {
    const std::size_t b1 = std::min(nb, (t + 1) * per_task);
    for (std::size_t b = t * per_task; b < b1; ++b) fn(b, b * bucket, std::min(d, (b + 1) * bucket));
  });
}

// Min and max of x[0..n); returns false if a NaN or Inf was seen (x * 0 is NaN then).
FEDAGG_CLONES bool min_max(const float* x, std::size_t n, float* mn, float* mx) {
  float lo[16], hi[16], z[16];
  for (int l = 0; l < 16; ++l) lo[l] = hi[l] = x[0], z[l] = 0.0f;
  std::size_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) {
      lo[l] = x[j + l] < lo[l] ? x[j + l] : lo[l];
      hi[l] = x[j + l] > hi[l] ? x[j + l] : hi[l];
      z[l] += x[j + l] * 0.0f;
    }
  for (; j < n; ++j) {
    lo[0] = x[j] < lo[0] ? x[j] : lo[0];
    hi[0] = x[j] > hi[0] ? x[j] : hi[0];
    z[0] += x[j] * 0.0f;
  }
  float zz = 0.0f;
  for (int l = 0; l < 16; ++l) zz += z[l];
  *mn = *std::min_element(lo, lo + 16);
  *mx = *std::max_element(hi, hi + 16);
  return zz == 0.0f;
}

FEDAGG_CLONES void stochastic_codes(const float* x, std::size_t n, std::size_t j0, float lo, float inv,
                                    std::uint32_t top, std::uint64_t seed, std::uint8_t* out) {
  for (std::size_t i = 0; i < n; ++i) {
    float q = (x[i] - lo) * inv + uniform01(seed, j0 + i);
    std::uint32_t c = static_cast<std::uint32_t>(q);
    out[i] = static_cast<std::uint8_t>(c < top ? c : top);
  }
}

FEDAGG_CLONES void add_dequantized(const std::uint8_t* code, std::size_t n, double base, double step,
                                   double* acc) {
  for (std::size_t i = 0; i < n; ++i) acc[i] += base + step * code[i];
}

// Packs n codes of `bits` bits (n * bits a multiple of 8 except at the very end).
void pack(const std::uint8_t* code, std::size_t n, int bits, std::uint8_t* out) {
  if (bits == 8) {
    std::memcpy(out, code, n);
    return;
  }
  const int per = 8 / bits;
  for (std::size_t i = 0; i < n; i += per) {
    std::uint8_t byte = 0;
    for (int k = 0; k < per && i + k < n; ++k) byte |= static_cast<std::uint8_t>(code[i + k] << (k * bits));
    out[i / per] = byte;
  }
}

void unpack(const std::uint8_t* in, std::size_t n, int bits, std::uint8_t* code) {
  if (bits == 8) {
    std::memcpy(code, in, n);
    return;
  }
  const int per = 8 / bits;
  const std::uint8_t mask = static_cast<std::uint8_t>((1u << bits) - 1);
  for (std::size_t i = 0; i < n; ++i)
    code[i] = static_cast<std::uint8_t>((in[i / per] >> ((i % per) * bits)) & mask);
}

void check_layout(int bits, std::size_t bucket) {
  FEDAGG_CHECK(bits == 1 || bits == 2 || bits == 4 || bits == 8, "bits must be 1, 2, 4 or 8");
  FEDAGG_CHECK(bucket >= 8 && bucket % 8 == 0 && bucket <= (1u << 20), "bucket must be a multiple of 8 in [8, 2^20]");
}

// One butterfly level at distance h over n values (n a multiple of 2h).
FEDAGG_CLONES void fwht_level(float* x, std::size_t n, std::size_t h) {
  for (std::size_t i = 0; i < n; i += 2 * h)
    for (std::size_t j = i; j < i + h; ++j) {
      const float a = x[j], b = x[j + h];
      x[j] = a + b;
      x[j + h] = a - b;
    }
}

// Levels h and 2h in one pass: each value goes through the same two additions, in the same order,
// as with two fwht_level calls (the same bits), reading and writing the data once.
FEDAGG_CLONES void fwht_levels2(float* x, std::size_t n, std::size_t h) {
  for (std::size_t i = 0; i < n; i += 4 * h)
    for (std::size_t j = i; j < i + h; ++j) {
      const float a = x[j], b = x[j + h], c = x[j + 2 * h], d = x[j + 3 * h];
      const float s0 = a + b, s1 = a - b, s2 = c + d, s3 = c - d;
      x[j] = s0 + s2;
      x[j + 2 * h] = s0 - s2;
      x[j + h] = s1 + s3;
      x[j + 3 * h] = s1 - s3;
    }
}

// Levels 1, 2 and 4 on each run of 8 values, in registers.
FEDAGG_CLONES void fwht_first3(float* x, std::size_t n) {
  for (std::size_t i = 0; i < n; i += 8) {
    float* p = x + i;
    const float a0 = p[0] + p[1], a1 = p[0] - p[1], a2 = p[2] + p[3], a3 = p[2] - p[3];
    const float a4 = p[4] + p[5], a5 = p[4] - p[5], a6 = p[6] + p[7], a7 = p[6] - p[7];
    const float b0 = a0 + a2, b2 = a0 - a2, b1 = a1 + a3, b3 = a1 - a3;
    const float b4 = a4 + a6, b6 = a4 - a6, b5 = a5 + a7, b7 = a5 - a7;
    p[0] = b0 + b4, p[4] = b0 - b4, p[1] = b1 + b5, p[5] = b1 - b5;
    p[2] = b2 + b6, p[6] = b2 - b6, p[3] = b3 + b7, p[7] = b3 - b7;
  }
}

void fwht_levels(float* x, std::size_t n, std::size_t h, std::size_t end) {  // levels h, 2h, ... < end
  for (; 2 * h < end; h <<= 2) fwht_levels2(x, n, h);
  if (h < end) fwht_level(x, n, h);
}

// The unnormalized Walsh-Hadamard transform (Sylvester order) of B values, B a power of two. The
// levels below 4096 run on 16 KB runs (in L1), the rest two levels per pass: about half the time
// of level by level, with every value computed by the same additions in the same order.
void fwht(float* x, std::size_t B) {
  if (B < 8) {
    fwht_levels(x, B, 1, B);
    return;
  }
  const std::size_t S = std::min<std::size_t>(B, 4096);
  for (std::size_t base = 0; base < B; base += S) {
    fwht_first3(x + base, S);
    fwht_levels(x + base, S, 8, S);
  }
  fwht_levels(x, B, S, B);
}

}  // namespace

void hadamard_rotate(float* x, std::size_t len, std::size_t B, std::uint64_t seed, bool inverse) {
  FEDAGG_CHECK(B >= 2 && (B & (B - 1)) == 0 && len % B == 0, "block must be a power of two dividing the length");
  const float norm = 1.0f / std::sqrt(static_cast<float>(B));
  parallel_for(len / B, [&](std::size_t blk, int) {
    float* y = x + blk * B;
    const std::size_t j0 = blk * B;
    if (!inverse)
      for (std::size_t j = 0; j < B; ++j) y[j] *= random_sign(seed, j0 + j);
    fwht(y, B);
    for (std::size_t j = 0; j < B; ++j) y[j] *= inverse ? norm * random_sign(seed, j0 + j) : norm;
  });
}

void quantize_uniform(const float* x, std::size_t d, int bits, std::size_t bucket, std::uint64_t seed,
                      float* lo, float* step, std::uint8_t* codes) {
  check_layout(bits, bucket);
  const std::uint32_t top = (1u << bits) - 1;
  for_buckets(d, bucket, [&](std::size_t b, std::size_t j0, std::size_t j1) {
    float mn, mx;
    const bool finite = min_max(x + j0, j1 - j0, &mn, &mx);
    const float s = (mx - mn) / static_cast<float>(top);
    lo[b] = mn;
    step[b] = finite ? s : NAN;  // the caller checks the steps: no separate finiteness pass
    std::uint8_t tmp[1 << 12];
    for (std::size_t c0 = j0; c0 < j1; c0 += sizeof tmp) {
      const std::size_t n = std::min<std::size_t>(sizeof tmp, j1 - c0);
      stochastic_codes(x + c0, n, c0, mn, s > 0 ? 1.0f / s : 0.0f, top, seed, tmp);
      pack(tmp, n, bits, codes + c0 * bits / 8);
    }
  });
}

void dequantize_uniform_add(const float* lo, const float* step, const std::uint8_t* codes, std::size_t d,
                            int bits, std::size_t bucket, double w, double* acc) {
  check_layout(bits, bucket);
  for_buckets(d, bucket, [&](std::size_t b, std::size_t j0, std::size_t j1) {
    std::uint8_t tmp[1 << 12];
    for (std::size_t c0 = j0; c0 < j1; c0 += sizeof tmp) {
      const std::size_t n = std::min<std::size_t>(sizeof tmp, j1 - c0);
      unpack(codes + c0 * bits / 8, n, bits, tmp);
      add_dequantized(tmp, n, w * lo[b], w * step[b], acc + c0);
    }
  });
}

void quantize_qsgd(const float* x, std::size_t d, int s, std::size_t bucket, std::uint64_t seed, float* norm,
                   std::int8_t* codes) {
  FEDAGG_CHECK(s >= 1 && s <= 127, "QSGD levels s must be in [1, 127]");
  check_layout(8, bucket);
  for_buckets(d, bucket, [&](std::size_t b, std::size_t j0, std::size_t j1) {
    double ss = 0.0;
    for (std::size_t j = j0; j < j1; ++j) ss += static_cast<double>(x[j]) * x[j];
    const double nrm = std::sqrt(ss);
    norm[b] = static_cast<float>(nrm);
    const double scale = nrm > 0 ? s / nrm : 0.0;
    for (std::size_t j = j0; j < j1; ++j) {
      const double a = std::fabs(static_cast<double>(x[j])) * scale + uniform01(seed, j);
      const int level = std::min(s, static_cast<int>(a));
      codes[j] = static_cast<std::int8_t>(x[j] < 0 ? -level : level);
    }
  });
}

void dequantize_qsgd_add(const float* norm, const std::int8_t* codes, std::size_t d, int s,
                         std::size_t bucket, double w, double* acc) {
  check_layout(8, bucket);
  for_buckets(d, bucket, [&](std::size_t b, std::size_t j0, std::size_t j1) {
    const double unit = w * norm[b] / s;
    for (std::size_t j = j0; j < j1; ++j) acc[j] += unit * codes[j];
  });
}

void quantize_sign(const float* x, std::size_t d, std::size_t bucket, float* scale, std::uint8_t* bits) {
  check_layout(1, bucket);
  for_buckets(d, bucket, [&](std::size_t b, std::size_t j0, std::size_t j1) {
    double l1 = 0.0;
    for (std::size_t j = j0; j < j1; ++j) l1 += std::fabs(static_cast<double>(x[j]));
    scale[b] = static_cast<float>(l1 / static_cast<double>(j1 - j0));
    for (std::size_t j = j0; j < j1; j += 8) {
      std::uint8_t byte = 0;
      for (std::size_t k = 0; k < 8 && j + k < j1; ++k) byte |= static_cast<std::uint8_t>((x[j + k] < 0) << k);
      bits[j / 8] = byte;
    }
  });
}

void dequantize_sign_add(const float* scale, const std::uint8_t* bits, std::size_t d, std::size_t bucket,
                         double w, double* acc) {
  check_layout(1, bucket);
  for_buckets(d, bucket, [&](std::size_t b, std::size_t j0, std::size_t j1) {
    const double a = w * scale[b];
    for (std::size_t j = j0; j < j1; ++j) acc[j] += ((bits[j / 8] >> (j % 8)) & 1) ? -a : a;
  });
}

void sign_vote_add(const std::uint8_t* bits, std::size_t d, std::int32_t* votes) {
  for_buckets(d, 1 << 12, [&](std::size_t, std::size_t j0, std::size_t j1) {
    for (std::size_t j = j0; j < j1; ++j) votes[j] += ((bits[j / 8] >> (j % 8)) & 1) ? -1 : 1;
  });
}

}  // namespace fedagg
