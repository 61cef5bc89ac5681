// n updates of d coordinates, given as n row pointers. A C-contiguous n x d
// matrix is just base + i * d; separately received updates are never copied.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedagg {

struct Rows {
  std::vector<const float*> ptr;
  std::size_t d = 0;
  std::size_t n() const { return ptr.size(); }
};

// A comparator network on n positions: after applying every (lo, hi) pair in
// order (min to lo, max to hi), the positions the network was built for hold
// their sorted values.
// With block = 16, each aligned group of 16 positions is first sorted in
// registers by the kernel, and lo/hi hold only the merge stages that follow.
struct Network {
  int n = 0;
  int block = 0;
  std::vector<std::uint32_t> lo, hi;
};

// A borrowed view of a Network for the kernels (plain pointers: the per-ISA
// kernel files instantiate no standard-library templates).
struct NetworkView {
  int n;
  int block;
  const std::uint32_t* lo;
  const std::uint32_t* hi;
  std::size_t size;
};

}  // namespace fedagg
