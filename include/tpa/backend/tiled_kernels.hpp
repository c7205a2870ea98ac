// The kernel set every SIMD backend (Portable, Avx2, Avx512) gets from the shared tiled kernels:
// the grouped kernel (detail::GroupedTiled) and the FlashTPA kernel (detail::TpaTiled) over the
// backend's vector primitives `Ops`.
#pragma once

#include "tpa/backend/kernels.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/tpa_tiled.hpp"

namespace tpa {
namespace detail {

/// \brief Kernels<B> of a SIMD backend B: derives from Kernels<Parent> (so kernels it does not
/// define fall back to the parent's) and runs the tiled kernels on `Ops`. Ops::kTpaWho names
/// the backend's tpa_attention in error messages.
template <class Ops, class Parent>
struct TiledKernels : Kernels<Parent> {
  /// Causal grouped attention of one call on the calling thread (allocates its workspace; the
  /// layers use tpa::grouped_attention with a Context instead).
  template <class S>
  static void grouped_attention(const GroupedAttentionParams<S>& p) {
    GroupedTiled<Ops, S>::run_whole(p);
  }
  /// Workspace floats grouped_attention_part needs for `part`.
  template <class S>
  static Index grouped_workspace_floats(const GroupedAttentionParams<S>& p,
                                        const GroupedPart& part) {
    return GroupedTiled<Ops, S>::workspace_floats(p, part);
  }
  /// One part of a call (see detail::GroupedTiled::run).
  template <class S>
  static void grouped_attention_part(const GroupedAttentionParams<S>& p, const GroupedPart& part,
                                     float* workspace, const GroupedStates* states) {
    GroupedTiled<Ops, S>::run(p, part, workspace, states);
  }

  /// Causal TPA of one call on the calling thread (allocates its workspace; the layers use
  /// tpa::tpa_attention with a Context instead). \throws Error if p is inconsistent.
  template <class S>
  static void tpa_attention(const TpaAttentionParams<S>& p) {
    TpaTiled<Ops, S>::run_whole(p, Ops::kTpaWho);
  }
  /// Workspace floats tpa_attention_part needs for `part`.
  template <class S>
  static Index tpa_workspace_floats(const TpaAttentionParams<S>& p, const TpaPart& part) {
    return TpaTiled<Ops, S>::workspace_floats(p, part);
  }
  /// One part of a TPA call (see detail::TpaTiled::run).
  template <class S>
  static void tpa_attention_part(const TpaAttentionParams<S>& p, const TpaPart& part,
                                 float* workspace, const TpaStates* states) {
    TpaTiled<Ops, S>::run(p, part, workspace, states);
  }
};

}  // namespace detail
}  // namespace tpa
