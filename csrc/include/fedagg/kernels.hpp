// The coordinate-parallel kernels. Each is implemented once in
// simd/kernels_impl.inc and compiled per instruction set (baseline x86-64,
// AVX2+FMA, AVX-512); kernels() picks the best one this CPU supports at run
// time. Every kernel works on the coordinate range [begin, end) so callers can
// split the work over threads.
#pragma once
#include <cstddef>
#include <cstdint>

#include "fedagg/rows.hpp"

namespace fedagg {

struct KernelTable {
  const char* isa;
  int lanes;  // float lanes per vector register
  // out[j] = sum_i coef[i] * rows[i][j], accumulated in float64.
  void (*weighted_sum)(const float* const* rows, int n, const double* coef, float* out,
                       std::size_t begin, std::size_t end);
  // acc[i * n + k] += sum_j (rows[i][j] - rows[k][j])^2 for i < k (upper triangle only).
  void (*pairwise_sqdist)(const float* const* rows, int n, double* acc, std::size_t begin,
                          std::size_t end);
  // acc[i] += sum_j (rows[i][j] - x[j])^2.
  void (*sqdist_to)(const float* const* rows, int n, const float* x, double* acc,
                    std::size_t begin, std::size_t end);
  // acc[i] += sum_j rows[i][j]^2.
  void (*sqnorms)(const float* const* rows, int n, double* acc, std::size_t begin,
                  std::size_t end);
  // Sort each coordinate's n values with `net`, then reduce them:
  //   mode 0: median; mode 1: mean of sorted ranks [f, n - f);
  //   mode 2: Bulyan's second stage, mean of the n - 2f values closest to the median.
  // Returns true if a NaN or Inf was seen (the output is then meaningless).
  bool (*sorted_reduce)(const float* const* rows, const NetworkView& net, int mode, int f, float* out,
                        std::size_t begin, std::size_t end);
  // weighted_sum of rows that all hold binary16 (elem 1) or bfloat16 (elem 2), widened in
  // registers: the bits weighted_sum gives on the rows widened beforehand.
  void (*weighted_sum_half)(const std::uint16_t* const* rows, int elem, int n, const double* coef, float* out,
                            std::size_t begin, std::size_t end);
  // dst[j] = src[j] widened to float32, exactly (src: `len` binary16 or bfloat16 bit patterns;
  // elem 1 or 2 as in Elem). NaN stays NaN, Inf Inf, subnormals their value.
  void (*widen)(const std::uint16_t* src, int elem, float* dst, std::size_t len);
};

// Coordinates per chunk of the distance kernel for n rows at `lanes` floats per vector: the n
// rows of a chunk stay in L2, and each float32 partial sum covers at most 2048 coordinates.
// (The ops tile half-precision rows in multiples of it so they are summed in the same chunks.)
inline std::size_t pair_chunk(int n, int lanes) {
  const std::size_t l = static_cast<std::size_t>(lanes);
  std::size_t c = (std::size_t(1) << 17) / static_cast<std::size_t>(n > 0 ? n : 1);
  c = c / l * l;
  if (c < 8 * l) c = 8 * l;
  if (c > 2048) c = 2048;
  return c;
}

const KernelTable& kernels();
// Names of the compiled-in instruction sets, best first, and whether this CPU runs each.
const KernelTable* kernel_table(const char* isa);  // nullptr if not compiled in or not usable
void force_isa(const char* isa);                   // testing: use a lower ISA; "" restores best

}  // namespace fedagg
