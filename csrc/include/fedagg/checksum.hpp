// CRC32C (Castagnoli, the iSCSI / ext4 / gRPC checksum): the transport's
// per-message checksum. Hardware crc32 instructions where the CPU has them,
// carry-less-multiply folding (VPCLMULQDQ) where the CPU has it, else three
// interleaved crc32 streams, else slicing-by-8 tables.
#pragma once
#include <cstddef>
#include <cstdint>

namespace fedagg {

// crc32c(data) with the standard conventions (init ~0, final xor ~0);
// crc32c(b, n, crc32c(a, m)) == crc32c(a || b).
std::uint32_t crc32c(const void* data, std::size_t n, std::uint32_t crc = 0);

// The same with one named implementation ("software", "sse4.2", "vpclmulqdq"),
// for tests and benchmarks; throws std::invalid_argument if this CPU lacks it.
std::uint32_t crc32c_with(const char* impl, const void* data, std::size_t n, std::uint32_t crc = 0);

// The implementation crc32c() uses on this CPU.
const char* crc32c_best();

// memcpy(dst, src, n) and crc32c(src, n) in one pass over src (blocks are
// checksummed while they are still in cache); dst is written with streaming
// stores where the CPU has AVX2, since it is not read again soon. With finite != nullptr (n a
// multiple of 4), *finite is set to whether every float32 in src is finite.
std::uint32_t copy_crc32c(void* dst, const void* src, std::size_t n, bool* finite = nullptr);

}  // namespace fedagg
