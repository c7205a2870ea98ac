// Configuration structs of the attention kinds, with validation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <vector>

#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// Most elements one weight matrix (or one folded weight, or one token's cached factors) of a
/// config may hold: 2^40. validate() rejects configs past it, so that no size computed from the
/// config's fields can overflow.
inline constexpr Index kMaxConfigElements = Index(1) << 40;

/// Most bytes the RoPE table (cos and sin, float) of a config may take: 1 GiB, i.e.
/// rope.max_positions × max(rotary dim, 2) × 4 ≤ 2^30 (e.g. 2M positions for rotary dim 128).
inline constexpr Index kMaxRopeTableBytes = Index(1) << 30;

namespace detail {

/// Whether the product of `factors` (each ≥ 0) is at most `limit`; computed without overflow.
inline bool product_at_most(Index limit, std::initializer_list<Index> factors) {
  Index p = 1;
  for (const Index f : factors) {
    if (f != 0 && p > limit / f) return false;
    p *= f;
  }
  return p <= limit;
}

/// \throws Error unless the product of `factors` (each ≥ 0) is at most kMaxConfigElements;
/// `what` names the weight and how its size is computed (or the one field).
inline void check_elements(const char* who, const char* what,
                           std::initializer_list<Index> factors) {
  if (product_at_most(kMaxConfigElements, factors)) return;
  if (factors.size() == 1) fail(who, ": ", what, " (", *factors.begin(), ") must be <= 2^40");
  std::ostringstream os;
  const char* sep = "";
  for (const Index f : factors) {
    os << sep << f;
    sep = " x ";
  }
  fail(who, ": ", what, " (", os.str(), ") would hold more than 2^40 elements");
}

}  // namespace detail

/// How the rotary part of a vector is split into pairs and which way it turns (SPEC.md, RoPE).
enum class RopeStyle {
  kHalfSplit,          ///< pairs (x_i, x_{i+r/2}), angle +p·θ_i (HF LLaMA / GPT-NeoX)
  kHalfSplitReversed,  ///< pairs (x_i, x_{i+r/2}), angle −p·θ_i (model/T6.py, llama-gqa.py)
  kInterleaved,        ///< pairs (x_{2i}, x_{2i+1}), angle +p·θ_i (model/T6_infer.py, Meta LLaMA)
  kNone,               ///< RoPE off (NoPE layers, ALiBi models): nothing rotates, and positions
                       ///< are bounded only by the cache, not by a table
};

inline const char* rope_style_name(RopeStyle s) {
  switch (s) {
    case RopeStyle::kHalfSplit: return "half-split";
    case RopeStyle::kHalfSplitReversed: return "half-split-reversed";
    case RopeStyle::kInterleaved: return "interleaved";
    case RopeStyle::kNone: return "none";
  }
  return "unknown";
}

/// Rotary position embedding settings. θ_i = base^(−2i/r), i = 0 … r/2−1.
struct RopeConfig {
  RopeStyle style = RopeStyle::kHalfSplitReversed;  ///< kNone turns RoPE off for the layer
  double base = 10000.0;
  Index rotary_dim = 0;        ///< r: number of leading dims that rotate (even); 0 = all of them
  Index max_positions = 4096;  ///< table length: positions 0 … max_positions−1 are valid;
                               ///< at most 2^28 / max(rotary dim, 2) (kMaxRopeTableBytes);
                               ///< ignored (no bound) when style is kNone
  // RoPE with decay (model/T6_partialrope_decay.py, llama-gqa-partialrope-decay.py).
  double decay_base = 1.0;  ///< the rotated dims of every query- and key-side row at position p
                            ///< are also multiplied by decay_base^(p·θ_i); in (0, 1], 1 = off

  /// Rotary dim for vectors of size `dim`: rotary_dim, or dim when rotary_dim is 0; 0 when RoPE
  /// is off (style kNone).
  Index resolved_dim(Index dim) const {
    if (style == RopeStyle::kNone) return 0;
    return rotary_dim == 0 ? dim : rotary_dim;
  }
  /// Whether the rotated dims decay with the position (decay_base ≠ 1).
  bool has_decay() const { return decay_base != 1.0; }
  /// Floats the RoPE table keeps per position: cos and sin (r/2 each), and with decay the decay
  /// factors (r/2 more); 0 when RoPE is off.
  Index table_floats_per_position(Index dim) const {
    const Index r = resolved_dim(dim);
    return has_decay() ? r + r / 2 : r;
  }

