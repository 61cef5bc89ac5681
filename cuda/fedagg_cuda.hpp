// The CUDA backend's launchers. Every launcher takes device pointers and the
// caller's stream, launches asynchronously on it, and throws fedagg::CudaError
// (naming the op) if a launch fails. Device memory is owned by the caller (the
// Python layer allocates it with the caller's framework, on its allocator).
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fedagg {
namespace gpu {

struct CudaError : std::runtime_error {
  cudaError_t code;
  CudaError(const std::string& what, cudaError_t c) : std::runtime_error(what), code(c) {}
};

// rows: device array of n device pointers to d floats each. nonfinite: nullptr, or a device int
// (zeroed by the caller) that becomes nonzero if any output is NaN or Inf.
void weighted_sum(const float* const* rows, int n, std::size_t d, const double* coef, float* out,
                  int* nonfinite, cudaStream_t stream);
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

// Compression codecs (codec_kernels.cu): acc (device float64, the payload's
// length) += w * decode(payload), from the payload's buffers uploaded as they
// came off the wire. Layouts and math as in csrc/include/fedagg/quant.hpp.
void scatter_add(double* acc, const void* idx, int index_bytes, const float* val, std::size_t m, double w,
                 cudaStream_t stream);
void dequantize_uniform_add(double* acc, const float* lo, const float* step, const std::uint8_t* codes,
                            std::size_t d, int bits, std::size_t bucket, double w, cudaStream_t stream);
void dequantize_qsgd_add(double* acc, const float* norm, const std::int8_t* codes, std::size_t d, int s,
                         std::size_t bucket, double w, cudaStream_t stream);
void dequantize_sign_add(double* acc, const float* scale, const std::uint8_t* signs, std::size_t d,
                         std::size_t bucket, double w, cudaStream_t stream);
// acc[j] += w * scale[j / block] * levels[code j] (rotation codec, 2^bits levels).
void dequantize_levels_add(double* acc, const float* scale, const std::uint8_t* codes, const double* levels,
                           std::size_t len, int bits, std::size_t block, double w, cudaStream_t stream);
void sign_vote_add(std::int32_t* votes, const std::uint8_t* signs, std::size_t d, cudaStream_t stream);
// In place, every block of B (a power of two dividing len): the CPU's hadamard_rotate, bit for bit.
void hadamard_rotate(float* x, std::size_t len, std::size_t B, std::uint64_t seed, bool inverse,
                     cudaStream_t stream);

// out[j] (+)= stddev * normal number (offset + j) of Philox stream `seed`: the CPU's floats, bit for bit.
void gaussian_noise(float* out, std::size_t d, float stddev, std::uint64_t seed, std::uint64_t offset, bool add,
                    cudaStream_t stream);

int device_count();

}  // namespace gpu
}  // namespace fedagg
