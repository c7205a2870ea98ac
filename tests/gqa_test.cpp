// MultiHeadAttention, MultiQueryAttention and GroupedQueryAttention against a naive
// double-precision implementation of SPEC.md written here, plus the cache equivalences
// (chunked prefill, decode, ragged batches, block reuse) and every validation error.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "test_util.hpp"

using tpa::GqaConfig;
using tpa::GqaWeights;
using tpa::Index;
using tpa::RopeStyle;
using tpa_test::random_tensor;
using tpa_test::rel_err;
using tpa_test::rows;

namespace gqa_test {

// Naive SPEC.md GQA in double: causal attention over x [T, D] at positions 0 … T−1.
std::vector<double> gqa_reference(const GqaConfig& c, const GqaWeights& w,
                                  const tpa::Tensor<float, 2>& x) {
  const Index T = x.dimension(0), D = c.d_model, H = c.n_heads, d = c.head_dim;
  const Index G = c.n_kv_heads == 0 ? H : c.n_kv_heads;
  const Index r = c.rope.rotary_dim == 0 ? d : c.rope.rotary_dim;
  const double scale = c.softmax_scale != 0 ? c.softmax_scale : 1.0 / std::sqrt(double(d));
  auto proj = [&](const tpa::Matrix<float>& W, Index t, Index row) {
    double s = 0;
    for (Index j = 0; j < D; ++j) s += double(W(row, j)) * x(t, j);
    return s;
  };
  std::vector<double> q(T * H * d), k(T * G * d), v(T * G * d), o(T * H * d), y(T * D);
  for (Index t = 0; t < T; ++t) {
    for (Index i = 0; i < H * d; ++i) q[t * H * d + i] = proj(w.c_q, t, i);
    for (Index i = 0; i < G * d; ++i) k[t * G * d + i] = proj(w.c_k, t, i);
    for (Index i = 0; i < G * d; ++i) v[t * G * d + i] = proj(w.c_v, t, i);
    for (Index h = 0; h < H; ++h) tpa_test::rope_ref(&q[(t * H + h) * d], r, t, c.rope.style, c.rope.base);
    for (Index g = 0; g < G; ++g) tpa_test::rope_ref(&k[(t * G + g) * d], r, t, c.rope.style, c.rope.base);
  }
  for (Index t = 0; t < T; ++t) {
    for (Index h = 0; h < H; ++h) {
      const Index g = h / (H / G);
      std::vector<double> s(t + 1);
      double m = -1e300, sum = 0;
      for (Index u = 0; u <= t; ++u) {
        double dot = 0;
        for (Index i = 0; i < d; ++i) dot += q[(t * H + h) * d + i] * k[(u * G + g) * d + i];
        s[u] = dot * scale;
        m = std::max(m, s[u]);
      }
      for (auto& e : s) sum += (e = std::exp(e - m));
      double* out = &o[(t * H + h) * d];
      for (Index i = 0; i < d; ++i) {
        double acc = 0;
        for (Index u = 0; u <= t; ++u) acc += s[u] / sum * v[(u * G + g) * d + i];
        out[i] = acc;
      }
      if (c.head_norm) {
        double ms = 0;
        for (Index i = 0; i < d; ++i) ms += out[i] * out[i];
        const double inv = 1.0 / std::sqrt(ms / d + c.norm_eps);
        for (Index i = 0; i < d; ++i) out[i] = out[i] * inv * w.subln[i];
      }
    }
    for (Index j = 0; j < D; ++j) {
      double acc = 0;
      for (Index i = 0; i < H * d; ++i) acc += double(w.c_proj(j, i)) * o[t * H * d + i];
      y[t * D + j] = acc;
    }
  }
  return y;
}

GqaConfig make_config(Index D, Index H, Index G, Index d, RopeStyle style = RopeStyle::kHalfSplitReversed,
                      Index rotary = 0, bool head_norm = false, float scale = 0.f) {
  GqaConfig c;
  c.d_model = D;
  c.n_heads = H;
  c.n_kv_heads = G;
  c.head_dim = d;
  c.rope.style = style;
  c.rope.rotary_dim = rotary;
  c.rope.max_positions = 64;
  c.head_norm = head_norm;
  c.softmax_scale = scale;
  return c;
}

template <class Backend>
class GqaLayer : public ::testing::Test {};
using Backends = ::testing::Types<tpa::Reference, tpa::Native>;
TYPED_TEST_SUITE(GqaLayer, Backends);

TYPED_TEST(GqaLayer, MatchesNaiveDoubleReference) {
  const std::vector<GqaConfig> configs = {
      make_config(48, 4, 4, 8),                                          // MHA
      make_config(40, 6, 2, 16, RopeStyle::kInterleaved, 8),             // GQA, partial rotary
      make_config(32, 4, 1, 12, RopeStyle::kHalfSplit, 0, true),         // MQA, head norm
      make_config(64, 8, 4, 10, RopeStyle::kHalfSplitReversed, 6, true, 0.2f),
  };
  tpa::Context ctx(2);
  for (std::size_t i = 0; i < configs.size(); ++i) {
    const auto& c = configs[i];
    const auto w = GqaWeights::random(c, 100 + i);
    tpa::GroupedQueryAttention<TypeParam> attn(c, w);
    const auto x = random_tensor(13, c.d_model, 7 + i);
    tpa::Tensor<float, 2> y(13, c.d_model);
    attn.forward(ctx, x, y);
    const auto ref = gqa_reference(c, w, x);
    EXPECT_LT(rel_err(y.data(), ref.data(), y.size()), 2e-5) << "config " << i;
  }
}

TYPED_TEST(GqaLayer, NamedKindsAreTheirSpecialCases) {
  tpa::Context ctx(1);
  auto c = make_config(32, 4, 0, 8);
  const auto w = GqaWeights::random(c, 5);
  const auto x = random_tensor(6, 32, 1);
  tpa::Tensor<float, 2> y(6, 32);
  tpa::MultiHeadAttention<TypeParam> mha(c, w);
  EXPECT_EQ(mha.config().kv_heads(), 4);
  EXPECT_EQ(mha.kind(), "MHA");
  mha.forward(ctx, x, y);
  EXPECT_LT(rel_err(y.data(), gqa_reference(mha.config(), w, x).data(), y.size()), 2e-5);

  auto cq = make_config(32, 4, 0, 8);
  cq.n_kv_heads = 1;
  const auto wq = GqaWeights::random(cq, 6);
  c.n_kv_heads = 0;
  tpa::MultiQueryAttention<TypeParam> mqa(c, wq);
  EXPECT_EQ(mqa.config().kv_heads(), 1);
  EXPECT_EQ(mqa.cache_layout().elements_per_token(), 2 * 8);
  mqa.forward(ctx, x, y);
  EXPECT_LT(rel_err(y.data(), gqa_reference(cq, wq, x).data(), y.size()), 2e-5);
}

TYPED_TEST(GqaLayer, CachedPrefillChunksAndDecodeEqualFullForward) {
  for (Index G : {6, 3, 1}) {
    const auto c = make_config(36, 6, G, 8, RopeStyle::kHalfSplitReversed, 0, G == 3);
    tpa::GroupedQueryAttention<TypeParam> attn(c, GqaWeights::random(c, 11));
    tpa::Context ctx(2);
    const Index T = 17;
    const auto x = random_tensor(T, 36, 3);
    tpa::Tensor<float, 2> full(T, 36);
    attn.forward(ctx, x, full);

    tpa::KVCache<float> cache({attn.cache_layout()}, 3, 16);
    const auto s = cache.add_sequence();
    std::vector<float> got;
    auto run = [&](Index r0, Index n) {
      const auto xi = rows(x, r0, n);
      tpa::Tensor<float, 2> yi(n, 36);
      attn.forward(ctx, xi, yi, cache, 0, s);
      got.insert(got.end(), yi.data(), yi.data() + yi.size());
    };
    run(0, 5);  // prefill
    run(5, 4);  // chunked prefill
    for (Index t = 9; t < T; ++t) run(t, 1);  // decode
    EXPECT_EQ(cache.length(s), T);
    EXPECT_LT(rel_err(got.data(), full.data(), full.size()), 1e-5) << "G " << G;
  }
}

TYPED_TEST(GqaLayer, PreRotatedCacheEqualsRotatingAtReadTime) {
  const auto c = make_config(24, 4, 2, 8, RopeStyle::kInterleaved);
  const auto w = GqaWeights::random(c, 2);
  tpa::GroupedQueryAttention<TypeParam> attn(c, w);
  tpa::Context ctx(1);
  tpa::KVCache<float> cache({attn.cache_layout()}, 4, 8);
  const auto s = cache.add_sequence();
  const auto x = random_tensor(9, 24, 8);
  tpa::Tensor<float, 2> y(9, 24);
  attn.forward(ctx, x, y, cache, 0, s);
  const auto view = cache.view(s, 0);
  for (Index t = 0; t < 9; ++t) {
    for (Index g = 0; g < 2; ++g) {
      double k[8], v[8];
      for (Index i = 0; i < 8; ++i) {
        k[i] = v[i] = 0;
        for (Index j = 0; j < 24; ++j) {
          k[i] += double(w.c_k(g * 8 + i, j)) * x(t, j);
          v[i] += double(w.c_v(g * 8 + i, j)) * x(t, j);
        }
      }
      tpa_test::rope_ref(k, 8, t, c.rope.style, c.rope.base);
      for (Index i = 0; i < 8; ++i) {
        EXPECT_NEAR(view.row_at(0, t, g)[i], k[i], 1e-5) << "K t " << t;
        EXPECT_NEAR(view.row_at(1, t, g)[i], v[i], 1e-5) << "V t " << t;
      }
    }
  }
}

TYPED_TEST(GqaLayer, RaggedBatchEqualsEachSequenceAlone) {
  const auto c = make_config(32, 8, 2, 8);
  tpa::GroupedQueryAttention<TypeParam> attn(c, GqaWeights::random(c, 4));
  tpa::Context ctx(2);
  const std::vector<Index> lens = {2, 7, 11, 1};
  tpa::KVCache<float> batched({attn.cache_layout()}, 4, 32), alone({attn.cache_layout()}, 4, 32);
  std::vector<tpa::SeqId> sb, sa;
  for (std::size_t i = 0; i < lens.size(); ++i) {
    const auto p = random_tensor(lens[i], 32, 20 + i);
    tpa::Tensor<float, 2> y(lens[i], 32);
    sb.push_back(batched.add_sequence());
    sa.push_back(alone.add_sequence());
    attn.forward(ctx, p, y, batched, 0, sb.back());
    attn.forward(ctx, p, y, alone, 0, sa.back());
  }
  for (int step = 0; step < 3; ++step) {
    const auto xb = random_tensor(4, 32, 50 + step);
    tpa::Tensor<float, 2> yb(4, 32);
    attn.decode(ctx, xb, yb, batched, 0, sb);
    for (Index b = 0; b < 4; ++b) {
      tpa::Tensor<float, 2> y1(1, 32);
      attn.forward(ctx, rows(xb, b, 1), y1, alone, 0, sa[b]);
      for (Index j = 0; j < 32; ++j) EXPECT_NEAR(yb(b, j), y1(0, j), 1e-6) << "seq " << b;
    }
  }
  for (std::size_t i = 0; i < lens.size(); ++i) EXPECT_EQ(batched.length(sb[i]), lens[i] + 3);
}

TYPED_TEST(GqaLayer, FreedAndReusedBlocksGiveTheSameResults) {
  const auto c = make_config(16, 2, 1, 8);
  tpa::GroupedQueryAttention<TypeParam> attn(c, GqaWeights::random(c, 9));
  tpa::Context ctx(1);
  const auto x = random_tensor(10, 16, 1), junk = random_tensor(12, 16, 2);
  tpa::Tensor<float, 2> expect(10, 16), got(10, 16), tmp(12, 16);
  tpa::KVCache<float> fresh({attn.cache_layout()}, 4, 3);
  attn.forward(ctx, x, expect, fresh, 0, fresh.add_sequence());

  tpa::KVCache<float> reused({attn.cache_layout()}, 4, 3);
  const auto a = reused.add_sequence();
  attn.forward(ctx, junk, tmp, reused, 0, a);  // fills every block with other data
  reused.free_sequence(a);
  const auto b = reused.add_sequence();
  attn.forward(ctx, x, got, reused, 0, b);
  for (Index i = 0; i < got.size(); ++i) ASSERT_EQ(got.data()[i], expect.data()[i]);
}

TYPED_TEST(GqaLayer, LayersOfAModelShareOneCache) {
  const auto c0 = make_config(24, 4, 2, 6), c1 = make_config(24, 4, 1, 8);
  tpa::GroupedQueryAttention<TypeParam> l0(c0, GqaWeights::random(c0, 1));
  tpa::MultiQueryAttention<TypeParam> l1(c1, GqaWeights::random(c1, 2));
  tpa::Context ctx(1);
  tpa::KVCache<float> shared({l0.cache_layout(), l1.cache_layout()}, 4, 8);
  tpa::KVCache<float> c_0({l0.cache_layout()}, 4, 8), c_1({l1.cache_layout()}, 4, 8);
  const auto s = shared.add_sequence(), s0 = c_0.add_sequence(), s1 = c_1.add_sequence();
  EXPECT_EQ(shared.bytes_per_token(), c_0.bytes_per_token() + c_1.bytes_per_token());
  for (Index t = 0; t < 7; ++t) {
    const auto x = random_tensor(1, 24, 30 + t);
    tpa::Tensor<float, 2> h(1, 24), y(1, 24), h2(1, 24), y2(1, 24);
    l0.forward(ctx, x, h, shared, 0, s);
    l1.forward(ctx, h, y, shared, 1, s);
    l0.forward(ctx, x, h2, c_0, 0, s0);
    l1.forward(ctx, h2, y2, c_1, 0, s1);
    for (Index j = 0; j < 24; ++j) ASSERT_EQ(y(0, j), y2(0, j));
  }
  EXPECT_EQ(shared.block_table(s).size(), 2u);
}

// Every invalid call throws tpa::Error naming the problem and leaves the cache as it was.
TEST(GqaValidation, BadCallsThrowAndChangeNothing) {
  const auto c = make_config(16, 4, 2, 4);
  tpa::GroupedQueryAttention<tpa::Native> attn(c, GqaWeights::random(c, 1));
  tpa::Context ctx(1);
  tpa::KVCache<float> cache({attn.cache_layout()}, 4, 3);
  const auto s = cache.add_sequence(), other = cache.add_sequence();
  tpa::Tensor<float, 2> x = random_tensor(5, 16, 1), y(5, 16);
  attn.forward(ctx, x, y, cache, 0, s);
  const auto before = tpa_test::snapshot(cache, {s, other});

  auto expect_error = [&](const char* what, auto&& call) {
    try {
      call();
      ADD_FAILURE() << "no error for " << what;
    } catch (const tpa::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
    EXPECT_TRUE(tpa_test::snapshot(cache, {s, other}) == before) << what;
  };
  tpa::Tensor<float, 2> x_bad(2, 15), y2(2, 16), y_bad(3, 16), x2 = random_tensor(2, 16, 2);
  tpa::Tensor<float, 2> x0(0, 16), y0(0, 16);
  expect_error("d_model (16)", [&] { attn.forward(ctx, x_bad, y2, cache, 0, s); });
  expect_error("must be x's shape", [&] { attn.forward(ctx, x2, y_bad, cache, 0, s); });
  expect_error("at least 1", [&] { attn.forward(ctx, x0, y0, cache, 0, s); });
  expect_error("sequence 7", [&] { attn.forward(ctx, x2, y2, cache, 0, 7); });
  expect_error("layer (1)", [&] { attn.forward(ctx, x2, y2, cache, 1, s); });
  tpa::Tensor<float, 2> x8 = random_tensor(8, 16, 3), y8(8, 16);
  expect_error("full", [&] { attn.forward(ctx, x8, y8, cache, 0, s); });
  expect_error("appears more than once", [&] { attn.decode(ctx, x2, y2, cache, 0, {s, s}); });
  expect_error("2 rows", [&] { attn.decode(ctx, x2, y2, cache, 0, {s}); });
  // The batch as a whole does not fit although each sequence alone would.
  {
    tpa::Tensor<float, 2> big = random_tensor(3, 16, 4), yb(3, 16);
    tpa::KVCache<float> tight({attn.cache_layout()}, 1, 7);
    const auto a = tight.add_sequence(), b = tight.add_sequence();
    attn.forward(ctx, random_tensor(3, 16, 5), big, tight, 0, a);
    attn.forward(ctx, random_tensor(3, 16, 6), big, tight, 0, b);
    const auto snap = tpa_test::snapshot(tight, {a, b});
    tpa::Tensor<float, 2> xb = random_tensor(2, 16, 7), yb2(2, 16);
    tpa::Tensor<float, 2> y1(1, 16);
    attn.decode(ctx, rows(xb, 0, 1), y1, tight, 0, {a});
    const auto snap2 = tpa_test::snapshot(tight, {a, b});
    EXPECT_THROW(attn.decode(ctx, xb, yb2, tight, 0, {a, b}), tpa::Error);  // needs 2, has 0
    EXPECT_TRUE(tpa_test::snapshot(tight, {a, b}) == snap2);
    EXPECT_FALSE(snap == snap2);
  }
  // A cache made for another layout.
  tpa::KVCache<float> wrong({tpa::CacheLayout("GQA", {{"K", 1, 4, true}, {"V", 1, 4, false}})}, 4, 3);
  const auto ws = wrong.add_sequence();
  EXPECT_THROW(attn.forward(ctx, x2, y2, wrong, 0, ws), tpa::Error);
  EXPECT_EQ(wrong.length(ws), 0);
  // Positions past the RoPE table (max_positions 64).
  auto small = c;
  small.rope.max_positions = 6;
  tpa::GroupedQueryAttention<tpa::Native> short_rope(small, GqaWeights::random(small, 1));
  expect_error("past the RoPE table", [&] { short_rope.forward(ctx, x2, y2, cache, 0, s); });
  tpa::Tensor<float, 2> x7 = random_tensor(7, 16, 9), y7(7, 16);
  EXPECT_THROW(short_rope.forward(ctx, x7, y7), tpa::Error);
  // The layer is unchanged too: the same call gives the same output as before the errors.
  tpa::Tensor<float, 2> again(5, 16);
  tpa::KVCache<float> c2({attn.cache_layout()}, 4, 3);
  attn.forward(ctx, x, again, c2, 0, c2.add_sequence());
  for (Index i = 0; i < again.size(); ++i) ASSERT_EQ(again.data()[i], y.data()[i]);
}

TEST(GqaValidation, InvalidConfigsAndWeightsThrow) {
  auto expect_error = [](const char* what, auto&& make) {
    try {
      make();
      ADD_FAILURE() << "no error for " << what;
    } catch (const tpa::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  using Layer = tpa::GroupedQueryAttention<tpa::Reference>;
  auto c = make_config(60, 12, 5, 4);
  expect_error("n_heads (12) is not a multiple of n_kv_heads (5)",
               [&] { Layer(c, GqaWeights::random(make_config(60, 12, 4, 4), 1)); });
  c = make_config(60, 12, 4, 6, RopeStyle::kHalfSplit, 5);
  expect_error("rotary dim (5) must be even", [&] { Layer(c, GqaWeights::random(c, 1)); });
  c = make_config(60, 12, 4, 6, RopeStyle::kHalfSplit, 8);
  expect_error("larger than", [&] { Layer(c, GqaWeights::random(c, 1)); });
  c = make_config(0, 12, 4, 6);
  expect_error("d_model (0)", [&] { Layer(c, GqaWeights{}); });
  c = make_config(60, 12, 4, 6);
  auto w = GqaWeights::random(c, 1);
  w.c_k.resize(3, 60);
  expect_error("'c_k.weight' has shape [3, 60], expected [24, 60]", [&] { Layer(c, w); });
  c.head_norm = true;
  expect_error("subln.weight", [&] { Layer(c, GqaWeights::random(make_config(60, 12, 4, 6), 1)); });
  c = make_config(60, 12, 4, 6);
  expect_error("MultiHeadAttention: n_kv_heads (4)",
               [&] { tpa::MultiHeadAttention<tpa::Reference>(c, GqaWeights::random(c, 1)); });
  expect_error("MultiQueryAttention: n_kv_heads (4)",
               [&] { tpa::MultiQueryAttention<tpa::Reference>(c, GqaWeights::random(c, 1)); });
  EXPECT_THROW(tpa::Context(0), tpa::Error);
}

}  // namespace gqa_test
