// CRC32C (Castagnoli, the iSCSI / ext4 / gRPC checksum): the transport's
// per-message checksum. Hardware crc32 instructions where the CPU has them,
// three interleaved streams so one core checksums at well over 10 GB/s.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedagg {

// crc32c(data) with the standard conventions (init ~0, final xor ~0);
// crc32c(b, n, crc32c(a, m)) == crc32c(a || b).
std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc = 0);

}  // namespace fedagg
