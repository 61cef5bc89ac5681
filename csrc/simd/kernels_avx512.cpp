// Kernels for ISA 'avx512' (see kernels_impl.inc); compile flags come from CMakeLists.txt.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#include <immintrin.h>

#include "fedagg/kernels.hpp"

#define FEDAGG_VBYTES 64
#define FEDAGG_MIN_PS(a, b) _mm512_min_ps((__m512)(a), (__m512)(b))
#define FEDAGG_MAX_PS(a, b) _mm512_max_ps((__m512)(a), (__m512)(b))
#define FEDAGG_PAIR_BLOCK 4

namespace fedagg {
namespace isa_avx512 {
#include "kernels_impl.inc"
}  // namespace isa_avx512

extern const KernelTable table_avx512 = {"avx512",
                                       isa_avx512::L,
                                       &isa_avx512::weighted_sum,
                                       &isa_avx512::pairwise_sqdist,
                                       &isa_avx512::sqdist_to,
                                       &isa_avx512::sqnorms,
                                       &isa_avx512::sorted_reduce,
                                       &isa_avx512::weighted_sum_half,
                                       &isa_avx512::widen};

}  // namespace fedagg
