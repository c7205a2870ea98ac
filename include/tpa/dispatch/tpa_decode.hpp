// Work split of the FlashTPA kernel over a Context's threads: whole calls (sequences), prefill
// calls cut along their queries, and decode calls cut into key pieces (split-K) merged exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <utility>

#include "tpa/backend/backends.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/dispatch/grouped_decode.hpp"
#include "tpa/dispatch/split.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/softmax.hpp"
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
  using K = Kernels<Backend>;
  for (Index c = 0; c < n_calls; ++c) calls[c].check("tpa_attention");
  if constexpr (!detail::HasTpaPart<K, S>::value) {
    ctx.parallel_for(n_calls, [calls](Index c) {
      if (calls[c].n_q > 0) K::tpa_attention(calls[c]);
    });
  } else {
    Scratch& scratch = ctx.scratch();
    ScratchGuard guard(scratch);
    constexpr Index kAlign = 64;  // key pieces tile-aligned

    auto* pieces = static_cast<detail::KeyPieces*>(
        scratch.bytes(sizeof(detail::KeyPieces) * static_cast<std::size_t>(n_calls)));
    auto* slot0 = static_cast<Index*>(scratch.bytes(sizeof(Index) * static_cast<std::size_t>(n_calls)));
    Index n_items = 0, n_slots = 0;
    for (Index c = 0; c < n_calls; ++c) {
      const auto& p = calls[c];
      slot0[c] = -1;
      if (p.n_q == 0) continue;
      if (p.n_q == 1) {
        pieces[c] = detail::key_pieces(split, p.q_pos0 + 1 - p.variant.first_key(p.q_pos0),
                                       detail::tpa_pair_cost(p), kAlign);
        n_items += pieces[c].count;
        if (pieces[c].count > 1) {
          slot0[c] = n_slots;
          n_slots += pieces[c].count;
        }
      } else {
        n_items += 1;
      }
    }
    if (n_items == 0) return;
    auto* item_call = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* item_sub = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* cum = static_cast<double*>(scratch.bytes(sizeof(double) * (n_items + 1)));
    // A decode piece's range of keys, from the first key of the call's window.
    auto piece_keys = [&](Index c, Index k) {
      const Index end = calls[c].q_pos0 + 1, k0 = calls[c].variant.first_key(calls[c].q_pos0);
      return std::make_pair(k0 + k * pieces[c].len, std::min(end, k0 + (k + 1) * pieces[c].len));
    };
    cum[0] = 0;
    {
      Index it = 0;
      for (Index c = 0; c < n_calls; ++c) {
        const auto& p = calls[c];
        if (p.n_q == 0) continue;
        const Index subs = p.n_q == 1 ? pieces[c].count : 1;
        for (Index k = 0; k < subs; ++k, ++it) {
          item_call[it] = c;
          item_sub[it] = k;
          double pairs;
          if (p.n_q == 1) {
            const auto r = piece_keys(c, k);
            pairs = static_cast<double>(r.second - r.first);
          } else {
            pairs = detail::causal_pairs(p.n_q, p.q_pos0, p.variant.window);
          }
          cum[it + 1] = cum[it] + pairs * detail::tpa_pair_cost(p);
        }
      }
    }
    const detail::WorkerCount wc = detail::worker_count(split, ctx.threads(), cum[n_items]);
    const Index max_w = wc.max_w, workers = wc.used;
    auto item_of = [&](Index it) {
      const Index c = item_call[it];
      const auto& p = calls[c];
      if (p.n_q == 1) {
        const auto r = piece_keys(c, item_sub[it]);
        return detail::CutItem{1, r.second - r.first - 1, detail::tpa_pair_cost(p)};
      }
      return detail::CutItem{p.n_q, p.q_pos0, detail::tpa_pair_cost(p),
                             std::max<Index>(1, detail::kTpaRowCap / p.n_heads),
                             p.variant.window};
    };
    auto* cuts = static_cast<detail::LineCut*>(scratch.bytes(sizeof(detail::LineCut) * (max_w + 1)));
    detail::cut_line(cum, n_items, workers, item_of, cuts);

    // A worker's units: key pieces and prefill calls inside its segment whole, plus a cut part of
    // a prefill call's queries at each end.
    const Index max_units = n_items + max_w + 1;
    auto* units = static_cast<detail::TpaUnit*>(scratch.bytes(sizeof(detail::TpaUnit) * max_units));
    auto* first_unit = static_cast<Index*>(scratch.bytes(sizeof(Index) * (max_w + 1)));
    Index n_units = 0;
    for (Index w = 0; w < workers; ++w) {
      first_unit[w] = n_units;
      detail::for_each_piece(cuts, w, item_of, [&](Index it, Index pos0, Index pos1, bool whole) {
        const Index c = item_call[it];
        const auto& p = calls[c];
        detail::TpaUnit u;
        u.call = c;
        if (p.n_q == 1) {
          const auto r = piece_keys(c, item_sub[it]);
          u.part = TpaPart{0, 1, r.first, r.second};
          if (slot0[c] >= 0) u.slot = slot0[c] + item_sub[it];
        } else if (whole) {
          u.part = TpaPart::whole(p);
        } else {
          u.part = TpaPart{pos0, pos1, 0, p.q_pos0 + pos1};
        }
        units[n_units++] = u;
      });
    }
    first_unit[workers] = n_units;

    // Partial states of the key pieces and per-worker workspaces, the latter sized for the
    // largest call and max_w workers.
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
    detail::take_split_buffers(scratch, n_slots, max_w, state_rows, state_dim, ws_floats, &slots,
                               &ws);

    detail::run_units(ctx, workers, first_unit, units, ws, slots,
                      [calls](const detail::TpaUnit& un, float* w, TpaStates* st) {
                        K::tpa_attention_part(calls[un.call], un.part, w, st);
                      });

    // Merge the key pieces of each cut decode call in key order (the sinks join each row's
    // denominator once, here), write its outputs.
    for (Index c = 0; c < n_calls; ++c)
      if (slot0[c] >= 0)
        detail::merge_pieces(slots + slot0[c], pieces[c].count, calls[c].n_heads,
                             calls[c].head_dim, calls[c].o, calls[c].variant.sinks);
  }
}

}  // namespace tpa