  /// \throws Error if style is not a RopeStyle value; if decay_base is not finite or not in
  /// (0, 1] (or ≠ 1 with RoPE off); and unless RoPE is off (kNone, whose other fields are then
  /// ignored): if base ≤ 0, max_positions < 1, the resolved rotary dim is odd, negative or larger
  /// than `dim` (the size of the vectors it rotates, ≥ 0), or the table (max_positions ×
  /// table_floats_per_position floats) would exceed kMaxRopeTableBytes (1 GiB). `who` prefixes
  /// the message.
  void validate(const char* who, Index dim) const {
    TPA_CHECK(dim >= 0, who, ": the rotated head dim (", dim, ") must be >= 0");
    TPA_CHECK(style == RopeStyle::kHalfSplit || style == RopeStyle::kHalfSplitReversed ||
                  style == RopeStyle::kInterleaved || style == RopeStyle::kNone,
              who, ": rope.style (", static_cast<int>(style), ") is not a RopeStyle value");
    // decay_base^(p·θ) = exp(p·θ·ln decay_base): ln needs a base > 0, and a base > 1 would grow
    // without bound with the position (overflow to inf); NaN/inf give no factor at all.
    TPA_CHECK(std::isfinite(decay_base) && decay_base > 0 && decay_base <= 1, who,
              ": rope.decay_base (", decay_base,
              ") must be finite and in (0, 1] (1 = no decay): the rotated dims at position p are "
              "multiplied by decay_base^(p*theta_i), which needs a base > 0 and would grow "
              "without bound for a base > 1");
    if (style == RopeStyle::kNone) {
      TPA_CHECK(!has_decay(), who, ": rope.decay_base (", decay_base,
                ") must be 1 when rope.style is none: decay scales the rotated dims, and "
                "nothing rotates");
      return;
    }
    TPA_CHECK(std::isfinite(base) && base > 0, who, ": rope.base (", base, ") must be > 0");
    TPA_CHECK(max_positions >= 1, who, ": rope.max_positions (", max_positions, ") must be >= 1");
    TPA_CHECK(rotary_dim >= 0, who, ": rope.rotary_dim (", rotary_dim, ") must be >= 0");
    const Index r = resolved_dim(dim);
    TPA_CHECK(r % 2 == 0, who, ": rotary dim (", r, ") must be even");
    TPA_CHECK(r <= dim, who, ": rope.rotary_dim (", r, ") is larger than the rotated head dim (",
              dim, ")");
    // Checked first so that table_floats_per_position (r + r/2) cannot overflow.
    TPA_CHECK(r <= kMaxRopeTableBytes / static_cast<Index>(sizeof(float)) / 2, who,
              ": rotary dim (", r, ") is too large: one position of its RoPE table would take "
              "more than 1 GiB");
    const Index per_position = std::max<Index>(table_floats_per_position(dim), 2);
    const Index max_rows = kMaxRopeTableBytes / static_cast<Index>(sizeof(float)) / per_position;
    TPA_CHECK(max_positions <= max_rows, who, ": rope.max_positions (", max_positions,
              ") is too large: its RoPE table (max_positions x ", per_position,
              " floats: cos and sin", has_decay() ? " and decay" : "", " for rotary dim ", r,
              ") may take at most 1 GiB, i.e. at most ", max_rows, " positions");
  }
};

// ---- Attention variants (issue 25, items 1-4: window, sinks, soft-cap, ALiBi) -------------

/// \brief Score variants of one attention layer (README, "Attention variants"). All are off by
/// default, and an off variant costs nothing. With z_t the score of key t for query position p
/// and head h:
///
///     z_t = scale · q·k_t                              (the plain score)
///     z_t ← c · tanh(z_t / c)                          logit_softcap = c (after the scale)
///     z_t ← z_t − m_h · (p − t)                        alibi, slope m_h
///     keys t ∈ (p − W, p] only                         window = W (else t ∈ [0, p])
///     o = Σ_t e^(z_t − m) v_t / (Σ_t e^(z_t − m) + e^(σ_h − m))   sinks σ [H], m = max(z, σ_h)
struct AttentionVariant {
  /// Sliding window W ≥ 1: the query at position p sees keys p − W + 1 … p. Unset: every
  /// earlier key (plain causal).
  std::optional<Index> window;
  /// Learned attention sinks: one logit per head in the softmax denominator (weight `sinks`
  /// [n_heads], as GPT-OSS stores it).
  bool sinks = false;
  /// Logit soft-cap c > 0 (finite or +inf): z ← c·tanh(z/c) after the softmax scale. Unset: off.
  std::optional<float> logit_softcap;
  /// ALiBi bias −m_h·(p − t) on the score of key t for the query at p.
  bool alibi = false;
  /// ALiBi slopes m_h [n_heads], finite; empty = the standard ones (alibi_slopes()).
  std::vector<float> alibi_slopes;

