// Noise for differential privacy: Gaussian from Philox4x32-10 (the same floats
// as the CUDA kernel, see philox.hpp) and exact discrete Gaussian samples
// (Canonne, Kamath, Steinke 2020) on an integer grid.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedagg {

// out[j] (+)= stddev * N_{offset + j} of stream `seed`, j < d; multithreaded.
void gaussian_noise(float* out, std::size_t d, float stddev, std::uint64_t seed, std::uint64_t offset, bool add);

// out[j] (+)= a sample of the discrete Gaussian N_Z(0, sigma2) with
// sigma2 = num / den (positive integers below 2^40), drawn exactly with integer
// arithmetic from the Philox stream of (seed, offset + j): coordinate j owns
// counter (offset + j, draw), so the result does not depend on the threads.
void discrete_gaussian(std::int64_t* out, std::size_t d, std::uint64_t num, std::uint64_t den, std::uint64_t seed,
                       std::uint64_t offset, bool add);

// Unbiased randomized rounding of x / step to integers: floor(x / step + u),
// u ~ U[0, 1) from (seed, j). Returns false if a value was NaN, Inf or too large.
// Coordinate j uses uniform number offset + j of the seed's stream (a shard passes its first coordinate).
bool round_to_grid(const double* x, std::size_t d, double step, std::uint64_t seed, std::uint64_t offset,
                   std::int64_t* out);
// round_to_grid's rounding of float32 x (the same uniforms for the same seed and offset) into the
// ring Z_{2^bits} (two's complement), with the squared L2 norm of the integers, summed in float64
// in a fixed order. False on NaN, Inf or integers beyond int64.
bool round_to_ring(const float* x, std::size_t d, double step, std::uint64_t seed, std::uint64_t offset, int bits,
                   std::uint32_t* out, double* norm2);

}  // namespace fedagg
