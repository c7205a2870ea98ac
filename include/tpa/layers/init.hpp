// Seeded random initialisation and shape checks shared by the weights structs.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>

#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {
namespace detail {

/// Fills a [out, in] weight with U(−1/sqrt(in), 1/sqrt(in)) (PyTorch's nn.Linear default bound).
inline void init_linear(Matrix<float>& w, Index out, Index in, std::mt19937_64& rng) {
  w.resize(out, in);
  const float bound = 1.f / std::sqrt(static_cast<float>(in));
  std::uniform_real_distribution<float> u(-bound, bound);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = u(rng);
}

/// Fills a norm weight with values around 1 (1 + U(−0.1, 0.1)), so that it is exercised.
inline void init_norm(Eigen::VectorXf& w, Index n, std::mt19937_64& rng) {
  w.resize(n);
  std::uniform_real_distribution<float> u(-0.1f, 0.1f);
  for (Index i = 0; i < n; ++i) w[i] = 1.f + u(rng);
}

/// Fills attention-sink logits (AttentionVariant::sinks) with U(−1, 1).
inline void init_sinks(Eigen::VectorXf& w, Index n, std::mt19937_64& rng) {
  w.resize(n);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (Index i = 0; i < n; ++i) w[i] = u(rng);
}

/// \throws Error unless `sinks` is [n_heads] with no NaN (±inf are allowed: −inf is no sink).
inline void check_sinks(const char* who, const Eigen::VectorXf& sinks, Index n_heads) {
  TPA_CHECK(sinks.size() == n_heads, who, ": weight 'sinks' has shape [", sinks.size(),
            "], expected [", n_heads, "] (one sink logit per head)");
  for (Index h = 0; h < n_heads; ++h)
    TPA_CHECK(!std::isnan(sinks[h]), who, ": weight 'sinks' [", h, "] is NaN");
}

/// \throws Error unless `w` is [rows, cols]; names the weight and both shapes.
inline void check_shape(const char* who, const char* name, const Matrix<float>& w, Index rows,
                        Index cols) {
  TPA_CHECK(w.rows() == rows && w.cols() == cols, who, ": weight '", name, "' has shape [",
            w.rows(), ", ", w.cols(), "], expected [", rows, ", ", cols, "]");
}
inline void check_shape(const char* who, const char* name, const Eigen::VectorXf& w, Index n) {
  TPA_CHECK(w.size() == n, who, ": weight '", name, "' has shape [", w.size(), "], expected [",
            n, "]");
}

}  // namespace detail
}  // namespace tpa
