// The layers against the reference outputs of the paper's own PyTorch code
// (tests/data/*.safetensors, see /work/shared/fixtures/README.md): each layer is built through
// the public API from the stored weights and metadata and must reproduce the stored outputs
// and cache contents to 1e-5 absolute, for a full forward, for prefill + token-by-token decode
// through the cache, and for a batched decode of all batch elements together.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <tpa/io/checkpoint.hpp>
#include <tpa/io/safetensors.hpp>
#include <tpa/tpa.hpp>
#include <utility>
#include <vector>

using tpa::Index;
using tpa::io::SafetensorsFile;

namespace fixtures_test {

// README: "A float32 implementation should match every stored output to an absolute error of
// about 1e-5 (stored values are O(1))".
constexpr double kAbsTol = 1e-5;
// The stored RoPE tables are float64 values rounded to f32, as tpa::RopeTable's: they may differ
// by an ulp where the two compute the angle in a different order.
constexpr double kRopeTol = 1e-7;

SafetensorsFile open_fixture(const std::string& name) {
  return SafetensorsFile::open(std::string(TPA_TEST_DATA_DIR) + "/" + name + ".safetensors");
}

Index meta_int(const SafetensorsFile& f, const std::string& key) {
  return static_cast<Index>(std::stoll(f.metadata_value(key)));  // "6 (unused ...)" -> 6
}

// "1/sqrt(head_dim) = 0.25" -> 0.25 (the number after the last '=', or the whole value).
double meta_scale(const SafetensorsFile& f) {
  const std::string s = f.metadata_value("softmax_scale");
  const auto eq = s.rfind('=');
  return std::stod(eq == std::string::npos ? s : s.substr(eq + 1));
}

// The fixture's RoPE convention, base and rotary dim, from its metadata.
tpa::RopeConfig meta_rope(const SafetensorsFile& f) {
  const std::string style = f.metadata_value("rope_style");
  tpa::RopeConfig r;
  if (style.find("interleaved") != std::string::npos) {
    r.style = tpa::RopeStyle::kInterleaved;
  } else if (style.find("-theta") != std::string::npos) {
    r.style = tpa::RopeStyle::kHalfSplitReversed;
  } else {
    r.style = tpa::RopeStyle::kHalfSplit;
  }
  r.base = std::stod(f.metadata_value("rope_base"));
  r.rotary_dim = meta_int(f, "rope_dim");
  r.max_positions = meta_int(f, "seq_len");
  // RoPE with decay (model/T6_partialrope_decay.py): the key its GPTConfig names it by.
  if (f.metadata().count("rope_decay_base") != 0)
    r.decay_base = std::stod(f.metadata_value("rope_decay_base"));
  return r;
}

// The fixture's T6 / K/V-only / T6_infer layer, its weights loaded by name: the T6 names
// (`c_qkv.W_A_q.weight` …, `c_proj.weight`) or, through tpa::io::t6_infer_names(), T6_infer.py's
// (`W_A_q.weight` …, `wo.weight`). The files also hold inputs and reference outputs, hence
// allow_unused.
tpa::TensorProductAttention<> tpa_layer(const SafetensorsFile& f) {
  tpa::TpaConfig c;
  c.d_model = meta_int(f, "n_embd");
  c.n_heads = meta_int(f, "n_head");
  c.head_dim = meta_int(f, "head_dim");
  c.k_rank = c.v_rank = meta_int(f, "rank");
  c.kv_only = f.contains("c_qkv.c_q.weight");
  c.q_rank = c.kv_only ? 0 : meta_int(f, "q_rank");
  c.rope = meta_rope(f);
  c.softmax_scale = static_cast<float>(meta_scale(f));
  c.head_norm = false;  // every TPA fixture: "using_groupnorm": "False"
  tpa::io::LoadOptions opt;
  opt.allow_unused = true;
  if (f.contains("wo.weight")) opt.names = tpa::io::t6_infer_names();
  return tpa::TensorProductAttention<>(c, tpa::io::load_tpa_weights(f, "", c, opt));
}

tpa::GroupedQueryAttention<> gqa_layer(const SafetensorsFile& f) {
  tpa::GqaConfig c;
  c.d_model = meta_int(f, "n_embd");
  c.n_heads = meta_int(f, "n_head");
  c.n_kv_heads = meta_int(f, "n_kv_head");
  c.head_dim = meta_int(f, "head_dim");
  c.rope = meta_rope(f);
  c.softmax_scale = static_cast<float>(meta_scale(f));
  tpa::io::LoadOptions opt;
  opt.allow_unused = true;
  return tpa::GroupedQueryAttention<>(c, tpa::io::load_gqa_weights(f, "", c, opt));
}

// Rows [t0, t0 + n) of batch element b of a [B, T, C] tensor, as a [n, C] tensor.
tpa::Tensor<float, 2> slice(const tpa::Tensor<float, 3>& t, Index b, Index t0, Index n) {
  const Index T = t.dimension(1), C = t.dimension(2);
  tpa::Tensor<float, 2> out(n, C);
  const float* src = t.data() + (b * T + t0) * C;
  std::copy(src, src + n * C, out.data());
  return out;
}

// max |a − expected[b, t0 : t0 + rows]| over a [rows, C] result.
double max_err(const tpa::Tensor<float, 2>& a, const tpa::Tensor<float, 3>& expected, Index b,
               Index t0) {
  const Index T = expected.dimension(1), C = expected.dimension(2);
  EXPECT_EQ(a.dimension(1), C);
  const float* e = expected.data() + (b * T + t0) * C;
  double m = 0;
  for (Index i = 0; i < a.size(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a.data()[i]) - static_cast<double>(e[i])));
  return m;
}

