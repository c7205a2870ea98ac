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
///
/// With decay (cfg.decay_base < 1) the table also holds decay_base^(p·θ_i), computed in double
/// as exp(p·θ_i · ln decay_base) (as model/T6_partialrope_decay.py does), and rotate() multiplies
/// both dims of each rotated pair by it after the rotation. Far positions underflow: a factor
/// below the smallest normal float (2^-126 ≈ 1.2e-38; at i = 0, θ_0 = 1, that is every
/// p > 126·ln 2 / −ln decay_base, e.g. p ≥ 830 for 0.9) is stored as exactly 0 (no subnormals),
/// so those dims carry 0 into the scores: nothing turns NaN or inf (unless the input already is).
///
/// With RoPE off (style kNone) rotate() does nothing and check_positions() bounds nothing but
/// overflow: positions are then limited only by the cache.
class RopeTable {
 public:
  RopeTable() = default;

  /// \throws Error if the config is invalid for vectors of size `dim`.
  RopeTable(const RopeConfig& cfg, Index dim)
      : style_(cfg.style), dim_(dim), rotary_dim_(cfg.resolved_dim(dim)),
        max_positions_(cfg.style == RopeStyle::kNone ? std::numeric_limits<Index>::max()
                                                     : cfg.max_positions) {
    cfg.validate("RopeTable", dim);
    if (style_ == RopeStyle::kNone) return;
    const Index half = rotary_dim_ / 2;
    cos_.resize(static_cast<std::size_t>(max_positions_ * half));
    sin_.resize(cos_.size());
    if (cfg.has_decay()) decay_.resize(cos_.size());
    const double log_decay = std::log(cfg.decay_base);
    for (Index p = 0; p < max_positions_; ++p) {
      for (Index i = 0; i < half; ++i) {
        const double theta =
            std::pow(cfg.base, -2.0 * static_cast<double>(i) / static_cast<double>(rotary_dim_));
        const double phi = static_cast<double>(p) * theta;
        const auto k = static_cast<std::size_t>(p * half + i);
        cos_[k] = static_cast<float>(std::cos(phi));
        sin_[k] = static_cast<float>(std::sin(phi));
        if (!decay_.empty()) {
          const double f = std::exp(phi * log_decay);
          decay_[k] = f < static_cast<double>(std::numeric_limits<float>::min())
                          ? 0.f
                          : static_cast<float>(f);
        }
      }
    }
  }

  RopeStyle style() const { return style_; }
  Index dim() const { return dim_; }
  Index rotary_dim() const { return rotary_dim_; }
  /// Positions 0 … max_positions()−1 are valid; the largest Index when RoPE is off.
  Index max_positions() const { return max_positions_; }
  /// Whether anything rotates (false for style kNone).
  bool enabled() const { return style_ != RopeStyle::kNone; }
  /// Whether rotate() also applies decay (RopeConfig::decay_base < 1).
  bool has_decay() const { return !decay_.empty(); }

  /// cos(p·θ_i) for i = 0 … r/2−1. Requires 0 ≤ p < max_positions().
  const float* cos_row(Index p) const { return cos_.data() + p * (rotary_dim_ / 2); }
  const float* sin_row(Index p) const { return sin_.data() + p * (rotary_dim_ / 2); }
  /// decay_base^(p·θ_i) for i = 0 … r/2−1 (0 where it underflows). Requires has_decay() and
  /// 0 ≤ p < max_positions().
  const float* decay_row(Index p) const { return decay_.data() + p * (rotary_dim_ / 2); }

  /// \throws Error unless positions first … first+count−1 are all in the table (RoPE off: unless
  /// first ≥ 0, count ≥ 0 and first + count does not overflow).
  void check_positions(const char* who, Index first, Index count) const {
    // Written so that no sum can overflow, whatever first and count are.
    if (first >= 0 && count >= 0 && first <= max_positions_ && count <= max_positions_ - first)
      return;
    if (!enabled())
      detail::fail(who, ": ", count, " positions from ", first,
                   " are not valid positions (first and count must be >= 0 and their sum must "
                   "not overflow)");
    if (count >= 1 && first <= std::numeric_limits<Index>::max() - (count - 1))
      detail::fail(who, ": position ", first + (count - 1),
                   " is past the RoPE table (rope.max_positions = ", max_positions_, ")");
    detail::fail(who, ": ", count, " positions from ", first,
                 " are past the RoPE table (rope.max_positions = ", max_positions_, ")");
  }

  /// Rotates `rows` vectors of size dim() at `v`, `stride` floats apart, to position `p`, and
  /// with decay multiplies their rotated dims by decay_row(p). Does nothing when RoPE is off.
  /// Requires 0 ≤ p < max_positions() (see check_positions).
  void rotate(float* v, Index p, Index rows = 1, Index stride = 0) const {
    if (style_ == RopeStyle::kNone) return;
    if (decay_.empty()) {
      rotate_rows<false>(v, p, rows, stride);
    } else {
      rotate_rows<true>(v, p, rows, stride);
    }
  }

 private:
  // The rotation (then, when kDecay, the decay) of rotate(); without decay the arithmetic is that
  // of plain RoPE, bit for bit.
  template <bool kDecay>
  void rotate_rows(float* v, Index p, Index rows, Index stride) const {
    const Index half = rotary_dim_ / 2;
    const float* c = cos_row(p);
    const float* s = sin_row(p);
    const float* dk = kDecay ? decay_row(p) : nullptr;
    const float sign = style_ == RopeStyle::kHalfSplitReversed ? -1.f : 1.f;
    for (Index r = 0; r < rows; ++r) {
      float* x = v + r * stride;
      if (style_ == RopeStyle::kInterleaved) {
        for (Index i = 0; i < half; ++i) {
          const float a = x[2 * i], b = x[2 * i + 1];
          float ra = a * c[i] - b * s[i], rb = a * s[i] + b * c[i];
          if (kDecay) {
            ra *= dk[i];
            rb *= dk[i];
          }
          x[2 * i] = ra;
          x[2 * i + 1] = rb;
        }
      } else {
        for (Index i = 0; i < half; ++i) {
          const float a = x[i], b = x[i + half], si = sign * s[i];
          float ra = a * c[i] - b * si, rb = a * si + b * c[i];
          if (kDecay) {
            ra *= dk[i];
            rb *= dk[i];
          }
          x[i] = ra;
          x[i + half] = rb;
        }
      }
    }
  }

  RopeStyle style_ = RopeStyle::kHalfSplitReversed;
  Index dim_ = 0;
  Index rotary_dim_ = 0;
  Index max_positions_ = 0;
  std::vector<float> cos_;  // [max_positions, r/2]
  std::vector<float> sin_;  // [max_positions, r/2]
  std::vector<float> decay_;  // [max_positions, r/2] with decay, else empty
};

}  // namespace tpa
