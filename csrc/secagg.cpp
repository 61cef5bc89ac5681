#include "fedagg/secagg.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "fedagg/check.hpp"
#include "fedagg/kernels.hpp"
#include "fedagg/threadpool.hpp"

namespace fedagg {

void apply_masks(std::uint32_t* data, std::size_t d, const std::uint8_t* keys, const std::int8_t* signs,
                 std::size_t m, const std::uint8_t* nonce, int bits) {
  FEDAGG_CHECK(bits >= 1 && bits <= 32, "the ring needs 1 <= bits <= 32");
  FEDAGG_CHECK(d <= (std::size_t(1) << 36), "at most 2^36 coordinates per mask (ChaCha20's 32-bit block counter)");
  for (std::size_t i = 0; i < m; ++i) FEDAGG_CHECK(signs[i] == 1 || signs[i] == -1, "mask signs must be +1 or -1");
  const std::uint32_t mask = bits == 32 ? 0xffffffffu : ((std::uint32_t(1) << bits) - 1);
  if (d == 0) return;
  // Words, as RFC 8439 reads key and nonce bytes (little-endian).
  std::uint32_t n[3];
  for (int w = 0; w < 3; ++w)
    n[w] = std::uint32_t(nonce[4 * w]) | std::uint32_t(nonce[4 * w + 1]) << 8 | std::uint32_t(nonce[4 * w + 2]) << 16 |
           std::uint32_t(nonce[4 * w + 3]) << 24;
  std::vector<std::uint32_t> k(8 * std::max<std::size_t>(m, 1));
  for (std::size_t i = 0; i < 8 * m; ++i)
    k[i] = std::uint32_t(keys[4 * i]) | std::uint32_t(keys[4 * i + 1]) << 8 | std::uint32_t(keys[4 * i + 2]) << 16 |
           std::uint32_t(keys[4 * i + 3]) << 24;
  const auto& kt = kernels();
  // 64 KB chunks: every mask of a chunk is added while it sits in L2.
  constexpr std::size_t kChunk = 16384;
  const std::size_t ntasks = (d + kChunk - 1) / kChunk;
  parallel_for(ntasks, [&](std::size_t t, int) {
    const std::size_t b = t * kChunk, e = std::min(d, b + kChunk);
    if (m == 0) {
      for (std::size_t j = b; j < e; ++j) data[j] &= mask;
      return;
    }
    for (std::size_t i = 0; i < m; ++i) kt.chacha_mask(k.data() + 8 * i, n, data, b, e, signs[i] < 0, mask);
  });
}

}  // namespace fedagg
