// Weights of TensorProductAttention (T6 and its K/V-only variant).
#pragma once

#include <cstdint>
#include <random>

#include "tpa/core/config.hpp"
#include "tpa/layers/init.hpp"

namespace tpa {

/// \brief Weights of TensorProductAttention, named as in the reference `model/T6.py` /
/// `model/T6_kvonly.py` (SPEC.md, "TPA"). All are [out, in] like nn.Linear.weight. In a T6
/// checkpoint the factor weights live under `c_qkv.` (e.g. `c_qkv.W_A_q.weight`); `c_proj` and
/// `subln` do not.
///
/// Row layout of the factor weights: W_A_* row h·R + r gives A[h, r]; W_B_* row r·d + i gives
/// B[r, i] (so the projection of a token is directly the row-major factor [H, R] or [R, d]).
struct TpaWeights {
  Matrix<float> W_A_q;    ///< c_qkv.W_A_q.weight [H·R_Q, D] (empty when kv_only)
  Matrix<float> W_A_k;    ///< c_qkv.W_A_k.weight [H·R_K, D]
  Matrix<float> W_A_v;    ///< c_qkv.W_A_v.weight [H·R_V, D]
  Matrix<float> W_B_q;    ///< c_qkv.W_B_q.weight [R_Q·d, D] (empty when kv_only)
  Matrix<float> W_B_k;    ///< c_qkv.W_B_k.weight [R_K·d, D]
  Matrix<float> W_B_v;    ///< c_qkv.W_B_v.weight [R_V·d, D]
  Matrix<float> c_q;      ///< c_qkv.c_q.weight   [H·d, D], only used when kv_only
  Matrix<float> c_proj;   ///< c_proj.weight      [D, H·d]
  Eigen::VectorXf subln;  ///< subln.weight       [d], only used when head_norm
  Eigen::VectorXf sinks;  ///< sinks              [H] sink logits, only used when variant.sinks

  /// Seeded random weights for `cfg` (deterministic for a given seed and standard library;
  /// \throws Error, before allocating anything, if `cfg` is invalid):
  /// U(−1/sqrt(D), 1/sqrt(D)) for the projections, 1 + U(−0.1, 0.1) for subln. Only the weights
  /// the config uses are filled; the others stay empty.
  static TpaWeights random(const TpaConfig& cfg, std::uint64_t seed) {
    cfg.validate("TpaWeights::random");  // before any size is computed from cfg
    std::mt19937_64 rng(seed);
    TpaWeights w;
    const Index H = cfg.n_heads, d = cfg.head_dim, D = cfg.d_model;
    if (cfg.kv_only) {
      detail::init_linear(w.c_q, H * d, D, rng);
    } else {
      detail::init_linear(w.W_A_q, H * cfg.q_rank, D, rng);
      detail::init_linear(w.W_B_q, cfg.q_rank * d, D, rng);
    }
    detail::init_linear(w.W_A_k, H * cfg.k_rank, D, rng);
    detail::init_linear(w.W_A_v, H * cfg.v_rank, D, rng);
    detail::init_linear(w.W_B_k, cfg.k_rank * d, D, rng);
    detail::init_linear(w.W_B_v, cfg.v_rank * d, D, rng);
    detail::init_linear(w.c_proj, D, H * d, rng);
    if (cfg.head_norm) detail::init_norm(w.subln, d, rng);
    if (cfg.variant.sinks) detail::init_sinks(w.sinks, H, rng);
    return w;
  }

  /// \throws Error if `cfg` is invalid, or naming the first weight `cfg` uses whose shape does
  /// not match it. Weights the config does not use (W_A_q/W_B_q when kv_only, c_q otherwise,
  /// subln without head_norm) are not checked.
  void check(const TpaConfig& cfg, const char* who) const {
    cfg.validate(who);  // the products below are bounded only for a valid cfg
    const Index H = cfg.n_heads, d = cfg.head_dim, D = cfg.d_model;
    if (cfg.kv_only) {
      detail::check_shape(who, "c_qkv.c_q.weight", c_q, H * d, D);
    } else {
      detail::check_shape(who, "c_qkv.W_A_q.weight", W_A_q, H * cfg.q_rank, D);
      detail::check_shape(who, "c_qkv.W_B_q.weight", W_B_q, cfg.q_rank * d, D);
    }
    detail::check_shape(who, "c_qkv.W_A_k.weight", W_A_k, H * cfg.k_rank, D);
    detail::check_shape(who, "c_qkv.W_A_v.weight", W_A_v, H * cfg.v_rank, D);
    detail::check_shape(who, "c_qkv.W_B_k.weight", W_B_k, cfg.k_rank * d, D);
    detail::check_shape(who, "c_qkv.W_B_v.weight", W_B_v, cfg.v_rank * d, D);
    detail::check_shape(who, "c_proj.weight", c_proj, D, H * d);
    if (cfg.head_norm) detail::check_shape(who, "subln.weight", subln, d);
    if (cfg.variant.sinks) detail::check_sinks(who, sinks, H);
  }
};

}  // namespace tpa
