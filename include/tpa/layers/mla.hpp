// MultiHeadLatentAttention: DeepSeek-V2 style multi-head latent attention over a latent KV cache.
#pragma once

#include <algorithm>
#include <cstring>
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
#include "tpa/layers/mla_weights.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {

/// \brief Multi-head latent attention (SPEC.md, "MLA"; reference `model/llama-mla.py`).
///
/// Per token: c_q = RMSNorm(W_DQ x) (or x when q_lora_rank = 0), q = W_UQ c_q → [H, d_n + d_R]
/// (q_nope | q_pe); [c_kv | k_pe] = W_DKV x; c_kv' = RMSNorm(c_kv); RoPE on q_pe and k_pe;
/// k_h = [W_UK,h c_kv' | k_pe], v_h = W_UV,h c_kv'; causal softmax attention per head with
/// scale 1/sqrt(d_n + d_R); y = W_O [o_1 … o_H]. The cache stores, per token, only
/// c_kv' [1, d_c] and the rotated k_pe [1, d_R] — never per-head keys or values.
/// RoPE variants (cfg.rope) act on q_pe and k_pe when a token is projected: decay_base < 1 also
/// scales their rotated dims by decay_base^(p·θ_i) (k_pe is cached with its decay); style kNone
/// leaves them unrotated (d_R is still ≥ 1: a position-free key part shared by all heads) and
/// bounds positions only by the cache.
///
/// Two equivalent forms (MlaConfig::form):
/// - absorbed: q_lat_h = W_UK,hᵀ q_nope_h and attention directly over the cached latents with
///   one shared "KV head" (key = [c_kv' | k_pe], value = c_kv'), then o_h = W_UV,h o_lat_h.
///   What W_UK and W_UV are folded into is fixed at construction (see folds_query(),
///   folds_output()), so a step does no weight preparation.
/// - explicit: every visible token's c_kv' is up-projected to per-head k_nope and v in scratch,
///   then plain per-head attention (cheaper for long prefill chunks, as in DeepSeek's serving).
/// kAuto picks, per chunk of a call (each sequence as if called alone), the one with fewer
/// multiply-adds (absorbed for every decode step).
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
class MultiHeadLatentAttention {
  static_assert(detail::RequireBackend<Backend>::value);  // one clear error on misuse

 public:
  using Config = MlaConfig;
  using Weights = MlaWeights;
  using Cache = KVCache<CacheScalar>;

  /// \throws Error if the config is invalid or a weight has the wrong shape.
  MultiHeadLatentAttention(const MlaConfig& cfg, MlaWeights weights)
      : cfg_(cfg), w_(std::move(weights)) {
    cfg_.validate(kWho);
    w_.check(cfg_, kWho);
    rope_ = RopeTable(cfg_.rope, cfg_.qk_rope_head_dim);
    alibi_ = cfg_.variant.resolved_alibi_slopes(cfg_.n_heads);
    layout_ = CacheLayout(
        kind_, {{"c_kv", 1, cfg_.kv_lora_rank, false}, {"k_pe", 1, cfg_.qk_rope_head_dim, true}});
    absorb();
  }

  const MlaConfig& config() const { return cfg_; }
  const MlaWeights& weights() const { return w_; }
  /// RoPE table of the d_R rotary part (q_pe and k_pe).
  const RopeTable& rope() const { return rope_; }
  /// Name of the kind: "MLA".
  const std::string& kind() const { return kind_; }

  /// What one token stores in this layer's cache: c_kv' [1, d_c] (after kv_a_layernorm) and
  /// k_pe [1, d_R] (rotated). d_c + d_R elements per token.
  const CacheLayout& cache_layout() const { return layout_; }

  /// The form (kAbsorbed or kExplicit) a call appending `n_new` tokens to a sequence that holds
  /// `n_cached` tokens computes: config().form, or for kAuto the cheaper one.
  MlaForm form_for(Index n_new, Index n_cached) const {
    detail::Segment seg{-1, 0, n_new, n_cached};
    return resolve(&seg, 1);
  }

