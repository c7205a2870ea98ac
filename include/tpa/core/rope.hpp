// Rotary position embedding: cos/sin tables computed in double, rotation of vectors in place.
#pragma once

#include <cmath>
#include <limits>
#include <vector>

#include "tpa/core/config.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief Precomputed RoPE table for vectors of size `dim` (SPEC.md, RoPE).
///
/// cos(p·θ_i) and sin(p·θ_i) are computed in double and stored as float, for positions
/// 0 … max_positions−1 and i = 0 … r/2−1. Only the first r dims of a vector rotate.
class RopeTable {
 public:
  RopeTable() = default;

  /// \throws Error if the config is invalid for vectors of size `dim`.
  RopeTable(const RopeConfig& cfg, Index dim)
      : style_(cfg.style), dim_(dim), rotary_dim_(cfg.resolved_dim(dim)),
        max_positions_(cfg.max_positions) {
    cfg.validate("RopeTable", dim);
    const Index half = rotary_dim_ / 2;
    cos_.resize(static_cast<std::size_t>(max_positions_ * half));
    sin_.resize(cos_.size());
    for (Index p = 0; p < max_positions_; ++p) {
      for (Index i = 0; i < half; ++i) {
        const double theta =
            std::pow(cfg.base, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim_));
        const double phi = static_cast<double>(p) * theta;
        cos_[static_cast<std::size_t>(p * half + i)] = static_cast<float>(std::cos(phi));
        sin_[static_cast<std::size_t>(p * half + i)] = static_cast<float>(std::sin(phi));
      }
    }
  }

  RopeStyle style() const { return style_; }
  Index dim() const { return dim_; }
  Index rotary_dim() const { return rotary_dim_; }
  Index max_positions() const { return max_positions_; }

  /// cos(p·θ_i) for i = 0 … r/2−1. Requires 0 ≤ p < max_positions().
  const float* cos_row(Index p) const { return cos_.data() + p * (rotary_dim_ / 2); }
  const float* sin_row(Index p) const { return sin_.data() + p * (rotary_dim_ / 2); }

  /// \throws Error unless positions first … first+count−1 are all in the table.
  void check_positions(const char* who, Index first, Index count) const {
    // Written so that no sum can overflow, whatever first and count are.
    if (first >= 0 && count >= 0 && first <= max_positions_ && count <= max_positions_ - first)
      return;
    if (count >= 1 && first <= std::numeric_limits<Index>::max() - (count - 1))
      detail::fail(who, ": position ", first + (count - 1),
                   " is past the RoPE table (rope.max_positions = ", max_positions_, ")");
    detail::fail(who, ": ", count, " positions from ", first,
                 " are past the RoPE table (rope.max_positions = ", max_positions_, ")");
  }

  /// Rotates `rows` vectors of size dim() at `v`, `stride` floats apart, to position `p`.
  /// Requires 0 ≤ p < max_positions() (see check_positions).
  void rotate(float* v, Index p, Index rows = 1, Index stride = 0) const {
    const Index half = rotary_dim_ / 2;
    const float* c = cos_row(p);
    const float* s = sin_row(p);
    const float sign = style_ == RopeStyle::kHalfSplitReversed ? -1.f : 1.f;
    for (Index r = 0; r < rows; ++r) {
      float* x = v + r * stride;
      if (style_ == RopeStyle::kInterleaved) {
        for (Index i = 0; i < half; ++i) {
          const float a = x[2 * i], b = x[2 * i + 1];
          x[2 * i] = a * c[i] - b * s[i];
          x[2 * i + 1] = a * s[i] + b * c[i];
        }
      } else {
        for (Index i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half], si = sign * s[i];
          x[i] = a * c[i] - b * si;
          x[i + half] = a * si + b * c[i];
        }
      }
    }
  }

 private:
  RopeStyle style_ = RopeStyle::kHalfSplitReversed;
  Index dim_ = 0;
  Index rotary_dim_ = 0;
  Index max_positions_ = 0;
  std::vector<float> cos_;  // [max_positions, r/2]
  std::vector<float> sin_;  // [max_positions, r/2]
};

}  // namespace tpa
