// The CPU kernels against plain float64 references, as a standalone program (no Python): what
// runs on a machine where the Python tests cannot, such as the aarch64 build under qemu-user
// (tests/test_native.py). For every kernel table this CPU can run (aarch64: the 16-byte vector
// kernels, which the compiler maps to NEON), on random inputs from fixed seeds with shapes that
// leave vector tails (d = 1, 5, 63, 64, 1000, 4099; n = 1 .. 33), checks weighted sums, pairwise
// and one-to-many squared distances, norms, median, trimmed mean, Bulyan's coordinate stage,
// Krum scores, non-finite detection, CRC32C and the AES-128-CTR masks of secure aggregation.
// Prints "ok N checks" and exits 0, or names the first failure and exits 1.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fedagg/checksum.hpp"
#include "fedagg/kernels.hpp"
#include "fedagg/ops.hpp"
#include "fedagg/secagg.hpp"
#include "fedagg/threadpool.hpp"

namespace {

long checks = 0;

[[noreturn]] void fail(const std::string& what) {
  std::printf("FAIL %s\n", what.c_str());
  std::exit(1);
}

void expect_close(double got, double want, double tol, const std::string& what) {
  ++checks;
  if (!(std::fabs(got - want) <= tol)) {
    char buf[256];
    std::snprintf(buf, sizeof buf, ": got %.17g, want %.17g (tolerance %.3g)", got, want, tol);
    fail(what + buf);
  }
}

struct Data {
  std::vector<float> x;
  fedagg::Rows rows;
};

Data make(int n, std::size_t d, unsigned seed, double scale) {
  std::mt19937_64 g(seed);
  std::normal_distribution<double> N(0.0, 1.0);
  Data D;
  D.x.resize(static_cast<std::size_t>(n) * d);
  for (auto& v : D.x) v = static_cast<float>(scale * N(g));
  D.rows.d = d;
  for (int i = 0; i < n; ++i) D.rows.ptr.push_back(D.x.data() + static_cast<std::size_t>(i) * d);
  return D;
}

double at(const Data& D, int i, std::size_t j) { return D.rows.ptr[static_cast<std::size_t>(i)][j]; }

// The value a coordinate-wise rule keeps, from the sorted column (reference definitions).
double ref_coordinate(std::vector<double> v, int mode, int f) {
  std::sort(v.begin(), v.end());
  const int n = static_cast<int>(v.size());
  if (mode == 0) return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  if (mode == 1) {
    double s = 0.0;
    for (int k = f; k < n - f; ++k) s += v[k];
    return s / (n - 2 * f);
  }
  // Bulyan: the mean of the n - 2f values closest to the median
  const double med = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
  std::vector<double> by(v);
  std::stable_sort(by.begin(), by.end(), [med](double a, double b) { return std::fabs(a - med) < std::fabs(b - med); });
  double s = 0.0;
  for (int k = 0; k < n - 2 * f; ++k) s += by[k];
  return s / (n - 2 * f);
}

void check_table(const char* isa) {
  const std::size_t ds[] = {1, 5, 63, 64, 1000, 4099};
  const int ns[] = {1, 2, 3, 7, 16, 17, 33};
  unsigned seed = 1;
  for (std::size_t d : ds)
    for (int n : ns) {
      const std::string at_shape = std::string(isa) + " n=" + std::to_string(n) + " d=" + std::to_string(d);
      Data X = make(n, d, seed++, 1.0 + static_cast<double>(seed % 5));
      // weighted sum
      std::vector<double> coef(static_cast<std::size_t>(n));
      for (int i = 0; i < n; ++i) coef[static_cast<std::size_t>(i)] = 0.5 + 0.25 * i;
      std::vector<float> out(d);
      fedagg::weighted_sum(X.rows, coef.data(), out.data());
      for (std::size_t j = 0; j < d; ++j) {
        double s = 0.0, m = 0.0;
        for (int i = 0; i < n; ++i) {
          s += coef[static_cast<std::size_t>(i)] * at(X, i, j);
          m += std::fabs(coef[static_cast<std::size_t>(i)] * at(X, i, j));
        }
        expect_close(out[j], s, 1e-6 * m + 1e-30, "weighted_sum " + at_shape);
      }
      // distances, norms
      const auto Dm = fedagg::pairwise_sqdist(X.rows);
      std::vector<double> ref(static_cast<std::size_t>(n) * n, 0.0);
      for (int i = 0; i < n; ++i)
        for (int k = 0; k < n; ++k) {
          double s = 0.0;
          for (std::size_t j = 0; j < d; ++j) s += (at(X, i, j) - at(X, k, j)) * (at(X, i, j) - at(X, k, j));
          ref[static_cast<std::size_t>(i) * n + k] = s;
          expect_close(Dm[static_cast<std::size_t>(i) * n + k], s, 1e-5 * s, "pairwise_sqdist " + at_shape);
        }
      const auto to0 = fedagg::sqdist_to(X.rows, X.rows.ptr[0]);
      const auto nrm = fedagg::sqnorms(X.rows);
      for (int i = 0; i < n; ++i) {
        double s = 0.0;
        for (std::size_t j = 0; j < d; ++j) s += at(X, i, j) * at(X, i, j);
        expect_close(to0[static_cast<std::size_t>(i)], ref[static_cast<std::size_t>(i) * n], 1e-5 * ref[static_cast<std::size_t>(i) * n],
                     "sqdist_to " + at_shape);
        expect_close(nrm[static_cast<std::size_t>(i)], s, 1e-5 * s, "sqnorms " + at_shape);
      }
      // coordinate-wise rules
      std::vector<double> col(static_cast<std::size_t>(n));
      std::vector<float> med(d), tm(d), bul(d);
      const int f = (n - 1) / 4;
      if (fedagg::coordinate_median(X.rows, med.data())) fail("coordinate_median saw a NaN " + at_shape);
      if (fedagg::trimmed_mean(X.rows, f, tm.data())) fail("trimmed_mean saw a NaN " + at_shape);
      const bool bulyan_ok = n >= 4 * f + 3;
      if (bulyan_ok && fedagg::bulyan_reduce(X.rows, f, bul.data())) fail("bulyan_reduce saw a NaN " + at_shape);
      for (std::size_t j = 0; j < d; ++j) {
        double m = 0.0;
        for (int i = 0; i < n; ++i) {
          col[static_cast<std::size_t>(i)] = at(X, i, j);
          m = std::max(m, std::fabs(at(X, i, j)));
        }
        expect_close(med[j], ref_coordinate(col, 0, 0), 1e-6 * m, "median " + at_shape);
        expect_close(tm[j], ref_coordinate(col, 1, f), 1e-6 * m, "trimmed_mean " + at_shape);
        if (bulyan_ok) expect_close(bul[j], ref_coordinate(col, 2, f), 1e-6 * m, "bulyan_reduce " + at_shape);
      }
      // Krum scores on the reference distances: the sum of the n - f - 2 smallest distances to others
      const int kf = std::max(0, (n - 3) / 2);
      if (n - kf - 2 >= 1) {
        const auto sc = fedagg::krum_scores(ref.data(), n, kf);
        for (int i = 0; i < n; ++i) {
          std::vector<double> others;
          for (int k = 0; k < n; ++k)
            if (k != i) others.push_back(ref[static_cast<std::size_t>(i) * n + k]);
          std::sort(others.begin(), others.end());
          double s = 0.0;
          for (int k = 0; k < n - kf - 2; ++k) s += others[static_cast<std::size_t>(k)];
          expect_close(sc[static_cast<std::size_t>(i)], s, 1e-12 * s, "krum_scores " + at_shape);
        }
      }
      // non-finite detection
      if (n >= 2) {
        X.x[static_cast<std::size_t>(n - 1) * d + d / 2] = std::nanf("");
        const auto bad = fedagg::nonfinite_rows(X.rows);
        ++checks;
        if (bad[static_cast<std::size_t>(n - 1)] != 1 || bad[0] != 0) fail("nonfinite_rows " + at_shape);
        ++checks;
        if (!fedagg::coordinate_median(X.rows, med.data())) fail("median missed a NaN " + at_shape);
      }
    }
}

}  // namespace

