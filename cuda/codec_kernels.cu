// CUDA kernels of the compression codecs' aggregator side: each adds w times a
// payload's decoded update into a float64 accumulator on the device, straight
// from the payload's buffers (the dense float32 update is never formed), with
// the same per-coordinate math as the CPU kernels (fedagg/quant_math.hpp).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "fedagg/quant_math.hpp"
#include "fedagg_cuda.hpp"

namespace fedagg {
namespace gpu {
namespace {

void check_launch(const char* op) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw CudaError(std::string("fedagg CUDA ") + op + ": " + cudaGetErrorString(e), e);
}

constexpr int kBlock = 256;

unsigned grid_of(std::size_t count) {
  const std::size_t want = (count + kBlock - 1) / kBlock;
  const std::size_t cap = std::size_t(1) << 16;  // grid-stride loops cover the rest
  return static_cast<unsigned>(want == 0 ? 1 : (want < cap ? want : cap));
}

#define FEDAGG_GRID_STRIDE(j, count)                                                         \
  for (std::size_t j = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       j < (count); j += static_cast<std::size_t>(gridDim.x) * blockDim.x)

template <class Index>
__global__ void scatter_add_kernel(double* __restrict__ acc, const Index* __restrict__ idx,
                                   const float* __restrict__ val, std::size_t m, double w) {
  // Indices of one payload are distinct (checked on the host): no two threads meet.
  FEDAGG_GRID_STRIDE(i, m) acc[idx[i]] += w * static_cast<double>(val[i]);
}

__global__ void uniform_add_kernel(double* __restrict__ acc, const float* __restrict__ lo,
                                   const float* __restrict__ step, const std::uint8_t* __restrict__ codes,
                                   std::size_t d, int bits, std::size_t bucket, double w) {
  FEDAGG_GRID_STRIDE(j, d) {
    const std::size_t b = j / bucket;
    acc[j] += w * lo[b] + (w * step[b]) * code_at(codes, j, bits);
  }
}

__global__ void qsgd_add_kernel(double* __restrict__ acc, const float* __restrict__ norm,
                                const std::int8_t* __restrict__ codes, std::size_t d, int s,
                                std::size_t bucket, double w) {
  FEDAGG_GRID_STRIDE(j, d) acc[j] += (w * norm[j / bucket] / s) * codes[j];
}

__global__ void sign_add_kernel(double* __restrict__ acc, const float* __restrict__ scale,
                                const std::uint8_t* __restrict__ signs, std::size_t d, std::size_t bucket,
                                double w) {
  FEDAGG_GRID_STRIDE(j, d) {
    const double a = w * scale[j / bucket];
    acc[j] += code_at(signs, j, 1) ? -a : a;
  }
}

__global__ void levels_add_kernel(double* __restrict__ acc, const float* __restrict__ scale,
                                  const std::uint8_t* __restrict__ codes, const double* __restrict__ levels,
                                  std::size_t len, int bits, std::size_t block, double w) {
  FEDAGG_GRID_STRIDE(j, len) acc[j] += w * static_cast<double>(scale[j / block]) * levels[code_at(codes, j, bits)];
}

__global__ void sign_vote_kernel(std::int32_t* __restrict__ votes, const std::uint8_t* __restrict__ signs,
                                 std::size_t d) {
  FEDAGG_GRID_STRIDE(j, d) votes[j] += code_at(signs, j, 1) ? -1 : 1;
}

// Walsh-Hadamard butterflies of stages h = 1, 2, ..., chunk / 2 inside every
// chunk of `chunk` (<= kSharedChunk) coordinates, in shared memory. The stage
// order is the CPU's, so the sums round the same way.
constexpr unsigned kSharedChunk = 4096;

__global__ void fwht_shared_kernel(float* __restrict__ x, unsigned chunk) {
  __shared__ float s[kSharedChunk];
  float* y = x + static_cast<std::size_t>(blockIdx.x) * chunk;
  for (unsigned i = threadIdx.x; i < chunk; i += blockDim.x) s[i] = y[i];
  __syncthreads();
  for (unsigned h = 1; h < chunk; h <<= 1) {
    for (unsigned t = threadIdx.x; t < chunk / 2; t += blockDim.x) {
      const unsigned i = (t / h) * 2 * h + (t % h);
      const float a = s[i], b = s[i + h];
      s[i] = a + b;
      s[i + h] = a - b;
    }
    __syncthreads();
  }
  for (unsigned i = threadIdx.x; i < chunk; i += blockDim.x) y[i] = s[i];
}

// One butterfly stage of span h over every block of B coordinates (for h >= kSharedChunk).
__global__ void fwht_stage_kernel(float* __restrict__ x, std::size_t len, std::size_t h) {
  FEDAGG_GRID_STRIDE(t, len / 2) {
    const std::size_t i = (t / h) * 2 * h + (t % h);
    const float a = x[i], b = x[i + h];
    x[i] = a + b;
    x[i + h] = a - b;
  }
}

// forward: before the butterflies, x *= D; after them, x *= 1/sqrt(B).
// inverse: after the butterflies, x *= D / sqrt(B).
__global__ void sign_scale_kernel(float* __restrict__ x, std::size_t len, std::uint64_t seed, float norm,
                                  int mode) {
  FEDAGG_GRID_STRIDE(j, len) {
    if (mode == 0) x[j] *= random_sign(seed, j);
    else if (mode == 1) x[j] *= norm;
    else x[j] *= norm * random_sign(seed, j);
  }
}

}  // namespace

void scatter_add(double* acc, const void* idx, int index_bytes, const float* val, std::size_t m, double w,
                 cudaStream_t stream) {
  if (m == 0) return;
  if (index_bytes == 4)
    scatter_add_kernel<<<grid_of(m), kBlock, 0, stream>>>(acc, static_cast<const std::uint32_t*>(idx), val, m, w);
  else
    scatter_add_kernel<<<grid_of(m), kBlock, 0, stream>>>(acc, static_cast<const std::uint64_t*>(idx), val, m, w);
  check_launch("scatter_add");
}

void dequantize_uniform_add(double* acc, const float* lo, const float* step, const std::uint8_t* codes,
                            std::size_t d, int bits, std::size_t bucket, double w, cudaStream_t stream) {
  uniform_add_kernel<<<grid_of(d), kBlock, 0, stream>>>(acc, lo, step, codes, d, bits, bucket, w);
  check_launch("dequantize_uniform_add");
}

void dequantize_qsgd_add(double* acc, const float* norm, const std::int8_t* codes, std::size_t d, int s,
                         std::size_t bucket, double w, cudaStream_t stream) {
  qsgd_add_kernel<<<grid_of(d), kBlock, 0, stream>>>(acc, norm, codes, d, s, bucket, w);
  check_launch("dequantize_qsgd_add");
}

void dequantize_sign_add(double* acc, const float* scale, const std::uint8_t* signs, std::size_t d,
                         std::size_t bucket, double w, cudaStream_t stream) {
  sign_add_kernel<<<grid_of(d), kBlock, 0, stream>>>(acc, scale, signs, d, bucket, w);
  check_launch("dequantize_sign_add");
}

void dequantize_levels_add(double* acc, const float* scale, const std::uint8_t* codes, const double* levels,
                           std::size_t len, int bits, std::size_t block, double w, cudaStream_t stream) {
  levels_add_kernel<<<grid_of(len), kBlock, 0, stream>>>(acc, scale, codes, levels, len, bits, block, w);
  check_launch("dequantize_levels_add");
}

void sign_vote_add(std::int32_t* votes, const std::uint8_t* signs, std::size_t d, cudaStream_t stream) {
  sign_vote_kernel<<<grid_of(d), kBlock, 0, stream>>>(votes, signs, d);
  check_launch("sign_vote_add");
}

void hadamard_rotate(float* x, std::size_t len, std::size_t B, std::uint64_t seed, bool inverse,
                     cudaStream_t stream) {
  const float norm = 1.0f / sqrtf(static_cast<float>(B));
  if (!inverse) sign_scale_kernel<<<grid_of(len), kBlock, 0, stream>>>(x, len, seed, norm, 0);
  const std::size_t chunk = B < kSharedChunk ? B : kSharedChunk;
  fwht_shared_kernel<<<static_cast<unsigned>(len / chunk), kBlock, 0, stream>>>(x, static_cast<unsigned>(chunk));
  for (std::size_t h = chunk; h < B; h <<= 1) fwht_stage_kernel<<<grid_of(len / 2), kBlock, 0, stream>>>(x, len, h);
  sign_scale_kernel<<<grid_of(len), kBlock, 0, stream>>>(x, len, seed, norm, inverse ? 2 : 1);
  check_launch("hadamard_rotate");
}

}  // namespace gpu
}  // namespace fedagg
