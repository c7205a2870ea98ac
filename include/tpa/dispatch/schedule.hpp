// The driver both attention schedulers (grouped_attention, tpa_attention) run: lay a batch of
// calls out as a line of items weighted by their multiply-adds, cut the line over the workers,
// run each worker's parts on ctx's threads, and merge the key pieces of split decode calls.
#pragma once

#include <algorithm>
#include <cstddef>
#include <utility>

#include "tpa/core/tensor.hpp"
#include "tpa/dispatch/split.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/score_variant.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {
namespace detail {

/// \brief Runs calls[0 … n_calls) (already checked) with the kernels of one family, spread over
/// ctx's threads as grouped_attention and tpa_attention describe: a decode call (n_q = 1) is cut
/// into key pieces (key_pieces, on multiples of Kind::kAlign) whose partial states are merged
/// exactly in key order afterwards; a prefill call is Kind::prefill_items(p) items; the line of
/// items is cut into equal pieces, one per worker (cut_line). Bit-identical for any thread count
/// and split.max_workers. Workspace and states come from ctx.scratch(), released on return.
///
/// \tparam Kind the kernel family, with static members:
///   - `Params`, `Part`: its call and part types; `kHasPart`: whether the backend has a part
///     kernel (else each call runs whole, one per task, through `run_whole(p)`);
///   - `kAlign`: key pieces start on multiples of it (the kernel's key tile);
///   - `decode_pair_cost(p)`, `prefill_pair_cost(p)`: multiply-adds of one (query, key) pair of
///     a decode call, and of one prefill item;
///   - `prefill_items(p)`: items of a prefill call (one per KV head, or one);
///   - `quantum(p)`: queries per pass of the kernel (CutItem::quantum);
///   - `decode_part(p, k0, k1)`: all of a decode call over keys [k0, k1);
///   - `prefill_part(p, item, i0, i1)`: queries [i0, i1) of prefill item `item`;
///   - `extend(prev, next)`: grows unit part `prev` of a call by the adjacent whole item `next`
///     of the same call and returns true, or returns false (then `next` is a unit of its own);
///   - `workspace_floats(p, part)`, `run(p, part, workspace, states)`: the part kernel;
///   - `value_dim(p)`: the length of an output row.
template <class Kind>
void run_schedule(Context& ctx, const typename Kind::Params* calls, Index n_calls,
                  const GroupedSplit& split) {
  using Part = typename Kind::Part;
  using Unit = SplitUnit<Part>;
  if constexpr (!Kind::kHasPart) {
    ctx.parallel_for(n_calls, [calls](Index c) {
      if (calls[c].n_q > 0) Kind::run_whole(calls[c]);
    });
  } else {
    Scratch& scratch = ctx.scratch();
    ScratchGuard guard(scratch);

    // Key pieces of each decode call, and the first state slot of a call cut in several.
    auto* pieces = static_cast<KeyPieces*>(
        scratch.bytes(sizeof(KeyPieces) * static_cast<std::size_t>(n_calls)));
    auto* slot0 =
        static_cast<Index*>(scratch.bytes(sizeof(Index) * static_cast<std::size_t>(n_calls)));
    Index n_items = 0, n_slots = 0;
    for (Index c = 0; c < n_calls; ++c) {
      const auto& p = calls[c];
      slot0[c] = -1;
      if (p.n_q == 0) continue;
      if (p.n_q == 1) {
        pieces[c] = key_pieces(split, p.q_pos0 + 1 - p.variant.first_key(p.q_pos0),
                               Kind::decode_pair_cost(p), Kind::kAlign);
        n_items += pieces[c].count;
        if (pieces[c].count > 1) {
          slot0[c] = n_slots;
          n_slots += pieces[c].count;
        }
      } else {
        n_items += Kind::prefill_items(p);
      }
    }
    if (n_items == 0) return;
    // The line of items: call, prefill item or key piece, cumulative cost.
    auto* item_call = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* item_sub = static_cast<Index*>(scratch.bytes(sizeof(Index) * n_items));
    auto* cum = static_cast<double*>(scratch.bytes(sizeof(double) * (n_items + 1)));
    // A decode piece's range of keys, from the first key of the call's window.
    auto piece_keys = [&](Index c, Index k) {
      const Index end = calls[c].q_pos0 + 1, k0 = calls[c].variant.first_key(calls[c].q_pos0);
      return std::make_pair(k0 + pieces[c].begin(k), std::min(end, k0 + pieces[c].begin(k + 1)));
    };
    cum[0] = 0;
    {
      Index it = 0;
      for (Index c = 0; c < n_calls; ++c) {
        const auto& p = calls[c];
        if (p.n_q == 0) continue;
        const Index subs = p.n_q == 1 ? pieces[c].count : Kind::prefill_items(p);
        for (Index k = 0; k < subs; ++k, ++it) {
          item_call[it] = c;
          item_sub[it] = k;
          double cost;
          if (p.n_q == 1) {
            const auto r = piece_keys(c, k);
            cost = static_cast<double>(r.second - r.first) * Kind::decode_pair_cost(p);
          } else {
            cost = causal_pairs(p.n_q, p.q_pos0, p.variant.window) * Kind::prefill_pair_cost(p);
          }
          cum[it + 1] = cum[it] + cost;
        }
      }
    }
    const WorkerCount wc = worker_count(split, ctx.threads(), cum[n_items]);
    const Index max_w = wc.max_w, workers = wc.used;
    auto item_of = [&](Index it) {
      const Index c = item_call[it];
      const auto& p = calls[c];
      if (p.n_q == 1) {
        const auto r = piece_keys(c, item_sub[it]);
        return CutItem{1, r.second - r.first - 1, Kind::decode_pair_cost(p)};
      }
      return CutItem{p.n_q, p.q_pos0, Kind::prefill_pair_cost(p), Kind::quantum(p),
                     p.variant.window};
    };
    auto* cuts = static_cast<LineCut*>(scratch.bytes(sizeof(LineCut) * (max_w + 1)));
    cut_line(cum, n_items, workers, item_of, cuts);

    // Units of each worker, in line order: a key piece, a run of whole prefill items of one call
    // (Kind::extend), or the cut part of one prefill item's queries.
    const Index max_units = n_items + max_w + 1;
    auto* units = static_cast<Unit*>(scratch.bytes(sizeof(Unit) * max_units));
    auto* first_unit = static_cast<Index*>(scratch.bytes(sizeof(Index) * (max_w + 1)));
    Index n_units = 0;
    for (Index w = 0; w < workers; ++w) {
      first_unit[w] = n_units;
      for_each_piece(cuts, w, item_of, [&](Index it, Index pos0, Index pos1, bool whole) {
        const Index c = item_call[it], sub = item_sub[it];
        const auto& p = calls[c];
        Unit u;
        u.call = c;
        if (p.n_q == 1) {
          const auto r = piece_keys(c, sub);
          u.part = Kind::decode_part(p, r.first, r.second);
          if (slot0[c] >= 0) u.slot = slot0[c] + sub;
        } else {
          u.part = Kind::prefill_part(p, sub, pos0, pos1);
          Unit* prev = n_units > first_unit[w] ? &units[n_units - 1] : nullptr;
          if (whole && prev != nullptr && prev->call == c && Kind::extend(prev->part, u.part))
            return;
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
      ws_floats = std::max(ws_floats, Kind::workspace_floats(p, Part::whole(p)));
      if (p.n_q == 1) state_rows = std::max(state_rows, p.n_heads);
      state_dim = std::max(state_dim, Kind::value_dim(p));
    }
    GroupedStates* slots = nullptr;
    float** ws = nullptr;
    take_split_buffers(scratch, n_slots, max_w, state_rows, state_dim, ws_floats, &slots, &ws);

    run_units(ctx, workers, first_unit, units, ws, slots,
              [calls](const Unit& un, float* w, GroupedStates* st) {
                Kind::run(calls[un.call], un.part, w, st);
              });

    // Merge the key pieces of each cut decode call in key order (the sinks join each row's
    // denominator once, here), write its outputs.
    for (Index c = 0; c < n_calls; ++c)
      if (slot0[c] >= 0)
        merge_pieces(slots + slot0[c], pieces[c].count, calls[c].n_heads,
                     Kind::value_dim(calls[c]), calls[c].o, calls[c].variant.sinks);
  }
}

}  // namespace detail
}  // namespace tpa
