// GroupedQueryAttention and its special cases MultiHeadAttention (G = H) and
// MultiQueryAttention (G = 1).
#pragma once

#include <new>
#include <string>
#include <utility>
#include <vector>

#include "tpa/backend/backends.hpp"
#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/config.hpp"
#include "tpa/core/rope.hpp"
#include "tpa/dispatch/grouped_decode.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/layers/chunk.hpp"
#include "tpa/layers/detail/call.hpp"
#include "tpa/layers/detail/variant.hpp"
#include "tpa/layers/gqa_weights.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {

/// Where GroupedQueryAttention<B, S> places K and V inside a cache block, for `group` query
/// heads per KV head (H / G): head-major (each KV head's tile of a block one contiguous run) for
/// int8, and for wider scalars when group ≤ sizeof(S) (≤ 1 query head per byte of a cached
/// element: the decode kernel then prefetches two steps ahead, GroupedTiled) or group ≥
/// 2 · sizeof(S); token-major (a token's G rows together) in between (f32 groups 5-7, 16-bit
/// 3), where nothing was measured. The kernels give bit-identical outputs either way; the rule
/// is what bench_decode decode_order measured with each head reading its run of a block front
/// to back (the two placements' steps alternated, 16K, 2 threads, 2-core AMD EPYC Zen 4;
/// head-major speed-up): int8 MHA 1.30x, GQA-8 1.22-1.30x, GQA-4 1.17-1.18x; bf16 MHA 1.09x,
/// GQA-8 1.07-1.15x, GQA-4 1.11-1.14x; f16 MHA 1.10x, GQA-8 1.11-1.16x, GQA-4 1.06-1.10x; f32
/// MHA 1.02x, GQA-4 1.07-1.08x; f32 GQA-8 with its two-step prefetch 1.08-1.11x over token-major
/// with one (0.97-0.98x with one step either way).
template <class CacheScalar>
constexpr TileOrder kv_tile_order(Index group) {
  constexpr Index bytes = static_cast<Index>(sizeof(CacheScalar));
  return bytes == 1 || group <= bytes || group >= 2 * bytes
             ? TileOrder::kHeadMajor
             : TileOrder::kTokenMajor;
}

/// \brief Grouped-query attention (SPEC.md, "MHA, GQA, MQA"): H query heads, G key/value heads,
/// query head h reads KV head h / (H/G). The cache stores, per token, the rotated keys
/// K [G, d] and the values V [G, d], placed in a block as kv_tile_order<CacheScalar>(H / G) says.
/// RoPE variants (cfg.rope): decay_base < 1 also scales the rotated dims of q and k by
/// decay_base^(p·θ_i) (the cached K carries its decay); style kNone rotates nothing and bounds
/// positions only by the cache. Both act when a token is projected, never in the attention
/// kernels, so a decode step's attention costs the same with them on or off.
///
/// All calls take x [tokens, d_model] and write y [tokens, d_model]. A call that throws
/// (tpa::Error, or std::bad_alloc) leaves the layer and the cache unchanged. A layer is immutable
/// after construction and may be shared between threads, each with its own Context; calls on
/// one cache from several threads follow KVCache's rules (distinct sequences, room reserved
/// with reserve_tokens; README, "Thread safety").
/// NaN/Inf in x are not checked for: they reach only the outputs and cache entries of the
/// sequence whose rows hold them, from that token on (never another sequence of the call or the
/// cache, nor that sequence's earlier tokens); nothing throws (README, "Errors, NaN and Inf").
///
/// \tparam Backend kernel set (Reference, Portable, Avx2, Avx512; default Native).
/// \tparam CacheScalar storage type of the KV cache it reads and writes.
template <class Backend = Native, class CacheScalar = float>
class GroupedQueryAttention {
  static_assert(detail::RequireBackend<Backend>::value);  // one clear error on misuse

 public:
  using Config = GqaConfig;
  using Weights = GqaWeights;
  using Cache = KVCache<CacheScalar>;

  /// \throws Error if the config is invalid or a weight has the wrong shape.
  GroupedQueryAttention(const GqaConfig& cfg, GqaWeights weights)
      : GroupedQueryAttention("GroupedQueryAttention", "GQA", cfg, std::move(weights)) {}

