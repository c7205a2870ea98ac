// The workspace of a tiled kernel's call run on its own thread (run_whole): one aligned
// allocation for the call. Scheduled runs take theirs from the Context's arena instead.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>

#include "tpa/core/tensor.hpp"

namespace tpa {
namespace detail {

/// Calls run(ws) with a workspace of `floats` floats, 64-byte aligned, allocated for this call
/// and freed when it returns or throws.
/// \throws std::bad_alloc if the allocation fails.
template <class Run>
void with_workspace(Index floats, const Run& run) {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  const std::size_t bytes = static_cast<std::size_t>(floats) * sizeof(float);
  std::unique_ptr<float, Free> ws(
      static_cast<float*>(std::aligned_alloc(64, (bytes + 63) / 64 * 64)));
  if (!ws) throw std::bad_alloc();
  run(ws.get());
}

}  // namespace detail
}  // namespace tpa