  /// Whether the absorbed form folds W_UK into the query projection (one weight
  /// [H·(d_c+d_R), d_cq or D] applied to c_q) instead of applying W_UK,hᵀ to q_nope_h per head.
  /// Chosen at construction: folding wins when d_c·d_in < d_n·(d_in + d_c).
  bool folds_query() const { return fold_q_; }
  /// Whether the absorbed form folds W_UV into the output projection (one weight [D, H·d_c])
  /// instead of applying W_UV,h per head before c_proj. Folding wins when D·d_c < d_v·(d_c + D).
  bool folds_output() const { return fold_o_; }

  /// Causal attention over the given tokens alone (positions 0 … tokens−1), no cache.
  /// \throws Error on wrong shapes or positions past the RoPE table.
  void forward(Context& ctx, ConstTensorView<float, 2> x, TensorView<float, 2> y) const {
    detail::check_io(kWho, x, y, cfg_.d_model);
    const Index n = x.dimension(0);
    rope_.check_positions(kWho, 0, n);
    ScratchGuard guard(ctx.scratch());
    detail::Segment seg{-1, 0, n, 0};
    const MlaForm form = resolve(&seg, 1);
    Buffers b = allocate(ctx, n, &form, &seg, 1);
    project(ctx, x, b, &seg, 1);
    const float* base[1] = {b.lat};
    const FactorPlace places[2] = {FactorPlace::token_major(0, 1, cfg_.kv_lora_rank),
                                   FactorPlace::token_major(n * cfg_.kv_lora_rank, 1,
                                                            cfg_.qk_rope_head_dim)};
    const SeqView<float> view = detail::contiguous_view<float>(base, places, n);
    if (form == MlaForm::kAbsorbed) {
      const GroupedAttentionParams<float> p = absorbed_params<float>(b, seg, view);
      grouped_attention<Backend>(ctx, &p, 1);
    } else {
      attend_explicit(ctx, b, seg, view);
    }
    finish(ctx, b, &form, &seg, 1, y);
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
  static constexpr const char* kWho = "MultiHeadLatentAttention";
  /// Tokens of c_kv' the explicit form widens to f32 at a time for its up-projection GEMMs.
  static constexpr Index kGather = 128;
  using StridedMap = Eigen::Map<Matrix<float>, 0, Eigen::OuterStride<>>;
  using ConstStridedMap = Eigen::Map<const Matrix<float>, 0, Eigen::OuterStride<>>;

  // Scratch of one call; pointers a form does not use are null.
  struct Buffers {
    Index n = 0;              // tokens of the call
    float* lat = nullptr;     // [n, d_c] c_kv', then [n, d_R] rotated k_pe
    float* qin = nullptr;     // [n, d_cq] RMSNorm(q_a_proj x) (q_lora_rank > 0)
    float* q = nullptr;       // [n, H, d_n + d_R], q_pe rotated
    float* qa = nullptr;      // [n, H, d_c + d_R] absorbed query: q_lat | rotated q_pe
    float* o_lat = nullptr;   // [n, H, d_c] absorbed attention output
    float* o = nullptr;       // [n, H, d_v] per-head outputs
    float* kv = nullptr;      // explicit: [l_max, H, d_n + d_R] keys, then [l_max, H, d_v] values
    float* gather = nullptr;  // explicit: [kGather, d_c] c_kv' of one chunk of tokens, as float
  };

  Index d_in() const { return cfg_.q_lora_rank > 0 ? cfg_.q_lora_rank : cfg_.d_model; }
  // W_UQ: rows h·(d_n+d_R) … of q_b_proj (or q_proj).
  const Matrix<float>& w_uq() const { return cfg_.q_lora_rank > 0 ? w_.q_b_proj : w_.q_proj; }
  // W_UK,h [d_n, d_c] and W_UV,h [d_v, d_c]: contiguous row blocks of kv_b_proj.
  ConstMatrixMap<float> w_uk(Index h) const {
    const Index d_c = cfg_.kv_lora_rank, d_n = cfg_.qk_nope_head_dim;
    return ConstMatrixMap<float>(w_.kv_b_proj.data() + h * (d_n + cfg_.v_head_dim) * d_c, d_n, d_c);
  }
  ConstMatrixMap<float> w_uv(Index h) const {
    const Index d_c = cfg_.kv_lora_rank, d_n = cfg_.qk_nope_head_dim, d_v = cfg_.v_head_dim;
    return ConstMatrixMap<float>(w_.kv_b_proj.data() + (h * (d_n + d_v) + d_n) * d_c, d_v, d_c);
  }

  // Decides, once, what the absorbed form folds, and computes the folded weights (in double).
  void absorb() {
    const Index H = cfg_.n_heads, D = cfg_.d_model, d_c = cfg_.kv_lora_rank;
    const Index d_n = cfg_.qk_nope_head_dim, d_R = cfg_.qk_rope_head_dim, d_v = cfg_.v_head_dim;
    const Index d_qk = cfg_.qk_head_dim(), din = d_in();
    // Multiply-adds per token and head: folded (d_c + d_R)·din vs (d_n + d_R)·din + d_n·d_c.
    fold_q_ = static_cast<double>(d_c) * din < static_cast<double>(d_n) * (din + d_c);
    // Folded D·d_c vs d_v·d_c + D·d_v.
    fold_o_ = static_cast<double>(D) * d_c < static_cast<double>(d_v) * (d_c + D);
    if (fold_q_) {
      const Index w = d_c + d_R;
      const Matrix<float>& uq = w_uq();
      wq_abs_.resize(H * w, din);
      for (Index h = 0; h < H; ++h) {
        const ConstMatrixMap<float> uk_f = w_uk(h);
        const Eigen::MatrixXd uk = uk_f.cast<double>();
        const Eigen::MatrixXd uq_nope = uq.block(h * d_qk, 0, d_n, din).cast<double>();
        wq_abs_.block(h * w, 0, d_c, din) = (uk.transpose() * uq_nope).cast<float>();
        wq_abs_.block(h * w + d_c, 0, d_R, din) = uq.block(h * d_qk + d_n, 0, d_R, din);
      }
    }
    if (!fold_q_) {  // W_UK,hᵀ [d_c, d_n] per head, rows contiguous for the query products
      uk_t_.resize(H * d_c, d_n);
      for (Index h = 0; h < H; ++h) uk_t_.block(h * d_c, 0, d_c, d_n) = w_uk(h).transpose();
    }
    if (fold_o_) {
      wo_abs_.resize(D, H * d_c);
      for (Index h = 0; h < H; ++h) {
        const ConstMatrixMap<float> uv_f = w_uv(h);
        const Eigen::MatrixXd wo_h = w_.c_proj.block(0, h * d_v, D, d_v).cast<double>();
        const Eigen::MatrixXd uv = uv_f.cast<double>();
        wo_abs_.block(0, h * d_c, D, d_c) = (wo_h * uv).cast<float>();
      }
    }
  }

  // Multiply-adds per head of one form for a call with n query tokens, `keys` (query, key)
  // pairs and `lat` latents to up-project; the parts both forms share are left out.
  double cost(MlaForm form, double n, double keys, double lat) const {
    const double d_c = static_cast<double>(cfg_.kv_lora_rank);
    const double d_n = static_cast<double>(cfg_.qk_nope_head_dim);
    const double d_R = static_cast<double>(cfg_.qk_rope_head_dim);
    const double d_v = static_cast<double>(cfg_.v_head_dim);
    const double D = static_cast<double>(cfg_.d_model), din = static_cast<double>(d_in());
    const double q_plain = (d_n + d_R) * din, o_plain = d_v * D;
    if (form == MlaForm::kExplicit)
      return n * (q_plain + o_plain) + keys * (d_n + d_R + d_v) + lat * (d_n + d_v) * d_c;
    const double q_abs = fold_q_ ? (d_c + d_R) * din : q_plain + d_n * d_c;
    const double o_abs = fold_o_ ? D * d_c : o_plain + d_v * d_c;
    return n * (q_abs + o_abs) + keys * (2 * d_c + d_R);
  }

  // config().form, or for kAuto the cheaper form for these segments (pos0 filled in).
  MlaForm resolve(const detail::Segment* segs, Index n_segs) const {
    if (cfg_.form != MlaForm::kAuto) return cfg_.form;
    double n = 0, keys = 0, lat = 0;
    for (Index s = 0; s < n_segs; ++s) {
      const double ns = static_cast<double>(segs[s].n), p0 = static_cast<double>(segs[s].pos0);
      n += ns;
      keys += ns * p0 + ns * (ns + 1) / 2;
      lat += p0 + ns;
    }
    return cost(MlaForm::kExplicit, n, keys, lat) < cost(MlaForm::kAbsorbed, n, keys, lat)
               ? MlaForm::kExplicit
               : MlaForm::kAbsorbed;
  }

  // All scratch of a call, taken before anything is appended to the cache. forms[s] is the
  // form of segment s (each segment's own resolve()).
  Buffers allocate(Context& ctx, Index N, const MlaForm* forms, const detail::Segment* segs,
                   Index n_segs) const {
    const Index H = cfg_.n_heads, d_c = cfg_.kv_lora_rank, d_R = cfg_.qk_rope_head_dim;
    const Index d_qk = cfg_.qk_head_dim(), d_v = cfg_.v_head_dim;
    Scratch& s = ctx.scratch();
    bool absorbed = false, explicit_form = false;
    Index l_max = 0;
    for (Index i = 0; i < n_segs; ++i) {
      if (forms[i] == MlaForm::kAbsorbed) {
        absorbed = true;
      } else {
        explicit_form = true;
        l_max = std::max(l_max, segs[i].pos0 + segs[i].n);
      }
    }
    Buffers b;
    b.n = N;
    b.lat = s.floats(N * (d_c + d_R));
    if (cfg_.q_lora_rank > 0) b.qin = s.floats(N * cfg_.q_lora_rank);
    if (explicit_form || !fold_q_) b.q = s.floats(N * H * d_qk);
    if (absorbed) {
      b.qa = s.floats(N * H * (d_c + d_R));
      b.o_lat = s.floats(N * H * d_c);
    }
    if (explicit_form || !fold_o_) b.o = s.floats(N * H * d_v);
    if (explicit_form) {
      b.kv = s.floats(l_max * H * (d_qk + d_v));
      b.gather = s.floats(std::min(l_max, kGather) * d_c);
    }
    return b;
  }

  // Rotates the d_R dims at `offset` of each of the H heads (`width` floats apart) of every
  // row of buf [N, H, width], at the row's position.
  void rotate_heads(float* buf, Index width, Index offset, const detail::Segment* segs,
                    Index n_segs) const {
    const Index H = cfg_.n_heads;
    for (Index s = 0; s < n_segs; ++s)
      for (Index i = 0; i < segs[s].n; ++i)
        rope_.rotate(buf + (segs[s].row0 + i) * H * width + offset, segs[s].pos0 + i, H, width);
  }

  // Latents (c_kv', rotated k_pe) and the queries of the chosen form, all tokens at once.
  // (The absorbed query is computed for all rows when b.qa is there, the plain one when b.q is:
  // every row's result is the same whatever the other rows, so a segment's rows are unaffected.)
  void project(Context& ctx, const ConstTensorView<float, 2>& x, const Buffers& b,
               const detail::Segment* segs, Index n_segs) const {
    const Index N = b.n, D = cfg_.d_model, H = cfg_.n_heads, d_c = cfg_.kv_lora_rank;
    const Index d_n = cfg_.qk_nope_head_dim, d_R = cfg_.qk_rope_head_dim, d_qk = cfg_.qk_head_dim();
    const ConstMatrixMap<float> w_dkv(w_.kv_a_proj_with_mqa.data(), d_c, D);
    const ConstMatrixMap<float> w_kr(w_.kv_a_proj_with_mqa.data() + d_c * D, d_R, D);
    float* k_pe = b.lat + N * d_c;
    const detail::RowChunks chunks{segs, n_segs, 0};
    if (cfg_.q_lora_rank > 0) {
      detail::project(ctx, x.data(), N, {{w_dkv, b.lat}, {w_kr, k_pe}, {w_.q_a_proj, b.qin}},
                      chunks);
    } else {
      detail::project(ctx, x.data(), N, {{w_dkv, b.lat}, {w_kr, k_pe}}, chunks);
    }
    detail::rms_norm_rows(b.lat, N, d_c, w_.kv_a_layernorm.data(), cfg_.norm_eps);
    for (Index s = 0; s < n_segs; ++s)
      for (Index i = 0; i < segs[s].n; ++i)
        rope_.rotate(k_pe + (segs[s].row0 + i) * d_R, segs[s].pos0 + i);

    const float* qin = x.data();
    if (cfg_.q_lora_rank > 0) {
      detail::rms_norm_rows(b.qin, N, cfg_.q_lora_rank, w_.q_a_layernorm.data(), cfg_.norm_eps);
      qin = b.qin;
    }
    if (b.q != nullptr) {
      detail::project(ctx, qin, N, {{w_uq(), b.q}}, chunks);
      rotate_heads(b.q, d_qk, d_n, segs, n_segs);
    }
    if (b.qa == nullptr) return;
    const Index wa = d_c + d_R;
    if (fold_q_) {
      detail::project(ctx, qin, N, {{wq_abs_, b.qa}}, chunks);
      rotate_heads(b.qa, wa, d_c, segs, n_segs);
      return;
    }
    for (Index h = 0; h < H; ++h)
      detail::project_strided(b.q + h * d_qk, H * d_qk, N,
                              ConstMatrixMap<float>(uk_t_.data() + h * d_c * d_n, d_c, d_n),
                              b.qa + h * wa, H * wa, chunks);
    for (Index t = 0; t < N; ++t)
      for (Index h = 0; h < H; ++h)
        std::memcpy(b.qa + (t * H + h) * wa + d_c, b.q + (t * H + h) * d_qk + d_n,
                    static_cast<std::size_t>(d_R) * sizeof(float));
  }

  void run_cached(Context& ctx, const ConstTensorView<float, 2>& x, TensorView<float, 2>& y,
                  Cache& cache, int layer, detail::Segment* segs, Index n_segs) const {
    detail::check_io(kWho, x, y, cfg_.d_model);
    const Index blocks =
        detail::plan_cache_call(kWho, cache, layer, layout_, rope_, segs, n_segs);
    detail::check_released(kWho, cache, cfg_.variant, segs, n_segs);
    // Nothing below throws tpa::Error: the checks above cover every precondition. All scratch
    // is taken before the first append; on std::bad_alloc (e.g. in a GEMM), `call` undoes the
    // appends and the blocks it allocated.
    ScratchGuard guard(ctx.scratch());
    detail::CacheCall<CacheScalar> call(ctx, cache, layer, segs, n_segs, blocks);
    const Index N = x.dimension(0), d_c = cfg_.kv_lora_rank, d_R = cfg_.qk_rope_head_dim;
    // Each segment's form is its own (as if it were called alone).
    auto* forms = static_cast<MlaForm*>(ctx.scratch().bytes(sizeof(MlaForm) * n_segs));
    Index n_absorbed = 0;
    for (Index s = 0; s < n_segs; ++s) {
      forms[s] = resolve(&segs[s], 1);
      n_absorbed += forms[s] == MlaForm::kAbsorbed;
    }
    using Params = GroupedAttentionParams<CacheScalar>;
    auto* calls = static_cast<Params*>(ctx.scratch().bytes(sizeof(Params) * (n_absorbed + 1)));
    Buffers b = allocate(ctx, N, forms, segs, n_segs);
    project(ctx, x, b, segs, n_segs);
    for (Index s = 0; s < n_segs; ++s) {
      const FactorRows rows[2] = {{b.lat + segs[s].row0 * d_c, d_c},
                                  {b.lat + N * d_c + segs[s].row0 * d_R, d_R}};
      cache.append(segs[s].seq, layer, segs[s].n, rows);
    }
    // The absorbed segments in one kernel call, split over ctx's threads; then the explicit ones
    // one after the other (each up-projects its latents, then splits its attention).
    Index c = 0;
    for (Index s = 0; s < n_segs; ++s)
      if (forms[s] == MlaForm::kAbsorbed)
        new (&calls[c++]) Params(absorbed_params<CacheScalar>(b, segs[s], cache.view(segs[s].seq, layer)));
    if (n_absorbed > 0) grouped_attention<Backend>(ctx, calls, n_absorbed);
    for (Index s = 0; s < n_segs; ++s)
      if (forms[s] == MlaForm::kExplicit)
        attend_explicit(ctx, b, segs[s], cache.view(segs[s].seq, layer));
    finish(ctx, b, forms, segs, n_segs, y);
    call.commit();
  }

  // The absorbed form's kernel call of one segment: MQA over the latents `lat` (factor 0 =
  // c_kv' [d_c], factor 1 = k_pe [d_R], at least pos0 + n tokens), one KV head, key =
  // [c_kv' | k_pe], value = c_kv'.
  template <class S>
  GroupedAttentionParams<S> absorbed_params(const Buffers& b, const detail::Segment& seg,
                                            const SeqView<S>& lat) const {
    const Index H = cfg_.n_heads, d_c = cfg_.kv_lora_rank, d_R = cfg_.qk_rope_head_dim;
    GroupedAttentionParams<S> p;
    p.q = b.qa + seg.row0 * H * (d_c + d_R);
    p.q_stride = H * (d_c + d_R);
    p.o = b.o_lat + seg.row0 * H * d_c;
    p.o_stride = H * d_c;
    p.n_q = seg.n;
    p.q_pos0 = seg.pos0;
    p.n_heads = H;
    p.n_kv_heads = 1;
    p.k_factor[0] = 0;
    p.k_dims[0] = d_c;
    p.k_factor[1] = 1;
    p.k_dims[1] = d_R;
    p.v_factor = 0;
    p.d_v = d_c;
    p.scale = cfg_.scale();
    p.kv = lat;
    p.variant = detail::score_variant(cfg_.variant, alibi_, w_.sinks);
    return p;
  }

  // Explicit form: up-project the latents of keys k0 … pos0+n−1 (k0 = 0, or the first query's
  // window start: earlier keys are neither read nor filled) to per-head keys and values in
  // scratch, then per-head (G = H) attention. The cached latents are read as stored, kGather
  // tokens of c_kv' widened at a time (no f32 copy of the sequence's cache); k_pe is widened
  // straight into the keys.
  template <class S>
  void attend_explicit(Context& ctx, const Buffers& b, const detail::Segment& seg,
                       const SeqView<S>& lat) const {
    const Index H = cfg_.n_heads, d_c = cfg_.kv_lora_rank, d_R = cfg_.qk_rope_head_dim;
    const Index d_n = cfg_.qk_nope_head_dim, d_v = cfg_.v_head_dim, d_qk = cfg_.qk_head_dim();
    const Index L = seg.pos0 + seg.n;
    float* keys = b.kv;                   // [L, H, d_qk]
    float* values = b.kv + L * H * d_qk;  // [L, H, d_v]
    const Index k0 = cfg_.variant.window.has_value()
                         ? std::max<Index>(0, seg.pos0 - *cfg_.variant.window + 1)
                         : 0;
    for (Index t0 = k0; t0 < L; t0 += kGather) {
      const Index n = std::min(kGather, L - t0);
      for (Index t = 0; t < n; ++t) {
        const S* c = lat.row_at(0, t0 + t, 0);
        const S* r = lat.row_at(1, t0 + t, 0);
        float* k_pe0 = keys + (t0 + t) * H * d_qk + d_n;
        if constexpr (is_quantized_v<S>) {  // one scale per token for each (single-row) factor
          const Index blk = (t0 + t) / lat.block_tokens, slot = (t0 + t) % lat.block_tokens;
          const float sc = lat.scales(0, blk, 0)[slot], sr = lat.scales(1, blk, 0)[slot];
          for (Index j = 0; j < d_c; ++j) b.gather[t * d_c + j] = static_cast<float>(c[j].v) * sc;
          for (Index j = 0; j < d_R; ++j) k_pe0[j] = static_cast<float>(r[j].v) * sr;
        } else {
          for (Index j = 0; j < d_c; ++j) b.gather[t * d_c + j] = static_cast<float>(c[j]);
          for (Index j = 0; j < d_R; ++j) k_pe0[j] = static_cast<float>(r[j]);
        }
        for (Index h = 1; h < H; ++h)
          std::copy(k_pe0, k_pe0 + d_R, keys + ((t0 + t) * H + h) * d_qk + d_n);
      }
      const ConstMatrixMap<float> c(b.gather, n, d_c);
      for (Index h = 0; h < H; ++h) {
        StridedMap(keys + t0 * H * d_qk + h * d_qk, n, d_n, Eigen::OuterStride<>(H * d_qk))
            .noalias() = c * w_uk(h).transpose();
        StridedMap(values + t0 * H * d_v + h * d_v, n, d_v, Eigen::OuterStride<>(H * d_v))
            .noalias() = c * w_uv(h).transpose();
      }
    }
    const float* base[1] = {b.kv};
    const FactorPlace places[2] = {FactorPlace::token_major(0, H, d_qk),
                                   FactorPlace::token_major(L * H * d_qk, H, d_v)};
    GroupedAttentionParams<float> p;
    p.q = b.q + seg.row0 * H * d_qk;
    p.q_stride = H * d_qk;
    p.o = b.o + seg.row0 * H * d_v;
    p.o_stride = H * d_v;
    p.n_q = seg.n;
    p.q_pos0 = seg.pos0;
    p.n_heads = H;
    p.n_kv_heads = H;
    p.k_factor[0] = 0;
    p.k_dims[0] = d_qk;
    p.v_factor = 1;
    p.d_v = d_v;
    p.scale = cfg_.scale();
    p.kv = detail::contiguous_view<float>(base, places, L);
    p.variant = detail::score_variant(cfg_.variant, alibi_, w_.sinks);
    grouped_attention<Backend>(ctx, &p, 1);
  }

  // Per-head outputs (absorbed: o_h = W_UV,h o_lat_h), then the output projection; one pass per
  // run of consecutive segments of one form (all rows at once when they share it).
  void finish(Context& ctx, const Buffers& b, const MlaForm* forms, const detail::Segment* segs,
              Index n_segs, TensorView<float, 2>& y) const {
    const Index H = cfg_.n_heads, d_c = cfg_.kv_lora_rank, d_v = cfg_.v_head_dim;
    const Index D = cfg_.d_model;
    for (Index s = 0; s < n_segs;) {
      Index e = s + 1;
      while (e < n_segs && forms[e] == forms[s]) ++e;
      const Index r0 = segs[s].row0, n = segs[e - 1].row0 + segs[e - 1].n - r0;
      const detail::RowChunks chunks{segs + s, e - s, r0};
      s = e;
      if (forms[e - 1] == MlaForm::kAbsorbed) {
        if (fold_o_) {
          detail::project(ctx, b.o_lat + r0 * H * d_c, n, {{wo_abs_, y.data() + r0 * D}}, chunks);
          continue;
        }
        for (Index h = 0; h < H; ++h)
          detail::project_strided(b.o_lat + r0 * H * d_c + h * d_c, H * d_c, n,
                                  w_uv(h), b.o + r0 * H * d_v + h * d_v, H * d_v, chunks);
      }
      detail::project(ctx, b.o + r0 * H * d_v, n, {{w_.c_proj, y.data() + r0 * D}}, chunks);
    }
  }

  std::string kind_ = "MLA";
  MlaConfig cfg_;
  MlaWeights w_;
  RopeTable rope_;
  std::vector<float> alibi_;  // resolved ALiBi slopes [H] (empty without ALiBi)
  CacheLayout layout_;  // built once: a decode step allocates nothing
  bool fold_q_ = false;
  bool fold_o_ = false;
  Matrix<float> wq_abs_;  // [H·(d_c+d_R), d_in]: per head W_UK,hᵀ W_UQ_nope,h, then W_UQ_pe,h
  Matrix<float> wo_abs_;  // [D, H·d_c]: per head W_O[:, h·d_v …] W_UV,h
  Matrix<float> uk_t_;    // [H·d_c, d_n]: per head W_UK,hᵀ (when the query is not folded)
};

}  // namespace tpa