  const GqaConfig& config() const { return cfg_; }
  const GqaWeights& weights() const { return w_; }
  const RopeTable& rope() const { return rope_; }
  /// Name of the kind: "MHA", "GQA" or "MQA".
  const std::string& kind() const { return kind_; }

  /// What one token stores in this layer's cache: K [G, d] (rotated) and V [G, d], token-major
  /// in a block (the kernels read either placement; see the constructor for why this one).
  CacheLayout cache_layout() const { return layout_; }

  /// Causal attention over the given tokens alone (positions 0 … tokens−1), no cache.
  /// \throws Error on wrong shapes or positions past the RoPE table.
  void forward(Context& ctx, ConstTensorView<float, 2> x, TensorView<float, 2> y) const {
    detail::check_io(who_.c_str(), x, y, cfg_.d_model);
    const Index n = x.dimension(0);
    rope_.check_positions(who_.c_str(), 0, n);
    ScratchGuard guard(ctx.scratch());
    detail::Segment seg{-1, 0, n, 0};
    Buffers b = project(ctx, x, &seg, 1);
    const float* base[1] = {b.kv};
    const Index G = cfg_.kv_heads(), d = cfg_.head_dim;
    const FactorPlace places[2] = {FactorPlace::token_major(0, G, d),
                                   FactorPlace::token_major(n * kv_width(), G, d)};
    const auto p = params<float>(b, seg, detail::contiguous_view<float>(base, places, n));
    grouped_attention<Backend>(ctx, &p, 1);
    finish(ctx, b, n, y);
  }

  /// Appends the tokens x to sequence `seq` of `cache` (layer `layer`) at the positions that
  /// follow its cached ones, and attends over everything cached: prefill, chunked prefill
  /// (several calls) and single-token decode alike.
  /// \throws Error on wrong shapes, an unknown sequence or layer, a cache whose layer layout is
  /// not cache_layout(), positions past the RoPE table, or a full cache.
  void forward(Context& ctx, ConstTensorView<float, 2> x, TensorView<float, 2> y, Cache& cache,
               int layer, SeqId seq) const {
    detail::Segment seg{seq, 0, x.dimension(0), 0};
    run_cached(ctx, x, y, cache, layer, &seg, 1);
  }

  /// Ragged call: appends chunk i's tokens — the next chunks[i].tokens rows of x, in order — to
  /// sequence chunks[i].seq of `cache` (layer `layer`) and attends over everything cached, for
  /// every chunk at once: prefill chunks, single decode tokens and speculative drafts in any mix
  /// (continuous batching, chunked prefill beside decode). The work of all chunks is split over
  /// ctx's threads, across and within chunks. Each chunk's outputs and cache entries are the
  /// bits it would get called alone (and with any thread count). All or nothing: if it throws,
  /// no sequence changed.
  /// \throws Error as forward(…, seq), or if there is no chunk, a chunk has no token, the tokens
  /// do not add up to x's rows, or a sequence appears twice.
  void forward(Context& ctx, ConstTensorView<float, 2> x, TensorView<float, 2> y, Cache& cache,
               int layer, const Chunk* chunks, Index n_chunks) const {
    ScratchGuard guard(ctx.scratch());
    detail::Segment* segs = detail::chunk_segments(who_.c_str(), ctx.scratch(), x.dimension(0), chunks,
                                                   n_chunks);
    run_cached(ctx, x, y, cache, layer, segs, n_chunks);
  }
  /// The ragged call over a vector of chunks (see above).
  void forward(Context& ctx, ConstTensorView<float, 2> x, TensorView<float, 2> y, Cache& cache,
               int layer, const std::vector<Chunk>& chunks) const {
    forward(ctx, x, y, cache, layer, chunks.data(), static_cast<Index>(chunks.size()));
  }

