// Plumbing shared by every layer call: input checks, the plan of which tokens go to which
// sequence at which positions, projections and per-head RMSNorm.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <new>
#include <vector>

#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/rope.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/layers/chunk.hpp"
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

/// The segments of a ragged call's chunks, in `scratch` (consecutive rows of x, in order).
/// \throws Error unless there is at least one chunk, each has ≥ 1 token, and the tokens add up to
/// x's rows (the sequences are checked by plan_cache_call).
inline Segment* chunk_segments(const char* who, Scratch& scratch, Index rows, const Chunk* chunks,
                               Index n_chunks) {
  TPA_CHECK(n_chunks >= 1 && chunks != nullptr, who, ": a ragged call needs at least one chunk, got ",
            n_chunks);
  auto* segs = static_cast<Segment*>(
      scratch.bytes(sizeof(Segment) * static_cast<std::size_t>(n_chunks)));
  Index row = 0;
  for (Index i = 0; i < n_chunks; ++i) {
    TPA_CHECK(chunks[i].tokens >= 1, who, ": chunk ", i, " (sequence ", chunks[i].seq, ") has ",
              chunks[i].tokens, " tokens, needs at least 1");
    TPA_CHECK(chunks[i].tokens <= rows - row, who, ": the chunks hold more tokens than x has rows (",
              rows, "): chunk ", i, " needs rows ", row, " … ", row + chunks[i].tokens - 1);
    segs[i] = Segment{chunks[i].seq, row, chunks[i].tokens, 0};
    row += chunks[i].tokens;
  }
  TPA_CHECK(row == rows, who, ": the chunks hold ", row, " tokens, x has ", rows,
            " rows; they must be equal");
  return segs;
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

/// \brief The products y[n, out] = x[n, depth] · Wᵀ of the layers, computed so that every
/// output element is the same float whatever the thread count, the number of rows n of the call
/// and the row's place in it (a decode token alone, or in a ragged batch, gives the bits it gives
/// in any other call).
///
/// Each element is the dot product of its x row and W row in one fixed order: kDotLanes partial
/// sums (lane j adds the products of k ≡ j mod kDotLanes, k ascending), added pairwise (lane
/// j + 16 into j, then + 8, + 4, + 2, + 1), then the products of the last depth mod kDotLanes elements
/// in order. The kernel computes blocks of kDotRows rows × kDotCols features at a time (so
/// a weight row is read once per kDotRows rows) with that same arithmetic for every element of
/// every block shape; threads take whole tiles of kProjectTile features.
constexpr Index kProjectTile = 128;
/// Partial sums per dot product: two AVX-512 vectors (or four AVX2 ones), so that each sum's
/// dependency chain is one add every other step; with 16 lanes a single decode token's
/// projection ran about 1.5x slower than Eigen's GEMV (latency-bound), with 32 about as fast.
constexpr int kDotLanes = 32;
constexpr int kDotRows = 2;
#if defined(__AVX512F__)
constexpr int kDotCols = 4;  // 8 dot products × 2 zmm = 16 of the 32 zmm registers
constexpr int kDotCols1 = 8;  // features of a one-row block (decode): 16 zmm too
#else
constexpr int kDotCols = 2;  // 4 dot products × 4 ymm = all 16 ymm registers
constexpr int kDotCols1 = 4;
#endif

/// y[r·ldy + c] = x_r · w_c for R rows (x row r at x + r·ldx) and C features (w row c at
/// w + c·ldw), depth elements each, in the order described at kProjectTile.
template <int R, int C>
inline void dot_block(const float* x, Index ldx, const float* w, Index ldw, Index depth, float* y,
                      Index ldy) {
  float acc[R][C][kDotLanes];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c)
      for (int j = 0; j < kDotLanes; ++j) acc[r][c][j] = 0.f;
  const Index kv = depth / kDotLanes * kDotLanes;
  for (Index k = 0; k < kv; k += kDotLanes) {
    for (int r = 0; r < R; ++r) {
      const float* xr = x + r * ldx + k;
      for (int c = 0; c < C; ++c) {
        const float* wc = w + c * ldw + k;
        for (int j = 0; j < kDotLanes; ++j) acc[r][c][j] += xr[j] * wc[j];
      }
    }
  }
  static_assert(kDotLanes == 32, "dot_block reduces 32 lanes");
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < C; ++c) {
      float* a = acc[r][c];
      // Pairwise, with constant trip counts so that the compiler keeps the vectors.
      for (int j = 0; j < 16; ++j) a[j] += a[j + 16];
      for (int j = 0; j < 8; ++j) a[j] += a[j + 8];
      for (int j = 0; j < 4; ++j) a[j] += a[j + 4];
      for (int j = 0; j < 2; ++j) a[j] += a[j + 2];
      a[0] += a[1];
      float s = a[0];
      for (Index k = kv; k < depth; ++k) s += x[r * ldx + k] * w[c * ldw + k];
      y[r * ldy + c] = s;
    }
  }
}

