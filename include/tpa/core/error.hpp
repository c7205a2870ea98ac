// tpa::Error, the one exception type of the library, and the helpers that build its messages.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace tpa {

/// \brief The exception every tpa function throws on bad input: wrong shapes, invalid configs,
/// positions past the RoPE table, a full cache, an unknown sequence, a malformed checkpoint.
/// The message names the offending value and the rule it breaks. A call that throws it leaves
/// the objects it was given (layer, cache) exactly as they were.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {

/// Concatenates the arguments with operator<< into one message.
template <class... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

/// Throws tpa::Error with the concatenated message.
template <class... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(concat(std::forward<Args>(args)...));
}

}  // namespace detail

/// Throws tpa::Error(message) unless `cond` holds. The message arguments are only formatted on
/// failure.
#define TPA_CHECK(cond, ...)                   \
  do {                                         \
    if (!(cond)) ::tpa::detail::fail(__VA_ARGS__); \
  } while (0)

}  // namespace tpa