// max |cached factor f of tokens 0 … n−1 − stored[b, t, ...]| for a stored [B, L, ...] tensor
// whose per-token part is laid out as the factor ([H, R], [R, d], [G, d]).
template <class S>
double cache_err(const tpa::SeqView<S>& view, std::size_t factor, const SafetensorsFile& f,
                 const std::string& name, Index b) {
  const tpa::io::TensorInfo& info = f.info(name);
  const std::vector<float> stored = f.read_f32(name);
  const Index L = info.shape.at(1);
  const Index per_token = info.numel() / (info.shape.at(0) * L);
  EXPECT_EQ(per_token, view.elements(factor)) << name;
  EXPECT_EQ(L, view.n_tokens) << name;
  double m = 0;
  for (Index t = 0; t < std::min(L, view.n_tokens); ++t)
    for (Index e = 0; e < per_token; ++e)
      m = std::max(m, std::abs(static_cast<double>(static_cast<float>(view.at(factor, t, e))) -
                               static_cast<double>(
                                   stored[static_cast<std::size_t>((b * L + t) * per_token + e)])));
  return m;
}

struct CacheCheck {
  std::size_t factor;
  std::string name;  // stored [B, L, ...] tensor holding that factor for all L cached tokens
};

// The checks shared by every fixture: `y_name` ([B, T, D]) for a full forward, for `prompt` tokens
// of prefill then one token per call, and for a batched decode of all batch elements; and the cache
// contents after all T tokens.
template <class Layer>
void check_fixture(const char* fixture, const Layer& layer, const SafetensorsFile& f, Index prompt,
                   const std::vector<CacheCheck>& final_cache, const std::string& y_name = "y") {
  const auto x = f.tensor<3>("x");
  const auto y = f.tensor<3>(y_name);
  const Index B = x.dimension(0), T = x.dimension(1), D = x.dimension(2);
  ASSERT_EQ(B, meta_int(f, "batch"));
  ASSERT_EQ(T, meta_int(f, "seq_len"));
  tpa::Context ctx;
  double forward_err = 0, decode_err = 0, batched_err = 0, cache_max = 0;

  // Full forward, no cache.
  for (Index b = 0; b < B; ++b) {
    tpa::Tensor<float, 2> yb(T, D);
    layer.forward(ctx, slice(x, b, 0, T), yb);
    forward_err = std::max(forward_err, max_err(yb, y, b, 0));
  }

  // Prefill, then token by token, each batch element its own sequence of one cache.
  tpa::KVCache<float> cache({layer.cache_layout()}, 4, 64);
  std::vector<tpa::SeqId> seqs;
  for (Index b = 0; b < B; ++b) {
    const auto seq = cache.add_sequence();
    seqs.push_back(seq);
    tpa::Tensor<float, 2> yp(prompt, D);
    layer.forward(ctx, slice(x, b, 0, prompt), yp, cache, 0, seq);
    decode_err = std::max(decode_err, max_err(yp, y, b, 0));
    for (Index t = prompt; t < T; ++t) {
      tpa::Tensor<float, 2> y1(1, D);
      layer.forward(ctx, slice(x, b, t, 1), y1, cache, 0, seq);
      decode_err = std::max(decode_err, max_err(y1, y, b, t));
    }
    for (const auto& c : final_cache)
      cache_max = std::max(cache_max, cache_err(cache.view(seq, 0), c.factor, f, c.name, b));
  }

  // Batched decode: all batch elements advance together after their prefills.
  tpa::KVCache<float> batched({layer.cache_layout()}, 4, 64);
  std::vector<tpa::SeqId> bseqs;
  for (Index b = 0; b < B; ++b) {
    bseqs.push_back(batched.add_sequence());
    tpa::Tensor<float, 2> yp(prompt, D);
    layer.forward(ctx, slice(x, b, 0, prompt), yp, batched, 0, bseqs.back());
  }
  for (Index t = prompt; t < T; ++t) {
    tpa::Tensor<float, 2> xb(B, D), yb(B, D);
    for (Index b = 0; b < B; ++b) {
      const auto xr = slice(x, b, t, 1);
      std::copy(xr.data(), xr.data() + D, xb.data() + b * D);
    }
    layer.decode(ctx, xb, yb, batched, 0, bseqs);
    for (Index b = 0; b < B; ++b) {
      tpa::Tensor<float, 2> row(1, D);
      std::copy(yb.data() + b * D, yb.data() + (b + 1) * D, row.data());
      batched_err = std::max(batched_err, max_err(row, y, b, t));
    }
  }

  // Ragged calls: every batch element in each call, with chunks of different sizes (a prefill
  // of prompt − b tokens first, then 1 to 3 tokens a call), until all T tokens are in.
  double ragged_err = 0, ragged_cache = 0;
  tpa::KVCache<float> ragged({layer.cache_layout()}, 4, 64);
  std::vector<tpa::SeqId> rseqs;
  for (Index b = 0; b < B; ++b) rseqs.push_back(ragged.add_sequence());
  std::vector<Index> pos(static_cast<std::size_t>(B), 0);
  for (Index step = 0;; ++step) {
    std::vector<tpa::Chunk> chunks;
    std::vector<Index> from;
    for (Index b = 0; b < B; ++b) {
      const Index p = pos[static_cast<std::size_t>(b)];
      if (p == T) continue;
      const Index n = step == 0 ? std::max<Index>(1, std::min(T, prompt - b))
                                : std::min(T - p, 1 + (b + step) % 3);
      chunks.push_back({rseqs[static_cast<std::size_t>(b)], n});
      from.push_back(b);
    }
    if (chunks.empty()) break;
    Index rows = 0;
    for (const auto& c : chunks) rows += c.tokens;
    tpa::Tensor<float, 2> xr(rows, D), yr(rows, D);
    Index r = 0;
    for (std::size_t i = 0; i < chunks.size(); ++i) {
      const auto xs = slice(x, from[i], pos[static_cast<std::size_t>(from[i])], chunks[i].tokens);
      std::copy(xs.data(), xs.data() + chunks[i].tokens * D, xr.data() + r * D);
      r += chunks[i].tokens;
    }
    layer.forward(ctx, xr, yr, ragged, 0, chunks);
    r = 0;
    for (std::size_t i = 0; i < chunks.size(); ++i) {
      const Index n = chunks[i].tokens;
      tpa::Tensor<float, 2> part(n, D);
      std::copy(yr.data() + r * D, yr.data() + (r + n) * D, part.data());
      ragged_err = std::max(ragged_err, max_err(part, y, from[i], pos[static_cast<std::size_t>(from[i])]));
      pos[static_cast<std::size_t>(from[i])] += n;
      r += n;
    }
  }
  for (Index b = 0; b < B; ++b)
    for (const auto& c : final_cache)
      ragged_cache = std::max(
          ragged_cache, cache_err(ragged.view(rseqs[static_cast<std::size_t>(b)], 0), c.factor, f, c.name, b));

  EXPECT_LE(forward_err, kAbsTol) << "full forward";
  EXPECT_LE(decode_err, kAbsTol) << "prefill " << prompt << " + token-by-token decode";
  EXPECT_LE(batched_err, kAbsTol) << "batched decode";
  EXPECT_LE(cache_max, kAbsTol) << "cache contents";
  EXPECT_LE(ragged_err, kAbsTol) << "ragged calls";
  EXPECT_LE(ragged_cache, kAbsTol) << "cache contents after ragged calls";
  std::printf(
      "[   info   ] %s: max |err| forward %.2e, prefill+decode %.2e, batched %.2e, "
      "ragged %.2e, cache %.2e (ragged %.2e)\n",
      fixture, forward_err, decode_err, batched_err, ragged_err, cache_max, ragged_cache);
}