/// Rows [0, n) × features [0, cols) of y = x · Wᵀ (x rows ldx apart, W rows ldw apart, y rows
/// ldy apart, y pointing at the first feature), on the calling thread: blocks of kDotRows rows ×
/// kDotCols features (a last single row: 1 × kDotCols1), the remainders one feature at a time
/// (same arithmetic).
inline void dot_tile(const float* x, Index ldx, Index n, const float* w, Index ldw, Index depth,
                     Index cols, float* y, Index ldy) {
  for (Index i = 0; i < n; i += kDotRows) {
    const float* xi = x + i * ldx;
    float* yi = y + i * ldy;
    if (n - i >= kDotRows) {
      const Index c_main = cols / kDotCols * kDotCols;
      for (Index c = 0; c < c_main; c += kDotCols)
        dot_block<kDotRows, kDotCols>(xi, ldx, w + c * ldw, ldw, depth, yi + c, ldy);
      for (Index c = c_main; c < cols; ++c)
        dot_block<kDotRows, 1>(xi, ldx, w + c * ldw, ldw, depth, yi + c, ldy);
    } else {
      const Index c_main = cols / kDotCols1 * kDotCols1;
      for (Index c = 0; c < c_main; c += kDotCols1)
        dot_block<1, kDotCols1>(xi, ldx, w + c * ldw, ldw, depth, yi + c, ldy);
      for (Index c = c_main; c < cols; ++c)
        dot_block<1, 1>(xi, ldx, w + c * ldw, ldw, depth, yi + c, ldy);
    }
  }
}

/// Rows of a chunk from which project() uses Eigen's GEMM instead of the dot kernel (prefill:
/// the dot kernel re-reads each weight tile for every kDotRows rows, ~1.5× slower at 2K rows).
constexpr Index kGemmRows = 64;
/// Output features per GEMM of project() (whole tiles per thread, as kProjectTile).
constexpr Index kGemmTile = 512;

/// \brief How project() groups a call's rows: the segments (chunks) of a ragged call. The rows
/// of a chunk of at least kGemmRows rows go through one GEMM per tile of kGemmTile features
/// over that chunk alone, the other rows through the dot kernel; either way a row's bits depend
/// only on its own chunk (the same call computes them when the chunk is alone) and never on
/// the thread count.
struct RowChunks {
  const Segment* segs = nullptr;  ///< null: the call's rows are one chunk
  Index n_segs = 0;
  Index row0 = 0;  ///< the call's row 0 is row `row0` of the segments' numbering
};

/// Calls f(r0, r1, gemm) for the runs of rows [0, n) of a call: each chunk of at least
/// kGemmRows rows (gemm), and each run of consecutive rows of smaller chunks.
template <class F>
void for_each_row_run(Index n, const RowChunks& chunks, const F& f) {
  if (chunks.segs == nullptr) {
    if (n > 0) f(Index(0), n, n >= kGemmRows);
    return;
  }
  Index run0 = 0, run1 = 0;  // pending run of small-chunk rows
  for (Index s = 0; s < chunks.n_segs; ++s) {
    const Index a = std::max<Index>(0, chunks.segs[s].row0 - chunks.row0);
    const Index b = std::min(n, chunks.segs[s].row0 - chunks.row0 + chunks.segs[s].n);
    if (a >= b) continue;
    if (chunks.segs[s].n >= kGemmRows) {
      if (run1 > run0) f(run0, run1, false);
      run0 = run1 = b;
      f(a, b, true);
    } else if (run1 == a && run1 > run0) {
      run1 = b;
    } else {
      if (run1 > run0) f(run0, run1, false);
      run0 = a;
      run1 = b;
    }
  }
  if (run1 > run0) f(run0, run1, false);
}

