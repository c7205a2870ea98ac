// Work split of the grouped attention kernel over a Context's threads: (sequence × KV head)
// units, and split-K along the sequence, merged exactly, when there are fewer units than threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <new>
#include <type_traits>
#include <utility>

#include "tpa/backend/backends.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/softmax.hpp"
#include "tpa/kernels/split.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {

namespace detail {

template <class K, class S, class = void>
struct HasGroupedPart : std::false_type {};
template <class K, class S>
struct HasGroupedPart<
    K, S,
    std::void_t<decltype(K::grouped_attention_part(
        std::declval<const GroupedAttentionParams<S>&>(), std::declval<const GroupedPart&>(),
        std::declval<float*>(), std::declval<const GroupedStates*>()))>> : std::true_type {};

using GroupedUnit = SplitUnit<GroupedPart>;

template <class S>
void check_grouped_call(const GroupedAttentionParams<S>& p, Index c) {
  TPA_CHECK(p.n_heads >= 1 && p.n_kv_heads >= 1 && p.n_heads % p.n_kv_heads == 0,
            "grouped_attention: call ", c, ": n_heads (", p.n_heads,
            ") must be a positive multiple of n_kv_heads (", p.n_kv_heads, ")");
  TPA_CHECK(p.k_dims[0] >= 1 && p.k_dims[1] >= 0 && p.d_v >= 1, "grouped_attention: call ", c,
            ": key dims (", p.k_dims[0], ", ", p.k_dims[1], ") and d_v (", p.d_v,
            ") must be positive (the second key part may be 0)");
  TPA_CHECK(p.n_q >= 0 && p.q_pos0 >= 0 && p.q_pos0 + p.n_q <= p.kv.n_tokens,
            "grouped_attention: call ", c, ": queries at positions ", p.q_pos0, " … ",
            p.q_pos0 + p.n_q - 1, " need that many cached tokens, the view has ", p.kv.n_tokens);
  TPA_CHECK(p.n_q == 0 || (p.q != nullptr && p.o != nullptr && p.kv.block_tokens >= 1),
            "grouped_attention: call ", c, ": null q/o or an empty cache view");
  if (p.n_q == 0) return;
  p.variant.check("grouped_attention", p.q_pos0, p.kv.first_token);
  TPA_CHECK(p.kv.places != nullptr, "grouped_attention: call ", c, ": the cache view is empty");
  for (int part = 0; part < 2; ++part) {
    if (p.k_dims[part] == 0) continue;
    const std::size_t f = p.k_factor[part];
    TPA_CHECK(p.kv.rows(f) == p.n_kv_heads && p.kv.cols(f) >= p.k_dims[part],
              "grouped_attention: call ", c, ": key part ", part, " needs ", p.n_kv_heads,
              " rows (KV heads) of at least ", p.k_dims[part], " elements, cached factor ", f,
              " is [", p.kv.rows(f), ", ", p.kv.cols(f), "]");
  }
  TPA_CHECK(p.kv.rows(p.v_factor) == p.n_kv_heads && p.kv.cols(p.v_factor) >= p.d_v,
            "grouped_attention: call ", c, ": the value needs ", p.n_kv_heads,
            " rows (KV heads) of at least ", p.d_v, " elements, cached factor ", p.v_factor,
            " is [", p.kv.rows(p.v_factor), ", ", p.kv.cols(p.v_factor), "]");
}

}  // namespace detail

