#include "fedagg/checksum.hpp"

#include <cstring>
#include <stdexcept>
#include <string>

#if defined(__x86_64__)
#include <immintrin.h>
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

// Folding with carry-less multiplies (Intel's "Fast CRC Computation for Generic
// Polynomials Using PCLMULQDQ"), four 256-bit accumulators = 128 bytes a step,
// then the folded 16 bytes go through the crc32 instruction. A 128-bit register
// holds a polynomial with bit i <-> x^(127-i) (the reflected convention); one
// clmul of two such 64-bit halves yields their product times x, which the
// constants below absorb: folding forward by D bits multiplies the high half
// (the register's low qword) by x^(D+63) mod P and the low half by x^(D-1) mod P.
std::uint64_t fold_constant(unsigned e) {  // x^e mod P, bit-reversed into a 64-bit lane
  std::uint32_t r = 1;  // normal form, bit m <-> x^m
  for (unsigned i = 0; i < e; ++i) r = (r << 1) ^ ((r & 0x80000000u) ? 0x1EDC6F41u : 0u);
  std::uint64_t out = 0;
  for (int m = 0; m < 32; ++m)
    if (r >> m & 1u) out |= std::uint64_t(1) << (63 - m);
  return out;
}

struct FoldConstants {
  std::uint64_t k[4][2];  // fold by 1024, 768, 512, 256 and 128 bits: {x^(D+63), x^(D-1)}
  std::uint64_t k128[2];
  FoldConstants() {
    const unsigned d[4] = {1024, 768, 512, 256};
    for (int i = 0; i < 4; ++i) k[i][0] = fold_constant(d[i] + 63), k[i][1] = fold_constant(d[i] - 1);
    k128[0] = fold_constant(128 + 63);
    k128[1] = fold_constant(128 - 1);
  }
};
const FoldConstants kFold;

#define FEDAGG_CLMUL_TARGET __attribute__((target("avx2,pclmul,vpclmulqdq,sse4.2")))
FEDAGG_CLMUL_TARGET inline __m256i fold256(__m256i x, __m256i k) {
  return _mm256_xor_si256(_mm256_clmulepi64_epi128(x, k, 0x00), _mm256_clmulepi64_epi128(x, k, 0x11));
}

FEDAGG_CLMUL_TARGET inline __m256i load(const unsigned char* q) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
}
FEDAGG_CLMUL_TARGET inline __m256i pair(const std::uint64_t* kk) {  // {x^(D+63), x^(D-1)} in both lanes
  return _mm256_set_epi64x(static_cast<long long>(kk[1]), static_cast<long long>(kk[0]),
                           static_cast<long long>(kk[1]), static_cast<long long>(kk[0]));
}

// The raw register update over n >= 128 bytes; returns it after the last whole 128-byte step
// and advances p / n past what it consumed.
FEDAGG_CLMUL_TARGET std::uint32_t update_clmul(std::uint32_t c, const unsigned char*& p, std::size_t& n) {
  __m256i x0 = _mm256_xor_si256(load(p), _mm256_set_epi32(0, 0, 0, 0, 0, 0, 0, static_cast<int>(c)));
  __m256i x1 = load(p + 32), x2 = load(p + 64), x3 = load(p + 96);
  p += 128;
  n -= 128;
  const __m256i k1024 = pair(kFold.k[0]);
  while (n >= 128) {
    x0 = _mm256_xor_si256(fold256(x0, k1024), load(p));
    x1 = _mm256_xor_si256(fold256(x1, k1024), load(p + 32));
    x2 = _mm256_xor_si256(fold256(x2, k1024), load(p + 64));
    x3 = _mm256_xor_si256(fold256(x3, k1024), load(p + 96));
    p += 128;
    n -= 128;
  }
  __m256i x = _mm256_xor_si256(_mm256_xor_si256(fold256(x0, pair(kFold.k[1])), fold256(x1, pair(kFold.k[2]))),
                               _mm256_xor_si256(fold256(x2, pair(kFold.k[3])), x3));
  const __m128i lo = _mm256_castsi256_si128(x), hi = _mm256_extracti128_si256(x, 1);
  const __m128i k = _mm_set_epi64x(static_cast<long long>(kFold.k128[1]), static_cast<long long>(kFold.k128[0]));
  const __m128i r = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(lo, k, 0x00), _mm_clmulepi64_si128(lo, k, 0x11)), hi);
  // r(x) * x^32 mod P is the register so far: exactly the crc32 instruction on r's 16 bytes from 0.
  std::uint64_t a = _mm_crc32_u64(0, static_cast<std::uint64_t>(_mm_cvtsi128_si64(r)));
  a = _mm_crc32_u64(a, static_cast<std::uint64_t>(_mm_extract_epi64(r, 1)));
  return static_cast<std::uint32_t>(a);
}
const bool kClmul = kHw && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("pclmul") &&
                    __builtin_cpu_supports("vpclmulqdq");
