// Work split of the grouped attention kernel over a Context's threads: (sequence × KV head)
// units cut along their queries, and decode calls cut into key pieces (split-K) merged exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <new>
#include <type_traits>
#include <utility>

#include "tpa/backend/backends.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/dispatch/split.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/softmax.hpp"
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
/// (n_q = 1) is cut along its keys into key pieces (split.min_work_per_piece; all KV heads each;
/// the partial online-softmax states are merged exactly afterwards in key order,
/// SoftmaxState::merge), a prefill call is one item per KV head. The line is cut into equal
/// pieces, one per worker, at whole key pieces or at query boundaries of a prefill KV head. So
/// batch-1 decode of any kind uses every thread, and a long prefill beside many decode tokens
/// is shared too.
///
/// Bit-identical with any thread count and split.max_workers, and for a call whatever the
/// other calls beside it: the key pieces of a decode call depend on that call alone, and a query
/// row's result does not depend on which worker computes it.
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
    constexpr Index kAlign = 16;  // key pieces tile-aligned

    // Multiply-adds of one (query, key) pair over `heads` KV heads of call p.
    auto pair_cost = [](const GroupedAttentionParams<S>& p, Index heads) {
      return static_cast<double>(heads * p.group_size() * (p.d_qk() + p.d_v));
    };
    // Key pieces of each decode call, and the first state slot of a call cut in several.
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
                                       pair_cost(p, p.n_kv_heads), kAlign);
        n_items += pieces[c].count;
        if (pieces[c].count > 1) {
          slot0[c] = n_slots;
          n_slots += pieces[c].count;
        }
      } else {
        n_items += p.n_kv_heads;
      }
    }
    if (n_items == 0) return;
    // The line of items: call, KV head (prefill) or key piece (decode), cumulative cost.
    auto* item_call = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* item_sub = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* cum = static_cast<double*>(scratch.bytes(sizeof(double) * (n_items + 1)));
    // An item's range of keys (decode piece: from the first key of the call's window) and its
    // cut item.
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
        const Index subs = p.n_q == 1 ? pieces[c].count : p.n_kv_heads;
        for (Index k = 0; k < subs; ++k, ++it) {
          item_call[it] = c;
          item_sub[it] = k;
          double cost;
          if (p.n_q == 1) {
            const auto r = piece_keys(c, k);
            cost = static_cast<double>(r.second - r.first) * pair_cost(p, p.n_kv_heads);
          } else {
            cost = detail::causal_pairs(p.n_q, p.q_pos0, p.variant.window) * pair_cost(p, 1);
          }
          cum[it + 1] = cum[it] + cost;
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
        return detail::CutItem{1, r.second - r.first - 1, pair_cost(p, p.n_kv_heads)};
      }
      return detail::CutItem{p.n_q, p.q_pos0, pair_cost(p, 1),
                             std::max<Index>(1, detail::kGroupedRowCap / p.group_size()),
                             p.variant.window};
    };
    auto* cuts = static_cast<detail::LineCut*>(scratch.bytes(sizeof(detail::LineCut) * (max_w + 1)));
    detail::cut_line(cum, n_items, workers, item_of, cuts);

    // Units of each worker, in line order: a key piece, a run of whole KV heads of a prefill
    // call, or the cut part of one KV head's queries.
    const Index max_units = n_items + max_w + 1;
    auto* units =
        static_cast<detail::GroupedUnit*>(scratch.bytes(sizeof(detail::GroupedUnit) * max_units));
    auto* first_unit = static_cast<Index*>(scratch.bytes(sizeof(Index) * (max_w + 1)));
    Index n_units = 0;
    for (Index w = 0; w < workers; ++w) {
      first_unit[w] = n_units;
      detail::for_each_piece(cuts, w, item_of, [&](Index it, Index pos0, Index pos1, bool whole) {
        const Index c = item_call[it], sub = item_sub[it];
        const auto& p = calls[c];
        detail::GroupedUnit u;
        u.call = c;
        if (p.n_q == 1) {
          const auto r = piece_keys(c, sub);
          u.part = GroupedPart{0, p.n_kv_heads, 0, 1, r.first, r.second};
          if (slot0[c] >= 0) u.slot = slot0[c] + sub;
          units[n_units++] = u;
        } else if (whole) {
          const Index g = sub;
          detail::GroupedUnit* prev = n_units > first_unit[w] ? &units[n_units - 1] : nullptr;
          if (prev != nullptr && prev->call == c && prev->part.g1 == g && prev->part.i0 == 0 &&
              prev->part.i1 == p.n_q) {
            prev->part.g1 = g + 1;  // extend the run of whole KV heads
          } else {
            u.part = GroupedPart{g, g + 1, 0, p.n_q, 0, p.q_pos0 + p.n_q};
            units[n_units++] = u;
          }
        } else {
          u.part = GroupedPart{sub, sub + 1, pos0, pos1, 0, p.q_pos0 + pos1};
          units[n_units++] = u;
        }
      });
    }
    first_unit[workers] = n_units;

    // Partial states of the key pieces and per-worker workspaces, the latter sized for the
    // largest call and max_w workers.
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
    detail::take_split_buffers(scratch, n_slots, max_w, state_rows, state_dim, ws_floats, &slots,
                               &ws);

    detail::run_units(ctx, workers, first_unit, units, ws, slots,
                      [calls](const detail::GroupedUnit& un, float* w, GroupedStates* st) {
                        K::grouped_attention_part(calls[un.call], un.part, w, st);
                      });

    // Merge the key pieces of each cut decode call in key order (the sinks join each row's
    // denominator once, here), write its outputs.
    for (Index c = 0; c < n_calls; ++c)
      if (slot0[c] >= 0)
        detail::merge_pieces(slots + slot0[c], pieces[c].count, calls[c].n_heads, calls[c].d_v,
                             calls[c].o, calls[c].variant.sinks);
  }
}

}  // namespace tpa
