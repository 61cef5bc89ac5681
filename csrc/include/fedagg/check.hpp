// Error reporting for the native layer: every failed precondition throws a
// typed exception carrying the failed expression; nothing aborts the process.
#pragma once
#include <cstddef>
#include <limits>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fedagg {

// Maps to Python ValueError (pybind11 translates std::invalid_argument).
struct InvalidArgument : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

[[noreturn]] inline void throw_invalid(const char* expr, const std::string& msg, const char* file,
                                       int line) {
  std::ostringstream s;
  s << msg << " (check '" << expr << "' failed at " << file << ":" << line << ")";
  throw InvalidArgument(s.str());
}

#define FEDAGG_CHECK(cond, msg)                                               \
  do {                                                                        \
    if (!(cond)) ::fedagg::throw_invalid(#cond, (msg), __FILE__, __LINE__);   \
  } while (0)

// Overflow-checked a * b for buffer sizes.
inline std::size_t checked_mul(std::size_t a, std::size_t b, const char* what) {
  if (a != 0 && b > std::numeric_limits<std::size_t>::max() / a)
    throw std::overflow_error(std::string("size overflow computing ") + what);
  return a * b;
}

}  // namespace fedagg
