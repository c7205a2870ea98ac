// Shared pieces of the tpa microbenchmarks: the reference shapes of every attention kind, a
// type-erased layer wrapper with the byte and FLOP model of each kind, the machine probes
// (read bandwidth, FMA peak) and the roofline built from them, fast cache filling, and the plain
// Eigen baseline (attention over materialised K and V, as a user writes it by hand).
#pragma once

#include <benchmark/benchmark.h>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <tpa/tpa.hpp>
#include <utility>
#include <vector>

namespace tpa_bench {

using tpa::Index;

// =============================================================================================
// Shapes (SPEC.md, "Cache size per token per layer")
// =============================================================================================

/// The attention kinds, in the order every table lists them (MHA first: the speed-up reference).
enum class Kind { kMHA, kGQA, kMQA, kMLA, kTPA, kTPAKV };

inline const char* kind_name(Kind k) {
  switch (k) {
    case Kind::kMHA:
      return "MHA";
    case Kind::kGQA:
      return "GQA";
    case Kind::kMQA:
      return "MQA";
    case Kind::kMLA:
      return "MLA";
    case Kind::kTPA:
      return "TPA";
    case Kind::kTPAKV:
      return "TPA-KV";
  }
  return "?";
}

/// Longest position any benchmark reaches: 64K context + decode slack (ctx/32) + 1.
constexpr Index kMaxPositions = 72 * 1024;

/// One kind at one shape: its config (only the member of its kind is used).
struct KindSpec {
  Kind kind = Kind::kMHA;
  tpa::GqaConfig gqa;
  tpa::MlaConfig mla;
  tpa::TpaConfig tpa;
};

/// A model shape: hidden size, layer count (for whole-model cache sizes) and one spec per kind.
struct Shape {
  std::string name;
  int n_layers = 0;
  Index d_model = 0;
  std::vector<KindSpec> kinds;  // in Kind order
};

inline KindSpec gqa_spec(Kind k, Index D, Index H, Index G, Index d) {
  KindSpec s;
  s.kind = k;
  s.gqa.d_model = D;
  s.gqa.n_heads = H;
  s.gqa.n_kv_heads = G;
  s.gqa.head_dim = d;
  s.gqa.rope.max_positions = kMaxPositions;
  return s;
}

inline KindSpec mla_spec(Index D, Index H, Index d_cq, Index d_c, Index d_R, Index d_n, Index d_v) {
  KindSpec s;
  s.kind = Kind::kMLA;
  s.mla.d_model = D;
  s.mla.n_heads = H;
  s.mla.q_lora_rank = d_cq;
  s.mla.kv_lora_rank = d_c;
  s.mla.qk_rope_head_dim = d_R;
  s.mla.qk_nope_head_dim = d_n;
  s.mla.v_head_dim = d_v;
  s.mla.rope.max_positions = kMaxPositions;
  return s;
}

inline KindSpec tpa_spec(bool kv_only, Index D, Index H, Index d, Index r_q, Index r_k, Index r_v) {
  KindSpec s;
  s.kind = kv_only ? Kind::kTPAKV : Kind::kTPA;
  s.tpa.d_model = D;
  s.tpa.n_heads = H;
  s.tpa.head_dim = d;
  s.tpa.q_rank = kv_only ? 0 : r_q;
  s.tpa.k_rank = r_k;
  s.tpa.v_rank = r_v;
  s.tpa.kv_only = kv_only;
  s.tpa.rope.max_positions = kMaxPositions;
  return s;
}

/// The reference repository's medium (~350M) models: D = 1024, d = 64, 24 layers; head counts
/// chosen there so that the parameter counts match (SPEC.md table).
inline Shape medium_shape() {
  const Index D = 1024, d = 64;
  return Shape{"medium",
               24,
               D,
               {gqa_spec(Kind::kMHA, D, 16, 16, d), gqa_spec(Kind::kGQA, D, 30, 2, d),
                gqa_spec(Kind::kMQA, D, 31, 1, d), mla_spec(D, 23, 1024, 512, 32, 64, 64),
                tpa_spec(false, D, 47, d, 6, 2, 2), tpa_spec(true, D, 29, d, 0, 2, 2)}};
}

/// A LLaMA-like long-context shape: D = 4096, H = 32, d = 128, 32 layers; GQA with 8 KV heads;
/// MLA with d_c = 512, d_R = 64 (d_cq = 1536, d_n = d_v = 128 as in DeepSeek-V2); TPA with
/// R_Q = 6, R_K = R_V = 2 (the T6 ranks).
inline Shape llama_shape() {
  const Index D = 4096, H = 32, d = 128;
  return Shape{"llama",
               32,
               D,
               {gqa_spec(Kind::kMHA, D, H, H, d), gqa_spec(Kind::kGQA, D, H, 8, d),
                gqa_spec(Kind::kMQA, D, H, 1, d), mla_spec(D, H, 1536, 512, 64, 128, 128),
                tpa_spec(false, D, H, d, 6, 2, 2), tpa_spec(true, D, H, d, 0, 2, 2)}};
}

inline const std::vector<Shape>& shapes() {
  static const std::vector<Shape> s = {llama_shape(), medium_shape()};
  return s;
}

// =============================================================================================
// Type-erased layer with the byte and FLOP model of its kind
// =============================================================================================
//
// FLOPs count a multiply-add as 2 and a lone multiply as 1; exp/max/division of the softmax
// (O(H) per key) and RoPE are left out. "W" is the number of weight elements a call reads once
// per token batch; a projection costs 2 FLOPs per weight element per token. Bytes are f32.
//
// Decode, one new token per sequence over L visible keys (per sequence):
//   bytes = 4·W (weights, read once per step for the whole batch) + L · cache bytes per token
//   MHA/GQA/MQA  W = D·H·d (q) + 2·D·G·d (k, v) + H·d·D (o)
//                FLOPs/key = 4·H·d (q·k and p·v per query head; GQA/MQA read G < H heads)
//   MLA          absorbed form (what decode runs): W = d_cq·D + [q: H·(d_c+d_R)·d_cq folded, or
//                H·(d_n+d_R)·d_cq + H·d_n·d_c] + (d_c+d_R)·D + [o: D·H·d_c folded, or
//                H·d_v·d_c + D·H·d_v]; FLOPs/key = 2·H·(d_c+d_R) + 2·H·d_c (latent q·[c_kv|k_pe]
//                and p·c_kv per head)
//   TPA          W = D·(H·R_Q + R_Q·d + (H + d)(R_K + R_V)) + H·d·D;
//                FLOPs/key (FlashTPA order) = 2·R_Q·R_K·d (B_Q·B_K) + 2·H·R_Q·R_K (mix with A_Q)
//                + 2·H·R_K (with A_K) + H·R_V (p ⊙ A_V) + 2·H·R_V·d ((p·A_V)·B_V)
//   TPA-KV       W = D·H·d (q) + D·(H + d)(R_K + R_V) + H·d·D;
//                FLOPs/key = 2·H·R_K·d (q_h·B_K) + 2·H·R_K + H·R_V + 2·H·R_V·d
//
// Prefill of n tokens into an empty sequence, P = n(n+1)/2 causal (query, key) pairs:
//   bytes = 4·W + 2·n·cache bytes per token (written once, read at least once)
//   FLOPs = 2·n·W + attention, where attention is
//   MHA/GQA/MQA  4·H·d·P
//   MLA          of the form the layer picks (form_for): explicit W includes kv_b applied to
//                every token, pairs 2·H·(d_n+d_R+d_v)·P; absorbed as decode, pairs × FLOPs/key
//   TPA, TPA-KV  the cheaper of factor form (P × FLOPs/key) and materialised K/V
//                (2·n·H·d·(R_Q + R_K + R_V) to build q, k, v heads, then 4·H·d·P; R_Q → 0 for
//                TPA-KV, whose q is a plain projection)
//
// Roofline time = max(bytes / measured read bandwidth, FLOPs / measured FMA peak).

/// The short name of a cache scalar in benchmark names: f32, bf16, f16.
template <class S>
const char* scalar_name() {
  return std::is_same<S, float>::value           ? "f32"
         : std::is_same<S, tpa::bfloat16>::value ? "bf16"
         : std::is_same<S, tpa::q8>::value       ? "int8"
                                                 : "f16";
}

/// Eigen-baseline sizes: the materialised cache a hand-written layer keeps per token.
struct BaselineDims {
  Index kv_heads = 0;  // heads stored in the materialised cache (H for MLA/TPA)
  Index d_qk = 0;      // key (and query) head size
  Index d_v = 0;       // value head size
};

class AnyLayer {
 public:
  virtual ~AnyLayer() = default;