  /// One token for each of several sequences: row b of x [B, d_model] is the next token of
  /// seqs[b] (the ragged call with one-token chunks). Sequences may have different lengths; each
  /// must appear once.
  /// \throws Error as forward(), or if seqs.size() != B or a sequence repeats.
  void decode(Context& ctx, ConstTensorView<float, 2> x, TensorView<float, 2> y, Cache& cache,
              int layer, const std::vector<SeqId>& seqs) const {
    TPA_CHECK(static_cast<Index>(seqs.size()) == x.dimension(0), who_, ": decode got ",
              seqs.size(), " sequences for ", x.dimension(0), " rows of x");
    ScratchGuard guard(ctx.scratch());
    auto* segs = static_cast<detail::Segment*>(
        ctx.scratch().bytes(sizeof(detail::Segment) * seqs.size()));
    for (std::size_t b = 0; b < seqs.size(); ++b)
      segs[b] = detail::Segment{seqs[b], static_cast<Index>(b), 1, 0};
    run_cached(ctx, x, y, cache, layer, segs, static_cast<Index>(seqs.size()));
  }

 protected:
  GroupedQueryAttention(const char* who, const char* kind, const GqaConfig& cfg,
                        GqaWeights weights)
      : who_(who), kind_(kind), cfg_(cfg), w_(std::move(weights)) {
    cfg_.validate(who);
    w_.check(cfg_, who);
    rope_ = RopeTable(cfg_.rope, cfg_.head_dim);
    alibi_ = cfg_.variant.resolved_alibi_slopes(cfg_.n_heads);
    const Index G = cfg_.kv_heads(), d = cfg_.head_dim;
    const TileOrder order = kv_tile_order<CacheScalar>(cfg_.group_size());
    layout_ = CacheLayout(kind_, {{"K", G, d, true, order}, {"V", G, d, false, order}});
  }

 private:
  struct Buffers {
    float* q;   // [N, H·d]
    float* kv;  // [N, G·d] keys, then [N, G·d] values
    float* o;   // [N, H·d]
    Index n;
  };

  Index kv_width() const { return cfg_.kv_heads() * cfg_.head_dim; }
  Index q_width() const { return cfg_.n_heads * cfg_.head_dim; }

  void run_cached(Context& ctx, const ConstTensorView<float, 2>& x, TensorView<float, 2>& y,
                  Cache& cache, int layer, detail::Segment* segs, Index n_segs) const {
    detail::check_io(who_.c_str(), x, y, cfg_.d_model);
    const Index blocks =
        detail::plan_cache_call(who_.c_str(), cache, layer, layout_, rope_, segs, n_segs);
    detail::check_released(who_.c_str(), cache, cfg_.variant, segs, n_segs);
    // Nothing below throws tpa::Error: the checks above cover every precondition. On
    // std::bad_alloc, `call` undoes the appends and the blocks it allocated.
    ScratchGuard guard(ctx.scratch());
    detail::CacheCall<CacheScalar> call(ctx, cache, layer, segs, n_segs, blocks);
    Buffers b = project(ctx, x, segs, n_segs);
    const Index N = x.dimension(0);
    for (Index s = 0; s < n_segs; ++s) {
      const FactorRows rows[2] = {{b.kv + segs[s].row0 * kv_width(), kv_width()},
                                  {b.kv + (N + segs[s].row0) * kv_width(), kv_width()}};
      cache.append(segs[s].seq, layer, segs[s].n, rows);
    }
    // One kernel call per sequence, all of them split over ctx's threads.
    using Params = GroupedAttentionParams<CacheScalar>;
    auto* calls = static_cast<Params*>(ctx.scratch().bytes(sizeof(Params) * n_segs));
    for (Index s = 0; s < n_segs; ++s)
      new (&calls[s]) Params(params<CacheScalar>(b, segs[s], cache.view(segs[s].seq, layer)));
    grouped_attention<Backend>(ctx, calls, n_segs);
    finish(ctx, b, N, y, {segs, n_segs, 0});
    call.commit();
  }

  // Projections of all tokens at once, then RoPE on q and k at each token's position.
  Buffers project(Context& ctx, const ConstTensorView<float, 2>& x, const detail::Segment* segs,
                  Index n_segs) const {
    const Index N = x.dimension(0), d = cfg_.head_dim;
    Buffers b{ctx.scratch().floats(N * q_width()), ctx.scratch().floats(2 * N * kv_width()),
              ctx.scratch().floats(N * q_width()), N};
    detail::project(ctx, x.data(), N,
                    {{w_.c_q, b.q}, {w_.c_k, b.kv}, {w_.c_v, b.kv + N * kv_width()}},
                    {segs, n_segs, 0});
    for (Index s = 0; s < n_segs; ++s) {
      for (Index i = 0; i < segs[s].n; ++i) {
        const Index row = segs[s].row0 + i, pos = segs[s].pos0 + i;
        rope_.rotate(b.q + row * q_width(), pos, cfg_.n_heads, d);
        rope_.rotate(b.kv + row * kv_width(), pos, cfg_.kv_heads(), d);
      }
    }
    return b;
  }

