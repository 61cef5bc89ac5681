// The PRG of secure aggregation's masks: AES-128 in counter mode on the CPU's AES instructions
// (x86 AES-NI, and VAES on 256-bit vectors where the CPU has it; the ARMv8 cryptography extension),
// the keystream added to (or subtracted from) the vector in the same pass. Hardware AES is
// constant-time; there is no table-based fallback here (it would leak the key through the cache):
// on a CPU without AES instructions prg_path() is "none" and the Python layer uses OpenSSL.
#include "fedagg/secagg.hpp"

#include <algorithm>
#include <cstring>
#include <vector>

#include "fedagg/check.hpp"
#include "fedagg/kernels.hpp"
#include "fedagg/threadpool.hpp"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define FEDAGG_AES_X86 1
#elif defined(__aarch64__) && defined(__linux__)
#include <arm_neon.h>
#include <sys/auxv.h>
#ifndef HWCAP_AES
#define HWCAP_AES (1 << 3)
#endif
#define FEDAGG_AES_ARM 1
#endif

namespace fedagg {
namespace {

enum class Path { kNone, kAesNi, kVaes, kArm };

// The round keys of AES-128 (FIPS-197 section 5.2) as 11 blocks of 16 bytes.
struct RoundKeys {
  alignas(16) std::uint8_t k[11][16];
};

// One 128-bit big-endian counter block (SP 800-38A): hi holds bytes 0-7, lo bytes 8-15.
struct Counter {
  std::uint64_t hi, lo;
  Counter plus(std::uint64_t n) const { return {hi + (lo + n < lo ? 1u : 0u), lo + n}; }
};

inline std::uint64_t bswap64(std::uint64_t x) { return __builtin_bswap64(x); }

// FIPS-197's key expansion on 32-bit words read little-endian from the key bytes (so RotWord is
// a rotation right by 8 and Rcon goes into the low byte); SubWord comes from the AES hardware.
template <class SubWord>
void expand(const std::uint8_t* key, RoundKeys& out, SubWord sub) {
  static const std::uint8_t rcon[10] = {0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x1b, 0x36};
  std::uint32_t w[44];
  std::memcpy(w, key, 16);
  for (int i = 4; i < 44; ++i) {
    std::uint32_t t = w[i - 1];
    if (i % 4 == 0) t = sub((t >> 8) | (t << 24)) ^ rcon[i / 4 - 1];
    w[i] = w[i - 4] ^ t;
  }
  std::memcpy(out.k, w, sizeof w);  // little-endian words back to bytes (x86, aarch64)
}

#if defined(FEDAGG_AES_X86)
__attribute__((target("aes"))) std::uint32_t sub_word_x86(std::uint32_t w) {
  // AESKEYGENASSIST's dword 0 is SubWord of the source's dword 1.
  return static_cast<std::uint32_t>(_mm_cvtsi128_si32(_mm_aeskeygenassist_si128(_mm_set_epi32(0, 0, int(w), 0), 0)));
}

__attribute__((target("aes"))) inline __m128i encrypt1(const RoundKeys& rk, __m128i x) {
  x = _mm_xor_si128(x, _mm_load_si128(reinterpret_cast<const __m128i*>(rk.k[0])));
  for (int r = 1; r < 10; ++r) x = _mm_aesenc_si128(x, _mm_load_si128(reinterpret_cast<const __m128i*>(rk.k[r])));
  return _mm_aesenclast_si128(x, _mm_load_si128(reinterpret_cast<const __m128i*>(rk.k[10])));
}

__attribute__((target("aes"))) inline __m128i block_of(Counter c) {
  return _mm_set_epi64x(static_cast<long long>(bswap64(c.lo)), static_cast<long long>(bswap64(c.hi)));
}

// Words [b, e) of data (b a multiple of 4) take the keystream from counter block c (that of word b).
__attribute__((target("aes"))) void ctr_aesni(const RoundKeys& rk, Counter c, std::uint32_t* data, std::size_t b,
                                              std::size_t e, bool neg, std::uint32_t mask) {
  const __m128i m = _mm_set1_epi32(static_cast<int>(mask));
  __m128i k[11];
  for (int r = 0; r < 11; ++r) k[r] = _mm_load_si128(reinterpret_cast<const __m128i*>(rk.k[r]));
  std::size_t j = b;
  for (; j + 32 <= e; j += 32, c = c.plus(8)) {  // 8 blocks in flight: AESENC's latency hidden
    __m128i x[8];
    for (int q = 0; q < 8; ++q) x[q] = _mm_xor_si128(block_of(c.plus(q)), k[0]);
    for (int r = 1; r < 10; ++r)
      for (int q = 0; q < 8; ++q) x[q] = _mm_aesenc_si128(x[q], k[r]);
    for (int q = 0; q < 8; ++q) {
      __m128i* p = reinterpret_cast<__m128i*>(data + j + 4 * q);
      const __m128i d = _mm_loadu_si128(p), ks = _mm_aesenclast_si128(x[q], k[10]);
      _mm_storeu_si128(p, _mm_and_si128(neg ? _mm_sub_epi32(d, ks) : _mm_add_epi32(d, ks), m));
    }
  }
  for (; j < e; j += 4, c = c.plus(1)) {  // the last blocks, the last one maybe partial
    std::uint32_t ks[4];
    _mm_storeu_si128(reinterpret_cast<__m128i*>(ks), encrypt1(rk, block_of(c)));
    for (std::size_t w = 0; w < 4 && j + w < e; ++w)
      data[j + w] = (neg ? data[j + w] - ks[w] : data[j + w] + ks[w]) & mask;
  }
}

__attribute__((target("avx2"))) inline __m256i block_pair(Counter a) {  // blocks a and a + 1, one per lane
  const Counter n = a.plus(1);
  return _mm256_set_epi64x(static_cast<long long>(bswap64(n.lo)), static_cast<long long>(bswap64(n.hi)),
                           static_cast<long long>(bswap64(a.lo)), static_cast<long long>(bswap64(a.hi)));
}

__attribute__((target("vaes,avx2,aes"))) void ctr_vaes(const RoundKeys& rk, Counter c, std::uint32_t* data,
                                                       std::size_t b, std::size_t e, bool neg, std::uint32_t mask) {
  const __m256i m = _mm256_set1_epi32(static_cast<int>(mask));
  __m256i k[11];
  for (int r = 0; r < 11; ++r)
    k[r] = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(rk.k[r])));
  std::size_t j = b;
  for (; j + 32 <= e; j += 32, c = c.plus(8)) {  // 8 blocks as 4 pairs
    __m256i x[4];
    for (int q = 0; q < 4; ++q) x[q] = _mm256_xor_si256(block_pair(c.plus(2 * q)), k[0]);
    for (int r = 1; r < 10; ++r)
      for (int q = 0; q < 4; ++q) x[q] = _mm256_aesenc_epi128(x[q], k[r]);
    for (int q = 0; q < 4; ++q) {
      __m256i* p = reinterpret_cast<__m256i*>(data + j + 8 * q);
      const __m256i d = _mm256_loadu_si256(p), ks = _mm256_aesenclast_epi128(x[q], k[10]);
      _mm256_storeu_si256(p, _mm256_and_si256(neg ? _mm256_sub_epi32(d, ks) : _mm256_add_epi32(d, ks), m));
    }
  }
  if (j < e) ctr_aesni(rk, c, data, j, e, neg, mask);
}
#endif

