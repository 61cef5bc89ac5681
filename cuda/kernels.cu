// CUDA kernels of the aggregation rules; semantics identical to the CPU
// kernels (csrc/simd/kernels_impl.inc), float64 accumulation where the CPU
// accumulates in float64.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <utility>

#include "fedagg/sort_math.hpp"
#include "fedagg_cuda.hpp"

namespace fedagg {
namespace gpu {
namespace {

void check(cudaError_t e, const char* op) {
  if (e != cudaSuccess)
    throw CudaError(std::string("fedagg CUDA ") + op + ": " + cudaGetErrorString(e), e);
}

int sm_count() {
  int dev = 0, sms = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice");
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
  return sms > 0 ? sms : 1;
}

unsigned grid_for(std::size_t d, int block) {
  const std::size_t want = (d + block - 1) / block;
  const std::size_t cap = static_cast<std::size_t>(sm_count()) * 32;
  return static_cast<unsigned>(want < cap ? (want > 0 ? want : 1) : cap);
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// Block-wide sum, result valid in thread 0. blockDim.x must be a multiple of 32 (<= 1024).
__device__ double block_sum(double v) {
  __shared__ double part[32];
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) part[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? part[lane] : 0.0;
  if (warp == 0) v = warp_sum(v);
  return v;
}

// ------------------------------------------------------------------ weighted sum
// True in every thread of the block when out and all n rows are 16-byte aligned
// (then four coordinates per thread, one 16-byte load per row).
__device__ bool rows_aligned16(const float* const* __restrict__ rows, int n, const void* out) {
  bool ok = (reinterpret_cast<std::uintptr_t>(out) & 15) == 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x)
    ok &= (reinterpret_cast<std::uintptr_t>(rows[i]) & 15) == 0;
  return __syncthreads_and(ok);
}

// Rows summed in order 0..n-1 per coordinate, in float64, like the CPU kernel. With
// nonfinite != nullptr, *nonfinite becomes nonzero if any output is NaN or Inf: the check
// every caller needs, without a second pass over the output and its launches.
__global__ void __launch_bounds__(256)
weighted_sum_kernel(const float* const* __restrict__ rows, int n, std::size_t d,
                    const double* __restrict__ coef, float* __restrict__ out, int* __restrict__ nonfinite) {
  const std::size_t tid = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t tail = 0;
  bool bad = false;
  if (rows_aligned16(rows, n, out)) {
    const std::size_t d4 = d / 4;
    for (std::size_t q = tid; q < d4; q += stride) {
      double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
#pragma unroll 4
      for (int i = 0; i < n; ++i) {
        const float4 v = __ldg(reinterpret_cast<const float4*>(rows[i]) + q);
        const double c = __ldg(coef + i);
        a0 += c * static_cast<double>(v.x);
        a1 += c * static_cast<double>(v.y);
        a2 += c * static_cast<double>(v.z);
        a3 += c * static_cast<double>(v.w);
      }
      const float4 o = make_float4(static_cast<float>(a0), static_cast<float>(a1), static_cast<float>(a2),
                                   static_cast<float>(a3));
      reinterpret_cast<float4*>(out)[q] = o;
      bad |= !(isfinite(o.x) && isfinite(o.y) && isfinite(o.z) && isfinite(o.w));
    }
    tail = d4 * 4;
  }
  for (std::size_t j = tail + tid; j < d; j += stride) {
    double acc = 0.0;
    for (int i = 0; i < n; ++i) acc += __ldg(coef + i) * static_cast<double>(__ldg(rows[i] + j));
    const float o = static_cast<float>(acc);
    out[j] = o;
    bad |= !isfinite(o);
  }
  if (nonfinite != nullptr && __syncthreads_or(bad) && threadIdx.x == 0) atomicOr(nonfinite, 1);
}

// ------------------------------------------------------- squared distances to x
// blockIdx.y: the row; the block sums its share of coordinates, then one atomic add.
__global__ void sqdist_to_kernel(const float* const* __restrict__ rows, std::size_t d,
                                 const float* __restrict__ x, double* __restrict__ out) {
  const float* r = rows[blockIdx.y];
  double s = 0.0;
  const std::size_t tid = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t tail = 0;
  if (((reinterpret_cast<std::uintptr_t>(r) | reinterpret_cast<std::uintptr_t>(x)) & 15) == 0) {
    const float4* r4 = reinterpret_cast<const float4*>(r);
    const float4* x4 = reinterpret_cast<const float4*>(x);
    for (std::size_t q = tid; q < d / 4; q += stride) {
      const float4 a = __ldg(r4 + q);
      const float4 b = x ? __ldg(x4 + q) : make_float4(0.f, 0.f, 0.f, 0.f);
      const double t0 = static_cast<double>(a.x) - b.x, t1 = static_cast<double>(a.y) - b.y;
      const double t2 = static_cast<double>(a.z) - b.z, t3 = static_cast<double>(a.w) - b.w;
      s += (t0 * t0 + t1 * t1) + (t2 * t2 + t3 * t3);
    }
    tail = d / 4 * 4;
  }
  for (std::size_t j = tail + tid; j < d; j += stride) {
    const double t = static_cast<double>(__ldg(r + j)) - (x ? static_cast<double>(__ldg(x + j)) : 0.0);
    s += t * t;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) atomicAdd(out + blockIdx.y, s);
}

__global__ void nonfinite_kernel(const float* const* __restrict__ rows, std::size_t d,
                                 int* __restrict__ out) {
  const float* r = rows[blockIdx.y];
  bool bad = false;
  const std::size_t tid = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  std::size_t tail = 0;
  if ((reinterpret_cast<std::uintptr_t>(r) & 15) == 0) {
    const float4* r4 = reinterpret_cast<const float4*>(r);
    for (std::size_t q = tid; q < d / 4; q += stride) {
      const float4 a = __ldg(r4 + q);
      bad |= !(isfinite(a.x) && isfinite(a.y) && isfinite(a.z) && isfinite(a.w));
    }
    tail = d / 4 * 4;
  }
  for (std::size_t j = tail + tid; j < d; j += stride) bad |= !isfinite(__ldg(r + j));
  if (__syncthreads_or(bad) && threadIdx.x == 0) out[blockIdx.y] = 1;
}

// --------------------------------------------------- pairwise squared distances
// Split over coordinates: each block takes a chunk of coordinates and a
// 64 x 64 tile of row pairs (tiles with K0 >= I0 only), stages KC coordinates
// of its 2 x 64 rows in shared memory, and each of its kThreads = 256 threads
// accumulates a 4 x 4 block of pairs from exact float32 differences (float32 runs of at
// most kRun coordinates, then float64), like the CPU kernel.
constexpr int kTile = 64, kKC = 32, kRun = 512, kThreads = 256, kPer = kTile * kKC / kThreads;

__global__ void __launch_bounds__(kThreads, 2)
pairwise_kernel(const float* const* __restrict__ rows, int n, std::size_t d, std::size_t chunk,
                double* __restrict__ D) {
  const int I0 = blockIdx.y * kTile, K0 = blockIdx.z * kTile;
  if (K0 < I0) return;
  const std::size_t j0 = static_cast<std::size_t>(blockIdx.x) * chunk;
  if (j0 >= d) return;
  const std::size_t j1 = j0 + chunk < d ? j0 + chunk : d;
  __shared__ float A[kKC][kTile + 1], B[kKC][kTile + 1];
  // This thread's 4 x 4 block (bi, bk) of the 16 x 16 grid of blocks. A tile on
  // the diagonal needs only the 136 blocks with bi <= bk: threads 0..135 take
  // them (whole warps beyond stay idle) instead of computing both halves.
  int bi, bk;
  bool active = true;
  if (I0 == K0) {
    int t = threadIdx.x;
    bi = 0;
    while (bi < 16 && t >= 16 - bi) {  // row bi of the upper triangle holds 16 - bi blocks
      t -= 16 - bi;
      ++bi;
    }
    active = bi < 16;
    bk = bi + t;
  } else {
    bi = threadIdx.x >> 4;
    bk = threadIdx.x & 15;
  }
  float acc[4][4];
  double dacc[4][4];
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[p][q] = 0.0f, dacc[p][q] = 0.0;
  // Each thread stages kPer values of A (and of B off the diagonal, where B is A),
  // loaded into registers one stage ahead so the loads overlap the arithmetic.
  const bool diag = I0 == K0;
  float(*Bs)[kTile + 1] = diag ? A : B;
  float pa[kPer], pb[kPer];
  auto fetch = [&](std::size_t jj) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int t = threadIdx.x + u * kThreads, r = t / kKC;
      const std::size_t j = jj + t % kKC;
      const bool in = j < j1;
      pa[u] = (in && I0 + r < n) ? __ldg(rows[I0 + r] + j) : 0.0f;
      pb[u] = (!diag && in && K0 + r < n) ? __ldg(rows[K0 + r] + j) : 0.0f;
    }
  };
  fetch(j0);
  int run = 0;
  for (std::size_t jj = j0; jj < j1; jj += kKC) {
#pragma unroll
    for (int u = 0; u < kPer; ++u) {
      const int t = threadIdx.x + u * kThreads, r = t / kKC, c = t % kKC;
      A[c][r] = pa[u];
      if (!diag) B[c][r] = pb[u];
    }
    __syncthreads();
    if (jj + kKC < j1) fetch(jj + kKC);
#pragma unroll 8
    for (int c = 0; c < (active ? kKC : 0); ++c) {
      float a[4], b[4];
#pragma unroll
      for (int p = 0; p < 4; ++p) a[p] = A[c][bi * 4 + p], b[p] = Bs[c][bk * 4 + p];
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float t = a[p] - b[q];
          acc[p][q] = fmaf(t, t, acc[p][q]);
        }
    }
    __syncthreads();
    run += kKC;
    if (run >= kRun) {
      run = 0;
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) dacc[p][q] += acc[p][q], acc[p][q] = 0.0f;
    }
  }
