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

/// One worker's piece of one call; `slot` ≥ 0: a key-split piece whose states go to slot.
struct TpaUnit {
  Index call = 0;
  TpaPart part;
  Index slot = -1;
};

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
      const double pairs = static_cast<double>(p.n_q) * static_cast<double>(p.q_pos0) +
                           0.5 * static_cast<double>(p.n_q) * static_cast<double>(p.n_q + 1);
      cum[c + 1] = cum[c] + pairs * detail::tpa_pair_cost(p);
    }
    const double total = cum[n_calls];
    if (total == 0) return;
    // Scratch below is sized for max_w workers whatever the actual count, so that its size does
    // not depend on the sequence lengths (a steady decode never grows the arena).
    const Index max_w = split.max_workers > 0 ? split.max_workers : ctx.threads();
    Index workers = max_w;
    if (split.min_work_per_worker > 0)
      workers = std::max<Index>(
          1, std::min<Index>(workers, static_cast<Index>(total / split.min_work_per_worker)));

    // Size of a call along its cut dimension: keys (decode) or queries (prefill).
    auto size_of = [&](Index c) {
      const auto& p = calls[c];
      return p.n_q == 1 ? p.q_pos0 + 1 : p.n_q;
    };
    // Cut w of the line as (call, position inside it), normalised so position < size.
    struct Cut {
      Index call, pos;
    };
    auto* cuts = static_cast<Cut*>(scratch.bytes(sizeof(Cut) * (max_w + 1)));
    cuts[0] = Cut{0, 0};
    cuts[workers] = Cut{n_calls, 0};
    for (Index w = 1; w < workers; ++w) {
      const double x = total * static_cast<double>(w) / static_cast<double>(workers);
      Index c = static_cast<Index>(std::upper_bound(cum, cum + n_calls + 1, x) - cum) - 1;
      c = std::min(std::max<Index>(c, 0), n_calls - 1);
      const auto& p = calls[c];
      const double off = (x - cum[c]) / detail::tpa_pair_cost(p);  // (query, key) pairs
      Index pos;
      if (p.n_q == 1) {
        constexpr Index kAlign = 64;  // keep key pieces tile-aligned
        pos = static_cast<Index>(std::llround(off / kAlign)) * kAlign;
      } else {
        // First query boundary whose prefix Σ_{i'<i} (q_pos0 + i' + 1) reaches off.
        double acc = 0;
        pos = 0;
        while (pos < p.n_q && acc < off) acc += static_cast<double>(p.q_pos0 + ++pos);
      }
      pos = std::min(std::max<Index>(pos, 0), size_of(c));
      cuts[w] = pos == size_of(c) ? Cut{c + 1, 0} : Cut{c, pos};
      if (cuts[w].call < cuts[w - 1].call ||
          (cuts[w].call == cuts[w - 1].call && cuts[w].pos < cuts[w - 1].pos))
        cuts[w] = cuts[w - 1];
    }

    // A worker's units: the calls inside its segment whole, plus a cut piece at each end.
    const Index max_units = n_calls + 2 * max_w + 2;
    auto* units = static_cast<detail::TpaUnit*>(scratch.bytes(sizeof(detail::TpaUnit) * max_units));
    auto* first_unit = static_cast<Index*>(scratch.bytes(sizeof(Index) * (max_w + 1)));
    Index n_units = 0, n_slots = 0;
    for (Index w = 0; w < workers; ++w) {
      first_unit[w] = n_units;
      Cut at = cuts[w];
      const Cut end = cuts[w + 1];
      while (at.call < end.call || (at.call == end.call && at.pos < end.pos)) {
        const Index c = at.call;
        const auto& p = calls[c];
        const Index size = size_of(c);
        const Index stop = c == end.call ? end.pos : size;
        if (p.n_q > 0) {
          detail::TpaUnit u;
          u.call = c;
          if (at.pos == 0 && stop == size) {
            u.part = TpaPart::whole(p);
          } else if (p.n_q == 1) {
            u.part = TpaPart{0, 1, at.pos, stop};
            u.slot = n_slots++;
          } else {
            u.part = TpaPart{at.pos, stop, 0, p.q_pos0 + stop};
          }
          units[n_units++] = u;
        }
        at = Cut{c + 1, 0};
      }
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
    auto* slots = static_cast<TpaStates*>(scratch.bytes(sizeof(TpaStates) * 2 * max_w));
    for (Index i = 0; i < 2 * max_w; ++i) {
      slots[i].m = scratch.floats(state_rows);
      slots[i].l = scratch.floats(state_rows);
      slots[i].acc = scratch.floats(state_rows * state_dim);
      slots[i].acc_stride = state_dim;
    }
    auto* ws = static_cast<float**>(scratch.bytes(sizeof(float*) * max_w));
    for (Index w = 0; w < max_w; ++w) ws[w] = scratch.floats(ws_floats);

    ctx.parallel_for(workers, [=](Index w) {
      for (Index u = first_unit[w]; u < first_unit[w + 1]; ++u) {
        const detail::TpaUnit& un = units[u];
        K::tpa_attention_part(calls[un.call], un.part, ws[w],
                              un.slot >= 0 ? &slots[un.slot] : nullptr);
      }
    });

    // Merge the key pieces of each split call (consecutive units) and write its outputs.
    for (Index u = 0; u < n_units;) {
      if (units[u].slot < 0) {
        ++u;
        continue;
      }
      const detail::TpaUnit& first = units[u];
      const auto& p = calls[first.call];
      const TpaStates& a = slots[first.slot];
      Index v = u + 1;
      while (v < n_units && units[v].slot >= 0 && units[v].call == first.call) ++v;
      for (Index h = 0; h < p.n_heads; ++h) {
        SoftmaxState sa;
        sa.m = a.m[h];
        sa.l = a.l[h];
        sa.acc = a.acc + h * a.acc_stride;
        sa.dim = p.head_dim;
        for (Index x = u + 1; x < v; ++x) {
          const TpaStates& b = slots[units[x].slot];
          SoftmaxState sb;
          sb.m = b.m[h];
          sb.l = b.l[h];
          sb.acc = b.acc + h * b.acc_stride;
          sb.dim = p.head_dim;
          sa.merge(sb);
        }
        sa.normalize(p.o + h * p.head_dim);
      }
      u = v;
    }
  }
}

}  // namespace tpa