  // The kernel call of one segment's queries over the view kv.
  template <class S>
  GroupedAttentionParams<S> params(const Buffers& b, const detail::Segment& seg,
                                   const SeqView<S>& kv) const {
    GroupedAttentionParams<S> p;
    p.q = b.q + seg.row0 * q_width();
    p.q_stride = q_width();
    p.o = b.o + seg.row0 * q_width();
    p.o_stride = q_width();
    p.n_q = seg.n;
    p.q_pos0 = seg.pos0;
    p.n_heads = cfg_.n_heads;
    p.n_kv_heads = cfg_.kv_heads();
    p.k_factor[0] = 0;
    p.k_dims[0] = cfg_.head_dim;
    p.v_factor = 1;
    p.d_v = cfg_.head_dim;
    p.scale = cfg_.scale();
    p.kv = kv;
    p.variant = detail::score_variant(cfg_.variant, alibi_, w_.sinks);
    return p;
  }

  // Optional per-head RMSNorm, then the output projection.
  void finish(Context& ctx, const Buffers& b, Index N, TensorView<float, 2>& y,
              const detail::RowChunks& chunks = {}) const {
    if (cfg_.head_norm)
      detail::rms_norm_rows(b.o, N * cfg_.n_heads, cfg_.head_dim, w_.subln.data(), cfg_.norm_eps);
    detail::project(ctx, b.o, N, {{w_.c_proj, y.data()}}, chunks);
  }

  std::string who_;
  std::string kind_;
  GqaConfig cfg_;
  GqaWeights w_;
  RopeTable rope_;
  std::vector<float> alibi_;  // resolved ALiBi slopes [H] (empty without ALiBi)
  CacheLayout layout_;  // built once: a decode step allocates nothing
};

/// \brief Multi-head attention: GroupedQueryAttention with one KV head per query head.
/// cfg.n_kv_heads must be 0 or n_heads.
template <class Backend = Native, class CacheScalar = float>
class MultiHeadAttention : public GroupedQueryAttention<Backend, CacheScalar> {
 public:
  /// \throws Error if n_kv_heads is neither 0 nor n_heads, or as GroupedQueryAttention.
  MultiHeadAttention(const GqaConfig& cfg, GqaWeights weights)
      : GroupedQueryAttention<Backend, CacheScalar>("MultiHeadAttention", "MHA", with_kv(cfg),
                                                    std::move(weights)) {}

 private:
  static GqaConfig with_kv(GqaConfig cfg) {
    TPA_CHECK(cfg.n_kv_heads == 0 || cfg.n_kv_heads == cfg.n_heads,
              "MultiHeadAttention: n_kv_heads (", cfg.n_kv_heads, ") must be 0 or n_heads (",
              cfg.n_heads, ")");
    cfg.n_kv_heads = cfg.n_heads;
    return cfg;
  }
};

/// \brief Multi-query attention: GroupedQueryAttention with one KV head shared by all query
/// heads. cfg.n_kv_heads must be 0 or 1.
template <class Backend = Native, class CacheScalar = float>
class MultiQueryAttention : public GroupedQueryAttention<Backend, CacheScalar> {
 public:
  /// \throws Error if n_kv_heads is neither 0 nor 1, or as GroupedQueryAttention.
  MultiQueryAttention(const GqaConfig& cfg, GqaWeights weights)
      : GroupedQueryAttention<Backend, CacheScalar>("MultiQueryAttention", "MQA", with_kv(cfg),
                                                    std::move(weights)) {}

 private:
  static GqaConfig with_kv(GqaConfig cfg) {
    TPA_CHECK(cfg.n_kv_heads == 0 || cfg.n_kv_heads == 1, "MultiQueryAttention: n_kv_heads (",
              cfg.n_kv_heads, ") must be 0 or 1");
    cfg.n_kv_heads = 1;
    return cfg;
  }
};

}  // namespace tpa
