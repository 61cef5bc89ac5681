// Gaussian noise on the GPU: the Philox4x32-10 stream and transform of
// fedagg/philox.hpp, compiled with --fmad=false (CMakeLists.txt) so that each
// float equals the CPU's (csrc/noise.cpp) for the same (seed, offset).
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "fedagg/philox.hpp"
#include "fedagg_cuda.hpp"

namespace fedagg {
namespace gpu {
namespace {

// Thread t owns Philox block first_block + t: up to four outputs.
__global__ void gaussian_kernel(float* __restrict__ out, std::size_t d, float stddev, std::uint64_t seed,
                                std::uint64_t offset, bool add) {
  const std::uint64_t first_block = offset / 4;
  const std::uint64_t nblocks = (offset + d + 3) / 4 - first_block;
  for (std::uint64_t t = static_cast<std::uint64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < nblocks;
       t += static_cast<std::uint64_t>(gridDim.x) * blockDim.x) {
    float n[4];
    philox::normal4(seed, first_block + t, n);
    for (int r = 0; r < 4; ++r) {
      const std::uint64_t g = (first_block + t) * 4 + r;  // stream index
      if (g < offset || g >= offset + d) continue;
      const std::size_t j = static_cast<std::size_t>(g - offset);
      const float v = stddev * n[r];
      out[j] = add ? out[j] + v : v;
    }
  }
}

}  // namespace

void gaussian_noise(float* out, std::size_t d, float stddev, std::uint64_t seed, std::uint64_t offset, bool add,
                    cudaStream_t stream) {
  if (d == 0) return;
  const std::size_t nblocks = (offset + d + 3) / 4 - offset / 4;
  const std::size_t want = (nblocks + 255) / 256;
  const unsigned grid = static_cast<unsigned>(want < (1u << 16) ? want : (1u << 16));
  gaussian_kernel<<<grid, 256, 0, stream>>>(out, d, stddev, seed, offset, add);
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw CudaError(std::string("fedagg CUDA gaussian_noise: ") + cudaGetErrorString(e), e);
}

}  // namespace gpu
}  // namespace fedagg
