// tpa::io checkpoint loaders and savers (include/tpa/io/checkpoint.hpp) and the T6-style model
// of examples/t6_model.hpp on checkpoints written here:
//  - every kind, saved as F32 / BF16 / F16 and loaded back, gives a layer whose outputs equal
//    (bit for bit) those of the in-memory weights rounded the same way;
//  - missing, unexpected and mis-shaped tensors throw tpa::Error naming them in full;
//  - a prefix picks its own layer out of a multi-layer file (h.1 is not h.10);
//  - the model loaded from a file generates the same tokens and logits as the same model built
//    from in-memory weights, deterministically, with finite logits;
//  - a real T6 model trained with the paper's model/T6.py (tests/data/t6_tiny.safetensors, config
//    in its metadata) reproduces the reference's logits and greedy tokens at every step, on every
//    compiled backend with 1 and 2 threads; its metadata and tensors are checked as untrusted;
//  - the example's sampler (greedy, seeded temperature / top-k / top-p).
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <tpa/io/checkpoint.hpp>
#include <tpa/tpa.hpp>
#include <type_traits>
#include <utility>
#include <vector>

#include "../examples/t6_model.hpp"
#include "test_util.hpp"

namespace checkpoint_test {

using tpa::Index;
using tpa::io::DType;
using tpa::io::LoadOptions;
using tpa::io::SafetensorsFile;
using tpa::io::SafetensorsWriter;

const DType kDTypes[] = {DType::kF32, DType::kBF16, DType::kF16};

// ---------------------------------------------------------------------------------------------
// Helpers over the weights structs
// ---------------------------------------------------------------------------------------------

// Calls f on every matrix and vector of a weights struct (empty ones included).
template <class W, class F>
void each(W& w, F&& f) {
  using T = std::decay_t<W>;
  if constexpr (std::is_same<T, tpa::GqaWeights>::value) {
    f(w.c_q), f(w.c_k), f(w.c_v), f(w.c_proj), f(w.subln);
  } else if constexpr (std::is_same<T, tpa::TpaWeights>::value) {
    f(w.W_A_q), f(w.W_A_k), f(w.W_A_v), f(w.W_B_q), f(w.W_B_k), f(w.W_B_v), f(w.c_q), f(w.c_proj),
        f(w.subln);
  } else {
    static_assert(std::is_same<T, tpa::MlaWeights>::value, "unknown weights type");
    f(w.q_a_proj), f(w.q_a_layernorm), f(w.q_b_proj), f(w.q_proj), f(w.kv_a_proj_with_mqa),
        f(w.kv_a_layernorm), f(w.kv_b_proj), f(w.c_proj);
  }
}

float round_as(DType dt, float v) {
  switch (dt) {
    case DType::kBF16:
      return static_cast<float>(tpa::bfloat16(v));
    case DType::kF16:
      return static_cast<float>(tpa::half(v));
    case DType::kF32:
      break;
  }
  return v;
}

template <class M>
void round_in_place(M& m, DType dt) {
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = round_as(dt, m.data()[i]);
}

// The weights as a file of `dt` holds them.
template <class W>
W rounded(W w, DType dt) {
  each(w, [&](auto& m) { round_in_place(m, dt); });
  return w;
}

// Every value of every weight, in order, with the sizes (so that shapes count too).
template <class W>
std::vector<std::vector<float>> flat(const W& w) {
  std::vector<std::vector<float>> out;
  each(w, [&](const auto& m) {
    out.emplace_back(m.data(), m.data() + m.size());
    out.back().push_back(static_cast<float>(m.rows()));
  });
  return out;
}

// The tpa::Error message of f(), or a test failure if it does not throw one.
std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const tpa::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no tpa::Error thrown";
  return "";
}

// A copy of `src` (as F32) without the tensors in `drop`, plus `add` (name -> shape, values).
struct Extra {
  std::vector<Index> shape;
  std::vector<float> values;
};
// The tensors of `src` (as F32) without those in `drop`, plus `add`, into `out`; returns the file
// `out` writes.
SafetensorsFile copy_tensors(const SafetensorsFile& src, const std::set<std::string>& drop,
                             const std::map<std::string, Extra>& add, SafetensorsWriter& out) {
  for (const std::string& name : src.names()) {
    if (drop.count(name)) continue;
    const std::vector<float> v = src.read_f32(name);
    out.add(name, DType::kF32, src.info(name).shape, v.data());
  }
  for (const auto& kv : add)
    out.add(kv.first, DType::kF32, kv.second.shape, kv.second.values.data());
  return SafetensorsFile::from_bytes(out.bytes());
}
SafetensorsFile rewrite(const SafetensorsFile& src, const std::set<std::string>& drop,
                        const std::map<std::string, Extra>& add = {}) {
  SafetensorsWriter out;
  return copy_tensors(src, drop, add, out);
}

Extra zeros(std::vector<Index> shape) {
  Index n = 1;
  for (Index d : shape) n *= d;
  return {std::move(shape), std::vector<float>(static_cast<std::size_t>(n), 0.5f)};
}

// ---------------------------------------------------------------------------------------------
// Configs of each kind (small)
// ---------------------------------------------------------------------------------------------

tpa::GqaConfig gqa_config(Index kv_heads, bool head_norm) {
  tpa::GqaConfig c;
  c.d_model = 32;
  c.n_heads = 4;
  c.n_kv_heads = kv_heads;
  c.head_dim = 8;
  c.head_norm = head_norm;
  c.rope.max_positions = 64;
  return c;
}

tpa::TpaConfig tpa_config(bool kv_only, bool head_norm) {
  tpa::TpaConfig c;
  c.d_model = 32;
  c.n_heads = 4;
  c.head_dim = 8;
  c.q_rank = kv_only ? 0 : 3;
  c.k_rank = 2;
  c.v_rank = 1;
  c.kv_only = kv_only;
  c.head_norm = head_norm;
  c.rope.max_positions = 64;
  return c;
}

tpa::MlaConfig mla_config(Index q_lora_rank) {
  tpa::MlaConfig c;
  c.d_model = 32;
  c.n_heads = 4;
  c.q_lora_rank = q_lora_rank;
  c.kv_lora_rank = 12;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 6;
  c.rope.max_positions = 64;
  return c;
}

// ---------------------------------------------------------------------------------------------
// Round trips through the writer, in each dtype
// ---------------------------------------------------------------------------------------------

