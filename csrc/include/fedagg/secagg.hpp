// Secure aggregation's masks: ChaCha20 keystreams added to (or subtracted from) an integer vector
// in the ring Z_{2^bits}, fused so each cache-sized chunk takes every mask before the next.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedagg {

// data[j] = (data[j] + sum_i signs[i] * ChaCha20(keys[i], nonce)[j]) mod 2^bits for j < d.
// keys: m * 32 bytes, signs: m values in {+1, -1}, nonce: 12 bytes; 1 <= bits <= 32;
// d <= 2^36 (the RFC 8439 block counter is 32 bits). Values of data above 2^bits - 1 are
// reduced too.
void apply_masks(std::uint32_t* data, std::size_t d, const std::uint8_t* keys, const std::int8_t* signs,
                 std::size_t m, const std::uint8_t* nonce, int bits);

}  // namespace fedagg