/// \brief Runs the grouped attention calls `calls[0 … n_calls)` (typically one per sequence of a
/// batch, all of one layer) with the kernels of `Backend`, spread over ctx's threads.
///
/// The work is a line of items in call order, each weighted by its multiply-adds: a decode call
/// (n_q = 1) is one item, all its KV heads; a prefill call is one item per KV head. The line is
/// cut into equal pieces, one per worker. A worker runs the items it owns whole (adjacent ones
/// of a call together) and the pieces of an item cut in two: a decode call is cut along its
/// keys (split-K: each worker streams whole token ranges of the cache, all heads; the partial
/// online-softmax states are merged exactly afterwards, SoftmaxState::merge), a prefill KV head
/// along its queries. So batch-1 decode of any kind uses every thread.
///
/// Workspace and partial states come from ctx.scratch(), released on return: after warm-up a
/// call allocates nothing. Backends without a part kernel (Reference) run one call per task.
/// \throws Error if a call's sizes are inconsistent (before any work).
template <class Backend, class S>
void grouped_attention(Context& ctx, const GroupedAttentionParams<S>* calls, Index n_calls,
                       const GroupedSplit& split = {}) {
  using K = Kernels<Backend>;
  for (Index c = 0; c < n_calls; ++c) detail::check_grouped_call(calls[c], c);
  if constexpr (!detail::HasGroupedPart<K, S>::value) {
    ctx.parallel_for(n_calls, [calls](Index c) {
      if (calls[c].n_q > 0) K::grouped_attention(calls[c]);
    });
  } else {
    Scratch& scratch = ctx.scratch();
    ScratchGuard guard(scratch);

    // The line of items (call c, KV heads [g, g + heads)): per-item cost (multiply-adds),
    // cumulative from item 0.
    auto item_heads = [](const GroupedAttentionParams<S>& p) {
      return p.n_q == 1 ? p.n_kv_heads : Index(1);
    };
    Index n_items = 0;
    for (Index c = 0; c < n_calls; ++c)
      if (calls[c].n_q > 0) n_items += calls[c].n_kv_heads / item_heads(calls[c]);
    if (n_items == 0) return;
    auto* item_call = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* item_g = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* cum = static_cast<double*>(scratch.bytes(sizeof(double) * (n_items + 1)));
    cum[0] = 0;
    {
      Index it = 0;
      for (Index c = 0; c < n_calls; ++c) {
        const auto& p = calls[c];
        if (p.n_q == 0) continue;
        const double rows_keys = detail::causal_pairs(p.n_q, p.q_pos0, p.variant.window);
        const Index heads = item_heads(p);
        const double cost =
            rows_keys * static_cast<double>(heads * p.group_size() * (p.d_qk() + p.d_v));
        for (Index g = 0; g < p.n_kv_heads; g += heads, ++it) {
          item_call[it] = c;
          item_g[it] = g;
          cum[it + 1] = cum[it] + cost;
        }
      }
    }
    const detail::WorkerCount wc = detail::worker_count(split, ctx.threads(), cum[n_items]);
    const Index max_w = wc.max_w, workers = wc.used;
    // An item's queries and multiply-adds per (query, key) pair, for the cuts.
    auto item_of = [&](Index it) {
      const auto& p = calls[item_call[it]];
      return detail::CutItem{
          p.n_q, p.q_pos0,
          static_cast<double>(item_heads(p) * p.group_size() * (p.d_qk() + p.d_v)),
          p.variant.window};
    };
    auto* cuts = static_cast<detail::LineCut*>(scratch.bytes(sizeof(detail::LineCut) * (max_w + 1)));
    detail::cut_line(cum, n_items, workers, 16, item_of, cuts);  // key pieces tile-aligned

    // Units of each worker, in line order.
    // A worker's units: one run of whole KV heads per call it touches, plus a cut piece at
    // each end of its segment.
    const Index max_units = n_calls + 3 * max_w + 2;
    auto* units =
        static_cast<detail::GroupedUnit*>(scratch.bytes(sizeof(detail::GroupedUnit) * max_units));
    auto* first_unit = static_cast<Index*>(scratch.bytes(sizeof(Index) * (max_w + 1)));
    Index n_units = 0, n_slots = 0;
    for (Index w = 0; w < workers; ++w) {
      first_unit[w] = n_units;
      detail::for_each_piece(cuts, w, item_of, [&](Index it, Index pos0, Index pos1, bool whole) {
        const Index c = item_call[it], g = item_g[it];
        const auto& p = calls[c];
        const Index g_end = g + item_heads(p);
        detail::GroupedUnit u;
        u.call = c;
        if (whole) {
          detail::GroupedUnit* prev = n_units > first_unit[w] ? &units[n_units - 1] : nullptr;
          if (prev != nullptr && prev->call == c && prev->slot < 0 && prev->part.g1 == g &&
              prev->part.i0 == 0 && prev->part.i1 == p.n_q && prev->part.k0 == 0) {
            prev->part.g1 = g_end;  // extend the run of whole KV heads
          } else {
            u.part = GroupedPart{g, g_end, 0, p.n_q, 0, p.q_pos0 + p.n_q};
            units[n_units++] = u;
          }
        } else if (p.n_q == 1) {
          const Index kb = item_of(it).key_begin();
          u.part = GroupedPart{g, g_end, 0, 1, kb + pos0, kb + pos1};
          u.slot = n_slots++;
          units[n_units++] = u;
        } else {
          u.part = GroupedPart{g, g + 1, pos0, pos1, 0, p.q_pos0 + pos1};
          units[n_units++] = u;
        }
      });
    }
    first_unit[workers] = n_units;

    // Partial states of key-split pieces (at most two per worker) and per-worker workspaces,
    // all sized for the largest call and max_w workers.
    Index ws_floats = 0, state_rows = 0, state_dim = 0;
    for (Index c = 0; c < n_calls; ++c) {
      const auto& p = calls[c];
      if (p.n_q == 0) continue;
      ws_floats = std::max(ws_floats, K::grouped_workspace_floats(p, GroupedPart::whole(p)));
      if (p.n_q == 1) state_rows = std::max(state_rows, p.n_heads);
      state_dim = std::max(state_dim, p.d_v);
    }
    GroupedStates* slots = nullptr;
    float** ws = nullptr;
    detail::take_split_buffers(scratch, max_w, state_rows, state_dim, ws_floats, &slots, &ws);

    detail::run_units(ctx, workers, first_unit, units, ws, slots,
                      [calls](const detail::GroupedUnit& un, float* w, GroupedStates* st) {
                        K::grouped_attention_part(calls[un.call], un.part, w, st);
                      });

    // Merge the pieces of each key-split decode call (consecutive units), write its outputs.
    detail::for_each_split_run(
        units, n_units,
        [](const detail::GroupedUnit& a, const detail::GroupedUnit& b) {
          return b.call == a.call && b.part.g0 == a.part.g0;
        },
        [&](const detail::GroupedUnit& first, Index pieces) {
          const auto& p = calls[first.call];
          const Index g = first.part.g0, rows = (first.part.g1 - g) * p.group_size();
          detail::merge_pieces(slots + first.slot, pieces, rows, p.d_v,
                               p.o + g * p.group_size() * p.d_v,
                               p.variant.sinks == nullptr ? nullptr
                                                          : p.variant.sinks + g * p.group_size());
        });
  }
}

}  // namespace tpa