#pragma unroll
  for (int p = 0; p < 4; ++p)
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int i = I0 + bi * 4 + p, k = K0 + bk * 4 + q;
      if (active && i < k && k < n) atomicAdd(D + static_cast<std::size_t>(i) * n + k, dacc[p][q] + acc[p][q]);
    }
}

// ---------------------------------------------------- sorting-network rules
// The per-coordinate math lives in fedagg/sort_math.hpp, shared with the CPU
// build so that the CPU tests exercise it (fedagg._core._register_sort_reduce).

template <int N>
__global__ void sorted_reduce_kernel(const float* const* __restrict__ rows, int n, std::size_t d,
                                     int mode, int f, float* __restrict__ out, int* flag) {
  extern __shared__ float staged[];  // mode 2: N values per thread, strided by blockDim
  bool bad = false;
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t j = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
       j += stride) {
    float* mine = staged + threadIdx.x;  // Bulyan's run-time indexing goes through shared memory
    out[j] = sortmath::reduce_coordinate<N>(
        [&](int i) { return __ldg(rows[i] + j); }, n, mode, f,
        [&](int i, float x) { mine[i * blockDim.x] = x; }, [&](int i) { return mine[i * blockDim.x]; },
        bad);
  }
  if (bad) atomicOr(flag, 1);
}