  virtual Kind kind() const = 0;
  /// The layout of the layer's f32 cache.
  virtual tpa::CacheLayout cache_layout() const = 0;
  /// The layouts of its bf16, f16 and int8 caches (GQA kinds may place K/V otherwise than in
  /// f32: tpa::kv_tile_order).
  virtual tpa::CacheLayout cache_layout_bf16() const = 0;
  virtual tpa::CacheLayout cache_layout_f16() const = 0;
  virtual tpa::CacheLayout cache_layout_q8() const = 0;
  /// The layout of the layer's cache of scalar S.
  template <class S>
  tpa::CacheLayout layout_for() const {
    if constexpr (std::is_same<S, tpa::bfloat16>::value)
      return cache_layout_bf16();
    else if constexpr (std::is_same<S, tpa::half>::value)
      return cache_layout_f16();
    else if constexpr (tpa::is_quantized_v<S>)
      return cache_layout_q8();
    else
      return cache_layout();
  }
  virtual Index d_model() const = 0;
  virtual Index n_heads() const = 0;

  /// One decode step: row b of x [B, D] is the next token of seqs[b]. 16-bit and int8 caches go
  /// to a copy of the layer (same weights) built on first use.
  virtual void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
                      tpa::KVCache<float>& cache, const std::vector<tpa::SeqId>& seqs) const = 0;
  virtual void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
                      tpa::KVCache<tpa::bfloat16>& cache,
                      const std::vector<tpa::SeqId>& seqs) const = 0;
  virtual void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
                      tpa::KVCache<tpa::half>& cache, const std::vector<tpa::SeqId>& seqs) const = 0;
  virtual void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
                      tpa::KVCache<tpa::q8>& cache, const std::vector<tpa::SeqId>& seqs) const = 0;
  /// Appends x [n, D] to `seq` (prefill / chunked prefill).
  virtual void forward(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
                       tpa::KVCache<float>& cache, tpa::SeqId seq) const = 0;
  /// The ragged call: the rows of x go to `chunks` in order.
  virtual void ragged(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
                      tpa::KVCache<float>& cache, const std::vector<tpa::Chunk>& chunks) const = 0;

  /// Weight elements one decode step reads (see the model above).
  virtual double decode_weights() const = 0;
  /// FLOPs per query token per visible key in decode.
  virtual double decode_flops_per_key() const = 0;
  /// FLOPs of a prefill of n tokens into an empty sequence (weights included).
  virtual double prefill_flops(double n) const = 0;
  /// Weight elements a prefill of n tokens reads.
  virtual double prefill_weights(double n) const = 0;

  // ---- Eigen baseline: what a user writes by hand over the same weights ----
  virtual BaselineDims baseline_dims() const = 0;
  /// For the B tokens x [B, D] at positions pos[b]: q [B, H·d_qk] (rotated), the materialised
  /// k [B, kv_heads·d_qk] (rotated) and v [B, kv_heads·d_v], with plain Eigen products.
  virtual void baseline_project(const tpa::Matrix<float>& x, const Index* pos,
                                tpa::Matrix<float>& q, tpa::Matrix<float>& k,
                                tpa::Matrix<float>& v) const = 0;
  /// y [B, D] = o [B, H·d_v] · W_oᵀ.
  virtual const tpa::Matrix<float>& out_weight() const = 0;
  virtual float softmax_scale() const = 0;
};