  /// Whether any variant is on.
  bool any() const { return window.has_value() || sinks || logit_softcap.has_value() || alibi; }

  /// The standard ALiBi slopes of n_heads heads (Press et al.; BLOOM's build_alibi_tensor, MPT's
  /// gen_slopes): with P the largest power of two ≤ n_heads, m_h = 2^(−8(h+1)/P) for h < P, and
  /// the remaining heads take the odd-numbered slopes of 2P heads, m_{P+j} = 2^(−4(2j+1)/P).
  static std::vector<float> standard_alibi_slopes(Index n_heads) {
    std::vector<float> m;
    if (n_heads < 1) return m;
    Index P = 1;
    while (P * 2 <= n_heads) P *= 2;
    for (Index h = 0; h < P; ++h)
      m.push_back(static_cast<float>(std::exp2(-8.0 * static_cast<double>(h + 1) / P)));
    for (Index j = 0; P + j < n_heads; ++j)
      m.push_back(static_cast<float>(std::exp2(-4.0 * static_cast<double>(2 * j + 1) / P)));
    return m;
  }

  /// The slopes the layer uses: alibi_slopes, or the standard ones when that is empty (n_heads
  /// of them); empty when alibi is off.
  std::vector<float> resolved_alibi_slopes(Index n_heads) const {
    if (!alibi) return {};
    return alibi_slopes.empty() ? standard_alibi_slopes(n_heads) : alibi_slopes;
  }

  /// \throws Error naming the field and the rule it breaks: window ≤ 0; logit_softcap ≤ 0 or
  /// NaN; alibi_slopes given without alibi, of a length other than n_heads, or not finite.
  void validate(const char* who, Index n_heads) const {
    if (window.has_value())
      TPA_CHECK(*window >= 1, who, ": variant.window (", *window,
                ") must be >= 1 (leave it unset for no window)");
    if (logit_softcap.has_value())
      TPA_CHECK(!std::isnan(*logit_softcap) && *logit_softcap > 0.f, who,
                ": variant.logit_softcap (", *logit_softcap,
                ") must be > 0 (leave it unset for no soft-cap)");
    if (!alibi_slopes.empty()) {
      TPA_CHECK(alibi, who, ": variant.alibi_slopes has ", alibi_slopes.size(),
                " entries but variant.alibi is false");
      TPA_CHECK(static_cast<Index>(alibi_slopes.size()) == n_heads, who,
                ": variant.alibi_slopes has ", alibi_slopes.size(),
                " entries, must have one per head (n_heads ", n_heads, ")");
      for (std::size_t h = 0; h < alibi_slopes.size(); ++h)
        TPA_CHECK(std::isfinite(alibi_slopes[h]), who, ": variant.alibi_slopes[", h, "] (",
                  alibi_slopes[h], ") must be finite");
    }
  }
};

// ---- end of attention variants --------------------------------------------------------------

/// Configuration of MultiHeadAttention, MultiQueryAttention and GroupedQueryAttention.
struct GqaConfig {
  Index d_model = 0;     ///< D: hidden size of the tokens
  Index n_heads = 0;     ///< H: query heads
  Index n_kv_heads = 0;  ///< G: key/value heads; H % G == 0. 0 means H (MHA)
  Index head_dim = 0;    ///< d: size of each query, key and value head
  RopeConfig rope;            ///< on every q and k head (with decay, if any); kNone: off
  float softmax_scale = 0.f;  ///< 0 means 1/sqrt(head_dim)
  bool head_norm = false;     ///< per-head RMSNorm of the outputs (weight `subln.weight` [d])
  float norm_eps = 1e-5f;
  AttentionVariant variant;   ///< window, sinks, soft-cap, ALiBi (all off by default)