#endif

}  // namespace

std::uint32_t crc32c_with(const char* impl, const void* data, std::size_t n, std::uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t c = ~crc;
  const std::string name = impl;
  if (name == "software") return ~update_sw(c, p, n);
#if defined(__x86_64__) && defined(__GNUC__)
  if (name == "sse4.2" && kHw) return ~update_hw(c, p, n);
  if (name == "vpclmulqdq" && kClmul) {
    if (n >= 256) c = update_clmul(c, p, n);
    return ~update_hw(c, p, n);
  }
#endif
  throw std::invalid_argument("crc32c implementation '" + name + "' is unknown or not supported by this CPU");
}

const char* crc32c_best() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (kClmul) return "vpclmulqdq";
  if (kHw) return "sse4.2";
#endif
  return "software";
}

std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint32_t c = ~crc;
#if defined(__x86_64__) && defined(__GNUC__)
  if (kClmul && n >= 256) c = update_clmul(c, p, n);  // below 256 bytes the set-up does not pay
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

#if defined(__x86_64__) && defined(__GNUC__)
// memcpy with streaming (non-temporal) stores, and the finiteness of the float32s on
// the way (when finite != nullptr; the caller keeps dst - src offsets on the float
// grid). The receive buffer is read again only at aggregation, long after, so
// writing around the caches saves the read-for-ownership of every line and keeps
// the chunk being checked in cache.
__attribute__((target("avx2"))) void stream_copy(unsigned char* d, const unsigned char* s, std::size_t n,
                                                 bool* finite) {
  std::size_t head = (32 - reinterpret_cast<std::uintptr_t>(d) % 32) % 32;
  if (head > n) head = n;
  std::memcpy(d, s, head);
  if (finite != nullptr) *finite = all_finite_f32(s, head / 4) && *finite;
  const __m256i exp = _mm256_set1_epi32(0x7F800000);
  __m256i bad = _mm256_setzero_si256();
  std::size_t i = head;
  for (; i + 128 <= n; i += 128) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 32));
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 64));
    const __m256i e = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i + 96));
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i), a);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 32), b);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 64), c);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i + 96), e);
    const __m256i ab = _mm256_or_si256(_mm256_cmpeq_epi32(_mm256_and_si256(a, exp), exp),
                                       _mm256_cmpeq_epi32(_mm256_and_si256(b, exp), exp));
    const __m256i ce = _mm256_or_si256(_mm256_cmpeq_epi32(_mm256_and_si256(c, exp), exp),
                                       _mm256_cmpeq_epi32(_mm256_and_si256(e, exp), exp));
    bad = _mm256_or_si256(bad, _mm256_or_si256(ab, ce));
  }
  std::memcpy(d + i, s + i, n - i);
  if (finite != nullptr)
    *finite = _mm256_testz_si256(bad, bad) && all_finite_f32(s + i, (n - i) / 4) && *finite;
}
const bool kAvx2 = __builtin_cpu_supports("avx2");
#endif
}  // namespace

std::uint32_t copy_crc32c(void* dst, const void* src, std::size_t n, bool* finite) {
  constexpr std::size_t kBlock = std::size_t(1) << 14;  // checksummed into L1, then copied out of it
  auto* d = static_cast<unsigned char*>(dst);
  const auto* s = static_cast<const unsigned char*>(src);
#if defined(__x86_64__) && defined(__GNUC__)
  // Streaming stores need the float grid of src to meet dst's 32-byte alignment; a
  // dst off by a non-multiple of 4 takes the plain copy.
  const bool stream = kAvx2 && (finite == nullptr || reinterpret_cast<std::uintptr_t>(d) % 4 == 0);
#else
  const bool stream = false;
#endif
  std::uint32_t crc = 0;
  bool ok = true;
  for (std::size_t off = 0; off < n; off += kBlock) {
    const std::size_t len = n - off < kBlock ? n - off : kBlock;
    crc = crc32c(s + off, len, crc);
#if defined(__x86_64__) && defined(__GNUC__)
    if (stream) {
      stream_copy(d + off, s + off, len, finite != nullptr ? &ok : nullptr);
      continue;
    }
#endif
    std::memcpy(d + off, s + off, len);
    if (finite != nullptr) ok = all_finite_f32(s + off, len / 4) && ok;
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if (stream) _mm_sfence();  // the streamed lines are visible before whatever the caller does next
#endif
  if (finite != nullptr) *finite = ok;
  return crc;
}

}  // namespace fedagg
