// Work split of the grouped attention kernel over a Context's threads: (sequence × KV head)
// units cut along their queries, and decode calls cut into key pieces (split-K) merged exactly.
#pragma once

#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "tpa/backend/backends.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/dispatch/schedule.hpp"
#include "tpa/dispatch/split.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/params.hpp"
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

/// The grouped kernels of kernel set K as run_schedule's Kind: a prefill call is one item per KV
/// head, and whole KV heads of one call next to each other join into one part.
template <class K, class S>
struct GroupedSchedule {
  using Params = GroupedAttentionParams<S>;
  using Part = GroupedPart;
  static constexpr bool kHasPart = HasGroupedPart<K, S>::value;
  static constexpr Index kAlign = 16;  // key pieces tile-aligned

  // Multiply-adds of one (query, key) pair over `heads` KV heads of call p.
  static double pair_cost(const Params& p, Index heads) {
    return static_cast<double>(heads * p.group_size() * (p.d_qk() + p.d_v));
  }
  static double decode_pair_cost(const Params& p) { return pair_cost(p, p.n_kv_heads); }
  static double prefill_pair_cost(const Params& p) { return pair_cost(p, 1); }
  static Index prefill_items(const Params& p) { return p.n_kv_heads; }
  static Index quantum(const Params& p) {
    return std::max<Index>(1, kGroupedRowCap / p.group_size());
  }
  static Part decode_part(const Params& p, Index k0, Index k1) {
    return GroupedPart{0, p.n_kv_heads, 0, 1, k0, k1};
  }
  static Part prefill_part(const Params& p, Index g, Index i0, Index i1) {
    return GroupedPart{g, g + 1, i0, i1, 0, p.q_pos0 + i1};
  }
  static bool extend(Part& prev, const Part& next) {
    if (prev.g1 != next.g0 || prev.i0 != next.i0 || prev.i1 != next.i1) return false;
    prev.g1 = next.g1;  // extend the run of whole KV heads
    return true;
  }
  static Index workspace_floats(const Params& p, const Part& part) {
    return K::grouped_workspace_floats(p, part);
  }
  static void run(const Params& p, const Part& part, float* ws, const GroupedStates* states) {
    K::grouped_attention_part(p, part, ws, states);
  }
  static void run_whole(const Params& p) { K::grouped_attention(p); }
  static Index value_dim(const Params& p) { return p.d_v; }
};

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
  for (Index c = 0; c < n_calls; ++c) detail::check_grouped_call(calls[c], c);
  detail::run_schedule<detail::GroupedSchedule<Kernels<Backend>, S>>(ctx, calls, n_calls, split);
}

}  // namespace tpa