  Index kv_heads() const { return n_kv_heads == 0 ? n_heads : n_kv_heads; }
  Index group_size() const { return n_heads / kv_heads(); }
  float scale() const {
    return softmax_scale != 0.f ? softmax_scale : 1.f / std::sqrt(static_cast<float>(head_dim));
  }

  /// \throws Error naming the field and the rule it breaks.
  void validate(const char* who = "GroupedQueryAttention") const {
    TPA_CHECK(d_model >= 1, who, ": d_model (", d_model, ") must be >= 1");
    TPA_CHECK(n_heads >= 1, who, ": n_heads (", n_heads, ") must be >= 1");
    TPA_CHECK(head_dim >= 1, who, ": head_dim (", head_dim, ") must be >= 1");
    TPA_CHECK(n_kv_heads >= 0, who, ": n_kv_heads (", n_kv_heads,
              ") must be >= 0 (0 means n_heads, i.e. MHA)");
    TPA_CHECK(n_heads % kv_heads() == 0, who, ": n_heads (", n_heads,
              ") is not a multiple of n_kv_heads (", kv_heads(), ")");
    // c_q and c_proj hold H·d·D elements (c_k and c_v, with G ≤ H, no more).
    detail::check_elements(who, "c_q.weight: n_heads x head_dim x d_model",
                           {n_heads, head_dim, d_model});
    TPA_CHECK(std::isfinite(softmax_scale) && softmax_scale >= 0.f, who, ": softmax_scale (",
              softmax_scale, ") must be finite and >= 0 (0 = 1/sqrt(head_dim))");
    TPA_CHECK(std::isfinite(norm_eps) && norm_eps > 0.f, who, ": norm_eps (", norm_eps,
              ") must be finite and > 0");
    rope.validate(who, head_dim);
    variant.validate(who, n_heads);
  }
};

/// Which of MLA's two equivalent forms a layer call computes (SPEC.md, MLA).
enum class MlaForm {
  kAuto,      ///< per call, the one with fewer multiply-adds: absorbed for decode, explicit for
              ///< long prefill chunks
  kAbsorbed,  ///< W_UK folded into the query, W_UV into the output; attends over the cached
              ///< latent c_kv' and k_pe directly (MQA-like, value = c_kv')
  kExplicit,  ///< up-projects every visible token's c_kv' to per-head k_nope and v (MHA-like)
};

/// \brief Configuration of MultiHeadLatentAttention (SPEC.md, "MLA"; DeepSeek-V2 style, reference
/// `model/llama-mla.py`). Per token the cache holds the normalised latent c_kv' [d_c] and the
/// rotated k_pe [d_R] shared by all heads.
struct MlaConfig {
  Index d_model = 0;           ///< D: hidden size of the tokens
  Index n_heads = 0;           ///< H: query heads
  Index q_lora_rank = 0;       ///< d_cq: query latent size; 0 = plain q_proj.weight [H·(d_n+d_R), D]
  Index kv_lora_rank = 0;      ///< d_c: key/value latent size (cached)
  Index qk_nope_head_dim = 0;  ///< d_n: per-head query/key dims without RoPE
  Index qk_rope_head_dim = 0;  ///< d_R: per-head query dims and shared key dims with RoPE (cached)
  Index v_head_dim = 0;        ///< d_v: per-head value size
  RopeConfig rope;             ///< rotates the first rope.resolved_dim(d_R) dims of q_pe and k_pe
                               ///< (with decay, if any); with style kNone q_pe and k_pe stay
                               ///< unrotated: a position-free key part shared by all heads
  float softmax_scale = 0.f;   ///< 0 means 1/sqrt(d_n + d_R)
  float norm_eps = 1e-6f;      ///< eps of q_a_layernorm and kv_a_layernorm
  MlaForm form = MlaForm::kAuto;  ///< both forms give the same outputs (up to rounding)
  AttentionVariant variant;       ///< window, sinks, soft-cap, ALiBi (all off by default)

  Index qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  float scale() const {
    return softmax_scale != 0.f ? softmax_scale
                                : 1.f / std::sqrt(static_cast<float>(qk_head_dim()));
  }