/// Weight elements of matrices that are set (empty ones count 0).
template <class... M>
double elements(const M&... m) {
  return (0.0 + ... + static_cast<double>(m.size()));
}

/// RoPE on `rows` vectors of a row-major matrix row, `stride` apart, starting at `offset`.
inline void rope_rows(const tpa::RopeTable& rope, tpa::Matrix<float>& m, const Index* pos,
                      Index rows, Index stride, Index offset) {
  for (Index b = 0; b < m.rows(); ++b) rope.rotate(m.row(b).data() + offset, pos[b], rows, stride);
}

/// Layer type L with its cache scalar replaced by S (L<Backend, float> → L<Backend, S>).
template <class L, class S>
struct WithCache;
template <template <class, class> class T, class B, class S0, class S>
struct WithCache<T<B, S0>, S> {
  using type = T<B, S>;
};

/// The part of AnyLayer every kind implements alike, over a layer of type L with random
/// weights (seed 42): the calls go to layer 0 of the cache.
template <class L>
class LayerOf : public AnyLayer {
 public:
  explicit LayerOf(const typename L::Config& cfg) : layer_(cfg, L::Weights::random(cfg, 42)) {}

  void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
              tpa::KVCache<tpa::bfloat16>& cache,
              const std::vector<tpa::SeqId>& seqs) const override {
    with_cache(bf16_).decode(ctx, x, y, cache, 0, seqs);
  }
  void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
              tpa::KVCache<tpa::half>& cache, const std::vector<tpa::SeqId>& seqs) const override {
    with_cache(f16_).decode(ctx, x, y, cache, 0, seqs);
  }
  void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
              tpa::KVCache<tpa::q8>& cache, const std::vector<tpa::SeqId>& seqs) const override {
    with_cache(q8_).decode(ctx, x, y, cache, 0, seqs);
  }

  tpa::CacheLayout cache_layout() const override { return layer_.cache_layout(); }
  tpa::CacheLayout cache_layout_bf16() const override {
    return with_cache(bf16_).cache_layout();
  }
  tpa::CacheLayout cache_layout_f16() const override { return with_cache(f16_).cache_layout(); }
  tpa::CacheLayout cache_layout_q8() const override { return with_cache(q8_).cache_layout(); }
  Index d_model() const override { return cfg().d_model; }
  Index n_heads() const override { return cfg().n_heads; }
  void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
              tpa::KVCache<float>& cache, const std::vector<tpa::SeqId>& seqs) const override {
    layer_.decode(ctx, x, y, cache, 0, seqs);
  }
  void forward(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
               tpa::KVCache<float>& cache, tpa::SeqId seq) const override {
    layer_.forward(ctx, x, y, cache, 0, seq);
  }
  void ragged(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
              tpa::KVCache<float>& cache, const std::vector<tpa::Chunk>& chunks) const override {
    layer_.forward(ctx, x, y, cache, 0, chunks);
  }
  const tpa::Matrix<float>& out_weight() const override { return layer_.weights().c_proj; }
  float softmax_scale() const override { return cfg().scale(); }

 protected:
  const typename L::Config& cfg() const { return layer_.config(); }
  L layer_;

 private:
  template <class S>
  using Layer = typename WithCache<L, S>::type;
  template <class T>
  const T& with_cache(std::unique_ptr<T>& slot) const {
    if (!slot) slot = std::make_unique<T>(cfg(), layer_.weights());
    return *slot;
  }
  mutable std::unique_ptr<Layer<tpa::bfloat16>> bf16_;
  mutable std::unique_ptr<Layer<tpa::half>> f16_;
  mutable std::unique_ptr<Layer<tpa::q8>> q8_;
};

// ---- MHA / GQA / MQA ----
template <class L>
class GqaLayer final : public LayerOf<L> {
 public:
  GqaLayer(Kind k, const tpa::GqaConfig& cfg) : LayerOf<L>(cfg), kind_(k) {}

  Kind kind() const override { return kind_; }

