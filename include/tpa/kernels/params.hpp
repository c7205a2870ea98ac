// Parameter structs of the attention kernels: pointers, strides and sizes of one sequence's
// work, so the same kernel serves prefill, chunked prefill and decode.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>

#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief Score variants of one kernel call (the kernels' view of AttentionVariant; README,
/// "Attention variants"). All off by default, and then the kernels run their plain code. For
/// the query at position p, head h and a key t it sees:
///
///     z = scale · q·k_t;   z ← softcap·tanh(z / softcap)  (softcap > 0);
///     z ← z − alibi[h]·(p − t)  (alibi non-null);
///     o = Σ_t e^(z_t − m) v_t / (Σ_t e^(z_t − m) + e^(sinks[h] − m))  (sinks non-null).
///
/// With window = W > 0 the query sees keys max(0, p − W + 1) … p only: the kernels do not visit
/// the keys before (whole tiles are skipped, the boundary tile is masked), so those may have
/// been released from the cache (KVCache::drop_before), down to kv.first_token.
struct ScoreVariant {
  Index window = 0;              ///< W ≥ 1, or 0: no window
  float softcap = 0.f;           ///< c > 0 and finite, or 0: off
  const float* alibi = nullptr;  ///< [n_heads] ALiBi slopes, or null: off
  const float* sinks = nullptr;  ///< [n_heads] sink logits (may be ±inf), or null: off

  /// Whether the scores are post-processed (soft-cap or ALiBi).
  bool transforms_scores() const { return softcap > 0.f || alibi != nullptr; }
  /// Whether any variant is on.
  bool any() const { return window > 0 || transforms_scores() || sinks != nullptr; }
  /// First key the query at position `pos` sees.
  Index first_key(Index pos) const { return window > 0 ? std::max<Index>(0, pos - window + 1) : 0; }

  /// \throws Error if window < 0, softcap is not finite or < 0, or the first key of the query
  /// at q_pos0 lies before `first_token` (released from the cache). `who` prefixes the message.
  void check(const char* who, Index q_pos0, Index first_token) const {
    TPA_CHECK(window >= 0, who, ": variant.window (", window, ") must be >= 0 (0: no window)");
    TPA_CHECK(softcap >= 0.f && softcap < std::numeric_limits<float>::infinity(), who,
              ": variant.softcap (", softcap, ") must be finite and >= 0 (0: off)");
    TPA_CHECK(first_key(q_pos0) >= first_token, who, ": the query at position ", q_pos0,
              " needs keys from position ", first_key(q_pos0), " but the cache released the "
              "tokens before ", first_token, " (KVCache::drop_before)",
              window > 0 ? "" : "; a layer without a window needs every key");
  }
};

/// \brief Causal attention of one sequence's queries over its cached keys and values, with
/// `n_heads / n_kv_heads` consecutive query heads sharing one KV head (MHA, GQA, MQA, and MLA
/// in its absorbed form).
///
/// The key of KV head g at token t is the concatenation of up to two parts: part j is the first
/// k_dims[j] elements of row g of factor k_factor[j], kv.row_at(k_factor[j], t, g). The value is
/// the first d_v elements of kv.row_at(v_factor, t, g). Those factors have n_kv_heads rows (one
/// per KV head) in any placement (TileOrder). Query i (0 ≤ i < n_q) sits at position q_pos0 + i
/// and sees keys 0 … q_pos0 + i, all of which must be cached (q_pos0 + n_q ≤ kv.n_tokens) — or,
/// with variant.window = W, keys max(0, q_pos0 + i − W + 1) … q_pos0 + i (ScoreVariant).
template <class S>
struct GroupedAttentionParams {
  const float* q = nullptr;  ///< [n_q, n_heads, d_qk], token i at q + i·q_stride
  Index q_stride = 0;
  float* o = nullptr;  ///< [n_q, n_heads, d_v], token i at o + i·o_stride
  Index o_stride = 0;
  Index n_q = 0;
  Index q_pos0 = 0;
  Index n_heads = 0;
  Index n_kv_heads = 0;
  std::size_t k_factor[2] = {0, 0};
  Index k_dims[2] = {0, 0};  ///< k_dims[1] = 0: the key has one part
  std::size_t v_factor = 1;
  Index d_v = 0;
  float scale = 1.f;
  SeqView<S> kv;
  ScoreVariant variant;  ///< window, soft-cap, ALiBi, sinks (off by default)