  /// \throws Error naming the field and the rule it breaks.
  void validate(const char* who = "MultiHeadLatentAttention") const {
    TPA_CHECK(d_model >= 1, who, ": d_model (", d_model, ") must be >= 1");
    TPA_CHECK(n_heads >= 1, who, ": n_heads (", n_heads, ") must be >= 1");
    TPA_CHECK(q_lora_rank >= 0, who, ": q_lora_rank (", q_lora_rank,
              ") must be >= 0 (0 = plain query projection q_proj)");
    TPA_CHECK(kv_lora_rank >= 1, who, ": kv_lora_rank (", kv_lora_rank, ") must be >= 1");
    TPA_CHECK(qk_nope_head_dim >= 1, who, ": qk_nope_head_dim (", qk_nope_head_dim,
              ") must be >= 1");
    TPA_CHECK(qk_rope_head_dim >= 1, who, ": qk_rope_head_dim (", qk_rope_head_dim,
              ") must be >= 1");
    TPA_CHECK(v_head_dim >= 1, who, ": v_head_dim (", v_head_dim, ") must be >= 1");
    // Each size alone first, so that the sums below cannot overflow; then every weight (and
    // the absorbed form's folded ones).
    detail::check_elements(who, "q_lora_rank", {q_lora_rank});
    detail::check_elements(who, "kv_lora_rank", {kv_lora_rank});
    detail::check_elements(who, "qk_nope_head_dim", {qk_nope_head_dim});
    detail::check_elements(who, "qk_rope_head_dim", {qk_rope_head_dim});
    detail::check_elements(who, "v_head_dim", {v_head_dim});
    const Index d_in = std::max(d_model, q_lora_rank);
    detail::check_elements(who, "q_a_proj.weight: q_lora_rank x d_model", {q_lora_rank, d_model});
    detail::check_elements(who, "q_proj.weight: n_heads x (qk_nope_head_dim + qk_rope_head_dim) x "
                           "max(d_model, q_lora_rank)", {n_heads, qk_head_dim(), d_in});
    detail::check_elements(who, "kv_a_proj_with_mqa.weight: (kv_lora_rank + qk_rope_head_dim) x "
                           "d_model", {kv_lora_rank + qk_rope_head_dim, d_model});
    detail::check_elements(who, "kv_b_proj.weight: n_heads x (qk_nope_head_dim + v_head_dim) x "
                           "kv_lora_rank", {n_heads, qk_nope_head_dim + v_head_dim, kv_lora_rank});
    detail::check_elements(who, "c_proj.weight: d_model x n_heads x v_head_dim",
                           {d_model, n_heads, v_head_dim});
    detail::check_elements(who, "absorbed query weight: n_heads x (kv_lora_rank + "
                           "qk_rope_head_dim) x max(d_model, q_lora_rank)",
                           {n_heads, kv_lora_rank + qk_rope_head_dim, d_in});
    detail::check_elements(who, "absorbed output weight: d_model x n_heads x kv_lora_rank",
                           {d_model, n_heads, kv_lora_rank});
    TPA_CHECK(std::isfinite(softmax_scale) && softmax_scale >= 0.f, who, ": softmax_scale (",
              softmax_scale, ") must be finite and >= 0 (0 = 1/sqrt(d_n + d_R))");
    TPA_CHECK(std::isfinite(norm_eps) && norm_eps > 0.f, who, ": norm_eps (", norm_eps,
              ") must be finite and > 0");
    TPA_CHECK(form == MlaForm::kAuto || form == MlaForm::kAbsorbed || form == MlaForm::kExplicit,
              who, ": form (", static_cast<int>(form), ") is not an MlaForm value");
    rope.validate(who, qk_rope_head_dim);
    variant.validate(who, n_heads);
  }
};

/// What TensorProductAttention applies to its contextual head factors A_Q, A_K, A_V right after
/// their projection (before the 1/R scaling; the cache holds the activated A_K and A_V).
enum class FactorActivation {
  kNone,     ///< A = W_A x (model/T6.py)
  kSigmoid,  ///< A = σ(W_A x) = 1 / (1 + e^−(W_A x)) (the T6 repository's decode/*_sigmoid.py)
};

inline const char* factor_activation_name(FactorActivation a) {
  switch (a) {
    case FactorActivation::kNone: return "none";
    case FactorActivation::kSigmoid: return "sigmoid";
  }
  return "unknown";
}

