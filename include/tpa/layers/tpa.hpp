// TensorProductAttention: the attention of the T6 model (SPEC.md, "TPA"), and its K/V-only
// variant.
#pragma once

#include <cmath>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "tpa/backend/backends.hpp"
#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/config.hpp"
#include "tpa/core/rope.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/dispatch/tpa_decode.hpp"
#include "tpa/layers/chunk.hpp"
#include "tpa/layers/detail/call.hpp"
#include "tpa/layers/detail/variant.hpp"
#include "tpa/layers/tpa_weights.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {

/// \brief Tensor Product Attention (SPEC.md, "TPA"; `model/T6.py`, or `model/T6_kvonly.py` when
/// cfg.kv_only).
///
/// Each token's queries, keys and values of all H heads are low-rank tensor products of
/// contextual factors: q_h = (1/R_Q) Σ_r A_Q[h,r] B_Q[r] (or a plain projection when kv_only),
/// k_h = (1/R_K) Σ_r A_K[h,r] B_K[r], v_h = (1/R_V) Σ_r A_V[h,r] B_V[r]. RoPE rotates the rows of
/// B_Q and B_K (kv_only: the query heads and the rows of B_K). The cache stores, per token, the
/// factors A_K [H, R_K], B_K [R_K, d] (rotated), A_V [H, R_V], B_V [R_V, d] — never per-head
/// keys or values: (R_K + R_V)(H + d) elements per token and layer.
/// Variants (per layer, applied once per token when it is projected, so a decode step's
/// attention costs the same with or without them): cfg.factor_activation = kSigmoid puts every A
/// through σ first (the cache holds σ(A_K), σ(A_V)); cfg.rope.decay_base < 1 also scales the
/// rotated dims of B_Q / B_K rows by decay_base^(p·θ_i) (cached B_K carries its decay);
/// cfg.rope.style = kNone rotates nothing and bounds positions only by the cache.
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
class TensorProductAttention {
  static_assert(detail::RequireBackend<Backend>::value);  // one clear error on misuse

 public:
  using Config = TpaConfig;
  using Weights = TpaWeights;
  using Cache = KVCache<CacheScalar>;

  /// Index of each factor in cache_layout() (and in the SeqView the kernels read).
  static constexpr std::size_t kFactorAK = 0;
  static constexpr std::size_t kFactorBK = 1;
  static constexpr std::size_t kFactorAV = 2;
  static constexpr std::size_t kFactorBV = 3;

  /// \throws Error if the config is invalid or a weight it uses has the wrong shape.
  TensorProductAttention(const TpaConfig& cfg, TpaWeights weights)
      : cfg_(cfg), w_(std::move(weights)) {
    cfg_.validate(kWho);
    w_.check(cfg_, kWho);
    rope_ = RopeTable(cfg_.rope, cfg_.head_dim);
    alibi_ = cfg_.variant.resolved_alibi_slopes(cfg_.n_heads);
    kind_ = cfg_.kv_only ? "TPA-KV" : "TPA";
    const Index H = cfg_.n_heads, d = cfg_.head_dim;
    elements_[kFactorAK] = H * cfg_.k_rank;
    elements_[kFactorBK] = cfg_.k_rank * d;
    elements_[kFactorAV] = H * cfg_.v_rank;
    elements_[kFactorBV] = cfg_.v_rank * d;
    const Index RK = cfg_.k_rank, RV = cfg_.v_rank;
    layout_ = CacheLayout(kind_, {{"A_K", H, RK, false},
                                  {"B_K", RK, d, true},
                                  {"A_V", H, RV, false},
                                  {"B_V", RV, d, false}});
  }

  const TpaConfig& config() const { return cfg_; }
  const TpaWeights& weights() const { return w_; }
  const RopeTable& rope() const { return rope_; }
  /// Name of the kind: "TPA", or "TPA-KV" for the K/V-only variant.
  const std::string& kind() const { return kind_; }

  /// What one token stores in this layer's cache: A_K [H, R_K], B_K [R_K, d] (rotated),
  /// A_V [H, R_V], B_V [R_V, d], in that order.
  CacheLayout cache_layout() const { return layout_; }

