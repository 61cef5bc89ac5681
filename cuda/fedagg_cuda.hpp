// The CUDA backend's launchers. Every launcher takes device pointers and the
// caller's stream, launches asynchronously on it, and throws fedagg::CudaError
// (naming the op) if a launch fails. Device memory is owned by the caller (the
// Python layer allocates it with the caller's framework, on its allocator).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace fedagg {
namespace gpu {

struct CudaError : std::runtime_error {
  cudaError_t code;
  CudaError(const std::string& what, cudaError_t c) : std::runtime_error(what), code(c) {}
};

// rows: device array of n device pointers to d floats each.
void weighted_sum(const float* const* rows, int n, std::size_t d, const double* coef, float* out,
                  cudaStream_t stream);
// D: device n x n doubles; upper triangle (i < k) written, the rest zero.
void pairwise_sqdist(const float* const* rows, int n, std::size_t d, double* D, cudaStream_t stream);
// out: device n doubles; x == nullptr gives squared norms.
void sqdist_to(const float* const* rows, int n, std::size_t d, const float* x, double* out,
               cudaStream_t stream);
// out: device n ints, 1 where the row holds NaN or Inf.
void nonfinite_rows(const float* const* rows, int n, std::size_t d, int* out, cudaStream_t stream);
// Coordinate-wise rules (mode 0 median, 1 trimmed mean of ranks [f, n-f),
// 2 Bulyan's window mean); *flag is set to 1 if a NaN/Inf was seen.
// net_lo/net_hi: device arrays of the sorting network (used for n > 64).
void sorted_reduce(const float* const* rows, int n, std::size_t d, int mode, int f,
                   const unsigned* net_lo, const unsigned* net_hi, std::size_t net_size, float* out,
                   int* flag, cudaStream_t stream);
int max_sorted_n();  // the largest n sorted_reduce accepts

int device_count();

}  // namespace gpu
}  // namespace fedagg