// n > 64: the values live in local memory and the network comes from global memory.
constexpr int kMaxN = 1024;

__global__ void sorted_reduce_large_kernel(const float* const* __restrict__ rows, int n,
                                           std::size_t d, int mode, int f,
                                           const unsigned* __restrict__ lo,
                                           const unsigned* __restrict__ hi, std::size_t nc,
                                           float* __restrict__ out, int* flag) {
  bool bad = false;
  float v[kMaxN];
  const std::size_t stride = static_cast<std::size_t>(gridDim.x) * blockDim.x;
  for (std::size_t j = static_cast<std::size_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < d;
       j += stride) {
    for (int i = 0; i < n; ++i) {
      v[i] = __ldg(rows[i] + j);
      bad |= !isfinite(v[i]);
    }
    for (std::size_t c = 0; c < nc; ++c) {
      const float x = v[lo[c]], y = v[hi[c]];
      v[lo[c]] = fminf(x, y);
      v[hi[c]] = fmaxf(x, y);
    }
    float r;
    if (mode == 0) {
      r = (n & 1) ? v[(n - 1) / 2]
                  : static_cast<float>((static_cast<double>(v[n / 2 - 1]) + v[n / 2]) * 0.5);
    } else if (mode == 1) {
      double s = 0.0;
      for (int i = f; i < n - f; ++i) s += v[i];
      r = static_cast<float>(s / (n - 2 * f));
    } else {
      r = sortmath::bulyan_window([&](int i) { return v[i]; }, n, f);
    }
    out[j] = r;
  }
  if (bad) atomicOr(flag, 1);
}

template <int N>
void launch_sorted(const float* const* rows, int n, std::size_t d, int mode, int f, float* out,
                   int* flag, cudaStream_t stream) {
  const int block = 128;
  const std::size_t smem = mode == 2 ? sizeof(float) * N * block : 0;
  if (smem > 48 * 1024)
    check(cudaFuncSetAttribute(sorted_reduce_kernel<N>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)),
          "sorted_reduce (shared memory)");
  sorted_reduce_kernel<N><<<grid_for(d, block), block, smem, stream>>>(rows, n, d, mode, f, out, flag);
  check(cudaGetLastError(), "sorted_reduce");
}