// Layer outputs for x: a full forward, then the same tokens through the cache (prefill of all
// but the last, then one decode step).
template <class Layer>
std::vector<float> outputs(const Layer& layer, const tpa::Tensor<float, 2>& x) {
  const Index n = x.dimension(0), D = x.dimension(1);
  tpa::Context ctx;
  tpa::Tensor<float, 2> y(n, D), yp(n - 1, D), y1(1, D);
  layer.forward(ctx, x, y);
  tpa::KVCache<float> cache({layer.cache_layout()}, 4, 8);
  const tpa::SeqId seq = cache.add_sequence();
  layer.forward(ctx, tpa_test::rows(x, 0, n - 1), yp, cache, 0, seq);
  layer.forward(ctx, tpa_test::rows(x, n - 1, 1), y1, cache, 0, seq);
  std::vector<float> out(y.data(), y.data() + y.size());
  out.insert(out.end(), yp.data(), yp.data() + yp.size());
  out.insert(out.end(), y1.data(), y1.data() + y1.size());
  return out;
}

template <class Layer>
void check_round_trip(const typename Layer::Config& cfg) {
  using Weights = typename Layer::Weights;
  const std::string prefix = "model.layers.7.attn.";
  const Weights w = Weights::random(cfg, /*seed=*/7);
  const auto x = tpa_test::random_tensor(6, cfg.d_model, /*seed=*/11);
  for (DType dt : kDTypes) {
    SCOPED_TRACE(tpa::io::dtype_name(dt));
    SafetensorsWriter out;
    tpa::io::save_weights(out, prefix, cfg, w, dt);
    const SafetensorsFile file = SafetensorsFile::from_bytes(out.bytes());
    for (const std::string& name : file.names()) {
      EXPECT_EQ(name.rfind(prefix, 0), 0u) << name;
      EXPECT_EQ(file.info(name).dtype, dt) << name;
    }

    const Weights loaded = tpa::io::load_weights(file, prefix, cfg);
    const Weights expect = rounded(w, dt);
    EXPECT_TRUE(flat(loaded) == flat(expect)) << "loaded values differ from the rounded ones";
    if (dt == DType::kF32) {
      EXPECT_TRUE(flat(loaded) == flat(w)) << "F32 must round-trip exactly";
    } else {
      EXPECT_FALSE(flat(loaded) == flat(w)) << "rounding to a 16-bit type changed nothing?";
    }

    const Layer from_file(cfg, loaded), in_memory(cfg, expect);
    const std::vector<float> a = outputs(from_file, x), b = outputs(in_memory, x);
    EXPECT_TRUE(a == b) << "outputs differ (max rel err "
                        << tpa_test::rel_err(a, b, static_cast<Index>(a.size())) << ")";
    for (float v : a) ASSERT_TRUE(std::isfinite(v));
  }
}

TEST(CheckpointRoundTrip, Mha) {
  check_round_trip<tpa::MultiHeadAttention<>>(gqa_config(4, false));
}
TEST(CheckpointRoundTrip, GqaWithHeadNorm) {
  check_round_trip<tpa::GroupedQueryAttention<>>(gqa_config(2, true));
}
TEST(CheckpointRoundTrip, Mqa) {
  check_round_trip<tpa::MultiQueryAttention<>>(gqa_config(1, false));
}
TEST(CheckpointRoundTrip, Tpa) {
  check_round_trip<tpa::TensorProductAttention<>>(tpa_config(false, false));
}
TEST(CheckpointRoundTrip, TpaKvOnlyWithHeadNorm) {
  check_round_trip<tpa::TensorProductAttention<>>(tpa_config(true, true));
}
TEST(CheckpointRoundTrip, MlaWithQueryLatent) {
  check_round_trip<tpa::MultiHeadLatentAttention<>>(mla_config(16));
}
TEST(CheckpointRoundTrip, MlaWithPlainQuery) {
  check_round_trip<tpa::MultiHeadLatentAttention<>>(mla_config(0));
}

TEST(CheckpointRoundTrip, WritesTheSpecNames) {
  auto names_of = [](auto save) {
    SafetensorsWriter out;
    save(out);
    return SafetensorsFile::from_bytes(out.bytes()).names();
  };
  using V = std::vector<std::string>;
  const auto g = gqa_config(2, true);
  EXPECT_EQ(
      names_of([&](SafetensorsWriter& o) {
        tpa::io::save_gqa_weights(o, "p", g, tpa::GqaWeights::random(g, 1));
      }),
      (V{"p.c_k.weight", "p.c_proj.weight", "p.c_q.weight", "p.c_v.weight", "p.subln.weight"}));
  const auto t = tpa_config(false, false);
  EXPECT_EQ(names_of([&](SafetensorsWriter& o) {
              tpa::io::save_tpa_weights(o, "", t, tpa::TpaWeights::random(t, 1));
            }),
            (V{"c_proj.weight", "c_qkv.W_A_k.weight", "c_qkv.W_A_q.weight", "c_qkv.W_A_v.weight",
               "c_qkv.W_B_k.weight", "c_qkv.W_B_q.weight", "c_qkv.W_B_v.weight"}));
  const auto k = tpa_config(true, false);
  EXPECT_EQ(names_of([&](SafetensorsWriter& o) {
              tpa::io::save_tpa_weights(o, "", k, tpa::TpaWeights::random(k, 1));
            }),
            (V{"c_proj.weight", "c_qkv.W_A_k.weight", "c_qkv.W_A_v.weight", "c_qkv.W_B_k.weight",
               "c_qkv.W_B_v.weight", "c_qkv.c_q.weight"}));
  const auto m = mla_config(16);
  EXPECT_EQ(names_of([&](SafetensorsWriter& o) {
              tpa::io::save_mla_weights(o, "", m, tpa::MlaWeights::random(m, 1));
            }),
            (V{"c_proj.weight", "kv_a_layernorm.weight", "kv_a_proj_with_mqa.weight",
               "kv_b_proj.weight", "q_a_layernorm.weight", "q_a_proj.weight", "q_b_proj.weight"}));
  const auto m0 = mla_config(0);
  EXPECT_EQ(names_of([&](SafetensorsWriter& o) {
              tpa::io::save_mla_weights(o, "", m0, tpa::MlaWeights::random(m0, 1));
            }),
            (V{"c_proj.weight", "kv_a_layernorm.weight", "kv_a_proj_with_mqa.weight",
               "kv_b_proj.weight", "q_proj.weight"}));
  // T6_infer.py's spelling through the name map.
  EXPECT_EQ(names_of([&](SafetensorsWriter& o) {
              tpa::io::save_tpa_weights(o, "", t, tpa::TpaWeights::random(t, 1), DType::kF32,
                                        tpa::io::t6_infer_names());
            }),
            (V{"W_A_k.weight", "W_A_q.weight", "W_A_v.weight", "W_B_k.weight", "W_B_q.weight",
               "W_B_v.weight", "wo.weight"}));
}

