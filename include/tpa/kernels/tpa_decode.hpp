// Work split of the FlashTPA kernel over a Context's threads: whole calls (sequences), and
// split-K along a sequence, merged exactly, when there are fewer calls than threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "tpa/backend/backends.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/kernels/grouped_decode.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/softmax.hpp"
#include "tpa/kernels/split.hpp"
#include "tpa/kernels/tpa_tiled.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {

/// How tpa::tpa_attention spreads its work: the same knobs as grouped_attention's
/// (max_workers, min_work_per_worker in multiply-adds).
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

using TpaUnit = SplitUnit<TpaPart>;

/// Multiply-adds of one (query, key) pair of a TPA call in FlashTPA order: the score side
/// (factored: R_Q·R_K·d + H·R_K·(R_Q + 1); full query: H·R_K·d) plus the value side H·R_V·d.
template <class S>
double tpa_pair_cost(const TpaAttentionParams<S>& p) {
  const double H = static_cast<double>(p.n_heads), d = static_cast<double>(p.head_dim);
  const double RQ = static_cast<double>(p.q_rank), RK = static_cast<double>(p.k_rank);
  const double qk = p.factored_query() ? RQ * RK * d + H * RK * (RQ + 1) : H * RK * d;
  return qk + H * static_cast<double>(p.v_rank) * d;
}

}  // namespace detail

/// \brief Runs the TPA calls `calls[0 … n_calls)` (typically one per sequence of a batch, all of
/// one layer) with the kernels of `Backend`, spread over ctx's threads.
///
/// The work is the line of calls in order, each weighted by its multiply-adds; the line is cut
/// into equal pieces, one per worker. A worker runs the calls it owns whole, and the pieces of a
/// call cut in two: a decode call (n_q = 1) is cut along its keys (split-K, on 64-token
/// boundaries; the partial online-softmax states of all heads are merged exactly afterwards,
/// SoftmaxState::merge), a prefill call along its queries. All heads of a piece stay together:
/// B_K and B_V are shared by the heads, so each factor byte is read once per step. So batch-1
/// decode uses every thread.
///
/// Workspace and partial states come from ctx.scratch(), released on return, sized by the shapes
/// (not the sequence lengths): after warm-up a call allocates nothing. Backends without a part
/// kernel (Reference) run one call per task.
/// \throws Error if a call is inconsistent (TpaAttentionParams::check), before any work.
template <class Backend, class S>
void tpa_attention(Context& ctx, const TpaAttentionParams<S>* calls, Index n_calls,
                   const TpaSplit& split = {}) {
  using K = Kernels<Backend>;
  for (Index c = 0; c < n_calls; ++c) calls[c].check("tpa_attention");
  if constexpr (!detail::HasTpaPart<K, S>::value) {
    ctx.parallel_for(n_calls, [calls](Index c) {
      if (calls[c].n_q > 0) K::tpa_attention(calls[c]);
    });
  } else {
    Scratch& scratch = ctx.scratch();
    ScratchGuard guard(scratch);

    // The line of calls: cumulative multiply-adds from call 0.
    auto* cum = static_cast<double*>(scratch.bytes(sizeof(double) * (n_calls + 1)));
    cum[0] = 0;
    for (Index c = 0; c < n_calls; ++c) {
      const auto& p = calls[c];
      const double pairs = detail::causal_pairs(p.n_q, p.q_pos0, p.variant.window);
      cum[c + 1] = cum[c] + pairs * detail::tpa_pair_cost(p);
    }
    if (cum[n_calls] == 0) return;
    const detail::WorkerCount wc = detail::worker_count(split, ctx.threads(), cum[n_calls]);
    const Index max_w = wc.max_w, workers = wc.used;
    auto item_of = [&](Index c) {
      return detail::CutItem{calls[c].n_q, calls[c].q_pos0, detail::tpa_pair_cost(calls[c]),
                             calls[c].variant.window};
    };
    auto* cuts = static_cast<detail::LineCut*>(scratch.bytes(sizeof(detail::LineCut) * (max_w + 1)));
    detail::cut_line(cum, n_calls, workers, 64, item_of, cuts);  // key pieces tile-aligned

    // A worker's units: the calls inside its segment whole, plus a cut piece at each end.
    const Index max_units = n_calls + 2 * max_w + 2;
    auto* units = static_cast<detail::TpaUnit*>(scratch.bytes(sizeof(detail::TpaUnit) * max_units));
    auto* first_unit = static_cast<Index*>(scratch.bytes(sizeof(Index) * (max_w + 1)));
    Index n_units = 0, n_slots = 0;
    for (Index w = 0; w < workers; ++w) {
      first_unit[w] = n_units;
      detail::for_each_piece(cuts, w, item_of, [&](Index c, Index pos0, Index pos1, bool whole) {
        const auto& p = calls[c];
        if (p.n_q == 0) return;
        detail::TpaUnit u;
        u.call = c;
        if (whole) {
          u.part = TpaPart::whole(p);
        } else if (p.n_q == 1) {
          const Index kb = item_of(c).key_begin();
          u.part = TpaPart{0, 1, kb + pos0, kb + pos1};
          u.slot = n_slots++;
        } else {
          u.part = TpaPart{pos0, pos1, 0, p.q_pos0 + pos1};
        }
        units[n_units++] = u;
      });
    }
    first_unit[workers] = n_units;

    // Partial states of key-split pieces (at most two per worker) and per-worker workspaces,
    // all sized for the largest call and max_w workers.
    Index ws_floats = 0, state_rows = 0, state_dim = 0;
    for (Index c = 0; c < n_calls; ++c) {
      const auto& p = calls[c];
      if (p.n_q == 0) continue;
      ws_floats = std::max(ws_floats, K::tpa_workspace_floats(p, TpaPart::whole(p)));
      state_rows = std::max(state_rows, p.n_heads);
      state_dim = std::max(state_dim, p.head_dim);
    }
    TpaStates* slots = nullptr;
    float** ws = nullptr;
    detail::take_split_buffers(scratch, max_w, state_rows, state_dim, ws_floats, &slots, &ws);

    detail::run_units(ctx, workers, first_unit, units, ws, slots,
                      [calls](const detail::TpaUnit& un, float* w, TpaStates* st) {
                        K::tpa_attention_part(calls[un.call], un.part, w, st);
                      });

    // Merge the key pieces of each split call (consecutive units) and write its outputs.
    detail::for_each_split_run(
        units, n_units,
        [](const detail::TpaUnit& a, const detail::TpaUnit& b) { return b.call == a.call; },
        [&](const detail::TpaUnit& first, Index pieces) {
          const auto& p = calls[first.call];
          detail::merge_pieces(slots + first.slot, pieces, p.n_heads, p.head_dim, p.o,
                               p.variant.sinks);
        });
  }
}

}  // namespace tpa