// FIPS-197's AES-128, written plainly (S-box computed from its definition, one block, scalar).
std::uint8_t xtime(std::uint8_t x) { return static_cast<std::uint8_t>((x << 1) ^ ((x & 0x80) ? 0x1b : 0)); }
std::uint8_t gmul(std::uint8_t a, std::uint8_t b) {
  std::uint8_t p = 0;
  for (; b; b >>= 1, a = xtime(a))
    if (b & 1) p ^= a;
  return p;
}
std::uint8_t sbox(std::uint8_t x) {
  std::uint8_t inv = 0;  // multiplicative inverse in GF(2^8) (0 -> 0), then the affine map
  for (int c = 1; c < 256 && x; ++c)
    if (gmul(x, static_cast<std::uint8_t>(c)) == 1) inv = static_cast<std::uint8_t>(c);
  std::uint8_t r = 0x63;
  for (int i = 0; i < 8; ++i) {
    const int bit = ((inv >> i) ^ (inv >> ((i + 4) % 8)) ^ (inv >> ((i + 5) % 8)) ^ (inv >> ((i + 6) % 8)) ^
                     (inv >> ((i + 7) % 8))) & 1;
    r ^= static_cast<std::uint8_t>(bit << i);
  }
  return r;
}
void aes128_block(const std::uint8_t key[16], const std::uint8_t in[16], std::uint8_t out[16]) {
  static std::uint8_t S[256];
  static bool made = false;
  if (!made) {
    for (int i = 0; i < 256; ++i) S[i] = sbox(static_cast<std::uint8_t>(i));
    made = true;
  }
  std::uint8_t w[176];
  std::memcpy(w, key, 16);
  std::uint8_t rcon = 1;
  for (int i = 16; i < 176; i += 4) {
    std::uint8_t t[4] = {w[i - 4], w[i - 3], w[i - 2], w[i - 1]};
    if (i % 16 == 0) {
      const std::uint8_t t0 = t[0];
      t[0] = static_cast<std::uint8_t>(S[t[1]] ^ rcon);
      t[1] = S[t[2]];
      t[2] = S[t[3]];
      t[3] = S[t0];
      rcon = xtime(rcon);
    }
    for (int j = 0; j < 4; ++j) w[i + j] = static_cast<std::uint8_t>(w[i + j - 16] ^ t[j]);
  }
  std::uint8_t s[16];  // column-major state: s[4 * c + r]
  for (int i = 0; i < 16; ++i) s[i] = static_cast<std::uint8_t>(in[i] ^ w[i]);
  for (int round = 1; round <= 10; ++round) {
    std::uint8_t t[16];
    for (int c = 0; c < 4; ++c)
      for (int r = 0; r < 4; ++r) t[4 * c + r] = S[s[4 * ((c + r) % 4) + r]];  // SubBytes, ShiftRows
    if (round < 10)
      for (int c = 0; c < 4; ++c) {  // MixColumns
        const std::uint8_t* a = t + 4 * c;
        const std::uint8_t m[4] = {
            static_cast<std::uint8_t>(gmul(a[0], 2) ^ gmul(a[1], 3) ^ a[2] ^ a[3]),
            static_cast<std::uint8_t>(a[0] ^ gmul(a[1], 2) ^ gmul(a[2], 3) ^ a[3]),
            static_cast<std::uint8_t>(a[0] ^ a[1] ^ gmul(a[2], 2) ^ gmul(a[3], 3)),
            static_cast<std::uint8_t>(gmul(a[0], 3) ^ a[1] ^ a[2] ^ gmul(a[3], 2))};
        std::memcpy(t + 4 * c, m, 4);
      }
    for (int i = 0; i < 16; ++i) s[i] = static_cast<std::uint8_t>(t[i] ^ w[16 * round + i]);
  }
  std::memcpy(out, s, 16);
}

