// Kernels for ISA 'avx2' (see kernels_impl.inc); compile flags come from CMakeLists.txt.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#include <immintrin.h>

#include "fedagg/kernels.hpp"

#define FEDAGG_VBYTES 32
#define FEDAGG_MIN_PS(a, b) _mm256_min_ps((__m256)(a), (__m256)(b))
#define FEDAGG_MAX_PS(a, b) _mm256_max_ps((__m256)(a), (__m256)(b))
// 3 x 3 pairs per block: 9 independent FMA chains hide the FMA latency (2 x 2, four chains, ran
// latency-bound at half the speed; 4 x 4 spills the 16 ymm registers).
#define FEDAGG_PAIR_BLOCK 3

namespace fedagg {
namespace isa_avx2 {
#include "kernels_impl.inc"
}  // namespace isa_avx2

extern const KernelTable table_avx2 = {"avx2",
                                       isa_avx2::L,
                                       &isa_avx2::weighted_sum,
                                       &isa_avx2::pairwise_sqdist,
                                       &isa_avx2::sqdist_to,
                                       &isa_avx2::sqnorms,
                                       &isa_avx2::sorted_reduce,
                                       &isa_avx2::weighted_sum_half,
                                       &isa_avx2::widen};

}  // namespace fedagg
