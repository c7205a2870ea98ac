// CacheLayout: which factors one token stores in one layer's KV cache.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// One cached factor of a token: a [rows, cols] matrix, e.g. TPA's B_K [R_K, d].
struct FactorSpec {
  std::string name;
  Index rows = 0;
  Index cols = 0;
  bool rotated = false;  ///< RoPE was applied before the factor was stored

  Index elements() const { return rows * cols; }
  bool operator==(const FactorSpec& o) const {
    return name == o.name && rows == o.rows && cols == o.cols && rotated == o.rotated;
  }
  bool operator!=(const FactorSpec& o) const { return !(*this == o); }
};

/// \brief The factors one token stores per layer, in storage order (DESIGN.md, "Factorized KV
/// cache"). Each attention layer publishes its own through `cache_layout()`.
class CacheLayout {
 public:
  CacheLayout() = default;

  /// \throws Error if `factors` is empty, a factor has a non-positive size, or a token would
  /// hold more than 2^57 elements.
  CacheLayout(std::string kind, std::vector<FactorSpec> factors)
      : kind_(std::move(kind)), factors_(std::move(factors)) {
    TPA_CHECK(!factors_.empty(), "CacheLayout '", kind_, "': needs at least one factor");
    constexpr Index kMaxElements = Index(1) << 57;  // elements() and sums of them cannot overflow
    Index total = 0;
    for (const auto& f : factors_) {
      TPA_CHECK(f.rows >= 1 && f.cols >= 1, "CacheLayout '", kind_, "': factor '", f.name,
                "' has shape [", f.rows, ", ", f.cols, "], both sizes must be >= 1");
      TPA_CHECK(f.rows <= (kMaxElements - total) / f.cols, "CacheLayout '", kind_, "': factor '",
                f.name, "' [", f.rows, ", ", f.cols, "] makes a token hold more than 2^57 elements");
      total += f.rows * f.cols;
    }
  }

  const std::string& kind() const { return kind_; }
  const std::vector<FactorSpec>& factors() const { return factors_; }
  std::size_t num_factors() const { return factors_.size(); }
  const FactorSpec& factor(std::size_t i) const { return factors_[i]; }

  /// Elements one token stores in this layer, all factors together.
  Index elements_per_token() const {
    Index n = 0;
    for (const auto& f : factors_) n += f.elements();
    return n;
  }

  /// Elements per token of the factors before factor `i` (its offset inside a token).
  Index factor_offset(std::size_t i) const {
    Index n = 0;
    for (std::size_t j = 0; j < i; ++j) n += factors_[j].elements();
    return n;
  }

  /// Human-readable factor list, e.g. "K[2x64] V[2x64]".
  std::string describe() const {
    std::string s;
    for (const auto& f : factors_) {
      if (!s.empty()) s += " ";
      s += f.name + "[" + std::to_string(f.rows) + "x" + std::to_string(f.cols) + "]";
    }
    return s;
  }

  bool operator==(const CacheLayout& o) const {
    return kind_ == o.kind_ && factors_ == o.factors_;
  }
  bool operator!=(const CacheLayout& o) const { return !(*this == o); }

 private:
  std::string kind_;
  std::vector<FactorSpec> factors_;
};

}  // namespace tpa