TEST(CheckpointRoundTrip, NameMapLoadsT6InferNames) {
  const auto cfg = tpa_config(false, false);
  const auto w = tpa::TpaWeights::random(cfg, 3);
  SafetensorsWriter out;
  tpa::io::save_tpa_weights(out, "layers.0.attention.", cfg, w, DType::kF32,
                            tpa::io::t6_infer_names());
  const auto file = SafetensorsFile::from_bytes(out.bytes());
  LoadOptions opt;
  opt.names = tpa::io::t6_infer_names();
  EXPECT_TRUE(flat(tpa::io::load_tpa_weights(file, "layers.0.attention.", cfg, opt)) == flat(w));
  // Without the map the library names are missing and the file's are unexpected.
  const std::string msg =
      error_of([&] { tpa::io::load_tpa_weights(file, "layers.0.attention.", cfg); });
  EXPECT_NE(msg.find("missing tensor 'layers.0.attention.c_proj.weight'"), std::string::npos)
      << msg;
  EXPECT_NE(msg.find("unexpected tensor 'layers.0.attention.wo.weight'"), std::string::npos) << msg;
}

// ---------------------------------------------------------------------------------------------
// Missing, unexpected, mis-shaped
// ---------------------------------------------------------------------------------------------

class CheckpointErrors : public ::testing::Test {
 protected:
  const std::string prefix = "transformer.h.3.attn.";
  tpa::GqaConfig cfg = gqa_config(2, false);

  SafetensorsFile good() const {
    SafetensorsWriter out;
    tpa::io::save_gqa_weights(out, prefix, cfg, tpa::GqaWeights::random(cfg, 5));
    // Tensors outside the prefix never matter, even with similar names.
    const std::vector<float> v(4, 1.f);
    out.add("transformer.h.3.mlp.c_fc1.weight", DType::kF32, {2, 2}, v.data());
    out.add("transformer.h.3.attn", DType::kF32, {4}, v.data());
    out.add("transformer.h.30.attn.c_q.weight", DType::kF32, {4}, v.data());
    return SafetensorsFile::from_bytes(out.bytes());
  }
  std::string load_error(const SafetensorsFile& f, const LoadOptions& opt = {}) const {
    return error_of([&] { tpa::io::load_gqa_weights(f, prefix, cfg, opt); });
  }
};

TEST_F(CheckpointErrors, GoodFileLoads) {
  EXPECT_NO_THROW(tpa::io::load_gqa_weights(good(), prefix, cfg));
  EXPECT_NO_THROW(tpa::io::load_gqa_weights(good(), "transformer.h.3.attn", cfg));
}

