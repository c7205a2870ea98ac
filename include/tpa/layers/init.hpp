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