  Index d_qk() const { return k_dims[0] + k_dims[1]; }
  Index group_size() const { return n_heads / n_kv_heads; }
};

/// \brief Causal Tensor Product Attention of one sequence's queries over its cached factors
/// (SPEC.md, "TPA"). The kernel sees factors only: it must never need per-head K or V in the
/// cache, and a fast kernel should not build them (DESIGN.md, "Kernels", FlashTPA order).
///
/// Key/value side. Token t of `kv` (0 ≤ t < kv.n_tokens) holds four factors, each row-major
/// and contiguous per token (TileOrder::kTokenMajor, or a single row; the kernels read a
/// token's factor whole), row r at kv.row_at(factor, t, r):
///
///     A_K [n_heads, k_rank]    factor a_k_factor
///     B_K [k_rank, head_dim]   factor b_k_factor (already rotated to position t)
///     A_V [n_heads, v_rank]    factor a_v_factor
///     B_V [v_rank, head_dim]   factor b_v_factor
///
/// and defines, for head h,  k_h(t) = (1/k_rank) Σ_s A_K[h,s] B_K[s]  and
/// v_h(t) = (1/v_rank) Σ_s A_V[h,s] B_V[s].
///
/// Query side. Query i (0 ≤ i < n_q) is the token at position q_pos0 + i. Either
///
///  - factored (q_rank ≥ 1): A_Q [n_heads, q_rank] at a_q + i·a_q_stride and the rotated
///    B_Q [q_rank, head_dim] at b_q + i·b_q_stride;  q_h = (1/q_rank) Σ_r A_Q[h,r] B_Q[r];
///  - full (q_rank == 0): q [n_heads, head_dim] at q + i·q_stride, already rotated (the
///    K/V-only variant).
///
/// Output: o_h = Σ_{t ≤ q_pos0+i} softmax_t(scale · q_h·k_h(t)) · v_h(t), written as
/// [n_heads, head_dim] at o + i·o_stride. All keys a query sees must be cached:
/// q_pos0 + n_q ≤ kv.n_tokens (keys past q_pos0 + i are masked, not read). `variant` adds a
/// window, soft-cap, ALiBi and sinks to the scores and the softmax (ScoreVariant).
///
/// In factor form (what a FlashTPA kernel computes, contracting B_Q with B_K first):
///
///     score(h, t) = qk_scale() · Σ_{r,s} A_Q[h,r] A_K(t)[h,s] (B_Q[r] · B_K(t)[s])
///     o_h         = v_scale()  · Σ_t Σ_s (p(h, t) A_V(t)[h,s]) B_V(t)[s]
///
/// with p the softmax over t of the scores: per key token, the [n_heads, v_rank] weights
/// p ⊙ A_V(t) times B_V(t) [v_rank, head_dim] — the value side as "(p · A_V) · B_V".
///
/// The factors need not come from a projection of the token: MHA/MQA/GQA are the special case
/// A[h, g] = G·[g == g(h)] with k_rank = v_rank = G and B = the GQA keys/values (SPEC.md
/// Section 4 equivalence); the tests feed such factors through this struct.
///
/// \tparam S storage scalar of the cached factors (float, bfloat16, half); kernels widen to f32.
template <class S>
struct TpaAttentionParams {
  // Query side: factored (q_rank ≥ 1) or full (q_rank == 0).
  Index q_rank = 0;            ///< R_Q; 0 selects the full query `q`
  const float* a_q = nullptr;  ///< [n_q, n_heads, q_rank], token i at a_q + i·a_q_stride
  Index a_q_stride = 0;
  const float* b_q = nullptr;  ///< [n_q, q_rank, head_dim] rotated, token i at b_q + i·b_q_stride
  Index b_q_stride = 0;
  const float* q = nullptr;  ///< [n_q, n_heads, head_dim] rotated, token i at q + i·q_stride
  Index q_stride = 0;

  float* o = nullptr;  ///< [n_q, n_heads, head_dim], token i at o + i·o_stride
  Index o_stride = 0;

  Index n_q = 0;       ///< queries (tokens) of this call
  Index q_pos0 = 0;    ///< position of query 0; query i sees keys 0 … q_pos0 + i
  Index n_heads = 0;   ///< H
  Index head_dim = 0;  ///< d (queries, keys and values)
  Index k_rank = 0;    ///< R_K
  Index v_rank = 0;    ///< R_V