  double decode_weights() const override {
    const auto& w = layer_.weights();
    return elements(w.c_q, w.c_k, w.c_v, w.c_proj);
  }
  double decode_flops_per_key() const override {
    return 4.0 * static_cast<double>(cfg().n_heads * cfg().head_dim);
  }
  double prefill_weights(double) const override { return decode_weights(); }
  double prefill_flops(double n) const override {
    return 2 * n * decode_weights() + decode_flops_per_key() * n * (n + 1) / 2;
  }

  BaselineDims baseline_dims() const override {
    return {cfg().kv_heads(), cfg().head_dim, cfg().head_dim};
  }
  void baseline_project(const tpa::Matrix<float>& x, const Index* pos, tpa::Matrix<float>& q,
                        tpa::Matrix<float>& k, tpa::Matrix<float>& v) const override {
    const auto& w = layer_.weights();
    const Index d = cfg().head_dim;
    q.noalias() = x * w.c_q.transpose();
    k.noalias() = x * w.c_k.transpose();
    v.noalias() = x * w.c_v.transpose();
    rope_rows(layer_.rope(), q, pos, cfg().n_heads, d, 0);
    rope_rows(layer_.rope(), k, pos, cfg().kv_heads(), d, 0);
  }

 private:
  using LayerOf<L>::cfg;
  using LayerOf<L>::layer_;
  Kind kind_;
};

// ---- MLA ----
class MlaLayer final : public LayerOf<tpa::MultiHeadLatentAttention<>> {
 public:
  explicit MlaLayer(const tpa::MlaConfig& cfg) : LayerOf(cfg) {}

  Kind kind() const override { return Kind::kMLA; }

  // Absorbed form (every decode step).
  double decode_weights() const override {
    const double D = dbl(cfg().d_model), H = dbl(cfg().n_heads), d_cq = dbl(cfg().q_lora_rank);
    const double d_c = dbl(cfg().kv_lora_rank), d_R = dbl(cfg().qk_rope_head_dim);
    const double d_n = dbl(cfg().qk_nope_head_dim), d_v = dbl(cfg().v_head_dim);
    const double din = d_cq > 0 ? d_cq : D;
    const double q =
        (d_cq > 0 ? d_cq * D : 0.0) +
        (layer_.folds_query() ? H * (d_c + d_R) * din : H * (d_n + d_R) * din + H * d_n * d_c);
    const double o = layer_.folds_output() ? D * H * d_c : H * d_v * d_c + D * H * d_v;
    return q + (d_c + d_R) * D + o;
  }
  double decode_flops_per_key() const override {
    const double H = dbl(cfg().n_heads), d_c = dbl(cfg().kv_lora_rank);
    return 2 * H * (d_c + dbl(cfg().qk_rope_head_dim)) + 2 * H * d_c;
  }
  double prefill_weights(double n) const override {
    if (!explicit_form(n)) return decode_weights();
    const auto& w = layer_.weights();
    return elements(w.q_a_proj, w.q_b_proj, w.q_proj, w.kv_a_proj_with_mqa, w.kv_b_proj, w.c_proj);
  }
  double prefill_flops(double n) const override {
    const double pairs = n * (n + 1) / 2;
    if (!explicit_form(n)) return 2 * n * decode_weights() + pairs * decode_flops_per_key();
    const double H = dbl(cfg().n_heads);
    return 2 * n * prefill_weights(n) + pairs * 2 * H * dbl(cfg().qk_head_dim() + cfg().v_head_dim);
  }

  // The explicit form: per-head keys [k_nope | k_pe] and values, materialised.
  BaselineDims baseline_dims() const override {
    return {cfg().n_heads, cfg().qk_head_dim(), cfg().v_head_dim};
  }
  void baseline_project(const tpa::Matrix<float>& x, const Index* pos, tpa::Matrix<float>& q,
                        tpa::Matrix<float>& k, tpa::Matrix<float>& v) const override {
    const auto& w = layer_.weights();
    const Index H = cfg().n_heads, d_c = cfg().kv_lora_rank, d_R = cfg().qk_rope_head_dim;
    const Index d_n = cfg().qk_nope_head_dim, d_v = cfg().v_head_dim, d_qk = cfg().qk_head_dim();
    if (cfg().q_lora_rank > 0) {
      tpa::Matrix<float> c_q = x * w.q_a_proj.transpose();
      rms_norm(c_q, w.q_a_layernorm);
      q.noalias() = c_q * w.q_b_proj.transpose();
    } else {
      q.noalias() = x * w.q_proj.transpose();
    }
    rope_rows(layer_.rope(), q, pos, H, d_qk, d_n);
    tpa::Matrix<float> lat = x * w.kv_a_proj_with_mqa.transpose();  // [B, d_c + d_R]
    tpa::Matrix<float> c_kv = lat.leftCols(d_c);
    rms_norm(c_kv, w.kv_a_layernorm);
    tpa::Matrix<float> k_pe = lat.rightCols(d_R);
    rope_rows(layer_.rope(), k_pe, pos, 1, 0, 0);
    const tpa::Matrix<float> kv = c_kv * w.kv_b_proj.transpose();  // [B, H·(d_n + d_v)]
    for (Index h = 0; h < H; ++h) {
      k.middleCols(h * d_qk, d_n) = kv.middleCols(h * (d_n + d_v), d_n);
      k.middleCols(h * d_qk + d_n, d_R) = k_pe;
      v.middleCols(h * d_v, d_v) = kv.middleCols(h * (d_n + d_v) + d_n, d_v);
    }
  }

