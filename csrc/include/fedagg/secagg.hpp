// Secure aggregation's masks: AES-128-CTR keystreams added to (or subtracted from) an integer vector
// in the ring Z_{2^bits}, fused so each cache-sized chunk takes every mask before the next.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedagg {

// data[j] = (data[j] + sum_i signs[i] * PRG(seeds[i])[j]) mod 2^bits for j < d, where PRG(seed) is
// the AES-128-CTR keystream (NIST SP 800-38A) under key seed[0:16] from the initial counter block
// seed[16:32] (a 128-bit big-endian counter, + 1 per 16-byte block, modulo 2^128, as OpenSSL),
// read as little-endian uint32 words. seeds: m * 32 bytes, signs: m values in {+1, -1};
// 1 <= bits <= 32. Values of data above 2^bits - 1 are reduced too. Throws (InvalidArgument) on a
// CPU without AES instructions when m > 0 (prg_path() == "none").
void apply_masks(std::uint32_t* data, std::size_t d, const std::uint8_t* seeds, const std::int8_t* signs,
                 std::size_t m, int bits);

// Which AES instructions apply_masks uses now: "vaes" (x86, 256-bit, with the avx2 or avx512 kernel
// table), "aesni" (x86, 128-bit; also with the base table forced), "armv8" (the ARMv8 cryptography
// extension) or "none".
const char* prg_path();

}  // namespace fedagg
