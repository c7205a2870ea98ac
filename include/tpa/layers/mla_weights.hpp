// Weights of MultiHeadLatentAttention.
#pragma once

#include <cstdint>
#include <random>

#include "tpa/core/config.hpp"
#include "tpa/core/error.hpp"
#include "tpa/layers/init.hpp"

namespace tpa {

/// \brief Weights of MLA, named as in the reference `model/llama-mla.py` (SPEC.md, "MLA"). All
/// matrices are [out, in] like nn.Linear.weight. Row layouts: q_b_proj / q_proj row
/// h·(d_n+d_R) + i is q_nope_h[i] for i < d_n, then q_pe_h; kv_a_proj_with_mqa rows are c_kv
/// [d_c] then k_pe [d_R]; kv_b_proj row h·(d_n+d_v) + i is k_nope_h[i] for i < d_n, then v_h.
///
/// With q_lora_rank > 0 the query is q_b_proj · RMSNorm(q_a_proj · x) and q_proj stays empty;
/// with q_lora_rank == 0 it is q_proj · x and the three q_a/q_b weights stay empty.
struct MlaWeights {
  Matrix<float> q_a_proj;            ///< q_a_proj.weight [d_cq, D]
  Eigen::VectorXf q_a_layernorm;     ///< q_a_layernorm.weight [d_cq]
  Matrix<float> q_b_proj;            ///< q_b_proj.weight [H·(d_n+d_R), d_cq]
  Matrix<float> q_proj;              ///< q_proj.weight [H·(d_n+d_R), D] (q_lora_rank == 0)
  Matrix<float> kv_a_proj_with_mqa;  ///< kv_a_proj_with_mqa.weight [d_c + d_R, D]
  Eigen::VectorXf kv_a_layernorm;    ///< kv_a_layernorm.weight [d_c]
  Eigen::VectorXf sinks;             ///< sinks [H] sink logits, only used when variant.sinks
  Matrix<float> kv_b_proj;           ///< kv_b_proj.weight [H·(d_n+d_v), d_c]
  Matrix<float> c_proj;              ///< c_proj.weight [D, H·d_v]

  /// Seeded random weights for `cfg` (deterministic for a given seed and standard library;
  /// \throws Error, before allocating anything, if `cfg` is invalid):
  /// projections U(±1/sqrt(in)), norm weights 1 + U(±0.1).
  static MlaWeights random(const MlaConfig& cfg, std::uint64_t seed) {
    cfg.validate("MlaWeights::random");  // before any size is computed from cfg
    std::mt19937_64 rng(seed);
    MlaWeights w;
    const Index D = cfg.d_model, H = cfg.n_heads, d_cq = cfg.q_lora_rank;
    const Index d_c = cfg.kv_lora_rank, d_qk = cfg.qk_head_dim(), d_R = cfg.qk_rope_head_dim;
    const Index d_n = cfg.qk_nope_head_dim, d_v = cfg.v_head_dim;
    if (d_cq > 0) {
      detail::init_linear(w.q_a_proj, d_cq, D, rng);
      detail::init_norm(w.q_a_layernorm, d_cq, rng);
      detail::init_linear(w.q_b_proj, H * d_qk, d_cq, rng);
    } else {
      detail::init_linear(w.q_proj, H * d_qk, D, rng);
    }
    detail::init_linear(w.kv_a_proj_with_mqa, d_c + d_R, D, rng);
    detail::init_norm(w.kv_a_layernorm, d_c, rng);
    detail::init_linear(w.kv_b_proj, H * (d_n + d_v), d_c, rng);
    detail::init_linear(w.c_proj, D, H * d_v, rng);
    if (cfg.variant.sinks) detail::init_sinks(w.sinks, H, rng);
    return w;
  }

  /// \throws Error if `cfg` is invalid, or naming the first weight whose shape does not match
  /// `cfg`, or a query weight that is set although `cfg.q_lora_rank` selects the other query
  /// path.
  void check(const MlaConfig& cfg, const char* who) const {
    cfg.validate(who);  // the products below are bounded only for a valid cfg
    const Index D = cfg.d_model, H = cfg.n_heads, d_cq = cfg.q_lora_rank;
    const Index d_c = cfg.kv_lora_rank, d_qk = cfg.qk_head_dim(), d_R = cfg.qk_rope_head_dim;
    const Index d_n = cfg.qk_nope_head_dim, d_v = cfg.v_head_dim;
    if (d_cq > 0) {
      TPA_CHECK(q_proj.size() == 0, who, ": weight 'q_proj.weight' is set but q_lora_rank (", d_cq,
                ") > 0 selects q_a_proj / q_a_layernorm / q_b_proj");
      detail::check_shape(who, "q_a_proj.weight", q_a_proj, d_cq, D);
      detail::check_shape(who, "q_a_layernorm.weight", q_a_layernorm, d_cq);
      detail::check_shape(who, "q_b_proj.weight", q_b_proj, H * d_qk, d_cq);
    } else {
      TPA_CHECK(q_a_proj.size() == 0 && q_a_layernorm.size() == 0 && q_b_proj.size() == 0, who,
                ": weights 'q_a_proj' / 'q_a_layernorm' / 'q_b_proj' are set but q_lora_rank (0) "
                "selects the plain query projection 'q_proj.weight'");
      detail::check_shape(who, "q_proj.weight", q_proj, H * d_qk, D);
    }
    detail::check_shape(who, "kv_a_proj_with_mqa.weight", kv_a_proj_with_mqa, d_c + d_R, D);
    detail::check_shape(who, "kv_a_layernorm.weight", kv_a_layernorm, d_c);
    detail::check_shape(who, "kv_b_proj.weight", kv_b_proj, H * (d_n + d_v), d_c);
    detail::check_shape(who, "c_proj.weight", c_proj, D, H * d_v);
    if (cfg.variant.sinks) detail::check_sinks(who, sinks, H);
  }
};

}  // namespace tpa