 private:
  static double dbl(Index i) { return static_cast<double>(i); }
  bool explicit_form(double n) const {
    return layer_.form_for(static_cast<Index>(n), 0) == tpa::MlaForm::kExplicit;
  }
  static void rms_norm(tpa::Matrix<float>& m, const Eigen::VectorXf& w) {
    for (Index r = 0; r < m.rows(); ++r) {
      const float inv =
          1.f / std::sqrt(m.row(r).squaredNorm() / static_cast<float>(m.cols()) + 1e-6f);
      m.row(r) = (m.row(r).array() * inv * w.transpose().array()).matrix();
    }
  }
};

// ---- TPA and TPA K/V-only ----
class TpaLayer final : public LayerOf<tpa::TensorProductAttention<>> {
 public:
  explicit TpaLayer(const tpa::TpaConfig& cfg) : LayerOf(cfg) {}

  Kind kind() const override { return cfg().kv_only ? Kind::kTPAKV : Kind::kTPA; }

  double decode_weights() const override {
    const auto& w = layer_.weights();
    return elements(w.W_A_q, w.W_B_q, w.c_q, w.W_A_k, w.W_B_k, w.W_A_v, w.W_B_v, w.c_proj);
  }
  double decode_flops_per_key() const override {
    const double H = dbl(cfg().n_heads), d = dbl(cfg().head_dim), r_q = dbl(cfg().q_rank);
    const double r_k = dbl(cfg().k_rank), r_v = dbl(cfg().v_rank);
    const double key = cfg().kv_only ? 2 * H * r_k * d + 2 * H * r_k
                                     : 2 * r_q * r_k * d + 2 * H * r_q * r_k + 2 * H * r_k;
    return key + H * r_v + 2 * H * r_v * d;
  }
  double prefill_weights(double) const override { return decode_weights(); }
  double prefill_flops(double n) const override {
    const double H = dbl(cfg().n_heads), d = dbl(cfg().head_dim);
    const double pairs = n * (n + 1) / 2;
    const double r_q = cfg().kv_only ? 0.0 : dbl(cfg().q_rank);
    const double factored = pairs * decode_flops_per_key();
    const double materialised =
        2 * n * H * d * (r_q + dbl(cfg().k_rank) + dbl(cfg().v_rank)) + pairs * 4 * H * d;
    return 2 * n * decode_weights() + std::min(factored, materialised);
  }

  // By hand: build every head's q, k, v from the factors and cache k, v like MHA.
  BaselineDims baseline_dims() const override {
    return {cfg().n_heads, cfg().head_dim, cfg().head_dim};
  }
  void baseline_project(const tpa::Matrix<float>& x, const Index* pos, tpa::Matrix<float>& q,
                        tpa::Matrix<float>& k, tpa::Matrix<float>& v) const override {
    const auto& w = layer_.weights();
    const Index H = cfg().n_heads, d = cfg().head_dim;
    const Index r_q = cfg().q_rank, r_k = cfg().k_rank, r_v = cfg().v_rank;
    if (cfg().kv_only) {
      q.noalias() = x * w.c_q.transpose();
      rope_rows(layer_.rope(), q, pos, H, d, 0);
    } else {
      const tpa::Matrix<float> a_q = x * w.W_A_q.transpose();
      tpa::Matrix<float> b_q = x * w.W_B_q.transpose();
      rope_rows(layer_.rope(), b_q, pos, r_q, d, 0);
      expand(a_q, b_q, r_q, q);
    }
    const tpa::Matrix<float> a_k = x * w.W_A_k.transpose();
    tpa::Matrix<float> b_k = x * w.W_B_k.transpose();
    rope_rows(layer_.rope(), b_k, pos, r_k, d, 0);
    expand(a_k, b_k, r_k, k);
    const tpa::Matrix<float> a_v = x * w.W_A_v.transpose();
    const tpa::Matrix<float> b_v = x * w.W_B_v.transpose();
    expand(a_v, b_v, r_v, v);
  }

 private:
  static double dbl(Index i) { return static_cast<double>(i); }
  // Row b: heads [H, d] = (1/R) · A_b [H, R] · B_b [R, d].
  void expand(const tpa::Matrix<float>& a, const tpa::Matrix<float>& b, Index r,
              tpa::Matrix<float>& out) const {
    const Index H = cfg().n_heads, d = cfg().head_dim;
    for (Index i = 0; i < a.rows(); ++i) {
      tpa::MatrixMap<float>(out.row(i).data(), H, d).noalias() =
          (1.f / static_cast<float>(r)) * tpa::ConstMatrixMap<float>(a.row(i).data(), H, r) *
          tpa::ConstMatrixMap<float>(b.row(i).data(), r, d);
    }
  }
};

inline std::unique_ptr<AnyLayer> make_layer(const KindSpec& s) {
  switch (s.kind) {
    case Kind::kMHA:
      return std::make_unique<GqaLayer<tpa::MultiHeadAttention<>>>(s.kind, s.gqa);
    case Kind::kGQA:
      return std::make_unique<GqaLayer<tpa::GroupedQueryAttention<>>>(s.kind, s.gqa);
    case Kind::kMQA:
      return std::make_unique<GqaLayer<tpa::MultiQueryAttention<>>>(s.kind, s.gqa);
    case Kind::kMLA:
      return std::make_unique<MlaLayer>(s.mla);
    case Kind::kTPA:
    case Kind::kTPAKV:
      return std::make_unique<TpaLayer>(s.tpa);
  }
  return nullptr;
}