TEST_F(CheckpointErrors, MissingTensorIsNamed) {
  const std::string msg = load_error(rewrite(good(), {prefix + "c_k.weight"}));
  EXPECT_NE(msg.find("missing tensor 'transformer.h.3.attn.c_k.weight' (expected shape [16, 32])"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("load_gqa_weights"), std::string::npos) << msg;
  EXPECT_NE(msg.find("(1 problem)"), std::string::npos) << msg;
  // allow_unused does not excuse a missing weight.
  LoadOptions lenient;
  lenient.allow_unused = true;
  EXPECT_NE(load_error(rewrite(good(), {prefix + "c_k.weight"}), lenient).find("c_k.weight"),
            std::string::npos);
}

TEST_F(CheckpointErrors, MisShapedTensorIsNamed) {
  const std::string msg = load_error(
      rewrite(good(), {prefix + "c_proj.weight"}, {{prefix + "c_proj.weight", zeros({32, 16})}}));
  EXPECT_NE(msg.find("tensor 'transformer.h.3.attn.c_proj.weight' has shape [32, 16], expected "
                     "[32, 32]"),
            std::string::npos)
      << msg;
  // Same element count, other rank: still mis-shaped.
  const std::string flat_msg = load_error(
      rewrite(good(), {prefix + "c_v.weight"}, {{prefix + "c_v.weight", zeros({16 * 32})}}));
  EXPECT_NE(flat_msg.find("tensor 'transformer.h.3.attn.c_v.weight' has shape [512]"),
            std::string::npos)
      << flat_msg;
}

TEST_F(CheckpointErrors, UnexpectedTensorIsNamed) {
  const std::string msg =
      load_error(rewrite(good(), {}, {{prefix + "rotary.inv_freq", zeros({4})}}));
  EXPECT_NE(msg.find("unexpected tensor 'transformer.h.3.attn.rotary.inv_freq' [4]"),
            std::string::npos)
      << msg;
  LoadOptions lenient;
  lenient.allow_unused = true;
  EXPECT_NO_THROW(tpa::io::load_gqa_weights(
      rewrite(good(), {}, {{prefix + "rotary.inv_freq", zeros({4})}}), prefix, cfg, lenient));
}

TEST_F(CheckpointErrors, WeightOfAnotherConfigSaysWhy) {
  // subln.weight in the file but head_norm off: the config probably is wrong.
  const std::string msg = load_error(rewrite(good(), {}, {{prefix + "subln.weight", zeros({8})}}));
  EXPECT_NE(msg.find("unexpected tensor 'transformer.h.3.attn.subln.weight' [8] (used only with "
                     "head_norm = true)"),
            std::string::npos)
      << msg;
  // A T6 file loaded as K/V-only TPA: the missing query and the two unused factors.
  const auto t6 = tpa_config(false, false);
  SafetensorsWriter out;
  tpa::io::save_tpa_weights(out, "a.", t6, tpa::TpaWeights::random(t6, 1));
  const auto f = SafetensorsFile::from_bytes(out.bytes());
  auto kv = t6;
  kv.kv_only = true;
  const std::string tmsg = error_of([&] { tpa::io::load_tpa_weights(f, "a.", kv); });
  EXPECT_NE(tmsg.find("missing tensor 'a.c_qkv.c_q.weight' (expected shape [32, 32])"),
            std::string::npos)
      << tmsg;
  EXPECT_NE(tmsg.find("unexpected tensor 'a.c_qkv.W_A_q.weight' [12, 32] (kv_only = true uses "
                      "c_qkv.c_q.weight)"),
            std::string::npos)
      << tmsg;
  EXPECT_NE(tmsg.find("unexpected tensor 'a.c_qkv.W_B_q.weight'"), std::string::npos) << tmsg;
  // MLA with a query latent loaded as plain-query MLA.
  const auto m = mla_config(16);
  SafetensorsWriter mout;
  tpa::io::save_mla_weights(mout, "", m, tpa::MlaWeights::random(m, 1));
  const auto mf = SafetensorsFile::from_bytes(mout.bytes());
  const std::string mmsg = error_of([&] { tpa::io::load_mla_weights(mf, "", mla_config(0)); });
  EXPECT_NE(mmsg.find("missing tensor 'q_proj.weight' (expected shape [48, 32])"),
            std::string::npos)
      << mmsg;
  EXPECT_NE(mmsg.find("unexpected tensor 'q_a_layernorm.weight' [16] (used only with "
                      "q_lora_rank > 0)"),
            std::string::npos)
      << mmsg;
}

TEST_F(CheckpointErrors, AllProblemsAreListedAtOnce) {
  const std::string msg = load_error(
      rewrite(good(), {prefix + "c_q.weight", prefix + "c_v.weight"},
              {{prefix + "c_v.weight", zeros({8, 32})}, {prefix + "extra", zeros({1})}}));
  EXPECT_NE(msg.find("(3 problems)"), std::string::npos) << msg;
  EXPECT_NE(msg.find("missing tensor 'transformer.h.3.attn.c_q.weight'"), std::string::npos);
  EXPECT_NE(msg.find("tensor 'transformer.h.3.attn.c_v.weight' has shape [8, 32]"),
            std::string::npos);
  EXPECT_NE(msg.find("unexpected tensor 'transformer.h.3.attn.extra'"), std::string::npos);
}

TEST_F(CheckpointErrors, InvalidConfigAndBadWeightsToSave) {
  auto bad = cfg;
  bad.n_kv_heads = 3;  // 4 heads are not a multiple of 3
  EXPECT_THROW(tpa::io::load_gqa_weights(good(), prefix, bad), tpa::Error);
  auto w = tpa::GqaWeights::random(cfg, 1);
  w.c_k.resize(3, 3);
  SafetensorsWriter out;
  const std::string msg = error_of([&] { tpa::io::save_gqa_weights(out, prefix, cfg, w); });
  EXPECT_NE(msg.find("c_k.weight"), std::string::npos) << msg;
  EXPECT_TRUE(SafetensorsFile::from_bytes(out.bytes()).names().empty());
}

// ---------------------------------------------------------------------------------------------
// A prefix picks its layer out of a multi-layer file
// ---------------------------------------------------------------------------------------------

TEST(CheckpointPrefix, PicksTheRightLayerOfTwelve) {
  const auto cfg = tpa_config(false, true);
  std::vector<tpa::TpaWeights> layers;
  SafetensorsWriter out;
  const std::vector<float> mlp(32 * 4, 0.25f);
  for (int l = 0; l < 12; ++l) {
    layers.push_back(tpa::TpaWeights::random(cfg, 100 + static_cast<std::uint64_t>(l)));
    const std::string h = "transformer.h." + std::to_string(l) + ".";
    tpa::io::save_tpa_weights(out, h + "attn.", cfg, layers.back(), DType::kBF16);
    out.add(h + "mlp.c_fc1.weight", DType::kBF16, {4, 32}, mlp.data());
  }
  const auto file = SafetensorsFile::from_bytes(out.bytes());
  for (int l : {0, 1, 10, 11}) {
    SCOPED_TRACE(l);
    const auto w =
        tpa::io::load_tpa_weights(file, "transformer.h." + std::to_string(l) + ".attn.", cfg);
    EXPECT_TRUE(flat(w) == flat(rounded(layers[static_cast<std::size_t>(l)], DType::kBF16)));
  }
  // Without the trailing '.', the prefix still means that layer (and not also h.10, h.11).
  EXPECT_TRUE(flat(tpa::io::load_tpa_weights(file, "transformer.h.1.attn", cfg)) ==
              flat(rounded(layers[1], DType::kBF16)));
  const std::string msg =
      error_of([&] { tpa::io::load_tpa_weights(file, "transformer.h.12.attn.", cfg); });
  EXPECT_NE(msg.find("missing tensor 'transformer.h.12.attn.c_qkv.W_A_q.weight'"),
            std::string::npos)
      << msg;
  // The whole block as prefix: the MLP weight is not an attention weight.
  const std::string bmsg =
      error_of([&] { tpa::io::load_tpa_weights(file, "transformer.h.2.", cfg); });
  EXPECT_NE(bmsg.find("unexpected tensor 'transformer.h.2.mlp.c_fc1.weight'"), std::string::npos)
      << bmsg;
}

// ---------------------------------------------------------------------------------------------
// The example model (examples/t6_model.hpp) on a checkpoint written here
// ---------------------------------------------------------------------------------------------

std::string temp_path(const std::string& stem) {
  return ::testing::TempDir() + "tpa_checkpoint_test_" + stem + "_" + std::to_string(::getpid()) +
         ".safetensors";
}

struct Run {
  std::vector<t6::Token> ids;
  std::vector<float> logits;  // after the last generated token
  std::size_t bytes_per_token = 0, bytes_used = 0;
};

template <class Attn>
Run generate(const t6::Model<Attn>& model, const std::vector<t6::Token>& prompt, Index n) {
  tpa::Context ctx;
  tpa::KVCache<float> cache(model.cache_layouts(), /*block_tokens=*/4, /*max_blocks=*/16);
  const tpa::SeqId seq = cache.add_sequence();
  Run r;
  r.ids = model.generate(ctx, prompt, n, cache, seq);
  const Eigen::VectorXf logits = model.forward(ctx, {r.ids.back()}, cache, seq);
  r.logits.assign(logits.data(), logits.data() + logits.size());
  r.bytes_per_token = cache.bytes_per_token();
  r.bytes_used = cache.bytes_used();
  return r;
}

template <class Attn>
t6::ModelWeights<Attn> rounded_model(t6::ModelWeights<Attn> w, DType dt) {
  round_in_place(w.wte, dt);
  round_in_place(w.lm_head, dt);
  for (auto& a : w.attn) a = rounded(a, dt);
  for (auto& m : w.mlp) {
    round_in_place(m.c_fc1, dt);
    round_in_place(m.c_fc2, dt);
    round_in_place(m.c_proj, dt);
  }
  return w;
}

template <class Attn>
void check_model(const typename Attn::Config& attn, bool tied) {
  t6::ModelConfig<Attn> cfg;
  cfg.attn = attn;
  cfg.vocab = 61;
  cfg.n_layers = 2;
  cfg.tied = tied;
  const auto weights = t6::Model<Attn>::random_weights(cfg, /*seed=*/5);
  const std::vector<t6::Token> prompt = {3, 1, 4, 1, 5, 9, 2, 6, 5};
  const Index n_new = 7;

  const t6::Model<Attn> in_memory(cfg, weights);
  const Run ref = generate(in_memory, prompt, n_new);
  ASSERT_EQ(static_cast<Index>(ref.ids.size()), n_new);
  for (t6::Token t : ref.ids) EXPECT_TRUE(t >= 0 && t < cfg.vocab) << t;
  ASSERT_EQ(static_cast<Index>(ref.logits.size()), cfg.vocab);
  for (float v : ref.logits) ASSERT_TRUE(std::isfinite(v));
  // Deterministic: a second run of the same model gives the same tokens and logits.
  const Run again = generate(in_memory, prompt, n_new);
  EXPECT_EQ(again.ids, ref.ids);
  EXPECT_TRUE(again.logits == ref.logits);
  // The cache holds prompt + n_new tokens of every layer.
  std::size_t per_token = 0;
  for (const auto& l : in_memory.cache_layouts())
    per_token += static_cast<std::size_t>(l.elements_per_token()) * sizeof(float);
  EXPECT_EQ(ref.bytes_per_token, per_token);
  EXPECT_EQ(ref.bytes_used, per_token * (prompt.size() + static_cast<std::size_t>(n_new)));

  for (DType dt : kDTypes) {
    SCOPED_TRACE(tpa::io::dtype_name(dt));
    const std::string path =
        temp_path(in_memory.attention(0).kind() + "_" + tpa::io::dtype_name(dt));
    SafetensorsWriter out;
    in_memory.save(out, dt);
    out.write(path);
    const SafetensorsFile file = SafetensorsFile::open(path);
    std::remove(path.c_str());  // the mapping stays valid
    EXPECT_EQ(file.contains(t6::kLmHead), !tied);
    EXPECT_TRUE(file.contains("transformer.h.1.mlp.c_proj.weight"));

    const t6::Model<Attn> loaded(cfg, t6::Model<Attn>::load_weights(file, cfg));
    const t6::Model<Attn> expect(cfg, rounded_model(weights, dt));
    const Run a = generate(loaded, prompt, n_new), b = generate(expect, prompt, n_new);
    EXPECT_EQ(a.ids, b.ids);
    EXPECT_TRUE(a.logits == b.logits) << "logits differ";
    if (dt == DType::kF32) {
      EXPECT_EQ(a.ids, ref.ids);
      EXPECT_TRUE(a.logits == ref.logits);
    }
  }

  // The file of this model does not load into a model of one layer fewer or more.
  SafetensorsWriter out;
  in_memory.save(out, DType::kF32);
  const auto file = SafetensorsFile::from_bytes(out.bytes());
  auto shallow = cfg;
  shallow.n_layers = 1;
  EXPECT_NE(error_of([&] {
              t6::Model<Attn>::load_weights(file, shallow);
            }).find("unexpected tensor 'transformer.h.1."),
            std::string::npos);
  auto deep = cfg;
  deep.n_layers = 3;
  EXPECT_NE(error_of([&] { t6::Model<Attn>::load_weights(file, deep); }).find("transformer.h.2."),
            std::string::npos);
}

TEST(CheckpointModel, Mha) { check_model<tpa::MultiHeadAttention<>>(gqa_config(4, false), true); }
TEST(CheckpointModel, Gqa) {
  check_model<tpa::GroupedQueryAttention<>>(gqa_config(2, true), false);
}
TEST(CheckpointModel, Mqa) { check_model<tpa::MultiQueryAttention<>>(gqa_config(1, false), true); }
TEST(CheckpointModel, Mla) { check_model<tpa::MultiHeadLatentAttention<>>(mla_config(16), true); }
TEST(CheckpointModel, Tpa) {
  check_model<tpa::TensorProductAttention<>>(tpa_config(false, false), true);
}
TEST(CheckpointModel, TpaKvOnly) {
  check_model<tpa::TensorProductAttention<>>(tpa_config(true, false), false);
}

TEST(CheckpointModel, TiedFileWithBothNamesMustAgree) {
  using Attn = tpa::TensorProductAttention<>;
  t6::ModelConfig<Attn> cfg;
  cfg.attn = tpa_config(false, false);
  cfg.vocab = 17;
  cfg.n_layers = 1;
  const t6::Model<Attn> model(cfg, t6::Model<Attn>::random_weights(cfg, 1));
  SafetensorsWriter out;
  model.save(out, DType::kF32);
  const auto tied = SafetensorsFile::from_bytes(out.bytes());
  // PyTorch's state_dict of a tied model holds both names with the same values: accepted.
  const std::vector<float> wte = tied.read_f32(t6::kWte);
  const auto both = rewrite(tied, {}, {{t6::kLmHead, {{17, 32}, wte}}});
  EXPECT_NO_THROW(t6::Model<Attn>::load_weights(both, cfg));
  // Only lm_head.weight (safetensors drops one of two shared tensors): accepted as the embedding.
  const auto head_only = rewrite(tied, {t6::kWte}, {{t6::kLmHead, {{17, 32}, wte}}});
  const t6::Model<Attn> from_head(cfg, t6::Model<Attn>::load_weights(head_only, cfg));
  EXPECT_EQ(generate(from_head, {1, 2, 3}, 4).ids, generate(model, {1, 2, 3}, 4).ids);
  // Different values under the two names: not a tied model.
  const auto differ = rewrite(tied, {}, {{t6::kLmHead, zeros({17, 32})}});
  EXPECT_NE(error_of([&] { t6::Model<Attn>::load_weights(differ, cfg); }).find("lm_head.weight"),
            std::string::npos);
}

// ---------------------------------------------------------------------------------------------
// A real T6 model: tests/data/t6_tiny.safetensors, a byte-level LM trained with the paper's
// model/T6.py (4 layers, n_embd 192, 6 heads of 32, rank 2, q_rank 6; tests/data/t6_tiny.md), and
// t6_tiny_generate.safetensors: the reference's greedy generations from a few prompts with the
// last-position logits before each generated token (float64 forward of the same f32 weights).
// ---------------------------------------------------------------------------------------------

#ifndef TPA_TEST_DATA_DIR
#error "TPA_TEST_DATA_DIR must be defined to the tests/data directory"
#endif

std::string data_path(const std::string& name) {
  return std::string(TPA_TEST_DATA_DIR) + "/" + name;
}

const SafetensorsFile& tiny_file() {
  static const SafetensorsFile f = SafetensorsFile::open(data_path("t6_tiny.safetensors"));
  return f;
}

// One stored prompt: its bytes, the reference's 48 greedy tokens and the logits before each.
struct ReferenceText {
  std::vector<t6::Token> prompt, generated;
  tpa::Matrix<float> logits;  // [generated.size(), 256]
};

std::vector<t6::Token> token_ids(const SafetensorsFile& f, const std::string& name) {
  std::vector<t6::Token> ids;
  for (float v : f.read_f32(name)) {
    EXPECT_TRUE(v >= 0.f && v < 256.f && v == std::floor(v)) << name << ": " << v;
    ids.push_back(static_cast<t6::Token>(v));
  }
  return ids;
}

const std::vector<ReferenceText>& reference_texts() {
  static const std::vector<ReferenceText> texts = [] {
    const auto f = SafetensorsFile::open(data_path("t6_tiny_generate.safetensors"));
    std::vector<ReferenceText> v;
    for (int k = 0; f.contains("prompt" + std::to_string(k) + ".ids"); ++k) {
      const std::string p = "prompt" + std::to_string(k) + ".";
      ReferenceText r{token_ids(f, p + "ids"), token_ids(f, p + "generated"),
                      f.matrix(p + "logits")};
      EXPECT_EQ(r.logits.rows(), static_cast<Index>(r.generated.size()));
      EXPECT_EQ(r.logits.cols(), 256);
      v.push_back(std::move(r));
    }
    EXPECT_GE(v.size(), 2u);
    return v;
  }();
  return texts;
}

template <class Attn>
t6::Model<Attn> tiny_model() {
  const auto cfg = t6::checkpoint_config<Attn>(tiny_file());
  return t6::Model<Attn>(cfg, t6::Model<Attn>::load_weights(tiny_file(), cfg));
}

// How far a run is from the reference over all steps of one text.
struct Agreement {
  double max_rel_err = 0;  // max over steps of max |Δlogit| / max(1, max |logit|)
  int steps = 0, token_mismatches = 0, first_mismatch = -1;
};

// Teacher forcing: prefills the prompt, then feeds the reference's tokens one at a time; at
// every step compares the logits with the reference's, and the greedy token with its token.
template <class Attn>
Agreement teacher_forced(const t6::Model<Attn>& model, const ReferenceText& r, int threads) {
  tpa::Context ctx(threads);
  const Index block = 16, total = static_cast<Index>(r.prompt.size() + r.generated.size());
  typename Attn::Cache cache(model.cache_layouts(), block, (total + block - 1) / block);
  const tpa::SeqId seq = cache.add_sequence();
  Agreement a;
  Eigen::VectorXf logits = model.forward(ctx, r.prompt, cache, seq);
  for (std::size_t i = 0; i < r.generated.size(); ++i) {
    if (i > 0) logits = model.forward(ctx, {r.generated[i - 1]}, cache, seq);
    const Eigen::VectorXf ref = r.logits.row(static_cast<Index>(i)).transpose();
    const double scale = std::max(1.0, static_cast<double>(ref.cwiseAbs().maxCoeff()));
    const double err = static_cast<double>((logits - ref).cwiseAbs().maxCoeff()) / scale;
    if (!(err <= a.max_rel_err)) a.max_rel_err = err;  // NaN sticks
    if (t6::Sampler::argmax(logits) != r.generated[i]) {
      if (a.first_mismatch < 0) a.first_mismatch = static_cast<int>(i);
      ++a.token_mismatches;
    }
    ++a.steps;
  }
  return a;
}

// Every compiled backend, the double-precision Reference included.
template <class B>
class T6Tiny : public ::testing::Test {};
TYPED_TEST_SUITE(T6Tiny, tpa_test::AllBackends, tpa_test::BackendName);

// The f32 cache matches every logit to 1e-4 of the largest |logit| and picks the reference's
// token at every step. The bf16 and f16 caches are reported, not checked (their rounding of the
// cached factors moves the logits by more; examples/t6_kl.cpp measures how much).
TYPED_TEST(T6Tiny, ReproducesTheReferenceLogitsAndGreedyTokens) {
  using B = TypeParam;
  const auto model = tiny_model<tpa::TensorProductAttention<B, float>>();
  const auto& texts = reference_texts();
  // Every prompt on every backend: the model is small enough that even the Reference backend
  // (scalar loops, double accumulation; only the attention kernels are the backend's) takes
  // about 0.1 s per prompt in release.
  const std::size_t n_texts = texts.size();
  for (std::size_t k = 0; k < n_texts; ++k) {
    for (int threads : {1, 2}) {
      SCOPED_TRACE("prompt " + std::to_string(k) + ", " + std::to_string(threads) + " threads");
      const Agreement a = teacher_forced(model, texts[k], threads);
      EXPECT_EQ(a.steps, 48);
      EXPECT_LE(a.max_rel_err, 1e-4);
      EXPECT_EQ(a.token_mismatches, 0) << "first at step " << a.first_mismatch;
      if (threads == 1)
        std::printf("[ %-8s ] prompt %zu, f32 cache: max |dlogit| / max(1, max |logit|) = %.2e\n",
                    B::name, k, a.max_rel_err);
    }
  }
  // Reported only: the half-width caches, one thread.
  const auto bf16 = tiny_model<tpa::TensorProductAttention<B, tpa::bfloat16>>();
  const auto f16 = tiny_model<tpa::TensorProductAttention<B, tpa::half>>();
  for (std::size_t k = 0; k < n_texts; ++k) {
    const Agreement b = teacher_forced(bf16, texts[k], 1), h = teacher_forced(f16, texts[k], 1);
    std::printf(
        "[ %-8s ] prompt %zu, bf16 cache: %.2e, %d of %d greedy tokens differ; "
        "f16 cache: %.2e, %d of %d differ\n",
        B::name, k, b.max_rel_err, b.token_mismatches, b.steps, h.max_rel_err, h.token_mismatches,
        h.steps);
  }
}

// The metadata of the real checkpoint gives model/T6.py's config.
TEST(T6TinyCheckpoint, ConfigComesFromTheMetadata) {
  using Attn = tpa::TensorProductAttention<>;
  const auto cfg = t6::checkpoint_config<Attn>(tiny_file());
  EXPECT_EQ(cfg.n_layers, 4);
  EXPECT_EQ(cfg.vocab, 256);
  EXPECT_EQ(cfg.d_model(), 192);
  EXPECT_EQ(cfg.hidden(), 512);
  EXPECT_TRUE(cfg.tied);
  EXPECT_EQ(cfg.attn.n_heads, 6);
  EXPECT_EQ(cfg.attn.head_dim, 32);
  EXPECT_EQ(cfg.attn.q_rank, 6);
  EXPECT_EQ(cfg.attn.k_rank, 2);
  EXPECT_EQ(cfg.attn.v_rank, 2);
  EXPECT_FALSE(cfg.attn.kv_only);
  EXPECT_FALSE(cfg.attn.head_norm);
  EXPECT_EQ(cfg.attn.rope.style, tpa::RopeStyle::kHalfSplitReversed);
  EXPECT_EQ(cfg.attn.rope.base, 10000.0);
  EXPECT_EQ(cfg.attn.rope.rotary_dim, 0);
  EXPECT_EQ(cfg.attn.rope.max_positions, 256);
}

// A copy of the real checkpoint (as F32) with the metadata keys in `set` set, those in `unset`
// removed, and the tensors in `drop` dropped and those in `add` added, as an untrusted file
// might have them.
SafetensorsFile tiny_variant(const std::map<std::string, std::string>& set,
                             const std::set<std::string>& unset,
                             const std::set<std::string>& drop = {},
                             const std::map<std::string, Extra>& add = {}) {
  const SafetensorsFile& src = tiny_file();
  SafetensorsWriter out;
  for (const auto& kv : src.metadata())
    if (!unset.count(kv.first)) out.set_metadata(kv.first, kv.second);
  for (const auto& kv : set) out.set_metadata(kv.first, kv.second);
  return copy_tensors(src, drop, add, out);
}

// Loads a file as the example does: config from the metadata, then the weights.
void load_tiny(const SafetensorsFile& f) {
  using Attn = tpa::TensorProductAttention<>;
  const auto cfg = t6::checkpoint_config<Attn>(f);
  const t6::Model<Attn> model(cfg, t6::Model<Attn>::load_weights(f, cfg));
}

TEST(T6TinyCheckpoint, BadMetadataIsNamed) {
  for (const char* key :
       {"n_layer", "n_embd", "n_head", "rank", "q_rank", "vocab_size", "block_size"}) {
    SCOPED_TRACE(key);
    const std::string missing = error_of([&] { load_tiny(tiny_variant({}, {key})); });
    EXPECT_NE(missing.find(std::string("no key '") + key + "'"), std::string::npos) << missing;
    for (const char* bad : {"", "-4", "4.0", " 4", "4x", "0", "99999999999999999999"}) {
      const std::string msg = error_of([&] { load_tiny(tiny_variant({{key, bad}}, {})); });
      EXPECT_NE(msg.find(std::string("metadata '") + key + "' is '" + bad + "'"), std::string::npos)
          << msg;
    }
  }
  // block_size bounds the RoPE table this allocates: a huge one is refused, not allocated.
  EXPECT_NE(error_of([&] {
              load_tiny(tiny_variant({{"block_size", "4000000000"}}, {}));
            }).find("'block_size'"),
            std::string::npos);
  // Without head_dim, n_embd / n_head (= 32 here) is used, and must divide evenly.
  EXPECT_NO_THROW(load_tiny(tiny_variant({}, {"head_dim"})));
  EXPECT_NE(error_of([&] {
              load_tiny(tiny_variant({{"n_head", "5"}}, {"head_dim"}));
            }).find("not a multiple of n_head"),
            std::string::npos);
  // Values that parse but do not match the tensors: the tensors are named.
  const std::string wide = error_of([&] { load_tiny(tiny_variant({{"n_embd", "256"}}, {})); });
  EXPECT_NE(wide.find("transformer.wte.weight"), std::string::npos) << wide;
  const std::string deep = error_of([&] { load_tiny(tiny_variant({{"n_layer", "5"}}, {})); });
  EXPECT_NE(deep.find("transformer.h.4."), std::string::npos) << deep;
  const std::string ranks = error_of([&] { load_tiny(tiny_variant({{"rank", "3"}}, {})); });
  EXPECT_NE(ranks.find("c_qkv.W_A_k.weight"), std::string::npos) << ranks;
}

// model/T6_partialrope_decay.py's GPTConfig fields, when the metadata has them: partial RoPE
// (rotary dim 2·⌊⌊head_dim·f⌋/2⌋, f = 0: RoPE off) and decay; bad values are named.
TEST(T6TinyCheckpoint, PartialRopeAndDecayFromTheMetadata) {
  using Attn = tpa::TensorProductAttention<>;
  const auto partial = t6::checkpoint_config<Attn>(
      tiny_variant({{"rope_partial_factor", "0.3333333333333333"}, {"rope_decay_base", "0.999"}},
                   {}));
  EXPECT_EQ(partial.attn.rope.rotary_dim, 10);  // int(32 / 3) = 10
  EXPECT_EQ(partial.attn.rope.decay_base, 0.999);
  EXPECT_EQ(partial.attn.rope.style, tpa::RopeStyle::kHalfSplitReversed);
  const auto quarter = t6::checkpoint_config<Attn>(tiny_variant({{"rope_partial_factor", "1/4"}}, {}));
  EXPECT_EQ(quarter.attn.rope.rotary_dim, 8);
  EXPECT_EQ(quarter.attn.rope.decay_base, 1.0);
  const auto off = t6::checkpoint_config<Attn>(
      tiny_variant({{"rope_partial_factor", "0"}, {"rope_decay_base", "0.9"}}, {}));
  EXPECT_EQ(off.attn.rope.style, tpa::RopeStyle::kNone);
  EXPECT_EQ(off.attn.rope.decay_base, 1.0);  // nothing rotates, so nothing decays
  EXPECT_NO_THROW(load_tiny(tiny_variant({{"rope_partial_factor", "0.5"}, {"rope_decay_base", "0.99"}}, {})));
  for (const auto& [key, bad] : std::vector<std::pair<std::string, std::string>>{
           {"rope_partial_factor", "1.5"}, {"rope_partial_factor", "x"}, {"rope_partial_factor", ""},
           {"rope_partial_factor", " 0.5"}, {"rope_partial_factor", "1/0"},
           {"rope_decay_base", "0"}, {"rope_decay_base", "1.01"}, {"rope_decay_base", "nan"},
           {"rope_decay_base", "-0.5"}, {"rope_decay_base", "0.9x"}}) {
    const std::string msg = error_of([&] { load_tiny(tiny_variant({{key, bad}}, {})); });
    EXPECT_NE(msg.find("metadata '" + key + "' is '" + bad + "', expected a number in"),
              std::string::npos)
        << msg;
  }
}

TEST(T6TinyCheckpoint, MissingAndMisShapedTensorsAreNamed) {
  EXPECT_NO_THROW(load_tiny(tiny_variant({}, {})));
  for (const char* name : {"transformer.wte.weight", "transformer.h.2.attn.c_qkv.W_B_q.weight",
                           "transformer.h.3.attn.c_proj.weight", "transformer.h.0.mlp.c_fc2.weight",
                           "transformer.h.1.mlp.c_proj.weight"}) {
    SCOPED_TRACE(name);
    const std::string missing = error_of([&] { load_tiny(tiny_variant({}, {}, {name})); });
    EXPECT_NE(missing.find(name), std::string::npos) << missing;
    const std::string shaped = error_of([&] {
      load_tiny(tiny_variant({}, {}, {name}, {{name, zeros({7, 3})}}));
    });
    EXPECT_NE(shaped.find(name), std::string::npos) << shaped;
    EXPECT_NE(shaped.find("[7, 3]"), std::string::npos) << shaped;
  }
  // A learned norm weight model/T6.py does not have is reported, not ignored.
  const std::string extra = error_of([&] {
    load_tiny(tiny_variant({}, {}, {}, {{"transformer.ln_f.weight", zeros({192})}}));
  });
  EXPECT_NE(extra.find("unexpected tensor 'transformer.ln_f.weight'"), std::string::npos) << extra;
}

// ---------------------------------------------------------------------------------------------
// The example's sampler
// ---------------------------------------------------------------------------------------------

TEST(T6Sampler, GreedyTopKOneAndTinyTopPPickTheArgmax) {
  Eigen::VectorXf logits(6);
  logits << 0.5f, 2.f, -1.f, 2.f, 1.9f, 0.f;  // the max twice: the lower id wins
  t6::Sampler greedy(t6::Sampling{});
  EXPECT_EQ(greedy(logits), 1);
  t6::Sampling s;
  s.temperature = 5.f;
  s.top_k = 1;
  t6::Sampler k1(s);
  s.top_k = 0;
  s.top_p = 1e-6f;
  t6::Sampler p0(s);
  for (int i = 0; i < 20; ++i) {
    EXPECT_EQ(k1(logits), 1);
    EXPECT_EQ(p0(logits), 1);
  }
}

TEST(T6Sampler, SeededDrawsFollowTheDistributionAndTheCuts) {
  Eigen::VectorXf logits(4);
  logits << std::log(0.1f), std::log(0.2f), std::log(0.3f), std::log(0.4f);
  t6::Sampling s;
  s.temperature = 1.f;
  s.seed = 7;
  t6::Sampler a(s), b(s);
  std::vector<int> count(4, 0);
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const t6::Token t = a(logits);
    ASSERT_EQ(t, b(logits));  // same seed, same draws
    ++count[static_cast<std::size_t>(t)];
  }
  for (int t = 0; t < 4; ++t)
    EXPECT_NEAR(count[static_cast<std::size_t>(t)] / double(n), 0.1 * (t + 1), 0.015);
  s.top_k = 2;  // only 3 and 2, as 4 : 3
  t6::Sampler k2(s);
  s.top_k = 0;
  s.top_p = 0.65f;  // 0.4 + 0.3 reaches it: only 3 and 2
  t6::Sampler p(s);
  std::vector<int> ck(4, 0), cp(4, 0);
  for (int i = 0; i < n; ++i)
    ++ck[static_cast<std::size_t>(k2(logits))], ++cp[static_cast<std::size_t>(p(logits))];
  EXPECT_EQ(ck[0] + ck[1], 0);
  EXPECT_EQ(cp[0] + cp[1], 0);
  EXPECT_NEAR(ck[3] / double(n), 4.0 / 7.0, 0.015);
  EXPECT_NEAR(cp[3] / double(n), 4.0 / 7.0, 0.015);
}