  /// Causal attention over the given tokens alone (positions 0 … tokens−1), no cache.
  /// \throws Error on wrong shapes or positions past the RoPE table.
  void forward(Context& ctx, ConstTensorView<float, 2> x, TensorView<float, 2> y) const {
    detail::check_io(kWho, x, y, cfg_.d_model);
    const Index n = x.dimension(0);
    rope_.check_positions(kWho, 0, n);
    ScratchGuard guard(ctx.scratch());
    detail::Segment seg{-1, 0, n, 0};
    Buffers b = project(ctx, x, &seg, 1);
    const float* base[1] = {b.kv};
    FactorPlace places[4];
    for (std::size_t f = 0; f < 4; ++f) {
      const FactorSpec& spec = layout_.factor(f);
      places[f] = FactorPlace::token_major(b.kv_offset[f], spec.rows, spec.cols);
    }
    const auto p = params<float>(b, seg, detail::contiguous_view<float>(base, places, n));
    tpa_attention<Backend>(ctx, &p, 1);
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
    detail::Segment* segs = detail::chunk_segments(kWho, ctx.scratch(), x.dimension(0), chunks,
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
    TPA_CHECK(static_cast<Index>(seqs.size()) == x.dimension(0), kWho, ": decode got ", seqs.size(),
              " sequences for ", x.dimension(0), " rows of x");
    ScratchGuard guard(ctx.scratch());
    auto* segs =
        static_cast<detail::Segment*>(ctx.scratch().bytes(sizeof(detail::Segment) * seqs.size()));
    for (std::size_t b = 0; b < seqs.size(); ++b)
      segs[b] = detail::Segment{seqs[b], static_cast<Index>(b), 1, 0};
    run_cached(ctx, x, y, cache, layer, segs, static_cast<Index>(seqs.size()));
  }

 private:
  static constexpr const char* kWho = "TensorProductAttention";

  // Per-call buffers in the context's scratch. All token-major over the call's N rows.
  struct Buffers {
    float* a_q;          // [N, H·R_Q] (factored query)
    float* b_q;          // [N, R_Q·d] rotated (factored query)
    float* q;            // [N, H·d] rotated (kv_only)
    float* kv;           // A_K [N, H·R_K], then B_K [N, R_K·d], A_V [N, H·R_V], B_V [N, R_V·d]
    float* o;            // [N, H·d]
    Index kv_offset[4];  // elements from kv to each factor's first row
  };

  Index q_width() const { return cfg_.n_heads * cfg_.head_dim; }

  void run_cached(Context& ctx, const ConstTensorView<float, 2>& x, TensorView<float, 2>& y,
                  Cache& cache, int layer, detail::Segment* segs, Index n_segs) const {
    detail::check_io(kWho, x, y, cfg_.d_model);
    const Index blocks =
        detail::plan_cache_call(kWho, cache, layer, layout_, rope_, segs, n_segs);
    detail::check_released(kWho, cache, cfg_.variant, segs, n_segs);
    // Nothing below throws tpa::Error: the checks above cover every precondition. On
    // std::bad_alloc, `call` undoes the appends and the blocks it allocated.
    ScratchGuard guard(ctx.scratch());
    detail::CacheCall<CacheScalar> call(ctx, cache, layer, segs, n_segs, blocks);
    Buffers b = project(ctx, x, segs, n_segs);
    for (Index s = 0; s < n_segs; ++s) {
      FactorRows rows[4];
      for (std::size_t f = 0; f < 4; ++f)
        rows[f] = {b.kv + b.kv_offset[f] + segs[s].row0 * elements_[f], elements_[f]};
      cache.append(segs[s].seq, layer, segs[s].n, rows);
    }
    // One kernel call per sequence, all of them split over ctx's threads.
    using Params = TpaAttentionParams<CacheScalar>;
    auto* calls = static_cast<Params*>(ctx.scratch().bytes(sizeof(Params) * n_segs));
    for (Index s = 0; s < n_segs; ++s)
      new (&calls[s]) Params(params<CacheScalar>(b, segs[s], cache.view(segs[s].seq, layer)));
    tpa_attention<Backend>(ctx, calls, n_segs);
    finish(ctx, b, x.dimension(0), y, {segs, n_segs, 0});
    call.commit();
  }

  // a ← σ(a) = 1 / (1 + e^−a) for n floats (FactorActivation::kSigmoid); e^−a = inf for
  // a < −88 gives exactly 0, NaN stays NaN.
  static void sigmoid(float* a, Index n) {
    for (Index i = 0; i < n; ++i) a[i] = 1.f / (1.f + std::exp(-a[i]));
  }

  // Projections of all tokens at once (one GEMM per weight), the factor activation on A_Q, A_K,
  // A_V, then RoPE (with decay, if any) at each token's position on the rows of B_Q (kv_only:
  // the query heads) and of B_K.
  Buffers project(Context& ctx, const ConstTensorView<float, 2>& x, const detail::Segment* segs,
                  Index n_segs) const {
    const Index N = x.dimension(0), H = cfg_.n_heads, d = cfg_.head_dim, RQ = cfg_.q_rank;
    Scratch& scratch = ctx.scratch();
    Buffers b{};
    Index kv_elements = 0;
    for (std::size_t f = 0; f < 4; ++f) {
      b.kv_offset[f] = kv_elements;
      kv_elements += N * elements_[f];
    }
    b.kv = scratch.floats(kv_elements);
    b.o = scratch.floats(N * q_width());
    if (cfg_.kv_only) {
      b.q = scratch.floats(N * q_width());
    } else {
      b.a_q = scratch.floats(N * H * RQ);
      b.b_q = scratch.floats(N * RQ * d);
    }
    const detail::Projection kv[4] = {{w_.W_A_k, b.kv + b.kv_offset[kFactorAK]},
                                      {w_.W_B_k, b.kv + b.kv_offset[kFactorBK]},
                                      {w_.W_A_v, b.kv + b.kv_offset[kFactorAV]},
                                      {w_.W_B_v, b.kv + b.kv_offset[kFactorBV]}};
    if (cfg_.kv_only) {
      detail::project(ctx, x.data(), N, {{w_.c_q, b.q}, kv[0], kv[1], kv[2], kv[3]},
                      {segs, n_segs, 0});
    } else {
      detail::project(ctx, x.data(), N,
                      {{w_.W_A_q, b.a_q}, {w_.W_B_q, b.b_q}, kv[0], kv[1], kv[2], kv[3]},
                      {segs, n_segs, 0});
    }
    if (cfg_.factor_activation == FactorActivation::kSigmoid) {
      if (!cfg_.kv_only) sigmoid(b.a_q, N * H * RQ);
      sigmoid(b.kv + b.kv_offset[kFactorAK], N * elements_[kFactorAK]);
      sigmoid(b.kv + b.kv_offset[kFactorAV], N * elements_[kFactorAV]);
    }
    float* b_k = b.kv + b.kv_offset[kFactorBK];
    for (Index s = 0; s < n_segs; ++s) {
      for (Index i = 0; i < segs[s].n; ++i) {
        const Index row = segs[s].row0 + i, pos = segs[s].pos0 + i;
        if (cfg_.kv_only) {
          rope_.rotate(b.q + row * q_width(), pos, H, d);
        } else {
          rope_.rotate(b.b_q + row * RQ * d, pos, RQ, d);
        }
        rope_.rotate(b_k + row * elements_[kFactorBK], pos, cfg_.k_rank, d);
      }
    }
    return b;
  }

  // The kernel call of one segment's queries over the view kv.
  template <class S>
  TpaAttentionParams<S> params(const Buffers& b, const detail::Segment& seg,
                               const SeqView<S>& kv) const {
    const Index H = cfg_.n_heads, d = cfg_.head_dim, RQ = cfg_.q_rank;
    TpaAttentionParams<S> p;
    if (cfg_.kv_only) {
      p.q_rank = 0;
      p.q = b.q + seg.row0 * q_width();
      p.q_stride = q_width();
    } else {
      p.q_rank = RQ;
      p.a_q = b.a_q + seg.row0 * H * RQ;
      p.a_q_stride = H * RQ;
      p.b_q = b.b_q + seg.row0 * RQ * d;
      p.b_q_stride = RQ * d;
    }
    p.o = b.o + seg.row0 * q_width();
    p.o_stride = q_width();
    p.n_q = seg.n;
    p.q_pos0 = seg.pos0;
    p.n_heads = H;
    p.head_dim = d;
    p.k_rank = cfg_.k_rank;
    p.v_rank = cfg_.v_rank;
    p.a_k_factor = kFactorAK;
    p.b_k_factor = kFactorBK;
    p.a_v_factor = kFactorAV;
    p.b_v_factor = kFactorBV;
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

  TpaConfig cfg_;
  TpaWeights w_;
  RopeTable rope_;
  std::vector<float> alibi_;  // resolved ALiBi slopes [H] (empty without ALiBi)
  std::string kind_;
  Index elements_[4] = {0, 0, 0, 0};  // elements per token of each cached factor
  CacheLayout layout_;                // built once: a decode step allocates nothing
};

}  // namespace tpa