// Per-row reductions: blockIdx.y is the row, enough blocks per row to fill the GPU.
constexpr int kRowBlock = 256;
dim3 per_row_grid(int n, std::size_t d) {
  std::size_t per_row = (static_cast<std::size_t>(sm_count()) * 8 + n - 1) / n;
  const std::size_t need = (d + kRowBlock - 1) / kRowBlock;
  if (per_row > need) per_row = need;
  if (per_row < 1) per_row = 1;
  return dim3(static_cast<unsigned>(per_row), static_cast<unsigned>(n));
}

}  // namespace

void weighted_sum(const float* const* rows, int n, std::size_t d, const double* coef, float* out,
                  int* nonfinite, cudaStream_t stream) {
  const int block = 256;
  weighted_sum_kernel<<<grid_for(d, block), block, 0, stream>>>(rows, n, d, coef, out, nonfinite);
  check(cudaGetLastError(), "weighted_sum");
}

void pairwise_sqdist(const float* const* rows, int n, std::size_t d, double* D, cudaStream_t stream) {
  check(cudaMemsetAsync(D, 0, sizeof(double) * n * n, stream), "pairwise_sqdist (memset)");
  const int tiles = (n + kTile - 1) / kTile;
  const std::size_t tile_pairs = static_cast<std::size_t>(tiles) * (tiles + 1) / 2;
  std::size_t chunks = static_cast<std::size_t>(sm_count()) * 8 / tile_pairs + 1;
  const std::size_t max_chunks = (d + kKC - 1) / kKC;
  if (chunks > max_chunks) chunks = max_chunks;
  std::size_t chunk = (d + chunks - 1) / chunks;
  chunk = (chunk + kKC - 1) / kKC * kKC;
  chunks = (d + chunk - 1) / chunk;
  dim3 grid(static_cast<unsigned>(chunks), tiles, tiles);
  pairwise_kernel<<<grid, kThreads, 0, stream>>>(rows, n, d, chunk, D);
  check(cudaGetLastError(), "pairwise_sqdist");
}

void sqdist_to(const float* const* rows, int n, std::size_t d, const float* x, double* out,
               cudaStream_t stream) {
  check(cudaMemsetAsync(out, 0, sizeof(double) * n, stream), "sqdist_to (memset)");
  sqdist_to_kernel<<<per_row_grid(n, d), kRowBlock, 0, stream>>>(rows, d, x, out);
  check(cudaGetLastError(), "sqdist_to");
}

void nonfinite_rows(const float* const* rows, int n, std::size_t d, int* out, cudaStream_t stream) {
  check(cudaMemsetAsync(out, 0, sizeof(int) * n, stream), "nonfinite_rows (memset)");
  nonfinite_kernel<<<per_row_grid(n, d), kRowBlock, 0, stream>>>(rows, d, out);
  check(cudaGetLastError(), "nonfinite_rows");
}

void sorted_reduce(const float* const* rows, int n, std::size_t d, int mode, int f,
                   const unsigned* net_lo, const unsigned* net_hi, std::size_t net_size, float* out,
                   int* flag, cudaStream_t stream) {
  check(cudaMemsetAsync(flag, 0, sizeof(int), stream), "sorted_reduce (memset)");
  if (n <= 8) return launch_sorted<8>(rows, n, d, mode, f, out, flag, stream);
  if (n <= 16) return launch_sorted<16>(rows, n, d, mode, f, out, flag, stream);
  if (n <= 32) return launch_sorted<32>(rows, n, d, mode, f, out, flag, stream);
  if (n <= 64) return launch_sorted<64>(rows, n, d, mode, f, out, flag, stream);
  if (n > kMaxN) throw std::invalid_argument("CUDA coordinate-wise rules support n <= 1024");
  const int block = 64;
  sorted_reduce_large_kernel<<<grid_for(d, block), block, 0, stream>>>(rows, n, d, mode, f, net_lo,
                                                                        net_hi, net_size, out, flag);
  check(cudaGetLastError(), "sorted_reduce");
}

int max_sorted_n() { return kMaxN; }

int device_count() {
  int c = 0;
  if (cudaGetDeviceCount(&c) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return c;
}

}  // namespace gpu
}  // namespace fedagg