// The stored rope_cos / rope_sin [T, r/2] against the layer's RopeTable.
void check_rope_tables(const char* fixture, const tpa::RopeTable& rope, const SafetensorsFile& f) {
  const auto cos = f.tensor<2>("rope_cos");
  const auto sin = f.tensor<2>("rope_sin");
  ASSERT_EQ(cos.dimension(1), rope.rotary_dim() / 2);
  double m = 0;
  for (Index p = 0; p < cos.dimension(0); ++p)
    for (Index i = 0; i < cos.dimension(1); ++i) {
      m = std::max(m, std::abs(static_cast<double>(cos(p, i)) - rope.cos_row(p)[i]));
      m = std::max(m, std::abs(static_cast<double>(sin(p, i)) - rope.sin_row(p)[i]));
    }
  EXPECT_LE(m, kRopeTol);
  std::printf("[   info   ] %s: max |rope table diff| %.2e\n", fixture, m);
  EXPECT_EQ(rope.has_decay(), f.contains("rope_decay"));
  if (!f.contains("rope_decay")) return;
  // decay_base^θ in (0, 1]: the same bound as cos and sin (both round a double to f32).
  const auto decay = f.tensor<2>("rope_decay");
  ASSERT_EQ(decay.dimension(0), cos.dimension(0));
  ASSERT_EQ(decay.dimension(1), cos.dimension(1));
  double md = 0;
  for (Index p = 0; p < decay.dimension(0); ++p)
    for (Index i = 0; i < decay.dimension(1); ++i)
      md = std::max(md, std::abs(static_cast<double>(decay(p, i)) - rope.decay_row(p)[i]));
  EXPECT_LE(md, kRopeTol);
  std::printf("[   info   ] %s: max |rope decay table diff| %.2e\n", fixture, md);
}

