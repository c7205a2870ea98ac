// Plumbing shared by every layer call: input checks, the plan of which tokens go to which
// sequence at which positions, projections and per-head RMSNorm.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <vector>

#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/rope.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {
namespace detail {

/// Rows [row0, row0 + n) of a call's input belong to sequence `seq`, at positions pos0 … .
struct Segment {
  SeqId seq = -1;
  Index row0 = 0;
  Index n = 0;
  Index pos0 = 0;
};

/// \throws Error unless x is [N ≥ 1, d_model] and y has the same shape.
inline void check_io(const char* who, const ConstTensorView<float, 2>& x,
                     const TensorView<float, 2>& y, Index d_model) {
  TPA_CHECK(x.dimension(0) >= 1, who, ": x has ", x.dimension(0), " tokens, needs at least 1");
  TPA_CHECK(x.dimension(1) == d_model, who, ": x is [", x.dimension(0), ", ", x.dimension(1),
            "], its last dim must be d_model (", d_model, ")");
  TPA_CHECK(y.dimension(0) == x.dimension(0) && y.dimension(1) == x.dimension(1), who,
            ": y is [", y.dimension(0), ", ", y.dimension(1), "], must be x's shape [",
            x.dimension(0), ", ", x.dimension(1), "]");
  TPA_CHECK(x.data() != nullptr && y.data() != nullptr, who, ": x and y must not be null");
}

/// Checks that every segment can be appended to `cache` (live, distinct sequences; layout; room
/// in the pool for all of them together; positions inside the RoPE table), fills each segment's
/// pos0 with the sequence's current length, and returns the new blocks the appends will take
/// (CacheCall allocates them), copies of shared blocks included. Changes nothing. The count is
/// an upper bound when several sequences of the call hold the same shared block (a parent and
/// its fork decoded together): each counts a copy, though a block held by r sequences needs at
/// most r − 1 copies; so such a call may be refused as not fitting by a block or so.
template <class S>
Index plan_cache_call(const char* who, const KVCache<S>& cache, int layer,
                      const CacheLayout& layout, const RopeTable& rope, Segment* segs,
                      Index n_segs) {
  Index blocks = 0;
  for (Index i = 0; i < n_segs; ++i) {
    Segment& s = segs[i];
    cache.check_append(who, s.seq, layer, layout, s.n);
    for (Index j = 0; j < i; ++j)
      TPA_CHECK(segs[j].seq != s.seq, who, ": sequence ", s.seq,
                " appears more than once in one call");
    s.pos0 = cache.length(s.seq, layer);
    rope.check_positions(who, s.pos0, s.n);
    blocks += cache.blocks_needed(s.seq, layer, s.n);
  }
  TPA_CHECK(blocks <= cache.available_blocks(), who, ": the cache is full: this call needs ",
            blocks, " new blocks but only ", cache.available_blocks(), " of max_blocks (",
            cache.max_blocks(), ") are available");
  return blocks;
}

/// \brief The cache side of one layer call after plan_cache_call: allocates the blocks the
/// appends will take (so they cannot fail) and copies the shared blocks they will write into
/// (copy on write), and unless commit() is called before it is destroyed — an exception
/// (std::bad_alloc from scratch or a GEMM) after some appends — undoes the appends and the
/// copies and releases the blocks it allocated: the strong guarantee for the whole call.
/// Its bookkeeping lives in ctx's scratch (create it inside the call's ScratchGuard).
template <class S>
class CacheCall {
 public:
  CacheCall(Context& ctx, KVCache<S>& cache, int layer, const Segment* segs, Index n_segs,
            Index blocks)
      : cache_(cache), layer_(layer), segs_(segs), n_segs_(n_segs),
        allocated_(cache.allocated_blocks()) {
    // All scratch first (it may throw), then the blocks (strong), then nothing throws.
    tables_ = static_cast<std::size_t*>(
        ctx.scratch().bytes(sizeof(std::size_t) * static_cast<std::size_t>(n_segs)));
    copies_ = static_cast<Index*>(
        ctx.scratch().bytes(sizeof(Index) * static_cast<std::size_t>(n_segs)));
    Index copies = 0;
    for (Index i = 0; i < n_segs; ++i) {
      tables_[i] = cache.block_table(segs[i].seq).size();
      copies += cache.copies_needed(segs[i].seq, layer, segs[i].n);
    }
    using Unshared = typename KVCache<S>::Unshared;
    log_ = copies == 0 ? nullptr
                       : static_cast<Unshared*>(ctx.scratch().bytes(
                             sizeof(Unshared) * static_cast<std::size_t>(copies)));
    cache.ensure_free_blocks(blocks);  // strong: nothing to undo if it throws
    Index made = 0;
    for (Index i = 0; i < n_segs; ++i) {
      copies_[i] = cache.unshare(segs[i].seq, layer, segs[i].n, log_ + made);
      made += copies_[i];
    }
    armed_ = true;
  }
  ~CacheCall() {
    if (!armed_) return;
    for (Index i = n_segs_ - 1; i >= 0; --i)
      cache_.undo_append(segs_[i].seq, layer_, segs_[i].pos0, tables_[i]);
    Index made = 0;
    for (Index i = 0; i < n_segs_; ++i) made += copies_[i];
    for (Index i = n_segs_ - 1; i >= 0; --i) {
      made -= copies_[i];
      cache_.undo_unshare(segs_[i].seq, log_ + made, copies_[i]);
    }
    cache_.undo_allocation(allocated_);
  }
  CacheCall(const CacheCall&) = delete;
  CacheCall& operator=(const CacheCall&) = delete;

  /// The call succeeded: keep its appends.
  void commit() { armed_ = false; }

