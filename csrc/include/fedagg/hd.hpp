// Annotations for code compiled for both host and device.
#pragma once

#if defined(__CUDACC__)
#define FEDAGG_HD __host__ __device__
#define FEDAGG_UNROLL _Pragma("unroll")
#else
#define FEDAGG_HD
#define FEDAGG_UNROLL _Pragma("GCC unroll 64")
#endif
