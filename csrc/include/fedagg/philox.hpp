// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC 2011) and the Gaussian transform built on it, for host and device.
//
// Normal number g of the stream (seed, offset) is lane g % 4 of Philox block
// g / 4: counter (block_lo, block_hi, 0, 0), key (seed_lo, seed_hi). The four
// words give two Box-Muller pairs. The transform uses only +, -, *, sqrt and
// integer operations (log and sincos are polynomials here, not libm), and both
// compilers are told not to contract a * b + c into an FMA (noise.cpp with
// -ffp-contract=off, the CUDA file with --fmad=false), so every IEEE operation
// rounds the same way: the CPU and the GPU produce the same floats.
#pragma once
#include <cstdint>
#include <cmath>
#include <cstring>

#include "fedagg/hd.hpp"

namespace fedagg {
namespace philox {

constexpr std::uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
constexpr std::uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;

// One round. W is std::uint32_t, or std::uint64_t holding 32-bit words (the
// CPU's vector loop: every lane operation is then 64-bit, which vectorizes).
template <class W>
FEDAGG_HD inline void round(W& c0, W& c1, W& c2, W& c3, std::uint32_t k0, std::uint32_t k1) {
  const std::uint64_t p0 = static_cast<std::uint64_t>(kM0) * static_cast<std::uint64_t>(c0);
  const std::uint64_t p1 = static_cast<std::uint64_t>(kM1) * static_cast<std::uint64_t>(c2);
  const W n0 = static_cast<W>((p1 >> 32) ^ c1 ^ k0);
  const W n2 = static_cast<W>((p0 >> 32) ^ c3 ^ k1);
  c1 = static_cast<W>(p1 & 0xFFFFFFFFu);
  c3 = static_cast<W>(p0 & 0xFFFFFFFFu);
  c0 = n0;
  c2 = n2;
}

// The 10-round bijection of (c0..c3) under key (k0, k1), in place.
FEDAGG_HD inline void philox4x32_10(std::uint32_t& c0, std::uint32_t& c1, std::uint32_t& c2, std::uint32_t& c3,
                                    std::uint32_t k0, std::uint32_t k1) {
  FEDAGG_UNROLL
  for (int r = 0; r < 10; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
}

FEDAGG_HD inline float bits_to_float(std::uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FEDAGG_HD inline std::uint32_t float_to_bits(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// float(a) correctly rounded, from two exact halves and one rounded sum (the
// same value as a plain conversion; written so AVX2, which has no unsigned
// conversion, vectorizes it).
FEDAGG_HD inline float to_float(std::uint32_t a) {
  return static_cast<float>(static_cast<int>(a >> 16)) * 65536.0f + static_cast<float>(static_cast<int>(a & 0xFFFFu));
}

// Natural log of u in (0, 1] (a normal float), Cephes' logf polynomial.
FEDAGG_HD inline float log_unit(float u) {
  const std::uint32_t b = float_to_bits(u);
  float e = static_cast<float>(static_cast<int>(b >> 23)) - 127.0f;
  float m = bits_to_float((b & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  // m > sqrt(2): halve it (an exponent decrement on the bits), e + 1.
  const std::uint32_t big = (b & 0x007FFFFFu) > 0x003504F3u ? 1u : 0u;
  m = bits_to_float(float_to_bits(m) - (big << 23));
  e = e + static_cast<float>(static_cast<int>(big));
  const float x = m - 1.0f;
  const float z = x * x;
  float y = 7.0376836292E-2f;
  y = y * x - 1.1514610310E-1f;
  y = y * x + 1.1676998740E-1f;
  y = y * x - 1.2420140846E-1f;
  y = y * x + 1.4249322787E-1f;
  y = y * x - 1.6668057665E-1f;
  y = y * x + 2.0000714765E-1f;
  y = y * x - 2.4999993993E-1f;
  y = y * x + 3.3333331174E-1f;
  y = y * x * z;
  y = y + e * -2.12194440E-4f;
  y = y - 0.5f * z;
  return (x + y) + e * 0.693359375f;
}

// sin and cos of 2 pi k / 2^24 for k in [0, 2^24): the octant from the integer,
// Cephes' sinf / cosf polynomials on [-pi/4, pi/4).
FEDAGG_HD inline void sincos_turn(std::uint32_t k, float& s, float& c) {
  const std::uint32_t j = (k + (1u << 21)) & 0x00FFFFFFu;
  const std::uint32_t q = j >> 22;
  const float x = (static_cast<float>(static_cast<int>(j & 0x003FFFFFu)) - 2097152.0f) * 3.7450702e-07f;  // (pi / 2) / 2^22
  const float z = x * x;
  float sp = -1.9515295891E-4f;
  sp = sp * z + 8.3321608736E-3f;
  sp = sp * z - 1.6666654611E-1f;
  const float sn = sp * z * x + x;
  float cp = 2.443315711809948E-5f;
  cp = cp * z - 1.388731625493765E-3f;
  cp = cp * z + 4.166664568298827E-2f;
  const float cs = cp * z * z - 0.5f * z + 1.0f;
  // Quadrant q: (sin, cos) = (sn, cs), (cs, -sn), (-sn, -cs), (-cs, sn); selects and
  // sign flips done on the bits, branch-free so that every ISA vectorizes it.
  const std::uint32_t swap = 0u - (q & 1u);
  const std::uint32_t sb = float_to_bits(sn), cb = float_to_bits(cs);
  s = bits_to_float(((sb & ~swap) | (cb & swap)) ^ ((q & 2u) << 30));
  c = bits_to_float(((cb & ~swap) | (sb & swap)) ^ (((q + 1u) & 2u) << 30));
}

// Box-Muller: radius from a (u = a * 2^-32 + 2^-33 in (0, 1], so |n| <= 6.77),
// angle from the top 24 bits of b.
FEDAGG_HD inline void box_muller(std::uint32_t a, std::uint32_t b, float& n0, float& n1) {
  const float u = to_float(a) * 0x1p-32f + 0x1p-33f;
  const float r = sqrtf(-2.0f * log_unit(u));
  float s, c;
  sincos_turn(b >> 8, s, c);
  n0 = r * c;
  n1 = r * s;
}

// The four standard normals of block `block` of stream `seed`.
FEDAGG_HD inline void normal4(std::uint64_t seed, std::uint64_t block, float out[4]) {
  std::uint32_t c0 = static_cast<std::uint32_t>(block), c1 = static_cast<std::uint32_t>(block >> 32), c2 = 0,
                c3 = 0;
  philox4x32_10(c0, c1, c2, c3, static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
  box_muller(c0, c1, out[0], out[1]);
  box_muller(c2, c3, out[2], out[3]);
}

}  // namespace philox
}  // namespace fedagg