/// \brief Configuration of TensorProductAttention (SPEC.md, "TPA"): the T6 layer and its
/// K/V-only variant.
///
/// Per token, the keys and values of all H heads are rank-R_K / rank-R_V tensor products of a
/// head factor A [H, R] and a token factor B [R, d]; the query is factorized the same way with
/// rank R_Q, or (kv_only) a plain full-rank projection.
struct TpaConfig {
  Index d_model = 0;          ///< D: hidden size of the tokens
  Index n_heads = 0;          ///< H: query (and key/value) heads
  Index head_dim = 0;         ///< d: size of each query, key and value head
  Index q_rank = 0;           ///< R_Q: rank of the query factors; ignored (may be 0) when kv_only
  Index k_rank = 0;           ///< R_K: rank of the key factors
  Index v_rank = 0;           ///< R_V: rank of the value factors
  bool kv_only = false;       ///< query is a plain projection c_q [H·d, D] (model/T6_kvonly.py)
  RopeConfig rope;            ///< applied to the rows of B_Q and B_K (kv_only: to q heads and B_K)
  float softmax_scale = 0.f;  ///< 0 means 1/sqrt(head_dim)
  bool head_norm = false;     ///< per-head RMSNorm of the outputs (weight `subln.weight` [d])
  float norm_eps = 1e-5f;
  /// Activation of the head factors A_Q, A_K, A_V (kv_only: A_K, A_V), applied before use and
  /// before caching: q_h = (1/R_Q) Σ_r σ(A_Q[h,r]) B_Q[r] with kSigmoid.
  FactorActivation factor_activation = FactorActivation::kNone;
  AttentionVariant variant;   ///< window, sinks, soft-cap, ALiBi (all off by default)

  float scale() const {
    return softmax_scale != 0.f ? softmax_scale : 1.f / std::sqrt(static_cast<float>(head_dim));
  }

  /// Elements one token stores per layer: A_K, B_K, A_V, B_V = (R_K + R_V)(H + d).
  Index cache_elements_per_token() const { return (k_rank + v_rank) * (n_heads + head_dim); }

  /// \throws Error naming the field and the rule it breaks.
  void validate(const char* who = "TensorProductAttention") const {
    TPA_CHECK(d_model >= 1, who, ": d_model (", d_model, ") must be >= 1");
    TPA_CHECK(n_heads >= 1, who, ": n_heads (", n_heads, ") must be >= 1");
    TPA_CHECK(head_dim >= 1, who, ": head_dim (", head_dim, ") must be >= 1");
    if (kv_only) {
      TPA_CHECK(q_rank >= 0, who, ": q_rank (", q_rank,
                ") must be >= 0 (it is unused when kv_only)");
    } else {
      TPA_CHECK(q_rank >= 1, who, ": q_rank (", q_rank, ") must be >= 1");
    }
    TPA_CHECK(k_rank >= 1, who, ": k_rank (", k_rank, ") must be >= 1");
    TPA_CHECK(v_rank >= 1, who, ": v_rank (", v_rank, ") must be >= 1");
    // Every weight, and one token's cached factors; each size is then ≤ 2^40, so the sums in
    // cache_elements_per_token() cannot overflow either.
    const Index q = kv_only ? 0 : q_rank;
    const Index rank = std::max({q, k_rank, v_rank});
    detail::check_elements(who, "c_q / c_proj weight: n_heads x head_dim x d_model",
                           {n_heads, head_dim, d_model});
    detail::check_elements(who, "W_A weight: n_heads x max rank x d_model",
                           {n_heads, rank, d_model});
    detail::check_elements(who, "W_B weight: max rank x head_dim x d_model",
                           {rank, head_dim, d_model});
    detail::check_elements(who, "cached factors per token: (k_rank + v_rank) x (n_heads + "
                           "head_dim)", {k_rank + v_rank, n_heads + head_dim});
    TPA_CHECK(std::isfinite(softmax_scale) && softmax_scale >= 0.f, who, ": softmax_scale (",
              softmax_scale, ") must be finite and >= 0 (0 = 1/sqrt(head_dim))");
    TPA_CHECK(std::isfinite(norm_eps) && norm_eps > 0.f, who, ": norm_eps (", norm_eps,
              ") must be finite and > 0");
    TPA_CHECK(factor_activation == FactorActivation::kNone ||
                  factor_activation == FactorActivation::kSigmoid,
              who, ": factor_activation (", static_cast<int>(factor_activation),
              ") is not a FactorActivation value");
    rope.validate(who, head_dim);
    variant.validate(who, n_heads);
  }
};

}  // namespace tpa