#if defined(FEDAGG_AES_ARM)
__attribute__((target("+crypto"))) std::uint32_t sub_word_arm(std::uint32_t w) {
  // AESE with a zero key: SubBytes, then ShiftRows, which moves nothing when all four columns are equal.
  return vgetq_lane_u32(vreinterpretq_u32_u8(vaeseq_u8(vreinterpretq_u8_u32(vdupq_n_u32(w)), vdupq_n_u8(0))), 0);
}

__attribute__((target("+crypto"))) inline uint8x16_t encrypt_arm(const uint8x16_t (&k)[11], uint8x16_t x) {
  for (int r = 0; r < 9; ++r) x = vaesmcq_u8(vaeseq_u8(x, k[r]));  // AESE adds the round key first
  return veorq_u8(vaeseq_u8(x, k[9]), k[10]);
}

__attribute__((target("+crypto"))) inline uint8x16_t block_arm(Counter c) {
  return vreinterpretq_u8_u64(vcombine_u64(vcreate_u64(bswap64(c.hi)), vcreate_u64(bswap64(c.lo))));
}

__attribute__((target("+crypto"))) void ctr_arm(const RoundKeys& rk, Counter c, std::uint32_t* data, std::size_t b,
                                                std::size_t e, bool neg, std::uint32_t mask) {
  const uint32x4_t m = vdupq_n_u32(mask);
  uint8x16_t k[11];
  for (int r = 0; r < 11; ++r) k[r] = vld1q_u8(rk.k[r]);
  std::size_t j = b;
  for (; j + 32 <= e; j += 32, c = c.plus(8)) {
    uint8x16_t x[8];
    for (int q = 0; q < 8; ++q) x[q] = block_arm(c.plus(q));
    for (int r = 0; r < 9; ++r)
      for (int q = 0; q < 8; ++q) x[q] = vaesmcq_u8(vaeseq_u8(x[q], k[r]));
    for (int q = 0; q < 8; ++q) {
      const uint32x4_t ks = vreinterpretq_u32_u8(veorq_u8(vaeseq_u8(x[q], k[9]), k[10]));
      const uint32x4_t d = vld1q_u32(data + j + 4 * q);
      vst1q_u32(data + j + 4 * q, vandq_u32(neg ? vsubq_u32(d, ks) : vaddq_u32(d, ks), m));
    }
  }
  for (; j < e; j += 4, c = c.plus(1)) {
    std::uint32_t ks[4];
    vst1q_u32(ks, vreinterpretq_u32_u8(encrypt_arm(k, block_arm(c))));
    for (std::size_t w = 0; w < 4 && j + w < e; ++w)
      data[j + w] = (neg ? data[j + w] - ks[w] : data[j + w] + ks[w]) & mask;
  }
}
#endif

