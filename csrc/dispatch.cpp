// Picks the best compiled-in kernel table this CPU can run, once.
#include <atomic>
#include <cstring>

#include "fedagg/check.hpp"
#include "fedagg/kernels.hpp"

namespace fedagg {

extern const KernelTable table_base;
#if defined(FEDAGG_X86_DISPATCH)
extern const KernelTable table_avx2;
extern const KernelTable table_avx512;
#endif

namespace {

bool usable(const KernelTable* t) {
#if defined(FEDAGG_X86_DISPATCH)
  __builtin_cpu_init();
  if (t == &table_avx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (t == &table_avx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return t == &table_base;
}

const KernelTable* const kAll[] = {
#if defined(FEDAGG_X86_DISPATCH)
    &table_avx512, &table_avx2,
#endif
    &table_base};

const KernelTable* best() {
  for (const KernelTable* t : kAll)
    if (usable(t)) return t;
  return &table_base;
}

std::atomic<const KernelTable*> g_active{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_active.load(std::memory_order_acquire);
  if (!t) {
    t = best();
    g_active.store(t, std::memory_order_release);
  }
  return *t;
}

const KernelTable* kernel_table(const char* isa) {
  for (const KernelTable* t : kAll)
    if (std::strcmp(t->isa, isa) == 0) return usable(t) ? t : nullptr;
  return nullptr;
}

void force_isa(const char* isa) {
  if (isa == nullptr || *isa == '\0') {
    g_active.store(best(), std::memory_order_release);
    return;
  }
  const KernelTable* t = kernel_table(isa);
  FEDAGG_CHECK(t != nullptr, std::string("instruction set '") + isa +
                                 "' is not compiled in or not supported by this CPU");
  g_active.store(t, std::memory_order_release);
}

}  // namespace fedagg
