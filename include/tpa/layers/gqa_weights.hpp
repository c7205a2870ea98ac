// Weights of MultiHeadAttention, MultiQueryAttention and GroupedQueryAttention.
#pragma once

#include <cstdint>
#include <random>

#include "tpa/core/config.hpp"
#include "tpa/layers/init.hpp"

namespace tpa {

/// Weights of the GQA family, named as in the reference `llama-gqa.py` (SPEC.md). All are
/// [out, in] like nn.Linear.weight.
struct GqaWeights {
  Matrix<float> c_q;      ///< c_q.weight    [H·d, D]
  Matrix<float> c_k;      ///< c_k.weight    [G·d, D]
  Matrix<float> c_v;      ///< c_v.weight    [G·d, D]
  Matrix<float> c_proj;   ///< c_proj.weight [D, H·d]
  Eigen::VectorXf subln;  ///< subln.weight  [d], only used when cfg.head_norm
  Eigen::VectorXf sinks;  ///< sinks         [H] sink logits, only used when cfg.variant.sinks

  /// Seeded random weights for `cfg` (deterministic for a given seed and standard library;
  /// \throws Error, before allocating anything, if `cfg` is invalid).
  static GqaWeights random(const GqaConfig& cfg, std::uint64_t seed) {
    cfg.validate("GqaWeights::random");  // before any size is computed from cfg
    std::mt19937_64 rng(seed);
    GqaWeights w;
    const Index H = cfg.n_heads, G = cfg.kv_heads(), d = cfg.head_dim, D = cfg.d_model;
    detail::init_linear(w.c_q, H * d, D, rng);
    detail::init_linear(w.c_k, G * d, D, rng);
    detail::init_linear(w.c_v, G * d, D, rng);
    detail::init_linear(w.c_proj, D, H * d, rng);
    if (cfg.head_norm) detail::init_norm(w.subln, d, rng);
    if (cfg.variant.sinks) detail::init_sinks(w.sinks, H, rng);
    return w;
  }

  /// \throws Error if `cfg` is invalid, or naming the first weight whose shape does not match
  /// `cfg`.
  void check(const GqaConfig& cfg, const char* who) const {
    cfg.validate(who);  // the products below are bounded only for a valid cfg
    const Index H = cfg.n_heads, G = cfg.kv_heads(), d = cfg.head_dim, D = cfg.d_model;
    detail::check_shape(who, "c_q.weight", c_q, H * d, D);
    detail::check_shape(who, "c_k.weight", c_k, G * d, D);
    detail::check_shape(who, "c_v.weight", c_v, G * d, D);
    detail::check_shape(who, "c_proj.weight", c_proj, D, H * d);
    if (cfg.head_norm) detail::check_shape(who, "subln.weight", subln, d);
    if (cfg.variant.sinks) detail::check_sinks(who, sinks, H);
  }
};

}  // namespace tpa