  // Key/value side: which factor of the layer's cache layout holds what.
  std::size_t a_k_factor = 0;  ///< A_K [n_heads, k_rank]
  std::size_t b_k_factor = 1;  ///< B_K [k_rank, head_dim], rotated
  std::size_t a_v_factor = 2;  ///< A_V [n_heads, v_rank]
  std::size_t b_v_factor = 3;  ///< B_V [v_rank, head_dim]

  float scale = 1.f;  ///< softmax scale (typically 1/sqrt(head_dim))
  SeqView<S> kv;      ///< the cached tokens of the sequence
  ScoreVariant variant;  ///< window, soft-cap, ALiBi, sinks (off by default)

  bool factored_query() const { return q_rank > 0; }
  /// Keys query i sees: q_pos0 + i + 1.
  Index n_keys(Index i) const { return q_pos0 + i + 1; }
  /// Multiplier of the rank-space score sum: scale / (R_Q·R_K), or scale / R_K for a full q.
  double qk_scale() const {
    return static_cast<double>(scale) /
           (static_cast<double>(factored_query() ? q_rank : 1) * static_cast<double>(k_rank));
  }
  /// Multiplier of the value sum: 1 / R_V.
  double v_scale() const { return 1.0 / static_cast<double>(v_rank); }

  /// \throws Error if the sizes are inconsistent: a null pointer the query mode needs, a rank
  /// or size < 1, a cached factor whose shape does not match or that is not contiguous per
  /// token, or q_pos0 + n_q > kv.n_tokens. `who` prefixes the message. O(1).
  void check(const char* who) const {
    TPA_CHECK(n_q >= 0 && q_pos0 >= 0, who, ": n_q (", n_q, ") and q_pos0 (", q_pos0,
              ") must be >= 0");
    TPA_CHECK(n_heads >= 1 && head_dim >= 1 && k_rank >= 1 && v_rank >= 1 && q_rank >= 0, who,
              ": sizes must be >= 1 (n_heads ", n_heads, ", head_dim ", head_dim, ", k_rank ",
              k_rank, ", v_rank ", v_rank, ", q_rank ", q_rank, " >= 0)");
    TPA_CHECK(q_pos0 + n_q <= kv.n_tokens, who, ": queries reach position ", q_pos0 + n_q - 1,
              " but only ", kv.n_tokens, " tokens are cached");
    if (n_q == 0) return;
    variant.check(who, q_pos0, kv.first_token);
    TPA_CHECK(o != nullptr, who, ": o is null");
    if (factored_query()) {
      TPA_CHECK(a_q != nullptr && b_q != nullptr, who, ": factored query needs a_q and b_q");
    } else {
      TPA_CHECK(q != nullptr, who, ": full query (q_rank 0) needs q");
    }
    TPA_CHECK(kv.places != nullptr, who, ": kv view is empty");
    auto shape_is = [&](std::size_t f, Index rows, Index cols) {
      return kv.rows(f) == rows && kv.cols(f) == cols;
    };
    TPA_CHECK(shape_is(a_k_factor, n_heads, k_rank) && shape_is(b_k_factor, k_rank, head_dim) &&
                  shape_is(a_v_factor, n_heads, v_rank) && shape_is(b_v_factor, v_rank, head_dim),
              who, ": cached factor shapes ([", kv.rows(a_k_factor), ", ", kv.cols(a_k_factor),
              "], [", kv.rows(b_k_factor), ", ", kv.cols(b_k_factor), "], [",
              kv.rows(a_v_factor), ", ", kv.cols(a_v_factor), "], [", kv.rows(b_v_factor), ", ",
              kv.cols(b_v_factor), "]) do not match A_K [", n_heads, ", ", k_rank, "], B_K [",
              k_rank, ", ", head_dim, "], A_V [", n_heads, ", ", v_rank, "], B_V [", v_rank, ", ",
              head_dim, "]");
    TPA_CHECK(kv.place(a_k_factor).token_contiguous() &&
                  kv.place(b_k_factor).token_contiguous() &&
                  kv.place(a_v_factor).token_contiguous() &&
                  kv.place(b_v_factor).token_contiguous(),
              who, ": the cached factors must be contiguous per token (TileOrder::kTokenMajor)");
  }
};

}  // namespace tpa
