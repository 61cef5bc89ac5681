#include "fedagg/checksum.hpp"

#include <cstring>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

namespace fedagg {
namespace {

constexpr std::uint32_t kPoly = 0x82F63B78u;  // reflected Castagnoli polynomial

struct Table {
  std::uint32_t t[8][256];
  Table() {
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      t[0][i] = c;
    }
    for (int s = 1; s < 8; ++s)
      for (int i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
  }
};
const Table& table() {
  static const Table tab;
  return tab;
}

// The raw register update (no pre/post inversion), slicing-by-8.
std::uint32_t update_sw(std::uint32_t c, const unsigned char* p, std::size_t n) {
  const auto& t = table().t;
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= c;
    c = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^ t[4][(w >> 24) & 0xFF] ^
        t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^ t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ t[0][(c ^ *p++) & 0xFF];
  return c;
}

// GF(2) 32x32 matrices (zlib's crc32_combine method): shifting a register
// over n zero bytes, to join independently computed streams.
std::uint32_t gf2_times(const std::uint32_t* mat, std::uint32_t vec) {
  std::uint32_t sum = 0;
  for (int i = 0; vec; ++i, vec >>= 1)
    if (vec & 1) sum ^= mat[i];
  return sum;
}
void gf2_square(std::uint32_t* sq, const std::uint32_t* mat) {
  for (int i = 0; i < 32; ++i) sq[i] = gf2_times(mat, mat[i]);
}
// The register after n zero bytes, as a matrix applied to any register.
void zeros_operator(std::uint32_t* op, std::size_t n) {
  std::uint32_t odd[32], even[32];
  odd[0] = kPoly;  // one zero bit
  for (int i = 1; i < 32; ++i) odd[i] = 1u << (i - 1);
  gf2_square(even, odd);  // two bits
  gf2_square(odd, even);  // four bits
  for (int i = 0; i < 32; ++i) op[i] = 1u << i;  // identity
  std::uint32_t tmp[32];
  bool use_even = true;
  while (n) {  // squaring: 8 bits, 16, 32, ... per step
    if (use_even) gf2_square(even, odd); else gf2_square(odd, even);
    const std::uint32_t* cur = use_even ? even : odd;
    if (n & 1) {
      for (int i = 0; i < 32; ++i) tmp[i] = gf2_times(cur, op[i]);
      std::memcpy(op, tmp, sizeof tmp);
    }
    use_even = !use_even;
    n >>= 1;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("sse4.2"))) std::uint32_t update_hw(std::uint32_t c, const unsigned char* p, std::size_t n) {
  constexpr std::size_t kStripe = 8192;  // bytes per stream per step
  if (n >= 3 * kStripe) {
    static std::uint32_t shift[32];  // over kStripe zero bytes
    static const bool ready = (zeros_operator(shift, kStripe), true);
    (void)ready;
    while (n >= 3 * kStripe) {
      std::uint64_t a = c, b = 0, d = 0;
      const unsigned char* q = p;
      for (std::size_t i = 0; i < kStripe; i += 8) {
        std::uint64_t x, y, z;
        std::memcpy(&x, q + i, 8);
        std::memcpy(&y, q + kStripe + i, 8);
        std::memcpy(&z, q + 2 * kStripe + i, 8);
        a = _mm_crc32_u64(a, x);
        b = _mm_crc32_u64(b, y);
        d = _mm_crc32_u64(d, z);
      }
      c = gf2_times(shift, gf2_times(shift, static_cast<std::uint32_t>(a)) ^ static_cast<std::uint32_t>(b)) ^
          static_cast<std::uint32_t>(d);
      p += 3 * kStripe;
      n -= 3 * kStripe;
    }
  }
  std::uint64_t r = c;
  for (; n >= 8; n -= 8, p += 8) {
    std::uint64_t x;
    std::memcpy(&x, p, 8);
    r = _mm_crc32_u64(r, x);
  }
  c = static_cast<std::uint32_t>(r);
  for (; n; --n) c = _mm_crc32_u8(c, *p++);
  return c;
}
const bool kHw = __builtin_cpu_supports("sse4.2");
#endif

}  // namespace

std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t c = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
  if (kHw) return ~update_hw(c, p, n);
#endif
  return ~update_sw(c, p, n);
}

namespace {
// True if no float32 in [p, p + count) is NaN or Inf (exponent bits all ones).
bool all_finite_f32(const unsigned char* p, std::size_t count) {
  std::uint32_t bad = 0;
  for (std::size_t i = 0; i < count; ++i) {
    std::uint32_t w;
    std::memcpy(&w, p + 4 * i, 4);
    bad |= static_cast<std::uint32_t>((w & 0x7F800000u) == 0x7F800000u);
  }
  return bad == 0;
}
}  // namespace

std::uint32_t copy_crc32c(void* dst, const void* src, std::size_t n, bool* finite) {
  constexpr std::size_t kBlock = std::size_t(1) << 16;
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
  std::uint32_t crc = 0;
  bool ok = true;
  for (std::size_t off = 0; off < n; off += kBlock) {
    const std::size_t len = n - off < kBlock ? n - off : kBlock;
    std::memcpy(d + off, s + off, len);
    crc = crc32c(d + off, len, crc);
    if (finite != nullptr) ok = all_finite_f32(d + off, len / 4) && ok;
  }
  if (finite != nullptr) *finite = ok;
  return crc;
}

}  // namespace fedagg