Path path() {
#if defined(FEDAGG_AES_X86)
  __builtin_cpu_init();
  if (!__builtin_cpu_supports("aes")) return Path::kNone;
  // VAES with the vector kernels (a forced "base" table keeps to 128-bit AES-NI, so both paths are testable)
  if (std::strcmp(kernels().isa, "base") != 0 && __builtin_cpu_supports("vaes") && __builtin_cpu_supports("avx2"))
    return Path::kVaes;
  return Path::kAesNi;
#elif defined(FEDAGG_AES_ARM)
  return (getauxval(AT_HWCAP) & HWCAP_AES) ? Path::kArm : Path::kNone;
#else
  return Path::kNone;
#endif
}

}  // namespace

const char* prg_path() {
  switch (path()) {
    case Path::kAesNi: return "aesni";
    case Path::kVaes: return "vaes";
    case Path::kArm: return "armv8";
    default: return "none";
  }
}

void apply_masks(std::uint32_t* data, std::size_t d, const std::uint8_t* seeds, const std::int8_t* signs,
                 std::size_t m, int bits) {
  FEDAGG_CHECK(bits >= 1 && bits <= 32, "the ring needs 1 <= bits <= 32");
  for (std::size_t i = 0; i < m; ++i) FEDAGG_CHECK(signs[i] == 1 || signs[i] == -1, "mask signs must be +1 or -1");
  const std::uint32_t mask = bits == 32 ? 0xffffffffu : ((std::uint32_t(1) << bits) - 1);
  const Path p = m == 0 ? Path::kNone : path();
  FEDAGG_CHECK(m == 0 || p != Path::kNone,
               "this CPU has no AES instructions: the masks are expanded with OpenSSL instead (fedagg.secure)");
  if (d == 0) return;
  std::vector<RoundKeys> keys(m);
  std::vector<Counter> iv(m);
  for (std::size_t i = 0; i < m; ++i) {
    const std::uint8_t* s = seeds + 32 * i;
#if defined(FEDAGG_AES_X86)
    expand(s, keys[i], sub_word_x86);
#elif defined(FEDAGG_AES_ARM)
    expand(s, keys[i], sub_word_arm);
#endif
    std::uint64_t hi, lo;  // the initial counter block, big-endian
    std::memcpy(&hi, s + 16, 8);
    std::memcpy(&lo, s + 24, 8);
    iv[i] = {bswap64(hi), bswap64(lo)};
  }
  // 64 KB chunks (a multiple of 4 words: whole blocks): every mask of a chunk is added while it sits in L2.
  constexpr std::size_t kChunk = 16384;
  const std::size_t ntasks = (d + kChunk - 1) / kChunk;
  parallel_for(ntasks, [&](std::size_t t, int) {
    const std::size_t b = t * kChunk, e = std::min(d, b + kChunk);
    if (m == 0) {
      for (std::size_t j = b; j < e; ++j) data[j] &= mask;
      return;
    }
    for (std::size_t i = 0; i < m; ++i) {
      const Counter c = iv[i].plus(b / 4);
      const bool neg = signs[i] < 0;
      switch (p) {
#if defined(FEDAGG_AES_X86)
        case Path::kVaes: ctr_vaes(keys[i], c, data, b, e, neg, mask); break;
        case Path::kAesNi: ctr_aesni(keys[i], c, data, b, e, neg, mask); break;
#endif
#if defined(FEDAGG_AES_ARM)
        case Path::kArm: ctr_arm(keys[i], c, data, b, e, neg, mask); break;
#endif
        default: break;
      }
    }
  });
}

}  // namespace fedagg