/// The layer of `kind` at shape `shape_index`, built once (random weights, seed 42) and kept.
inline const AnyLayer& layer(std::size_t shape_index, Kind kind) {
  static std::map<std::pair<std::size_t, int>, std::unique_ptr<AnyLayer>> layers;
  auto& slot = layers[{shape_index, static_cast<int>(kind)}];
  if (!slot) slot = make_layer(shapes()[shape_index].kinds[static_cast<std::size_t>(kind)]);
  return *slot;
}

// =============================================================================================
// Machine probes and the roofline
// =============================================================================================

/// What one thread count of this machine can do, measured in this run.
struct Machine {
  double read_bytes_per_s = 0;  // best streaming read bandwidth
  double flops_per_s = 0;       // best FP32 FMA rate

  /// max(bytes / bandwidth, flops / peak) in seconds.
  double roofline_seconds(double bytes, double flops) const {
    return std::max(bytes / read_bytes_per_s, flops / flops_per_s);
  }
};

/// Buffer the bandwidth probe streams: 1 GiB, well past the L2 of each core and twice the L3
/// (an LRU cache keeps nothing of a stream larger than itself).
constexpr std::size_t kProbeBytes = std::size_t{1} << 30;

/// Page size the probe buffer asks for. On a Linux whose transparent huge pages are in "madvise"
/// mode (Debian's default), plain allocations get 4 KiB pages; streaming them costs TLB misses
/// (two-level in a VM) and reads markedly slower than 2 MiB pages. The roofline uses the huge-page
/// figure, what the memory system can deliver; the 4 KiB figure is reported beside it.
enum class Pages { kHuge, kDefault };

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};

inline std::unique_ptr<float, FreeDeleter>& probe_buffer_slot() {
  static std::unique_ptr<float, FreeDeleter> buf;
  return buf;
}
inline Pages& probe_buffer_pages() {
  static Pages pages = Pages::kHuge;
  return pages;
}

