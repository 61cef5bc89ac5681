// n updates of d coordinates, given as n row pointers. A C-contiguous n x d
// matrix is just base + i * d; separately received updates are never copied.
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace fedagg {

// What a row's elements are. Half-precision rows (IEEE binary16, bfloat16) are read by the ops
// through float32 tiles of a few thousand coordinates (ops.cpp), never widened whole; `ptr` then
// holds their addresses (to be read as uint16 bit patterns, never as floats).
enum class Elem : std::uint8_t { F32 = 0, F16 = 1, BF16 = 2 };

struct Rows {
  std::vector<const float*> ptr;
  std::size_t d = 0;
  std::vector<Elem> elem;  // per row; empty: every row float32
  std::size_t n() const { return ptr.size(); }
  bool all_f32() const { return elem.empty(); }
  Elem elem_of(std::size_t i) const { return elem.empty() ? Elem::F32 : elem[i]; }
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