TEST(T6Sampler, InvalidSettingsThrowNamingTheField) {
  t6::Sampling s;
  s.temperature = -1.f;
  EXPECT_NE(error_of([&] { t6::Sampler x(s); }).find("temperature"), std::string::npos);
  s = {};
  s.top_k = -1;
  EXPECT_NE(error_of([&] { t6::Sampler x(s); }).find("top_k"), std::string::npos);
  s = {};
  s.top_p = 0.f;
  EXPECT_NE(error_of([&] { t6::Sampler x(s); }).find("top_p"), std::string::npos);
  s.top_p = 1.5f;
  EXPECT_NE(error_of([&] { t6::Sampler x(s); }).find("top_p"), std::string::npos);
}

// Seeded sampling through the real model: the same seed gives the same text, another seed
// (most likely) another; greedy generation is the reference's.
TEST(T6TinyCheckpoint, GenerateGreedyAndSampled) {
  using Attn = tpa::TensorProductAttention<>;
  const auto model = tiny_model<Attn>();
  const ReferenceText& r = reference_texts()[0];
  auto run = [&](const t6::Sampling& s) {
    tpa::Context ctx;
    tpa::KVCache<float> cache(model.cache_layouts(), 16, 8);
    const tpa::SeqId seq = cache.add_sequence();
    return model.generate(ctx, r.prompt, 48, cache, seq, nullptr, s);
  };
  EXPECT_EQ(run({}), r.generated);
  t6::Sampling s;
  s.temperature = 1.f;
  s.top_k = 40;
  s.top_p = 0.95f;
  s.seed = 3;
  const auto a = run(s), b = run(s);
  EXPECT_EQ(a, b);
  s.seed = 4;
  EXPECT_NE(run(s), a);
}

}  // namespace checkpoint_test