// Keystream block b of PRG(seed) as 4 words: AES-128 of (seed[16:32] + b as a 128-bit big-endian counter).
void prg_block(const std::uint8_t seed[32], std::size_t b, std::uint32_t out[4]) {
  std::uint8_t ctr[16], ks[16];
  std::memcpy(ctr, seed + 16, 16);
  std::uint64_t add = b;
  for (int i = 15; i >= 0 && add; --i) {  // + add, carrying through all 16 bytes
    const std::uint64_t v = ctr[i] + (add & 0xff);
    ctr[i] = static_cast<std::uint8_t>(v);
    add = (add >> 8) + (v >> 8);
  }
  aes128_block(seed, ctr, ks);
  std::memcpy(out, ks, 16);  // little-endian words (x86, aarch64)
}

// The fused masks (this ISA's AES instructions, threads) against the plain AES.
void check_masks(const std::string& isa) {
  if (std::strcmp(fedagg::prg_path(), "none") == 0) {
    std::printf("%s: no AES instructions, masks not checked here (the Python layer uses OpenSSL)\n", isa.c_str());
    return;
  }
  // NIST SP 800-38A F.5.1 (CTR-AES128): keystream block 1 = plaintext XOR ciphertext.
  const std::uint8_t f51[32] = {0x2b, 0x7e, 0x15, 0x16, 0x28, 0xae, 0xd2, 0xa6, 0xab, 0xf7, 0x15,
                                0x88, 0x09, 0xcf, 0x4f, 0x3c, 0xf0, 0xf1, 0xf2, 0xf3, 0xf4, 0xf5,
                                0xf6, 0xf7, 0xf8, 0xf9, 0xfa, 0xfb, 0xfc, 0xfd, 0xfe, 0xff};
  const std::uint8_t p1[16] = {0x6b, 0xc1, 0xbe, 0xe2, 0x2e, 0x40, 0x9f, 0x96,
                               0xe9, 0x3d, 0x7e, 0x11, 0x73, 0x93, 0x17, 0x2a};
  const std::uint8_t c1[16] = {0x87, 0x4d, 0x61, 0x91, 0xb6, 0x20, 0xe3, 0x26,
                               0x1b, 0xef, 0x68, 0x64, 0x99, 0x0d, 0xb6, 0xce};
  std::vector<std::uint32_t> z(4, 0);
  const std::int8_t plus = 1;
  fedagg::apply_masks(z.data(), 4, f51, &plus, 1, 32);
  std::uint8_t got[16];
  std::memcpy(got, z.data(), 16);
  for (int i = 0; i < 16; ++i)
    expect_close(got[i], p1[i] ^ c1[i], 0, "SP 800-38A F.5.1 byte " + std::to_string(i) + " " + isa);
  std::uint8_t plain[16];
  aes128_block(f51, f51 + 16, plain);
  for (int i = 0; i < 16; ++i) expect_close(plain[i], p1[i] ^ c1[i], 0, "plain AES F.5.1 byte " + std::to_string(i));
  std::mt19937_64 g(99);
  for (std::size_t d : {std::size_t(1), std::size_t(5), std::size_t(17), std::size_t(1000), std::size_t(70001)})
    for (int bits : {32, 13}) {
      std::uint8_t seeds[64];
      for (auto& b : seeds) b = static_cast<std::uint8_t>(g());
      if (d == 1000) std::memset(seeds + 24, 0xff, 8);  // the low 64 counter bits overflow inside the vector
      const std::int8_t signs[2] = {1, -1};
      std::vector<std::uint32_t> x(d), y;
      for (auto& v : x) v = static_cast<std::uint32_t>(g());
      y = x;
      fedagg::apply_masks(y.data(), d, seeds, signs, 2, bits);
      const std::uint32_t mask = bits == 32 ? 0xffffffffu : (1u << bits) - 1;
      for (std::size_t j = 0; j < d; j += 4) {
        std::uint32_t a[4], b[4];
        prg_block(seeds, j / 4, a);
        prg_block(seeds + 32, j / 4, b);
        for (std::size_t w = 0; w < 4 && j + w < d; ++w)
          if (y[j + w] != ((x[j + w] + a[w] - b[w]) & mask))
            fail("apply_masks " + isa + " d=" + std::to_string(d) + " at " + std::to_string(j + w));
      }
      ++checks;
    }
}