// The stored `<name>_prerope` [B, T, rows, d] through the layer's RopeTable (rotation, then decay)
// against the stored `<name>` (after RoPE): max |diff| over every row of every token.
double rope_rows_err(const tpa::RopeTable& rope, const SafetensorsFile& f, const std::string& name) {
  const auto pre = f.tensor<4>(name + "_prerope");
  const auto post = f.tensor<4>(name);
  const Index B = pre.dimension(0), T = pre.dimension(1), R = pre.dimension(2),
              d = pre.dimension(3);
  EXPECT_EQ(d, rope.dim());
  std::vector<float> row(static_cast<std::size_t>(R * d));
  double m = 0;
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < T; ++t) {
      const float* src = pre.data() + ((b * T + t) * R) * d;
      std::copy(src, src + R * d, row.begin());
      rope.rotate(row.data(), t, R, d);
      const float* want = post.data() + ((b * T + t) * R) * d;
      for (Index e = 0; e < R * d; ++e)
        m = std::max(m, std::abs(static_cast<double>(row[static_cast<std::size_t>(e)]) - want[e]));
    }
  return m;
}

TEST(Fixtures, T6SharpAttention) {
  const auto f = open_fixture("t6_c1_sharp");
  const auto layer = tpa_layer(f);
  EXPECT_EQ(layer.kind(), "TPA");
  EXPECT_FALSE(layer.config().kv_only);
  EXPECT_EQ(layer.config().q_rank, 6);
  EXPECT_EQ(layer.config().k_rank, 2);
  EXPECT_EQ(layer.config().rope.style, tpa::RopeStyle::kHalfSplitReversed);
  EXPECT_FLOAT_EQ(layer.config().softmax_scale, 0.25f);  // = 1/sqrt(head_dim), the default
  check_rope_tables("t6_c1_sharp", layer.rope(), f);
  check_fixture("t6_c1_sharp", layer, f, 7, {{0, "A_k"}, {1, "B_k"}, {2, "A_v"}, {3, "B_v"}});
}

