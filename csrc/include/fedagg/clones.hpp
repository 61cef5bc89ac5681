// Hot loops outside the per-ISA kernel table are compiled for AVX-512, AVX2
// and baseline x86-64 and picked at load time (GCC function multiversioning);
// elsewhere they are plain C++.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FEDAGG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FEDAGG_CLONES
#endif