// Half precision: every binary16 and bfloat16 bit pattern widened as the plain formula says,
// and half-precision rows through the ops (tiled) giving the bits of the rows widened beforehand.
double half_value(std::uint16_t h) {
  const int sign = h >> 15, ex = (h >> 10) & 31, man = h & 1023;
  double v = ex == 0 ? std::ldexp(man, -24) : ex == 31 ? (man ? NAN : INFINITY) : std::ldexp(1024 + man, ex - 25);
  return sign ? -v : v;
}

void check_half(const std::string& isa) {
  const auto& k = fedagg::kernels();
  std::vector<std::uint16_t> all(65536);
  for (std::size_t i = 0; i < all.size(); ++i) all[i] = static_cast<std::uint16_t>(i);
  std::vector<float> out(all.size());
  k.widen(all.data(), 1, out.data(), all.size());
  for (std::size_t i = 0; i < all.size(); ++i) {
    const double want = half_value(all[i]);
    ++checks;
    if (std::isnan(want) ? !std::isnan(out[i]) : static_cast<double>(out[i]) != want)
      fail("widen binary16 " + isa + " pattern " + std::to_string(i));
  }
  k.widen(all.data(), 2, out.data(), all.size());
  for (std::size_t i = 0; i < all.size(); ++i) {
    std::uint32_t bits;
    std::memcpy(&bits, &out[i], 4);
    ++checks;
    if (bits != static_cast<std::uint32_t>(i) << 16) fail("widen bfloat16 " + isa + " pattern " + std::to_string(i));
  }
  std::mt19937_64 g(5);
  for (int elem : {1, 2})
    for (std::size_t d : {std::size_t(1), std::size_t(63), std::size_t(5000)})
      for (int n : {1, 7, 33}) {
        std::vector<std::uint16_t> h(static_cast<std::size_t>(n) * d);
        for (auto& v : h) v = static_cast<std::uint16_t>(g() & (elem == 1 ? 0x3bffu : 0x3f7fu));  // finite, |v| < 1
        std::vector<float> w(h.size());
        k.widen(h.data(), elem, w.data(), h.size());
        fedagg::Rows half, wide;
        half.d = wide.d = d;
        for (int i = 0; i < n; ++i) {
          half.ptr.push_back(reinterpret_cast<const float*>(h.data() + static_cast<std::size_t>(i) * d));
          half.elem.push_back(static_cast<fedagg::Elem>(elem));
          wide.ptr.push_back(w.data() + static_cast<std::size_t>(i) * d);
        }
        std::vector<double> coef(n, 1.0 / n);
        std::vector<float> a(d), b(d);
        fedagg::weighted_sum(half, coef.data(), a.data());
        fedagg::weighted_sum(wide, coef.data(), b.data());
        const std::string at = isa + " elem " + std::to_string(elem) + " n=" + std::to_string(n) + " d=" +
                               std::to_string(d);
        ++checks;
        if (std::memcmp(a.data(), b.data(), 4 * d) != 0) fail("weighted_sum of half rows " + at);
        fedagg::coordinate_median(half, a.data());
        fedagg::coordinate_median(wide, b.data());
        ++checks;
        if (std::memcmp(a.data(), b.data(), 4 * d) != 0) fail("median of half rows " + at);
        ++checks;
        if (fedagg::pairwise_sqdist(half) != fedagg::pairwise_sqdist(wide)) fail("distances of half rows " + at);
      }
}

int main() {
  // CRC32C's standard check value
  ++checks;
  if (fedagg::crc32c("123456789", 9) != 0xE3069283u) fail("crc32c check value");
  for (int threads : {1, 3}) {
    fedagg::set_num_threads(threads);
    for (const char* isa : {"avx512", "avx2", "base"}) {
      if (fedagg::kernel_table(isa) == nullptr) continue;
      fedagg::force_isa(isa);
      check_table(isa);
      check_masks(isa);
      check_half(isa);
      std::printf("%s (%d threads): ok\n", isa, threads);
    }
  }
  std::printf("ok %ld checks\n", checks);
  return 0;
}