 private:
  KVCache<S>& cache_;
  int layer_;
  const Segment* segs_;
  Index n_segs_;
  Index allocated_;
  std::size_t* tables_ = nullptr;
  Index* copies_ = nullptr;                           // copies unshare() made, per segment
  typename KVCache<S>::Unshared* log_ = nullptr;      // their undo records, segment after segment
  bool armed_ = false;
};

/// Output features per GEMM of project() for n ≤ 32 rows: the widest slice (≤ 256) for which
/// both blocks Eigen's GEMM packs (sizes from its own blocking heuristic, kc × slice and
/// kc × n) fit under EIGEN_STACK_ALLOCATION_LIMIT, so that it puts them on the stack.
inline Index stack_gemm_cols(Index depth, Index n, Index out) {
  Index cols = std::min<Index>(out, 256);
  for (; cols > 8; cols /= 2) {
    Index kc = depth, mc = cols, nc = n;
    Eigen::internal::computeProductBlockingSizes<float, float, 1>(kc, mc, nc, Index(1));
    if (kc * std::max(mc, nc) * Index(sizeof(float)) <= EIGEN_STACK_ALLOCATION_LIMIT) break;
  }
  return cols;
}

/// Output features [c0, c1) of y[n, W.rows()] = x[n, W.cols()] · Wᵀ, all row-major and
/// contiguous, on the calling thread. Allocates nothing for n ≤ 32 (decode and decode batches);
/// larger n (prefill) may let Eigen's GEMM allocate.
inline void project_cols(const float* x, Index n, const ConstMatrixMap<float>& w, float* y,
                         Index c0, Index c1) {
  ConstMatrixMap<float> xm(x, n, w.cols());
  MatrixMap<float> ym(y, n, w.rows());
  if (n == 1) {  // GEMV straight into y (no temporary)
    ym.row(0).segment(c0, c1 - c0).transpose().noalias() =
        w.middleRows(c0, c1 - c0) * xm.row(0).transpose();
  } else if (n <= 32) {
    // One GEMM per slice of output features (W is still read once): one GEMM over all of W
    // would heap-allocate its packed blocks.
    const Index cols = stack_gemm_cols(w.cols(), n, c1 - c0);
    for (Index c = c0; c < c1; c += cols) {
      const Index cw = std::min(cols, c1 - c);
      ym.middleCols(c, cw).noalias() = xm * w.middleRows(c, cw).transpose();
    }
  } else {
    ym.middleCols(c0, c1 - c0).noalias() = xm * w.middleRows(c0, c1 - c0).transpose();
  }
}

/// y[n, W.rows()] = x[n, W.cols()] · Wᵀ on the calling thread (see project_cols).
inline void project(const float* x, Index n, const Matrix<float>& w, float* y) {
  project_cols(x, n, ConstMatrixMap<float>(w.data(), w.rows(), w.cols()), y, 0, w.rows());
}

/// One product of a batched project(): y[n, w.rows()] = x · wᵀ (w row-major).
struct Projection {
  Projection(const Matrix<float>& m, float* out) : w(m.data(), m.rows(), m.cols()), y(out) {}
  Projection(const ConstMatrixMap<float>& m, float* out) : w(m), y(out) {}
  ConstMatrixMap<float> w;
  float* y;
};

/// Every product of `ps` over the same input x[n, d] (each y row-major and contiguous), spread
/// over ctx's threads: the output features of all products are cut into one contiguous range per
/// thread (multiples of 16), so each thread streams its share of the weights once. Allocates
/// nothing for n ≤ 32.
inline void project(Context& ctx, const float* x, Index n, std::initializer_list<Projection> ps) {
  constexpr Index kAlign = 16;
  Index total = 0;
  for (const Projection& p : ps) total += p.w.rows();
  // Below 64 K multiply-adds (256 KB of weights) waking a second thread costs about what it saves.
  const Index cols = ps.size() ? ps.begin()->w.cols() : 0;
  const Index parts =
      total * cols * n < (Index(1) << 16) ? 1 : std::min<Index>(ctx.threads(), total / kAlign);
  if (parts <= 1) {
    for (const Projection& p : ps) project_cols(x, n, p.w, p.y, 0, p.w.rows());
    return;
  }
  ctx.parallel_for(parts, [&](Index part) {
    const auto cut = [&](Index k) { return k == parts ? total : (k * total / parts) / kAlign * kAlign; };
    const Index lo = cut(part), hi = cut(part + 1);
    Index base = 0;
    for (const Projection& p : ps) {
      const Index r = p.w.rows();
      const Index c0 = std::max(lo, base) - base, c1 = std::min(hi, base + r) - base;
      if (c0 < c1) project_cols(x, n, p.w, p.y, c0, c1);
      base += r;
    }
  });
}

/// RMSNorm of each of `rows` vectors of size dim (contiguous): v / sqrt(mean(v²) + eps) · w.
inline void rms_norm_rows(float* v, Index rows, Index dim, const float* weight, float eps) {
  for (Index r = 0; r < rows; ++r) {
    float* x = v + r * dim;
    double ss = 0;
    for (Index i = 0; i < dim; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float inv =
        static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + static_cast<double>(eps)));
    for (Index i = 0; i < dim; ++i) x[i] = x[i] * inv * weight[i];
  }
}

/// A SeqView over `n` tokens stored contiguously in one block (the no-cache forward): factor f
/// is places[f] (typically FactorPlace::token_major: token t at base + offset + t·rows·cols).
template <class S>
SeqView<S> contiguous_view(const S* const* base, const FactorPlace* places, Index n) {
  static const std::int32_t kTable[1] = {0};
  SeqView<S> v;
  v.block_base = base;
  v.table = kTable;
  v.places = places;
  v.n_tokens = n;
  v.block_tokens = n;
  return v;
}

}  // namespace detail
}  // namespace tpa