/// The probe buffer with the given pages, allocated and touched (by all of ctx's threads) on
/// first use; a buffer of the other kind is freed first.
inline const float* probe_buffer(tpa::Context& ctx, Pages pages) {
  auto& slot = probe_buffer_slot();
  if (slot && probe_buffer_pages() != pages) slot.reset();
  if (!slot) {
    constexpr std::size_t kHugePage = std::size_t{2} << 20;
    auto* p = static_cast<float*>(std::aligned_alloc(kHugePage, kProbeBytes));
    if (p == nullptr) throw std::bad_alloc();
    slot.reset(p);
    probe_buffer_pages() = pages;
#if defined(__linux__) && defined(MADV_HUGEPAGE) && defined(MADV_NOHUGEPAGE)
    // Advice only: where THP is off or unavailable this changes nothing.
    madvise(p, kProbeBytes, pages == Pages::kHuge ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
#endif
    const Index n = static_cast<Index>(kProbeBytes / sizeof(float));
    const Index parts = 64;
    ctx.parallel_for(parts, [&](Index i) {
      for (Index j = i * n / parts; j < (i + 1) * n / parts; ++j) p[j] = 1.f;
    });
  }
  return slot.get();
}

/// Frees the probe buffer (called once the attention benchmarks start, to give them the memory).
inline void release_probe_buffer() { probe_buffer_slot().reset(); }

/// Streaming sum of n floats (n a multiple of 128), 8 independent vector accumulators.
inline float stream_sum(const float* p, std::size_t n) {
#if defined(__AVX512F__)
  __m512 a[8];
  for (auto& v : a) v = _mm512_setzero_ps();
  for (std::size_t i = 0; i < n; i += 128)
    for (int j = 0; j < 8; ++j) a[j] = _mm512_add_ps(a[j], _mm512_load_ps(p + i + 16 * j));
  for (int j = 1; j < 8; ++j) a[0] = _mm512_add_ps(a[0], a[j]);
  return _mm512_reduce_add_ps(a[0]);
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 a[8];
  for (auto& v : a) v = _mm256_setzero_ps();
  for (std::size_t i = 0; i < n; i += 64)
    for (int j = 0; j < 8; ++j) a[j] = _mm256_add_ps(a[j], _mm256_load_ps(p + i + 8 * j));
  for (int j = 1; j < 8; ++j) a[0] = _mm256_add_ps(a[0], a[j]);
  alignas(32) float t[8];
  _mm256_store_ps(t, a[0]);
  float s = 0;
  for (float v : t) s += v;
  return s;
#else
  float a[16] = {};
  for (std::size_t i = 0; i < n; i += 16)
    for (int j = 0; j < 16; ++j) a[j] += p[i + static_cast<std::size_t>(j)];
  float s = 0;
  for (float v : a) s += v;
  return s;
#endif
}

/// One pass of the read probe over the whole buffer, split over ctx's threads. Returns seconds.
inline double read_probe_pass(tpa::Context& ctx, const float* buf, float* sink) {
  const std::size_t n = kProbeBytes / sizeof(float);
  const Index parts = ctx.threads();
  float sums[64] = {};
  const auto t0 = std::chrono::steady_clock::now();
  ctx.parallel_for(parts, [&](Index i) {
    const std::size_t begin = n / static_cast<std::size_t>(parts) * static_cast<std::size_t>(i);
    sums[i] = stream_sum(buf + begin, n / static_cast<std::size_t>(parts));
  });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (Index i = 0; i < parts; ++i) *sink += sums[i];
  return s;
}

/// FMAs per FMA-probe loop iteration and thread: independent accumulators of `lanes` floats
/// (two FMA ports × 4-cycle latency need ≥ 8 in flight), all register-resident with the two
/// operands: 16 of AVX-512's 32 registers; 12 of AVX2's 16 (16 accumulators spill there and read
/// 67 instead of 116 GFLOP/s per core on a Zen 4, a 1.7× overstated % of roofline).
#if defined(__AVX512F__) || !(defined(__AVX2__) && defined(__FMA__))
constexpr int kFmaAccumulators = 16;
#else
constexpr int kFmaAccumulators = 12;
#endif
constexpr std::int64_t kFmaIterations = 1 << 22;

/// Register-blocked FMA loop of one thread; returns FLOPs done (2 per lane per FMA).
inline double fma_loop(float seed, float* sink) {
#if defined(__AVX512F__)
  __m512 acc[kFmaAccumulators];
  for (int j = 0; j < kFmaAccumulators; ++j) acc[j] = _mm512_set1_ps(seed + static_cast<float>(j));
  const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
  for (std::int64_t i = 0; i < kFmaIterations; ++i)
    for (int j = 0; j < kFmaAccumulators; ++j) acc[j] = _mm512_fmadd_ps(acc[j], a, b);
  for (int j = 1; j < kFmaAccumulators; ++j) acc[0] = _mm512_add_ps(acc[0], acc[j]);
  *sink += _mm512_reduce_add_ps(acc[0]);
  const double lanes = 16;
#elif defined(__AVX2__) && defined(__FMA__)
  __m256 acc[kFmaAccumulators];
  for (int j = 0; j < kFmaAccumulators; ++j) acc[j] = _mm256_set1_ps(seed + static_cast<float>(j));
  const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
  for (std::int64_t i = 0; i < kFmaIterations; ++i)
    for (int j = 0; j < kFmaAccumulators; ++j) acc[j] = _mm256_fmadd_ps(acc[j], a, b);
  for (int j = 1; j < kFmaAccumulators; ++j) acc[0] = _mm256_add_ps(acc[0], acc[j]);
  alignas(32) float t[8];
  _mm256_store_ps(t, acc[0]);
  for (float v : t) *sink += v;
  const double lanes = 8;
#else
  float acc[kFmaAccumulators];
  for (int j = 0; j < kFmaAccumulators; ++j) acc[j] = seed + static_cast<float>(j);
  for (std::int64_t i = 0; i < kFmaIterations; ++i)
    for (int j = 0; j < kFmaAccumulators; ++j) acc[j] = std::fma(acc[j], 0.999999f, 1e-7f);
  for (float v : acc) *sink += v;
  const double lanes = 1;
#endif
  return 2.0 * lanes * kFmaAccumulators * static_cast<double>(kFmaIterations);
}

/// One FMA-probe pass on every thread of ctx. Returns {flops, seconds}.
inline std::pair<double, double> fma_probe_pass(tpa::Context& ctx, float* sink) {
  double flops[64] = {};
  float sinks[64] = {};
  const auto t0 = std::chrono::steady_clock::now();
  ctx.parallel_for(ctx.threads(),
                   [&](Index i) { flops[i] = fma_loop(1.f + static_cast<float>(i), &sinks[i]); });
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double total = 0;
  for (Index i = 0; i < ctx.threads(); ++i) {
    total += flops[i];
    *sink += sinks[i];
  }
  return {total, s};
}

/// Read bandwidth (bytes/s) measured now: the best of `passes` passes of the read probe over
/// 2 MiB pages on ctx's threads. Memory bandwidth on a shared host drifts by 2× within minutes
/// (other tenants), so a benchmark that calls this right before and after its timed loop can
/// state its fraction of the bandwidth it actually had, beside the run's best (machine()).
inline double read_bandwidth_now(tpa::Context& ctx, int passes) {
  const float* buf = probe_buffer(ctx, Pages::kHuge);
  float sink = 0;
  double best = 1e30;
  for (int i = 0; i < passes; ++i) best = std::min(best, read_probe_pass(ctx, buf, &sink));
  benchmark::DoNotOptimize(sink);
  return static_cast<double>(kProbeBytes) / best;
}

/// FP32 FMA rate (FLOP/s) measured now: the best of `passes` FMA-probe passes on ctx's threads
/// (the FMA clock moves with other tenants too).
inline double fma_peak_now(tpa::Context& ctx, int passes) {
  float sink = 0;
  double best = 0;
  for (int i = 0; i < passes; ++i) {
    const auto [f, s] = fma_probe_pass(ctx, &sink);
    best = std::max(best, f / s);
  }
  benchmark::DoNotOptimize(sink);
  return best;
}

/// \brief The machine as one benchmark case had it: probes taken right before its timed loop
/// (constructor) and right after (finish()), the best of each kept, so the case's % of roofline
/// is against what it could have had around its own run, never only against the run's first
/// probes (a bandwidth drop between the two would print > 100 %).
class NowProbes {
 public:
  explicit NowProbes(tpa::Context& ctx, int passes = 2) : ctx_(ctx), passes_(passes) { take(); }
  /// Probes again after the timed loop; returns {best bandwidth, best FMA rate}.
  Machine finish() {
    take();
    return m_;
  }

 private:
  void take() {
    m_.read_bytes_per_s = std::max(m_.read_bytes_per_s, read_bandwidth_now(ctx_, passes_));
    m_.flops_per_s = std::max(m_.flops_per_s, fma_peak_now(ctx_, passes_));
  }
  tpa::Context& ctx_;
  int passes_;
  Machine m_;
};

/// Per thread count: the best probe results seen in this run.
inline std::map<int, Machine>& machines() {
  static std::map<int, Machine> m;
  return m;
}

/// The machine model for `threads`, measured now (5 passes of each probe, best kept) unless a
/// probe benchmark of this run already did.
inline const Machine& machine(int threads) {
  Machine& m = machines()[threads];
  tpa::Context ctx(threads);
  float sink = 0;
  if (m.read_bytes_per_s == 0) m.read_bytes_per_s = read_bandwidth_now(ctx, 5);
  if (m.flops_per_s == 0) {
    for (int i = 0; i < 5; ++i) {
      const auto [f, s] = fma_probe_pass(ctx, &sink);
      m.flops_per_s = std::max(m.flops_per_s, f / s);
    }
  }
  benchmark::DoNotOptimize(sink);
  return m;
}

// =============================================================================================
// Results shared between benchmarks of one run (for speed-up counters)
// =============================================================================================

/// Seconds per call measured by the latest run of each benchmark, by key.
inline std::map<std::string, double>& results() {
  static std::map<std::string, double> r;
  return r;
}

/// Accumulates the wall time of timed sections (excluding paused refills).
class StepTimer {
 public:
  void start() { t0_ = std::chrono::steady_clock::now(); }
  void stop() {
    total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }
  double total() const { return total_; }

 private:
  std::chrono::steady_clock::time_point t0_;
  double total_ = 0;
};

/// Evicts the last-level cache between timed decode steps by reading a buffer of twice its size
/// (at least 64 MiB, at most 1.5 GiB). A step of one layer of a model then finds that layer's
/// weights and cache in memory, as it would in the model, whose layers together exceed the LLC;
/// without it, a benchmark that repeats one layer on a CPU with a large L3 (this VM reports
/// 480 MiB) keeps much of a small working set (TPA at 16K: 40 MB cache + 89 MB weights) in L3
/// and measures more than the memory bandwidth allows.
class LlcEvictor {
 public:
  static LlcEvictor& get() {
    static LlcEvictor e;
    return e;
  }
  std::size_t bytes() const { return buf_.size() * sizeof(std::uint64_t); }
  void operator()() {
    std::uint64_t acc = 0;
    for (std::size_t i = 0; i < buf_.size(); i += 8) acc += buf_[i];  // one load per line
    sink_ = acc;
  }

 private:
  LlcEvictor() {
    long l3 = 0;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    const std::size_t want = std::min<std::size_t>(
        std::max<std::size_t>(2 * static_cast<std::size_t>(std::max(l3, 0L)), std::size_t(64) << 20),
        std::size_t(3) << 29);
    buf_.assign(want / sizeof(std::uint64_t), 1);
  }
  std::vector<std::uint64_t> buf_;
  volatile std::uint64_t sink_ = 0;
};

/// A counter of bytes, shown with binary prefixes (Ki, Mi, Gi) on the console; raw in the JSON.
inline benchmark::Counter bytes_counter(double bytes) {
  return benchmark::Counter(bytes, benchmark::Counter::kDefaults, benchmark::Counter::kIs1024);
}

// =============================================================================================
// Filling caches fast: random factor rows appended straight through KVCache::append
// =============================================================================================

/// Random rows for every factor of a layout, `tokens` of them, uniform in [−1, 1].
class RandomFactors {
 public:
  RandomFactors(const tpa::CacheLayout& layout, Index tokens, std::uint64_t seed)
      : tokens_(tokens) {
    std::mt19937_64 rng(seed);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    for (const auto& f : layout.factors()) {
      data_.emplace_back(static_cast<std::size_t>(tokens * f.elements()));
      for (auto& v : data_.back()) v = u(rng);
      rows_.push_back({data_.back().data(), f.elements()});
    }
  }
  Index tokens() const { return tokens_; }
  const tpa::FactorRows* rows() const { return rows_.data(); }

 private:
  Index tokens_;
  std::vector<std::vector<float>> data_;
  std::vector<tpa::FactorRows> rows_;
};

/// Appends n tokens to `seq` of layer 0, in chunks copied from `src`.
template <class S>
void fill_sequence(tpa::KVCache<S>& cache, tpa::SeqId seq, Index n, const RandomFactors& src) {
  for (Index done = 0; done < n;) {
    const Index chunk = std::min(src.tokens(), n - done);
    cache.append(seq, 0, chunk, src.rows());
    done += chunk;
  }
}

/// Fills x with uniform [−1, 1] values.
inline void randomize(float* x, Index n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (Index i = 0; i < n; ++i) x[i] = u(rng);
}

}  // namespace tpa_bench
