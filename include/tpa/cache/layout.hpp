// CacheLayout: which factors one token stores in one layer's KV cache.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief How a factor's rows are ordered inside a cache block (DESIGN.md, "Factorized KV
/// cache": each (layer, factor, KV head) tile of a block is one contiguous run).
enum class TileOrder {
  /// [block_tokens][rows][cols]: each token's whole factor is contiguous, tokens one after
  /// another. For factors a kernel reads whole per token (TPA's A_K, B_K, ...; MLA's latents).
  kTokenMajor,
  /// [rows][block_tokens][cols]: row r of every token of the block is contiguous, rows one after
  /// another. For factors whose rows a kernel reads separately (GQA/MHA's K and V [G, d]: KV
  /// head g's tile is one run instead of rows G·d elements apart).
  kHeadMajor,
};

/// One cached factor of a token: a [rows, cols] matrix, e.g. TPA's B_K [R_K, d].
struct FactorSpec {
  std::string name;
  Index rows = 0;
  Index cols = 0;
  bool rotated = false;  ///< RoPE was applied before the factor was stored
  TileOrder order = TileOrder::kTokenMajor;  ///< placement inside a cache block

  Index elements() const { return rows * cols; }
  /// Equal names, shapes, rotation and placement; a one-row factor's two orders place the same
  /// bytes (MQA's K and V) and compare equal.
  bool operator==(const FactorSpec& o) const {
    return name == o.name && rows == o.rows && cols == o.cols && rotated == o.rotated &&
           (order == o.order || rows == 1);
  }
  bool operator!=(const FactorSpec& o) const { return !(*this == o); }
};

/// \brief Where one factor lives inside a block's region of one layer: element (r, c) of the
/// factor of the block's token t (0 ≤ t < block_tokens) is at
/// offset + r·row_stride + t·token_stride + c. Token-major: (row_stride, token_stride) =
/// (cols, rows·cols); head-major: (block_tokens·cols, cols). Either way the factor occupies
/// block_tokens·rows·cols elements from `offset`.
struct FactorPlace {
  Index offset = 0;        ///< elements from the region's start to the factor's first element
  Index rows = 0;          ///< rows of one token's factor (e.g. KV heads)
  Index cols = 0;          ///< elements per row (contiguous)
  Index row_stride = 0;    ///< elements between rows r and r + 1 of one token
  Index token_stride = 0;  ///< elements between tokens t and t + 1 of one row
  /// Quantized caches (tpa::q8) only: elements (bytes) from the region's start to the factor's
  /// f32 scales, [scale_rows][block_tokens] (the scale of row r of the block's token t at
  /// scale_offset + 4·(r·block_tokens + t) bytes); scale_rows is rows (a scale per row) or 1 (a
  /// scale per token for the whole factor), 0 when the cache stores no scales.
  Index scale_offset = 0;
  Index scale_rows = 0;

  Index elements() const { return rows * cols; }
  /// Each token's whole factor is one contiguous run of elements() (token-major, or one row).
  bool token_contiguous() const { return rows == 1 || row_stride == cols; }

  static FactorPlace token_major(Index offset, Index rows, Index cols) {
    return FactorPlace{offset, rows, cols, cols, rows * cols};
  }
  static FactorPlace head_major(Index offset, Index rows, Index cols, Index block_tokens) {
    return FactorPlace{offset, rows, cols, block_tokens * cols, cols};
  }
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

  /// Where factor `i` lives in a block of `block_tokens` tokens, relative to the start of the
  /// layer's region: the factors one after another in layout order, each placed per its order.
  FactorPlace place(std::size_t i, Index block_tokens) const {
    const FactorSpec& f = factors_[i];
    const Index offset = block_tokens * factor_offset(i);
    return f.order == TileOrder::kHeadMajor
               ? FactorPlace::head_major(offset, f.rows, f.cols, block_tokens)
               : FactorPlace::token_major(offset, f.rows, f.cols);
  }

  /// Human-readable factor list, e.g. "K[2x64,head-major] V[2x64,head-major]".
  std::string describe() const {
    std::string s;
    for (const auto& f : factors_) {
      if (!s.empty()) s += " ";
      s += f.name + "[" + std::to_string(f.rows) + "x" + std::to_string(f.cols) +
           (f.order == TileOrder::kHeadMajor ? ",head-major]" : "]");
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