TEST(Fixtures, T6KvOnly) {
  const auto f = open_fixture("t6_kvonly_c1");
  const auto layer = tpa_layer(f);
  EXPECT_EQ(layer.kind(), "TPA-KV");
  EXPECT_TRUE(layer.config().kv_only);
  EXPECT_FLOAT_EQ(layer.config().softmax_scale, 0.25f);
  check_rope_tables("t6_kvonly_c1", layer.rope(), f);
  check_fixture("t6_kvonly_c1", layer, f, 5, {{0, "A_k"}, {1, "B_k"}, {2, "A_v"}, {3, "B_v"}});
}

TEST(Fixtures, GqaTwoKvHeads) {
  const auto f = open_fixture("gqa_kv2");
  const auto layer = gqa_layer(f);
  EXPECT_EQ(layer.kind(), "GQA");
  EXPECT_EQ(layer.config().kv_heads(), 2);
  EXPECT_EQ(layer.config().group_size(), meta_int(f, "group_size"));
  EXPECT_FLOAT_EQ(layer.config().softmax_scale, 0.25f);
  check_rope_tables("gqa_kv2", layer.rope(), f);
  check_fixture("gqa_kv2", layer, f, 9, {{0, "k"}, {1, "v"}});
}

// model/T6_partialrope_decay.py: half-split reversed RoPE on the first 8 of 24 dims of each B_q /
// B_k row, the rotated dims also × decay_base^θ[t,i] with decay_base 0.9 (metadata
// `rope_decay_base`). The layer is built from the metadata like the other T6 fixtures.
TEST(Fixtures, T6PartialRopeDecay) {
  const auto f = open_fixture("t6_partialrope_decay");
  const auto layer = tpa_layer(f);
  EXPECT_EQ(layer.kind(), "TPA");
  EXPECT_EQ(layer.config().rope.style, tpa::RopeStyle::kHalfSplitReversed);
  EXPECT_EQ(layer.config().rope.rotary_dim, 8);
  EXPECT_EQ(layer.config().rope.decay_base, 0.9);
  EXPECT_EQ(layer.config().q_rank, 6);
  EXPECT_EQ(layer.config().head_dim, 24);
  check_rope_tables("t6_partialrope_decay", layer.rope(), f);
  // The stored B_q and B_k, after rotation and decay, from the stored ones before.
  const double bq = rope_rows_err(layer.rope(), f, "B_q");
  const double bk = rope_rows_err(layer.rope(), f, "B_k");
  EXPECT_LE(bq, kAbsTol) << "B_q";
  EXPECT_LE(bk, kAbsTol) << "B_k";
  std::printf("[   info   ] t6_partialrope_decay: max |err| B_q %.2e, B_k %.2e\n", bq, bk);
  check_fixture("t6_partialrope_decay", layer, f, 7,
                {{0, "A_k"}, {1, "B_k"}, {2, "A_v"}, {3, "B_v"}});
}

