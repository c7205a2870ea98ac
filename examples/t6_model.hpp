// A small decoder-only language model written with tpa's attention layers, as in the reference
// `model/T6.py` (and `llama-gqa.py` / `llama-mla.py`, which differ only in the attention):
//
//   x = wte[tokens]                                  transformer.wte.weight [V, D]
//   per block i:  x += attn_i(rms_norm(x))           transformer.h.<i>.attn.*  (any tpa kind)
//                 x += mlp_i(rms_norm(x))            transformer.h.<i>.mlp.c_fc1 / c_fc2 / c_proj
//   logits = lm_head(rms_norm(x))                    lm_head.weight [V, D], or wte when tied
//
// mlp(x) = c_proj(silu(c_fc1 x) ⊙ c_fc2 x), hidden size floor(8/3 · D) by default. The block and
// final norms are F.rms_norm without a learned weight (eps = float32 machine epsilon, PyTorch's
// default). All layers share one tpa::KVCache; the model is a template over the attention layer
// type, so every kind runs the same code.
//
// checkpoint_config() reads the config of a checkpoint written by the paper's code from its
// __metadata__ (tests/data/t6_tiny.safetensors); Sampling / Sampler pick the next token greedily
// or by seeded temperature / top-k / top-p sampling.
//
// This header is part of the examples, not of the library: tpa provides attention layers; the
// embedding, norms, MLP and sampling here are the few lines a user writes around them.
#pragma once

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdlib>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <tpa/io/checkpoint.hpp>
#include <tpa/tpa.hpp>
#include <type_traits>
#include <utility>
#include <vector>

namespace t6 {

using tpa::Index;
using Token = std::int32_t;
using tpa::Matrix;

/// \brief Shape of the model around its attention layers. The attention config `attn` (of the
/// layer's type) holds d_model, the heads and RoPE; `attn.rope.max_positions` bounds the context.
template <class Attn>
struct ModelConfig {
  typename Attn::Config attn;
  Index vocab = 256;     ///< V
  Index n_layers = 2;    ///< L
  Index mlp_hidden = 0;  ///< F; 0 = floor(8/3 · d_model) as in model/T6.py
  bool tied = true;      ///< lm_head is transformer.wte.weight (model/T6.py ties them)
  float norm_eps = std::numeric_limits<float>::epsilon();  ///< F.rms_norm's default for float32

  Index d_model() const { return attn.d_model; }
  /// F, or model/T6.py's math.floor(8 / 3 * n_embd) (the same double arithmetic).
  Index hidden() const {
    return mlp_hidden > 0
               ? mlp_hidden
               : static_cast<Index>(std::floor(8.0 / 3.0 * static_cast<double>(attn.d_model)));
  }

