// Per-coordinate math the CPU quantizers (csrc/quant.cpp) and the CUDA codec
// kernels (cuda/codec_kernels.cu) share, so both backends draw the same
// random bits and read the same packed codes.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fedagg/hd.hpp"

namespace fedagg {

// u in [0, 1) from (seed, index): a murmur3-style finalizer of the mixed counter.
FEDAGG_HD inline float uniform01(std::uint64_t seed, std::uint64_t j) {
  std::uint32_t h = static_cast<std::uint32_t>(j * 0x9E3779B97F4A7C15ull + seed) ^
                    static_cast<std::uint32_t>(seed >> 32);
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return static_cast<float>(h >> 8) * (1.0f / 16777216.0f);
}

// The random sign of coordinate j in the randomized Hadamard rotation.
FEDAGG_HD inline float random_sign(std::uint64_t seed, std::uint64_t j) {
  return uniform01(seed ^ 0xA5A5A5A5A5A5A5A5ull, j) < 0.5f ? -1.0f : 1.0f;
}

// Code j of `bits` bits (1, 2, 4 or 8), packed little-endian within bytes.
FEDAGG_HD inline unsigned code_at(const std::uint8_t* codes, std::size_t j, int bits) {
  const std::size_t bit = j * static_cast<std::size_t>(bits);
  return (codes[bit >> 3] >> (bit & 7)) & ((1u << bits) - 1u);
}

}  // namespace fedagg
