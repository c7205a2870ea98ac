// Work split of the FlashTPA kernel over a Context's threads: whole calls (sequences), prefill
// calls cut along their queries, and decode calls cut into key pieces (split-K) merged exactly.
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>

#include "tpa/backend/backends.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/dispatch/schedule.hpp"
#include "tpa/dispatch/split.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/tpa_tiled.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {

/// How tpa::tpa_attention spreads its work: the same knobs as grouped_attention's
/// (max_workers, min_work_per_worker, min_work_per_piece in multiply-adds).
using TpaSplit = GroupedSplit;

namespace detail {

template <class K, class S, class = void>
struct HasTpaPart : std::false_type {};
template <class K, class S>
struct HasTpaPart<K, S,
                  std::void_t<decltype(K::tpa_attention_part(
                      std::declval<const TpaAttentionParams<S>&>(), std::declval<const TpaPart&>(),
                      std::declval<float*>(), std::declval<const TpaStates*>()))>>
    : std::true_type {};

/// Multiply-adds of one (query, key) pair of a TPA call in FlashTPA order: the score side
/// (factored: R_Q·R_K·d + H·R_K·(R_Q + 1); full query: H·R_K·d) plus the value side H·R_V·d.
template <class S>
double tpa_pair_cost(const TpaAttentionParams<S>& p) {
  const double H = static_cast<double>(p.n_heads), d = static_cast<double>(p.head_dim);
  const double RQ = static_cast<double>(p.q_rank), RK = static_cast<double>(p.k_rank);
  const double qk = p.factored_query() ? RQ * RK * d + H * RK * (RQ + 1) : H * RK * d;
  return qk + H * static_cast<double>(p.v_rank) * d;
}

/// The TPA kernels of kernel set K as run_schedule's Kind: a prefill call is one item (all heads
/// of a part stay together: B_K and B_V are shared by the heads).
template <class K, class S>
struct TpaSchedule {
  using Params = TpaAttentionParams<S>;
  using Part = TpaPart;
  static constexpr bool kHasPart = HasTpaPart<K, S>::value;
  static constexpr Index kAlign = 64;  // key pieces tile-aligned

  static double decode_pair_cost(const Params& p) { return tpa_pair_cost(p); }
  static double prefill_pair_cost(const Params& p) { return tpa_pair_cost(p); }
  static Index prefill_items(const Params&) { return 1; }
  static Index quantum(const Params& p) { return std::max<Index>(1, kTpaRowCap / p.n_heads); }
  static Part decode_part(const Params&, Index k0, Index k1) { return TpaPart{0, 1, k0, k1}; }
  static Part prefill_part(const Params& p, Index, Index i0, Index i1) {
    return TpaPart{i0, i1, 0, p.q_pos0 + i1};
  }
  static bool extend(Part&, const Part&) { return false; }  // one item per call
  static Index workspace_floats(const Params& p, const Part& part) {
    return K::tpa_workspace_floats(p, part);
  }
  static void run(const Params& p, const Part& part, float* ws, const TpaStates* states) {
    K::tpa_attention_part(p, part, ws, states);
  }
  static void run_whole(const Params& p) { K::tpa_attention(p); }
  static Index value_dim(const Params& p) { return p.head_dim; }
};

}  // namespace detail

/// \brief Runs the TPA calls `calls[0 … n_calls)` (typically one per sequence of a batch, all of
/// one layer) with the kernels of `Backend`, spread over ctx's threads.
///
/// The work is a line of items in call order, each weighted by its multiply-adds: a decode call
/// (n_q = 1) is cut along its keys into key pieces (split.min_work_per_piece, 64-token
/// boundaries; the partial online-softmax states of all heads are merged exactly afterwards in
/// key order, SoftmaxState::merge), a prefill call is one item. The line is cut into equal
/// pieces, one per worker, at whole key pieces or at query boundaries of a prefill call. All
/// heads of a piece stay together: B_K and B_V are shared by the heads, so each factor byte is
/// read once per step. So batch-1 decode uses every thread.
///
/// Bit-identical with any thread count and split.max_workers, and for a call whatever the
/// other calls beside it (see grouped_attention).
///
/// Workspace and partial states come from ctx.scratch(), released on return: after warm-up a
/// call allocates nothing. Backends without a part kernel (Reference) run one call per task.
/// \throws Error if a call is inconsistent (TpaAttentionParams::check), before any work.
template <class Backend, class S>
void tpa_attention(Context& ctx, const TpaAttentionParams<S>* calls, Index n_calls,
                   const TpaSplit& split = {}) {
  for (Index c = 0; c < n_calls; ++c) calls[c].check("tpa_attention");
  detail::run_schedule<detail::TpaSchedule<Kernels<Backend>, S>>(ctx, calls, n_calls, split);
}

}  // namespace tpa