  /// \throws tpa::Error naming the bad field.
  void validate() const {
    TPA_CHECK(vocab >= 1, "t6::ModelConfig: vocab (", vocab, ") must be >= 1");
    TPA_CHECK(n_layers >= 1, "t6::ModelConfig: n_layers (", n_layers, ") must be >= 1");
    TPA_CHECK(mlp_hidden >= 0, "t6::ModelConfig: mlp_hidden (", mlp_hidden, ") must be >= 0");
    TPA_CHECK(norm_eps > 0.f, "t6::ModelConfig: norm_eps must be > 0");
    attn.validate();
  }
};

/// SwiGLU MLP weights, [out, in] like nn.Linear.weight.
struct MlpWeights {
  Matrix<float> c_fc1;   ///< [F, D] gate (through silu)
  Matrix<float> c_fc2;   ///< [F, D] up
  Matrix<float> c_proj;  ///< [D, F]
};

/// All weights of the model. lm_head is empty when the config ties it to wte.
template <class Attn>
struct ModelWeights {
  Matrix<float> wte;                         ///< transformer.wte.weight [V, D]
  Matrix<float> lm_head;                     ///< lm_head.weight [V, D] (untied only)
  std::vector<typename Attn::Weights> attn;  ///< per layer
  std::vector<MlpWeights> mlp;               ///< per layer
};

/// The checkpoint names (model/T6.py's state_dict).
inline std::string attn_prefix(Index layer) {
  return "transformer.h." + std::to_string(layer) + ".attn.";
}
inline std::string mlp_name(Index layer, const char* w) {
  return "transformer.h." + std::to_string(layer) + ".mlp." + w + ".weight";
}
inline constexpr const char* kWte = "transformer.wte.weight";
inline constexpr const char* kLmHead = "lm_head.weight";

namespace detail {

inline std::string shape_string(const std::vector<Index>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline void fill_uniform(Matrix<float>& m, Index rows, Index cols, float bound,
                         std::mt19937_64& rng) {
  std::uniform_real_distribution<float> u(-bound, bound);
  m.resize(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = u(rng);
}

/// Reads a [rows, cols] tensor; throws tpa::Error naming it if it is missing or shaped otherwise.
inline Matrix<float> read_matrix(const tpa::io::SafetensorsFile& f, const std::string& name,
                                 Index rows, Index cols) {
  TPA_CHECK(f.contains(name), "t6::Model: checkpoint has no tensor '", name, "' (expected [", rows,
            ", ", cols, "])");
  const std::vector<Index>& s = f.info(name).shape;
  TPA_CHECK(s == std::vector<Index>({rows, cols}), "t6::Model: tensor '", name, "' has shape ",
            detail::shape_string(s), ", expected [", rows, ", ", cols, "]");
  return f.matrix(name);
}

/// y [n, out] = x [n, in] · Wᵀ, the output features split over the context's threads.
inline void linear(tpa::Context& ctx, const Matrix<float>& x, const Matrix<float>& w,
                   Matrix<float>& y) {
  y.resize(x.rows(), w.rows());
  const Index parts = std::min<Index>(ctx.threads(), std::max<Index>(1, w.rows() / 64));
  ctx.parallel_for(parts, [&](Index p) {
    const Index c0 = p * w.rows() / parts, c1 = (p + 1) * w.rows() / parts;
    y.middleCols(c0, c1 - c0).noalias() = x * w.middleRows(c0, c1 - c0).transpose();
  });
}

/// F.rms_norm(x, (D,)) of each row, without weight: x / sqrt(mean(x²) + eps).
inline void rms_norm(const Matrix<float>& x, float eps, Matrix<float>& y) {
  y.resize(x.rows(), x.cols());
  for (Index r = 0; r < x.rows(); ++r) {
    double ss = 0;
    for (Index i = 0; i < x.cols(); ++i) ss += static_cast<double>(x(r, i)) * x(r, i);
    const double inv = 1.0 / std::sqrt(ss / static_cast<double>(x.cols()) + eps);
    for (Index i = 0; i < x.cols(); ++i)
      y(r, i) = static_cast<float>(static_cast<double>(x(r, i)) * inv);
  }
}

/// The integer metadata value `key` of `file`, which must be decimal digits (no sign, space or
/// exponent) for a value in [lo, hi]. \throws tpa::Error naming the key if it is missing or not.
inline Index metadata_int(const tpa::io::SafetensorsFile& file, const std::string& key, Index lo,
                          Index hi) {
  const auto& meta = file.metadata();
  const auto it = meta.find(key);
  TPA_CHECK(it != meta.end(), "t6::checkpoint_config: checkpoint metadata has no key '", key, "'");
  const std::string& v = it->second;
  bool ok = !v.empty() && v.size() <= 18;
  Index x = 0;
  for (char c : v) {
    ok = ok && c >= '0' && c <= '9';
    if (ok) x = x * 10 + (c - '0');
  }
  TPA_CHECK(ok && x >= lo && x <= hi, "t6::checkpoint_config: metadata '", key, "' is '",
            tpa::io::detail::clip(v), "', expected an integer in [", lo, ", ", hi, "]");
  return x;
}

/// The real metadata value `key` of `file`: a decimal number (as Python's repr writes a float,
/// e.g. "0.999", "1e-3") or a fraction "a/b" of two such numbers, finite and in [lo, hi].
/// \throws tpa::Error naming the key if it is not.
inline double metadata_real(const tpa::io::SafetensorsFile& file, const std::string& key,
                            double lo, double hi) {
  const std::string& v = file.metadata_value(key);
  auto number = [](const std::string& t, double& x) {
    if (t.empty() || t.size() > 40 || std::isspace(static_cast<unsigned char>(t[0]))) return false;
    char* end = nullptr;
    x = std::strtod(t.c_str(), &end);
    return end == t.c_str() + t.size() && std::isfinite(x);
  };
  double x = 0, den = 1;
  const auto slash = v.find('/');
  bool ok = slash == std::string::npos
                ? number(v, x)
                : number(v.substr(0, slash), x) && number(v.substr(slash + 1), den) && den != 0;
  if (ok) x /= den;
  ok = ok && std::isfinite(x) && x >= lo && x <= hi;
  TPA_CHECK(ok, "t6::checkpoint_config: metadata '", key, "' is '", tpa::io::detail::clip(v),
            "', expected a number in [", lo, ", ", hi, "]");
  return x;
}

}  // namespace detail

/// Largest value checkpoint_config() accepts for a size in the metadata (n_embd, vocab_size,
/// block_size, …): the file is untrusted, and its sizes decide what is allocated.
inline constexpr Index kMaxMetadataSize = Index{1} << 20;

/// \brief The config of a checkpoint of model/T6.py's GPT (the T6 repository's own training
/// code), from its __metadata__: `n_layer`, `n_embd`, `n_head`, `head_dim` (n_embd / n_head if
/// absent), `rank` (R_K = R_V), `q_rank`, `vocab_size`, and `block_size` (the context it was
/// trained on) as rope.max_positions. The rest is what model/T6.py hard-codes: RoPE half-split,
/// rotation by −θ, base 10000 over the full head dim (tables in float), F.rms_norm without
/// weight, SwiGLU MLP of floor(8/3 · n_embd), tied lm_head, no head norm. A checkpoint of
/// model/T6_partialrope_decay.py (the same GPT with partial RoPE and decay) has two more
/// GPTConfig fields, read when present: `rope_partial_factor` f in [0, 1] (rotary dim
/// 2·⌊⌊head_dim·f⌋/2⌋ as that file computes it; 0 rotates nothing: RoPE off) and
/// `rope_decay_base` in (0, 1] (rope.decay_base). Their defaults there (1/3, 0.999) differ from
/// model/T6.py's behaviour (1, no decay), which is what their absence gives here.
/// \tparam Attn a TensorProductAttention<Backend, CacheScalar>.
/// \throws tpa::Error naming the metadata key that is missing or not a valid integer, or the
/// rule the values break together. (The tensors are checked when Model::load_weights reads them.)
template <class Attn>
ModelConfig<Attn> checkpoint_config(const tpa::io::SafetensorsFile& file) {
  static_assert(
      std::is_same<typename Attn::Config, tpa::TpaConfig>::value,
      "t6::checkpoint_config: model/T6.py checkpoints hold TensorProductAttention layers");
  using detail::metadata_int;
  const Index kMax = kMaxMetadataSize;
  ModelConfig<Attn> cfg;
  cfg.n_layers = metadata_int(file, "n_layer", 1, 4096);
  cfg.vocab = metadata_int(file, "vocab_size", 1, kMax);
  tpa::TpaConfig& a = cfg.attn;
  a.d_model = metadata_int(file, "n_embd", 1, kMax);
  a.n_heads = metadata_int(file, "n_head", 1, a.d_model);
  if (file.metadata().count("head_dim") != 0) {
    a.head_dim = metadata_int(file, "head_dim", 1, kMax);
  } else {
    TPA_CHECK(a.d_model % a.n_heads == 0,
              "t6::checkpoint_config: metadata has no 'head_dim' and "
              "n_embd (",
              a.d_model, ") is not a multiple of n_head (", a.n_heads, ")");
    a.head_dim = a.d_model / a.n_heads;
  }
  a.q_rank = metadata_int(file, "q_rank", 1, kMax);
  a.k_rank = a.v_rank = metadata_int(file, "rank", 1, kMax);
  a.kv_only = false;
  a.head_norm = false;
  a.rope.style = tpa::RopeStyle::kHalfSplitReversed;
  a.rope.base = 10000.0;
  a.rope.rotary_dim = 0;  // the full head dim
  a.rope.max_positions = metadata_int(file, "block_size", 1, kMax);
  if (file.metadata().count("rope_partial_factor") != 0) {
    const double f = detail::metadata_real(file, "rope_partial_factor", 0.0, 1.0);
    a.rope.rotary_dim = static_cast<Index>(static_cast<double>(a.head_dim) * f) / 2 * 2;
    if (a.rope.rotary_dim == 0) a.rope.style = tpa::RopeStyle::kNone;
  }
  if (file.metadata().count("rope_decay_base") != 0 && a.rope.style != tpa::RopeStyle::kNone) {
    a.rope.decay_base = detail::metadata_real(file, "rope_decay_base",
                                              std::numeric_limits<double>::denorm_min(), 1.0);
  }
  cfg.mlp_hidden = 0;  // floor(8/3 · n_embd)
  cfg.tied = true;
  cfg.validate();
  return cfg;
}

/// How Sampler picks the next token from the logits.
struct Sampling {
  float temperature = 0.f;  ///< 0: greedy (argmax); else the logits are divided by it
  Index top_k = 0;          ///< keep only the k most likely tokens (0: all)
  float top_p = 1.f;        ///< keep the fewest most likely tokens whose probability is >= top_p
  std::uint64_t seed = 1;   ///< of the sampler's std::mt19937_64

  bool greedy() const { return temperature == 0.f; }

  /// \throws tpa::Error naming the bad field.
  void validate() const {
    TPA_CHECK(std::isfinite(temperature) && temperature >= 0.f, "t6::Sampling: temperature (",
              temperature, ") must be finite and >= 0 (0 = greedy)");
    TPA_CHECK(top_k >= 0, "t6::Sampling: top_k (", top_k, ") must be >= 0 (0 = all tokens)");
    TPA_CHECK(top_p > 0.f && top_p <= 1.f, "t6::Sampling: top_p (", top_p, ") must be in (0, 1]");
  }
};

/// \brief Picks tokens from logits as a Sampling says. Seeded: the same seed, settings and logits
/// give the same tokens (std::mt19937_64 is fully specified; the draws are converted to doubles
/// here, not by a standard distribution, whose algorithm is up to the library).
class Sampler {
 public:
  /// \throws tpa::Error if `s` is invalid.
  explicit Sampler(const Sampling& s) : s_(s), rng_(s.seed) { s_.validate(); }

  const Sampling& sampling() const { return s_; }

  /// Greedy: the most likely token (lowest id on ties). Otherwise: softmax(logits / T) over the
  /// top_k most likely tokens (ties broken by lower id), cut to the shortest prefix whose
  /// probability reaches top_p (at least one token), renormalized and drawn from.
  Token operator()(const Eigen::VectorXf& logits) {
    const Index V = logits.size();
    TPA_CHECK(V >= 1, "t6::Sampler: no logits");
    if (s_.greedy()) return argmax(logits);
    order_.resize(static_cast<std::size_t>(V));
    for (Index i = 0; i < V; ++i) order_[static_cast<std::size_t>(i)] = static_cast<Token>(i);
    std::stable_sort(order_.begin(), order_.end(),
                     [&](Token a, Token b) { return logits[a] > logits[b]; });
    const std::size_t k =
        s_.top_k > 0 ? static_cast<std::size_t>(std::min<Index>(s_.top_k, V)) : order_.size();
    const double inv_t = 1.0 / static_cast<double>(s_.temperature);
    const double top = static_cast<double>(logits[order_[0]]) * inv_t;
    prob_.resize(k);
    double total = 0;
    for (std::size_t i = 0; i < k; ++i) {
      prob_[i] = std::exp(static_cast<double>(logits[order_[i]]) * inv_t - top);
      total += prob_[i];
    }
    std::size_t n = k;  // top-p: the shortest prefix reaching top_p of the total
    if (s_.top_p < 1.f) {
      double sum = 0;
      for (n = 0; n < k;) {
        sum += prob_[n++];
        if (sum >= static_cast<double>(s_.top_p) * total) break;
      }
      total = sum;
    }
    // A uniform double in [0, total) from the top 53 bits of one draw.
    const double u = static_cast<double>(rng_() >> 11) * (1.0 / 9007199254740992.0) * total;
    double acc = 0;
    for (std::size_t i = 0; i < n; ++i) {
      acc += prob_[i];
      if (u < acc) return order_[i];
    }
    return order_[n - 1];  // u within rounding of total
  }

  /// The most likely token, the lowest id on ties.
  static Token argmax(const Eigen::VectorXf& v) {
    Index best = 0;
    for (Index i = 1; i < v.size(); ++i)
      if (v[i] > v[best]) best = i;
    return static_cast<Token>(best);
  }

 private:
  Sampling s_;
  std::mt19937_64 rng_;
  std::vector<Token> order_;
  std::vector<double> prob_;
};

/// Wall-clock seconds spent in prefill and decode by Model::generate.
struct Timing {
  double prefill_s = 0, decode_s = 0;
  Index prefill_tokens = 0, decode_tokens = 0;
};

/// \brief The decoder. Immutable once built; all state of a generation lives in the KVCache.
/// \tparam Attn a tpa layer type: MultiHeadAttention<>, GroupedQueryAttention<>,
/// MultiQueryAttention<>, MultiHeadLatentAttention<> or TensorProductAttention<>.
template <class Attn>
class Model {
 public:
  using Config = ModelConfig<Attn>;
  using Weights = ModelWeights<Attn>;
  using Cache = typename Attn::Cache;

  /// \throws tpa::Error if the config is invalid or a weight has the wrong shape.
  Model(const Config& cfg, Weights w) : cfg_(cfg) {
    cfg_.validate();
    const Index V = cfg_.vocab, D = cfg_.d_model(), F = cfg_.hidden(), L = cfg_.n_layers;
    check(w.wte, kWte, V, D);
    if (cfg_.tied) {
      TPA_CHECK(w.lm_head.size() == 0, "t6::Model: lm_head is set but the config ties it to wte");
    } else {
      check(w.lm_head, kLmHead, V, D);
    }
    TPA_CHECK(static_cast<Index>(w.attn.size()) == L && static_cast<Index>(w.mlp.size()) == L,
              "t6::Model: weights for ", w.attn.size(), " attention / ", w.mlp.size(),
              " MLP layers, config has ", L);
    for (Index l = 0; l < L; ++l) {
      const MlpWeights& m = w.mlp[static_cast<std::size_t>(l)];
      check(m.c_fc1, mlp_name(l, "c_fc1"), F, D);
      check(m.c_fc2, mlp_name(l, "c_fc2"), F, D);
      check(m.c_proj, mlp_name(l, "c_proj"), D, F);
    }
    for (auto& a : w.attn) attn_.emplace_back(cfg_.attn, std::move(a));
    wte_ = std::move(w.wte);
    lm_head_ = std::move(w.lm_head);
    mlp_ = std::move(w.mlp);
  }

  /// Seeded random weights (deterministic for a given seed and standard library).
  static Weights random_weights(const Config& cfg, std::uint64_t seed) {
    cfg.validate();
    std::mt19937_64 rng(seed);
    const Index V = cfg.vocab, D = cfg.d_model(), F = cfg.hidden();
    const float bd = 1.f / std::sqrt(static_cast<float>(D));
    Weights w;
    // As model/T6.py: wte is the tied nn.Linear lm_head, U(±1/sqrt(D)).
    detail::fill_uniform(w.wte, V, D, bd, rng);
    if (!cfg.tied) detail::fill_uniform(w.lm_head, V, D, bd, rng);
    for (Index l = 0; l < cfg.n_layers; ++l) {
      w.attn.push_back(Attn::Weights::random(cfg.attn, rng()));
      MlpWeights m;
      detail::fill_uniform(m.c_fc1, F, D, bd, rng);
      detail::fill_uniform(m.c_fc2, F, D, bd, rng);
      detail::fill_uniform(m.c_proj, D, F, 1.f / std::sqrt(static_cast<float>(F)), rng);
      w.mlp.push_back(std::move(m));
    }
    return w;
  }

  /// \brief The weights of `file` by model/T6.py's names (converted from F32/BF16/F16).
  /// With cfg.tied, the embedding is transformer.wte.weight or, if the file only has that,
  /// lm_head.weight; a file with both must hold the same values.
  /// \throws tpa::Error naming every missing, mis-shaped or unexpected tensor (e.g. the layers
  /// of a deeper model).
  static Weights load_weights(const tpa::io::SafetensorsFile& file, const Config& cfg) {
    cfg.validate();
    const Index V = cfg.vocab, D = cfg.d_model(), F = cfg.hidden(), L = cfg.n_layers;
    Weights w;
    std::set<std::string> used;
    auto take = [&](const std::string& name, Index rows, Index cols) {
      used.insert(name);
      return detail::read_matrix(file, name, rows, cols);
    };
    if (cfg.tied) {
      const bool has_wte = file.contains(kWte), has_head = file.contains(kLmHead);
      w.wte = take(has_wte || !has_head ? kWte : kLmHead, V, D);
      if (has_wte && has_head) {
        TPA_CHECK(take(kLmHead, V, D) == w.wte, "t6::Model: the config ties lm_head to wte but '",
                  kLmHead, "' differs from '", kWte, "' (load it untied)");
      }
    } else {
      w.wte = take(kWte, V, D);
      w.lm_head = take(kLmHead, V, D);
    }
    for (Index l = 0; l < L; ++l) {
      w.attn.push_back(tpa::io::load_weights(file, attn_prefix(l), cfg.attn));
      MlpWeights m;
      m.c_fc1 = take(mlp_name(l, "c_fc1"), F, D);
      m.c_fc2 = take(mlp_name(l, "c_fc2"), F, D);
      m.c_proj = take(mlp_name(l, "c_proj"), D, F);
      w.mlp.push_back(std::move(m));
    }
    // The attention loaders reject stray tensors under their prefix; anything else left over
    // (another layer, a learned norm this model does not have) is reported here.
    for (const std::string& name : file.names()) {
      bool known = used.count(name) != 0;
      for (Index l = 0; l < L && !known; ++l) known = name.rfind(attn_prefix(l), 0) == 0;
      TPA_CHECK(known, "t6::Model: unexpected tensor '", name, "' ",
                detail::shape_string(file.info(name).shape), " for a model of ", L, " layers (",
                cfg.tied ? "tied" : "untied", " lm_head)");
    }
    return w;
  }

  /// Adds every weight to `out` by model/T6.py's names, stored as `dtype`.
  void save(tpa::io::SafetensorsWriter& out, tpa::io::DType dtype) const {
    const std::vector<Index> emb = {cfg_.vocab, cfg_.d_model()};
    out.add(kWte, dtype, emb, wte_.data());
    if (!cfg_.tied) out.add(kLmHead, dtype, emb, lm_head_.data());
    for (Index l = 0; l < cfg_.n_layers; ++l) {
      const auto& a = attn_[static_cast<std::size_t>(l)];
      const MlpWeights& m = mlp_[static_cast<std::size_t>(l)];
      tpa::io::save_weights(out, attn_prefix(l), a.config(), a.weights(), dtype);
      out.add(mlp_name(l, "c_fc1"), dtype, {m.c_fc1.rows(), m.c_fc1.cols()}, m.c_fc1.data());
      out.add(mlp_name(l, "c_fc2"), dtype, {m.c_fc2.rows(), m.c_fc2.cols()}, m.c_fc2.data());
      out.add(mlp_name(l, "c_proj"), dtype, {m.c_proj.rows(), m.c_proj.cols()}, m.c_proj.data());
    }
  }

  const Config& config() const { return cfg_; }
  const Attn& attention(Index layer) const { return attn_.at(static_cast<std::size_t>(layer)); }

  /// One cache layout per layer, for tpa::KVCache.
  std::vector<tpa::CacheLayout> cache_layouts() const {
    std::vector<tpa::CacheLayout> v;
    for (const auto& a : attn_) v.push_back(a.cache_layout());
    return v;
  }

  /// \brief Appends `tokens` to sequence `seq` (all layers) and returns the logits [V] of the
  /// last one. Prefill, chunked prefill and single-token decode alike.
  /// \throws tpa::Error on a token outside [0, V), a full cache, or positions past the RoPE
  /// table.
  Eigen::VectorXf forward(tpa::Context& ctx, const std::vector<Token>& tokens, Cache& cache,
                          tpa::SeqId seq) const {
    const tpa::Chunk chunk{seq, static_cast<Index>(tokens.size())};
    return forward(ctx, tokens, &chunk, 1, cache).row(0).transpose();
  }

  /// \brief One ragged step of a continuous-batching server: the tokens of chunk i (the next
  /// chunks[i].tokens entries of `tokens`, in order) are appended to sequence chunks[i].seq —
  /// prompt chunks, decode tokens and drafts in any mix, one ragged call per layer — and the
  /// logits [n_chunks, V] of each chunk's last token are returned. If a layer throws, the
  /// layers before it are cut back (KVCache::truncate), so the step changes nothing.
  /// \throws tpa::Error as the layers' ragged call, or on a token outside [0, V).
  Matrix<float> forward(tpa::Context& ctx, const std::vector<Token>& tokens,
                        const tpa::Chunk* chunks, Index n_chunks, Cache& cache) const {
    const Index n = static_cast<Index>(tokens.size()), D = cfg_.d_model();
    TPA_CHECK(n >= 1, "t6::Model::forward: no tokens");
    Matrix<float> x(n, D), h, a(n, D), u, g;
    for (Index t = 0; t < n; ++t) {
      const Token id = tokens[static_cast<std::size_t>(t)];
      TPA_CHECK(id >= 0 && id < cfg_.vocab, "t6::Model::forward: token ", id,
                " is outside the vocabulary [0, ", cfg_.vocab, ")");
      x.row(t) = wte_.row(id);
    }
    std::vector<Index> before;  // lengths, to undo a step that fails after layer 0
    for (Index i = 0; i < n_chunks; ++i) before.push_back(cache.length(chunks[i].seq, 0));
    for (Index l = 0; l < cfg_.n_layers; ++l) {
      detail::rms_norm(x, cfg_.norm_eps, h);
      try {
        attn_[static_cast<std::size_t>(l)].forward(
            ctx, tpa::ConstTensorView<float, 2>(h.data(), n, D),
            tpa::TensorView<float, 2>(a.data(), n, D), cache, static_cast<int>(l), chunks,
            n_chunks);
      } catch (...) {
        if (l > 0)
          for (Index i = 0; i < n_chunks; ++i)
            cache.truncate(chunks[i].seq, before[static_cast<std::size_t>(i)]);
        throw;
      }
      x += a;
      detail::rms_norm(x, cfg_.norm_eps, h);
      const MlpWeights& m = mlp_[static_cast<std::size_t>(l)];
      detail::linear(ctx, h, m.c_fc1, u);
      detail::linear(ctx, h, m.c_fc2, g);
      u = (u.array() / (1.f + (-u.array()).exp()) * g.array()).matrix();  // silu(u) ⊙ g
      detail::linear(ctx, u, m.c_proj, a);
      x += a;
    }
    Matrix<float> last(n_chunks, D), logits;
    for (Index i = 0, row = 0; i < n_chunks; ++i) {
      row += chunks[i].tokens;
      last.row(i) = x.row(row - 1);
    }
    detail::rms_norm(last, cfg_.norm_eps, h);
    detail::linear(ctx, h, cfg_.tied ? wte_ : lm_head_, logits);
    return logits;
  }

  /// \brief Generation: prefills `prompt` into `seq`, then picks a token `n_new` times, feeding
  /// each back: greedily (the most likely token, lowest id on ties) by default, or as `sampling`
  /// says (seeded). Returns the `n_new` new tokens; the cache then holds
  /// prompt.size() + n_new − 1 tokens of `seq`.
  /// \throws tpa::Error as forward(), or if `sampling` is invalid.
  std::vector<Token> generate(tpa::Context& ctx, const std::vector<Token>& prompt, Index n_new,
                              Cache& cache, tpa::SeqId seq, Timing* timing = nullptr,
                              const Sampling& sampling = {}) const {
    using Clock = std::chrono::steady_clock;
    Sampler pick(sampling);
    std::vector<Token> out;
    if (n_new <= 0) return out;
    const auto t0 = Clock::now();
    Eigen::VectorXf logits = forward(ctx, prompt, cache, seq);
    const auto t1 = Clock::now();
    out.push_back(pick(logits));
    for (Index i = 1; i < n_new; ++i) {
      logits = forward(ctx, {out.back()}, cache, seq);
      out.push_back(pick(logits));
    }
    const auto t2 = Clock::now();
    if (timing != nullptr) {
      timing->prefill_s = std::chrono::duration<double>(t1 - t0).count();
      timing->decode_s = std::chrono::duration<double>(t2 - t1).count();
      timing->prefill_tokens = static_cast<Index>(prompt.size());
      timing->decode_tokens = n_new - 1;
    }
    return out;
  }

  static Token argmax(const Eigen::VectorXf& v) { return Sampler::argmax(v); }

 private:
  static void check(const Matrix<float>& m, const std::string& name, Index rows, Index cols) {
    TPA_CHECK(m.rows() == rows && m.cols() == cols, "t6::Model: weight '", name, "' is [", m.rows(),
              ", ", m.cols(), "], expected [", rows, ", ", cols, "]");
  }

  Config cfg_;
  std::vector<Attn> attn_;
  Matrix<float> wte_, lm_head_;
  std::vector<MlpWeights> mlp_;
};

}  // namespace t6