// T6_infer.py: interleaved RoPE, base 500000; 12 prompt tokens then 4 decode steps, with the
// reference's factor caches stored after the prefill and after the last step.
TEST(Fixtures, T6InferDecode) {
  const auto f = open_fixture("t6_infer_decode");
  const auto layer = tpa_layer(f);
  EXPECT_EQ(layer.kind(), "TPA");
  EXPECT_EQ(layer.config().rope.style, tpa::RopeStyle::kInterleaved);
  EXPECT_EQ(layer.config().rope.base, 500000.0);
  EXPECT_FLOAT_EQ(layer.config().softmax_scale, 0.25f);
  check_rope_tables("t6_infer_decode", layer.rope(), f);

  const Index prompt = meta_int(f, "prompt_len"), steps = meta_int(f, "n_decode_steps");
  const auto x = f.tensor<3>("x");
  const auto y_prefill = f.tensor<3>("y_prefill");
  const auto y_decode = f.tensor<3>("y_decode");
  const auto y_full = f.tensor<3>("y_full");
  const Index B = x.dimension(0), D = x.dimension(2);
  ASSERT_EQ(x.dimension(1), prompt + steps);
  const std::vector<CacheCheck> prefill_cache = {{0, "prefill.cache_kA"},
                                                 {1, "prefill.cache_kB"},
                                                 {2, "prefill.cache_vA"},
                                                 {3, "prefill.cache_vB"}};
  const std::vector<CacheCheck> final_cache = {
      {0, "final.cache_kA"}, {1, "final.cache_kB"}, {2, "final.cache_vA"}, {3, "final.cache_vB"}};
  tpa::Context ctx;
  tpa::KVCache<float> cache({layer.cache_layout()}, 8, 16);
  double prefill_err = 0, decode_err = 0, full_err = 0, cache_max = 0;
  for (Index b = 0; b < B; ++b) {
    const auto seq = cache.add_sequence();
    tpa::Tensor<float, 2> yp(prompt, D);
    layer.forward(ctx, slice(x, b, 0, prompt), yp, cache, 0, seq);
    prefill_err = std::max(prefill_err, max_err(yp, y_prefill, b, 0));
    for (const auto& c : prefill_cache)
      cache_max = std::max(cache_max, cache_err(cache.view(seq, 0), c.factor, f, c.name, b));
    for (Index s = 0; s < steps; ++s) {
      tpa::Tensor<float, 2> y1(1, D);
      layer.forward(ctx, slice(x, b, prompt + s, 1), y1, cache, 0, seq);
      decode_err = std::max(decode_err, max_err(y1, y_decode, b, s));
    }
    for (const auto& c : final_cache)
      cache_max = std::max(cache_max, cache_err(cache.view(seq, 0), c.factor, f, c.name, b));
    tpa::Tensor<float, 2> yf(prompt + steps, D);
    layer.forward(ctx, slice(x, b, 0, prompt + steps), yf);
    full_err = std::max(full_err, max_err(yf, y_full, b, 0));
  }
  EXPECT_LE(prefill_err, kAbsTol) << "y_prefill";
  EXPECT_LE(decode_err, kAbsTol) << "y_decode";
  EXPECT_LE(full_err, kAbsTol) << "y_full";
  EXPECT_LE(cache_max, kAbsTol) << "prefill.cache_* / final.cache_*";
  std::printf(
      "[   info   ] t6_infer_decode: max |err| y_prefill %.2e, y_decode %.2e, y_full "
      "%.2e, caches %.2e\n",
      prefill_err, decode_err, full_err, cache_max);

  // y_full is the module output over all 16 tokens: the generic checks (including a batched
  // decode of both batch elements) apply to it too.
  check_fixture("t6_infer_decode", layer, f, prompt, final_cache, "y_full");
}

}  // namespace fixtures_test
