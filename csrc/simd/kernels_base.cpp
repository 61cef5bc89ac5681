// Kernels for ISA 'base' (see kernels_impl.inc); compile flags come from CMakeLists.txt.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <new>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "fedagg/kernels.hpp"

#define FEDAGG_VBYTES 16
#if defined(__x86_64__) || defined(_M_X64)
#define FEDAGG_MIN_PS(a, b) _mm_min_ps((__m128)(a), (__m128)(b))
#define FEDAGG_MAX_PS(a, b) _mm_max_ps((__m128)(a), (__m128)(b))
#else  // portable: the same semantics, left to the compiler
#define FEDAGG_MIN_PS(a, b) ((a) < (b) ? (a) : (b))
#define FEDAGG_MAX_PS(a, b) ((a) > (b) ? (a) : (b))
#endif
#define FEDAGG_PAIR_BLOCK 2

namespace fedagg {
namespace isa_base {
#include "kernels_impl.inc"
}  // namespace isa_base

extern const KernelTable table_base = {"base",
                                       isa_base::L,
                                       &isa_base::weighted_sum,
                                       &isa_base::pairwise_sqdist,
                                       &isa_base::sqdist_to,
                                       &isa_base::sqnorms,
                                       &isa_base::sorted_reduce,
                                       &isa_base::weighted_sum_half,
                                       &isa_base::widen};

}  // namespace fedagg
