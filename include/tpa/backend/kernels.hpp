// The trait that maps a backend tag to its kernel set.
#pragma once

#include "tpa/backend/tags.hpp"

namespace tpa {

/// \brief Kernels<Backend>: the kernel set of a backend, as static member functions. Each
/// backend header specialises it, deriving from its parent's set, so a kernel a backend does not
/// specialise falls back to its parent's (ultimately Reference's).
template <class Backend>
struct Kernels : Kernels<typename detail::ParentOf<Backend>::type> {
  static_assert(detail::RequireBackend<Backend>::value);
};

}  // namespace tpa