/// Features [c0, c0 + cols) of y = x · Wᵀ for n rows (x rows ldx apart, W [out, depth] row-major,
/// y rows ldy apart, y pointing at feature 0), on the calling thread: Eigen's GEMM or the dot
/// kernel.
inline void project_block(const float* x, Index ldx, Index n, const ConstMatrixMap<float>& w,
                          Index c0, Index cols, float* y, Index ldy, bool gemm) {
  const Index depth = w.cols();
  if (!gemm) {
    dot_tile(x, ldx, n, w.data() + c0 * depth, depth, depth, cols, y + c0, ldy);
    return;
  }
  using Strided = Eigen::Map<const Matrix<float>, 0, Eigen::OuterStride<>>;
  using StridedOut = Eigen::Map<Matrix<float>, 0, Eigen::OuterStride<>>;
  const Strided xm(x, n, depth, Eigen::OuterStride<>(ldx));
  StridedOut ym(y + c0, n, cols, Eigen::OuterStride<>(ldy));
  ym.noalias() = xm * w.middleRows(c0, cols).transpose();
}

/// y[n, out] = x[n, depth] · Wᵀ with strided x and y (W [out, depth] row-major) on the calling
/// thread, with the same per-element guarantee as project(ctx, …).
inline void project_strided(const float* x, Index ldx, Index n, const ConstMatrixMap<float>& w,
                            float* y, Index ldy, const RowChunks& chunks = {}) {
  for_each_row_run(n, chunks, [&](Index r0, Index r1, bool gemm) {
    const Index tile = gemm ? kGemmTile : w.rows();
    for (Index c = 0; c < w.rows(); c += tile)
      project_block(x + r0 * ldx, ldx, r1 - r0, w, c, std::min(tile, w.rows() - c), y + r0 * ldy,
                    ldy, gemm);
  });
}

/// One product of a batched project(): y[n, w.rows()] = x · wᵀ (w row-major).
struct Projection {
  Projection(const Matrix<float>& m, float* out) : w(m.data(), m.rows(), m.cols()), y(out) {}
  Projection(const ConstMatrixMap<float>& m, float* out) : w(m), y(out) {}
  ConstMatrixMap<float> w;
  float* y;
};

/// Every product of `ps` over the same input x[n, d] (each y row-major and contiguous), spread
/// over ctx's threads by whole tiles of output features (kProjectTile for the dot kernel,
/// kGemmTile for a GEMM chunk; contiguous runs of tiles per thread, so each thread streams its
/// share of the weights once). Every output element is the same float with any thread count and
/// whatever the other chunks of the call (see kProjectTile, RowChunks). Allocates nothing for
/// chunks under kGemmRows rows (decode, decode batches, drafts); Eigen's GEMM may for larger ones.
inline void project(Context& ctx, const float* x, Index n, std::initializer_list<Projection> ps,
                    const RowChunks& chunks = {}) {
  if (ps.size() == 0) return;
  const Index depth = ps.begin()->w.cols();
  for_each_row_run(n, chunks, [&](Index r0, Index r1, bool gemm) {
    const Index rows = r1 - r0, tile_w = gemm ? kGemmTile : kProjectTile;
    Index total = 0, tiles = 0;
    for (const Projection& p : ps) {
      total += p.w.rows();
      tiles += (p.w.rows() + tile_w - 1) / tile_w;
    }
    // Below 64 K multiply-adds (256 KB of weights) waking a second thread costs about what it
    // saves.
    const Index parts =
        total * depth * rows < (Index(1) << 16) ? 1 : std::min<Index>(ctx.threads(), tiles);
    const auto run_tiles = [&](Index t0, Index t1) {
      Index t = 0;
      for (const Projection& p : ps) {
        const Index out = p.w.rows();
        for (Index c = 0; c < out; c += tile_w, ++t) {
          if (t < t0 || t >= t1) continue;
          project_block(x + r0 * depth, depth, rows, p.w, c, std::min(tile_w, out - c),
                        p.y + r0 * out, out, gemm);
        }
      }
    };
    if (parts <= 1) {
      run_tiles(0, tiles);
      return;
    }
    ctx.parallel_for(parts, [&](Index part) {
      run_tiles(part * tiles / parts, (part + 1) * tiles / parts);
    });
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
