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

// memcpy(dst, src, n) and crc32c(src, n) in one pass over src (blocks are
// checksummed while they are still in cache). With finite != nullptr (n a
// multiple of 4), *finite is set to whether every float32 in src is finite.
std::uint32_t copy_crc32c(void* dst, const void* src, std::size_t n, bool* finite = nullptr);

}  // namespace fedagg
