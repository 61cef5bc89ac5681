// Quantizers: stochastic uniform b-bit with per-bucket range, QSGD, and 1-bit
// sign with per-bucket scale; the matching decode-and-accumulate kernels (the
// aggregator never forms a dense float32 copy of a quantized update).
//
// Stochastic rounding draws u in [0, 1) from a counter-based hash of
// (seed, coordinate index), so encoding is reproducible and parallel.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedagg {

// bits in {1, 2, 4, 8}; bucket a multiple of 8. For each bucket b:
// lo[b] = min, step[b] = (max - min) / (2^bits - 1); code = floor((x - lo) / step + u).
// codes: ceil(d * bits / 8) bytes, code j at bit (j * bits) % 8 of byte j * bits / 8.
// A bucket holding NaN or Inf gets step = NaN (QSGD: norm, sign: scale non-finite).
void quantize_uniform(const float* x, std::size_t d, int bits, std::size_t bucket, std::uint64_t seed,
                      float* lo, float* step, std::uint8_t* codes);
// acc[j] += w * (lo + code * step)
void dequantize_uniform_add(const float* lo, const float* step, const std::uint8_t* codes, std::size_t d,
                            int bits, std::size_t bucket, double w, double* acc);

// QSGD (Alistarh et al. 2017): norm[b] = ||x_bucket||_2, level = floor(|x| / norm * s + u),
// code = sign * level as int8 (s <= 127).
void quantize_qsgd(const float* x, std::size_t d, int s, std::size_t bucket, std::uint64_t seed, float* norm,
                   std::int8_t* codes);
void dequantize_qsgd_add(const float* norm, const std::int8_t* codes, std::size_t d, int s,
                         std::size_t bucket, double w, double* acc);

// Sign: bit j = (x_j < 0) packed little-endian; scale[b] = mean |x| over the bucket.
void quantize_sign(const float* x, std::size_t d, std::size_t bucket, float* scale, std::uint8_t* bits);
// acc[j] += w * scale * (bit ? -1 : +1)
void dequantize_sign_add(const float* scale, const std::uint8_t* bits, std::size_t d, std::size_t bucket,
                         double w, double* acc);
// votes[j] += (bit ? -1 : +1) for one payload's bits (majority vote counts).
void sign_vote_add(const std::uint8_t* bits, std::size_t d, std::int32_t* votes);

// Randomized Hadamard rotation, in place, of each block of B (a power of two)
// coordinates: forward y = H D x / sqrt(B), inverse x = D H y / sqrt(B), with D
// the random signs of (seed, index). Orthonormal: the inverse undoes the forward.
void hadamard_rotate(float* x, std::size_t len, std::size_t B, std::uint64_t seed, bool inverse);

}  // namespace fedagg
