// TensorProductAttention (T6 and K/V-only) against a naive double-precision implementation of
// SPEC.md written here; cache equivalences (decode, chunked prefill, ragged batches); the
// Section 4 identities (MHA/MQA/GQA as TPA with non-contextual factors) through the attention
// cores; cache sizes; and every validation error, with the cache left unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "test_util.hpp"

using tpa::Index;
using tpa::RopeStyle;
using tpa::TpaConfig;
using tpa::TpaWeights;
using tpa_test::random_tensor;
using tpa_test::rel_err;
using tpa_test::rows;

namespace tpa_layer_test {

using Tpa = tpa::TensorProductAttention<>;  // Native backend, float cache: what users get.

// ------------------------------------------------------------------------------------------
// Naive SPEC.md TPA in double, independent of the library's math (its own RoPE, projections,
// attention, RMSNorm). Causal over x [T, D] at positions 0 … T−1; returns y [T, D].
// ------------------------------------------------------------------------------------------

// Rotates the first r dims of v to position p (SPEC.md, RoPE table of the three conventions).
void naive_rope(double* v, Index r, Index p, RopeStyle style, double base) {
  const Index half = r / 2;
  const double sign = style == RopeStyle::kHalfSplitReversed ? -1.0 : 1.0;
  for (Index i = 0; i < half; ++i) {
    const double theta = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(r));
    const double phi = sign * static_cast<double>(p) * theta;
    const bool inter = style == RopeStyle::kInterleaved;
    double& a = v[inter ? 2 * i : i];
    double& b = v[inter ? 2 * i + 1 : i + half];
    const double a0 = a, b0 = b;
    a = a0 * std::cos(phi) - b0 * std::sin(phi);
    b = a0 * std::sin(phi) + b0 * std::cos(phi);
  }
}

std::vector<double> naive_tpa(const TpaConfig& c, const TpaWeights& w,
                              const tpa::Tensor<float, 2>& x) {
  const Index T = x.dimension(0), D = c.d_model, H = c.n_heads, d = c.head_dim;
  const Index RQ = c.q_rank, RK = c.k_rank, RV = c.v_rank;
  const Index r = c.rope.rotary_dim == 0 ? d : c.rope.rotary_dim;
  const double scale = c.softmax_scale != 0 ? c.softmax_scale : 1.0 / std::sqrt(double(d));
  // W x_t for row `row` of W.
  auto proj = [&](const tpa::Matrix<float>& W, Index t, Index row) {
    double s = 0;
    for (Index j = 0; j < D; ++j) s += double(W(row, j)) * double(x(t, j));
    return s;
  };
  std::vector<double> q(T * H * d), k(T * H * d), v(T * H * d);
  for (Index t = 0; t < T; ++t) {
    // Contextual factors, rotated B_Q / B_K (or q heads).
    std::vector<double> aq(H * RQ), bq(RQ * d), ak(H * RK), bk(RK * d), av(H * RV), bv(RV * d);
    for (Index i = 0; i < H * RK; ++i) ak[i] = proj(w.W_A_k, t, i);
    for (Index i = 0; i < H * RV; ++i) av[i] = proj(w.W_A_v, t, i);
    for (Index i = 0; i < RK * d; ++i) bk[i] = proj(w.W_B_k, t, i);
    for (Index i = 0; i < RV * d; ++i) bv[i] = proj(w.W_B_v, t, i);
    for (Index s = 0; s < RK; ++s) naive_rope(&bk[s * d], r, t, c.rope.style, c.rope.base);
    if (c.kv_only) {
      for (Index i = 0; i < H * d; ++i) q[t * H * d + i] = proj(w.c_q, t, i);
      for (Index h = 0; h < H; ++h)
        naive_rope(&q[(t * H + h) * d], r, t, c.rope.style, c.rope.base);
    } else {
      for (Index i = 0; i < H * RQ; ++i) aq[i] = proj(w.W_A_q, t, i);
      for (Index i = 0; i < RQ * d; ++i) bq[i] = proj(w.W_B_q, t, i);
      for (Index s = 0; s < RQ; ++s) naive_rope(&bq[s * d], r, t, c.rope.style, c.rope.base);
    }
    // q_h = (1/R_Q) Σ A_Q[h,r] B_Q[r]; k_h, v_h likewise.
    for (Index h = 0; h < H; ++h) {
      for (Index i = 0; i < d; ++i) {
        double sk = 0, sv = 0, sq = 0;
        for (Index s = 0; s < RK; ++s) sk += ak[h * RK + s] * bk[s * d + i];
        for (Index s = 0; s < RV; ++s) sv += av[h * RV + s] * bv[s * d + i];
        k[(t * H + h) * d + i] = sk / double(RK);
        v[(t * H + h) * d + i] = sv / double(RV);
        if (!c.kv_only) {
          for (Index s = 0; s < RQ; ++s) sq += aq[h * RQ + s] * bq[s * d + i];
          q[(t * H + h) * d + i] = sq / double(RQ);
        }
      }
    }
  }
  std::vector<double> o(T * H * d), y(T * D);
  for (Index t = 0; t < T; ++t) {
    for (Index h = 0; h < H; ++h) {
      std::vector<double> p(t + 1);
      double m = -1e300, sum = 0;
      for (Index u = 0; u <= t; ++u) {
        double dot = 0;
        for (Index i = 0; i < d; ++i) dot += q[(t * H + h) * d + i] * k[(u * H + h) * d + i];
        p[u] = dot * scale;
        m = std::max(m, p[u]);
      }
      for (auto& e : p) sum += (e = std::exp(e - m));
      double* out = &o[(t * H + h) * d];
      for (Index i = 0; i < d; ++i) {
        double acc = 0;
        for (Index u = 0; u <= t; ++u) acc += p[u] / sum * v[(u * H + h) * d + i];
        out[i] = acc;
      }
      if (c.head_norm) {
        double ss = 0;
        for (Index i = 0; i < d; ++i) ss += out[i] * out[i];
        const double inv = 1.0 / std::sqrt(ss / double(d) + double(c.norm_eps));
        for (Index i = 0; i < d; ++i) out[i] *= inv * double(w.subln[i]);
      }
    }
    for (Index j = 0; j < D; ++j) {
      double s = 0;
      for (Index i = 0; i < H * d; ++i) s += double(w.c_proj(j, i)) * o[t * H * d + i];
      y[t * D + j] = s;
    }
  }
  return y;
}

TpaConfig make_config(Index D, Index H, Index d, Index RQ, Index RK, Index RV, RopeStyle style,
                      bool kv_only = false, bool head_norm = false, Index rotary_dim = 0,
                      double base = 10000.0) {
  TpaConfig c;
  c.d_model = D;
  c.n_heads = H;
  c.head_dim = d;
  c.q_rank = RQ;
  c.k_rank = RK;
  c.v_rank = RV;
  c.kv_only = kv_only;
  c.head_norm = head_norm;
  c.rope.style = style;
  c.rope.rotary_dim = rotary_dim;
  c.rope.base = base;
  c.rope.max_positions = 64;
  return c;
}

// Tolerance of the float32 layer against the double reference, relative to max |y|: the
// layer's projections are float GEMMs over D ≤ 64 and H·d ≤ 64 terms (≈ 1e-7 relative each),
// its RoPE tables are float; observed errors are 1.6e-7 … 4.3e-7.
constexpr double kRefTol = 1e-5;

// ------------------------------------------------------------------------------------------
// (a) The layer against the naive reference.
// ------------------------------------------------------------------------------------------

struct Shape {
  const char* name;
  TpaConfig cfg;
};

std::vector<Shape> shapes() {
  return {
      {"t6_reversed", make_config(32, 4, 8, 3, 2, 2, RopeStyle::kHalfSplitReversed)},
      {"rk_ne_rv_halfsplit_norm",
       make_config(48, 3, 16, 2, 1, 3, RopeStyle::kHalfSplit, false, true)},
      {"rq1_partial_interleaved",
       make_config(32, 5, 16, 1, 2, 4, RopeStyle::kInterleaved, false, false, 8, 500000.0)},
      {"rq6_partial_reversed_norm",
       make_config(64, 4, 16, 6, 3, 2, RopeStyle::kHalfSplitReversed, false, true, 10)},
      {"kvonly_reversed", make_config(64, 4, 16, 0, 2, 2, RopeStyle::kHalfSplitReversed, true)},
      {"kvonly_rk_ne_rv_interleaved_norm",
       make_config(40, 2, 12, 6, 1, 3, RopeStyle::kInterleaved, true, true, 6)},
      {"kvonly_halfsplit_partial",
       make_config(24, 6, 8, 0, 3, 1, RopeStyle::kHalfSplit, true, false, 4)},
  };
}

TEST(TpaLayer, MatchesNaiveReferenceForwardAndPrefill) {
  tpa::Context ctx;
  std::uint64_t seed = 1;
  for (const auto& s : shapes()) {
    SCOPED_TRACE(s.name);
    const TpaWeights w = TpaWeights::random(s.cfg, seed++);
    const Tpa layer(s.cfg, w);
    EXPECT_EQ(layer.kind(), s.cfg.kv_only ? "TPA-KV" : "TPA");
    const Index T = 11, D = s.cfg.d_model;
    const auto x = random_tensor(T, D, seed++);
    const auto ref = naive_tpa(s.cfg, w, x);

    tpa::Tensor<float, 2> y(T, D);
    layer.forward(ctx, x, y);
    EXPECT_LE(rel_err(y.data(), ref, T * D), kRefTol) << "no-cache forward";

    tpa::KVCache<float> cache({layer.cache_layout()}, 4, 16);
    const tpa::SeqId seq = cache.add_sequence();
    y.setZero();
    layer.forward(ctx, x, y, cache, 0, seq);
    EXPECT_LE(rel_err(y.data(), ref, T * D), kRefTol) << "prefill through the cache";
    EXPECT_EQ(cache.length(seq), T);
  }
}

TEST(TpaLayer, CustomSoftmaxScaleAndReferenceBackend) {
  TpaConfig c = make_config(32, 4, 8, 2, 2, 3, RopeStyle::kHalfSplitReversed, false, true);
  c.softmax_scale = 0.9f;
  const TpaWeights w = TpaWeights::random(c, 77);
  const tpa::TensorProductAttention<tpa::Reference> layer(c, w);
  const auto x = random_tensor(9, 32, 78);
  const auto ref = naive_tpa(c, w, x);
  tpa::Context ctx;
  tpa::Tensor<float, 2> y(9, 32);
  layer.forward(ctx, x, y);
  EXPECT_LE(rel_err(y.data(), ref, 9 * 32), kRefTol);
}

TEST(TpaLayer, Bfloat16CacheStaysClose) {
  const TpaConfig c = make_config(32, 4, 8, 3, 2, 2, RopeStyle::kHalfSplitReversed);
  const TpaWeights w = TpaWeights::random(c, 5);
  const tpa::TensorProductAttention<tpa::Native, tpa::bfloat16> layer(c, w);
  const Index T = 10;
  const auto x = random_tensor(T, 32, 6);
  const auto ref = naive_tpa(c, w, x);
  tpa::Context ctx;
  tpa::KVCache<tpa::bfloat16> cache({layer.cache_layout()}, 4, 16);
  const auto seq = cache.add_sequence();
  tpa::Tensor<float, 2> y(T, 32);
  layer.forward(ctx, x, y, cache, 0, seq);
  // bfloat16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per cached element).
  EXPECT_LE(rel_err(y.data(), ref, T * 32), 1e-2);
  EXPECT_EQ(cache.bytes_per_token(), static_cast<std::size_t>(c.cache_elements_per_token()) * 2);
}

// ------------------------------------------------------------------------------------------
// (b) Cache equivalences.
// ------------------------------------------------------------------------------------------

constexpr double kCacheTol = 1e-5;  // brief: incremental == full within relative 1e-5

TEST(TpaCache, IncrementalDecodeEqualsFullForward) {
  for (bool kv_only : {false, true}) {
    SCOPED_TRACE(kv_only ? "kv_only" : "t6");
    const TpaConfig c =
        make_config(48, 4, 16, 6, 2, 3, RopeStyle::kHalfSplitReversed, kv_only, true);
    const Tpa layer(c, TpaWeights::random(c, 11));
    const Index T = 21, D = c.d_model;
    const auto x = random_tensor(T, D, 12);
    tpa::Context ctx;
    tpa::Tensor<float, 2> full(T, D);
    layer.forward(ctx, x, full);

    tpa::KVCache<float> cache({layer.cache_layout()}, 4, 16);
    const auto seq = cache.add_sequence();
    const Index prompt = 5;
    tpa::Tensor<float, 2> y(prompt, D);
    layer.forward(ctx, rows(x, 0, prompt), y, cache, 0, seq);
    EXPECT_LE(rel_err(y.data(), full.data(), prompt * D), kCacheTol);
    for (Index t = prompt; t < T; ++t) {
      tpa::Tensor<float, 2> y1(1, D);
      layer.forward(ctx, rows(x, t, 1), y1, cache, 0, seq);
      EXPECT_LE(rel_err(y1.data(), full.data() + t * D, D), kCacheTol) << "token " << t;
    }
    EXPECT_EQ(cache.length(seq), T);
    EXPECT_EQ(cache.bytes_used(), static_cast<std::size_t>(T) * cache.bytes_per_token());
  }
}

TEST(TpaCache, ChunkedPrefillEqualsOneCall) {
  const TpaConfig c = make_config(32, 3, 8, 2, 2, 1, RopeStyle::kInterleaved);
  const Tpa layer(c, TpaWeights::random(c, 21));
  const Index T = 19, D = c.d_model;
  const auto x = random_tensor(T, D, 22);
  tpa::Context ctx;
  tpa::Tensor<float, 2> full(T, D);
  layer.forward(ctx, x, full);

  // Chunks that start and end inside blocks of 4 tokens and cross several of them.
  tpa::KVCache<float> cache({layer.cache_layout()}, 4, 16);
  const auto seq = cache.add_sequence();
  Index t = 0;
  for (Index n : {3, 1, 6, 4, 5}) {
    tpa::Tensor<float, 2> y(n, D);
    layer.forward(ctx, rows(x, t, n), y, cache, 0, seq);
    EXPECT_LE(rel_err(y.data(), full.data() + t * D, n * D), kCacheTol) << "chunk at " << t;
    t += n;
  }
  ASSERT_EQ(t, T);
}

TEST(TpaCache, RaggedBatchDecodeEqualsEachSequenceAlone) {
  for (bool kv_only : {false, true}) {
    SCOPED_TRACE(kv_only ? "kv_only" : "t6");
    const TpaConfig c = make_config(32, 4, 8, 3, 1, 2, RopeStyle::kHalfSplit, kv_only);
    const Tpa layer(c, TpaWeights::random(c, 31));
    const Index D = c.d_model, steps = 4;
    const std::vector<Index> prompt = {7, 1, 12};
    std::vector<tpa::Tensor<float, 2>> xs;
    for (std::size_t b = 0; b < prompt.size(); ++b)
      xs.push_back(random_tensor(prompt[b] + steps, D, 40 + b));
    tpa::Context ctx;

    // Each sequence alone, in its own cache, one forward over everything.
    std::vector<tpa::Tensor<float, 2>> alone;
    for (std::size_t b = 0; b < prompt.size(); ++b) {
      tpa::Tensor<float, 2> y(prompt[b] + steps, D);
      layer.forward(ctx, xs[b], y);
      alone.push_back(y);
    }

    // All in one cache: prefill each, then batched decode steps (in a shuffled order once).
    tpa::KVCache<float> cache({layer.cache_layout()}, 4, 32);
    std::vector<tpa::SeqId> seqs;
    for (std::size_t b = 0; b < prompt.size(); ++b) {
      seqs.push_back(cache.add_sequence());
      tpa::Tensor<float, 2> y(prompt[b], D);
      layer.forward(ctx, rows(xs[b], 0, prompt[b]), y, cache, 0, seqs.back());
    }
    for (Index s = 0; s < steps; ++s) {
      std::vector<std::size_t> order = {0, 1, 2};
      if (s == 2) order = {2, 0, 1};
      tpa::Tensor<float, 2> xb(3, D), yb(3, D);
      std::vector<tpa::SeqId> ids;
      for (std::size_t i = 0; i < 3; ++i) {
        const std::size_t b = order[i];
        const Index t = prompt[b] + s;
        std::copy(xs[b].data() + t * D, xs[b].data() + (t + 1) * D, xb.data() + i * D);
        ids.push_back(seqs[b]);
      }
      layer.decode(ctx, xb, yb, cache, 0, ids);
      for (std::size_t i = 0; i < 3; ++i) {
        const std::size_t b = order[i];
        const Index t = prompt[b] + s;
        EXPECT_LE(rel_err(yb.data() + i * D, alone[b].data() + t * D, D), kCacheTol)
            << "sequence " << b << " step " << s;
      }
    }
    for (std::size_t b = 0; b < prompt.size(); ++b)
      EXPECT_EQ(cache.length(seqs[b]), prompt[b] + steps);
  }
}

// ------------------------------------------------------------------------------------------
// (c) SPEC.md Section 4: MHA / MQA / GQA are TPA with non-contextual factors
// A[h, g] = G·[g == g(h)], R_K = R_V = G, B = the GQA keys / values.
// ------------------------------------------------------------------------------------------

template <class Backend>
void check_gqa_identity(Index H, Index G) {
  SCOPED_TRACE(std::string(Backend::name) + " H=" + std::to_string(H) + " G=" + std::to_string(G));
  const Index d = 8, T = 13, n_q = 5, q_pos0 = T - n_q;
  const auto keys = random_tensor(T, G * d, 100 + G);    // [T, G, d], taken as rotated
  const auto values = random_tensor(T, G * d, 200 + G);  // [T, G, d]
  const auto q = random_tensor(n_q, H * d, 300 + G);     // [n_q, H, d], taken as rotated
  const Index group = H / G;

  // GQA cache: K [G, d], V [G, d], head-major (as GroupedQueryAttention places them).
  tpa::KVCache<float> gqa_cache(
      {tpa::CacheLayout("GQA", {{"K", G, d, true, tpa::TileOrder::kHeadMajor},
                                {"V", G, d, false, tpa::TileOrder::kHeadMajor}})},
      4, 16);
  const auto gs = gqa_cache.add_sequence();
  const tpa::FactorRows gqa_rows[2] = {{keys.data(), G * d}, {values.data(), G * d}};
  gqa_cache.append(gs, 0, T, gqa_rows);

  // TPA cache with the same tokens as factors: A [H, G] one-hot·G, B = keys / values.
  std::vector<float> a(static_cast<std::size_t>(T * H * G), 0.f);
  for (Index t = 0; t < T; ++t)
    for (Index h = 0; h < H; ++h)
      a[static_cast<std::size_t>((t * H + h) * G + h / group)] = float(G);
  tpa::KVCache<float> tpa_cache(
      {tpa::CacheLayout(
          "TPA",
          {{"A_K", H, G, false}, {"B_K", G, d, true}, {"A_V", H, G, false}, {"B_V", G, d, false}})},
      4, 16);
  const auto ts = tpa_cache.add_sequence();
  const tpa::FactorRows tpa_rows[4] = {
      {a.data(), H * G}, {keys.data(), G * d}, {a.data(), H * G}, {values.data(), G * d}};
  tpa_cache.append(ts, 0, T, tpa_rows);

  const float scale = 1.f / std::sqrt(float(d));
  tpa::Tensor<float, 2> o_gqa(n_q, H * d), o_full(n_q, H * d), o_fact(n_q, H * d);

  tpa::GroupedAttentionParams<float> gp;
  gp.q = q.data();
  gp.q_stride = H * d;
  gp.o = o_gqa.data();
  gp.o_stride = H * d;
  gp.n_q = n_q;
  gp.q_pos0 = q_pos0;
  gp.n_heads = H;
  gp.n_kv_heads = G;
  gp.k_factor[0] = 0;
  gp.k_dims[0] = d;
  gp.v_factor = 1;
  gp.d_v = d;
  gp.scale = scale;
  gp.kv = gqa_cache.view(gs, 0);
  tpa::Kernels<tpa::Reference>::grouped_attention(gp);

  // TPA core, full query (the K/V-only path).
  tpa::TpaAttentionParams<float> tp;
  tp.q_rank = 0;
  tp.q = q.data();
  tp.q_stride = H * d;
  tp.o = o_full.data();
  tp.o_stride = H * d;
  tp.n_q = n_q;
  tp.q_pos0 = q_pos0;
  tp.n_heads = H;
  tp.head_dim = d;
  tp.k_rank = G;
  tp.v_rank = G;
  tp.scale = scale;
  tp.kv = tpa_cache.view(ts, 0);
  tpa::Kernels<Backend>::tpa_attention(tp);
  EXPECT_LE(rel_err(o_full.data(), o_gqa.data(), n_q * H * d), 1e-6) << "full query";

  // TPA core, factored query: A_Q = H·I [H, H], B_Q = q heads [H, d] (R_Q = H).
  std::vector<float> a_q(static_cast<std::size_t>(n_q * H * H), 0.f);
  for (Index i = 0; i < n_q; ++i)
    for (Index h = 0; h < H; ++h) a_q[static_cast<std::size_t>((i * H + h) * H + h)] = float(H);
  tp.q = nullptr;
  tp.q_rank = H;
  tp.a_q = a_q.data();
  tp.a_q_stride = H * H;
  tp.b_q = q.data();
  tp.b_q_stride = H * d;
  tp.o = o_fact.data();
  tpa::Kernels<Backend>::tpa_attention(tp);
  EXPECT_LE(rel_err(o_fact.data(), o_gqa.data(), n_q * H * d), 1e-6) << "factored query";
}

TEST(TpaCore, GqaMqaMhaAreTpaWithNonContextualFactors) {
  const Index H = 6;
  for (Index G : {Index(1), Index(2), H}) {
    check_gqa_identity<tpa::Reference>(H, G);
    check_gqa_identity<tpa::Native>(H, G);
  }
}

// ------------------------------------------------------------------------------------------
// (d) Cache size per token.
// ------------------------------------------------------------------------------------------

TEST(TpaCache, ElementsAndBytesPerToken) {
  for (bool kv_only : {false, true}) {
    const TpaConfig c = make_config(32, 5, 8, 3, 2, 3, RopeStyle::kHalfSplitReversed, kv_only);
    const Tpa layer(c, TpaWeights::random(c, 3));
    const tpa::CacheLayout l = layer.cache_layout();
    ASSERT_EQ(l.num_factors(), 4u);
    const tpa::FactorSpec expect[4] = {
        {"A_K", 5, 2, false}, {"B_K", 2, 8, true}, {"A_V", 5, 3, false}, {"B_V", 3, 8, false}};
    for (std::size_t f = 0; f < 4; ++f) EXPECT_EQ(l.factor(f), expect[f]) << f;
    EXPECT_EQ(l.kind(), kv_only ? "TPA-KV" : "TPA");
    const Index per_token = (2 + 3) * (5 + 8);
    EXPECT_EQ(l.elements_per_token(), per_token);
    EXPECT_EQ(c.cache_elements_per_token(), per_token);

    // Exact bytes, per layer and for a two-layer model, and bytes_used after appends.
    tpa::KVCache<float> cache({l, l}, 4, 16);
    EXPECT_EQ(cache.bytes_per_token(0), static_cast<std::size_t>(per_token) * 4);
    EXPECT_EQ(cache.bytes_per_token(), static_cast<std::size_t>(per_token) * 4 * 2);
    const auto seq = cache.add_sequence();
    tpa::Context ctx;
    const auto x = random_tensor(6, 32, 4);
    tpa::Tensor<float, 2> y(6, 32);
    layer.forward(ctx, x, y, cache, 0, seq);
    layer.forward(ctx, x, y, cache, 1, seq);
    EXPECT_EQ(cache.bytes_used(), static_cast<std::size_t>(6 * per_token * 4 * 2));
    tpa::KVCache<tpa::half> half_cache({l}, 4, 16);
    EXPECT_EQ(half_cache.bytes_per_token(), static_cast<std::size_t>(per_token) * 2);
  }
}

TEST(TpaCache, MediumModelTableOfSpec) {
  // SPEC.md: D = 1024, head_dim 64; T6 47 heads, R_Q 6, R_K = R_V = 2 -> 444 elements;
  // K/V-only 29 heads -> 372.
  const TpaConfig t6 = make_config(1024, 47, 64, 6, 2, 2, RopeStyle::kHalfSplitReversed);
  const TpaConfig kv = make_config(1024, 29, 64, 0, 2, 2, RopeStyle::kHalfSplitReversed, true);
  EXPECT_EQ(t6.cache_elements_per_token(), 444);
  EXPECT_EQ(kv.cache_elements_per_token(), 372);
  const Tpa t6_layer(t6, TpaWeights::random(t6, 1));
  const Tpa kv_layer(kv, TpaWeights::random(kv, 2));
  EXPECT_EQ(t6_layer.cache_layout().elements_per_token(), 444);
  EXPECT_EQ(kv_layer.cache_layout().elements_per_token(), 372);
  tpa::KVCache<float> cache({t6_layer.cache_layout(), kv_layer.cache_layout()}, 16, 4);
  EXPECT_EQ(cache.bytes_per_token(0), 444u * 4);
  EXPECT_EQ(cache.bytes_per_token(1), 372u * 4);
  // One token through the medium T6 layer: exactly 444 floats are cached.
  const auto seq = cache.add_sequence();
  tpa::Context ctx;
  const auto x = random_tensor(1, 1024, 9);
  tpa::Tensor<float, 2> y(1, 1024);
  t6_layer.forward(ctx, x, y, cache, 0, seq);
  EXPECT_EQ(cache.bytes_used(), 444u * 4);
}

// ------------------------------------------------------------------------------------------
// (e) Errors: invalid configs and weights, bad calls; a throwing call changes no state.
// ------------------------------------------------------------------------------------------

// Expects `f` to throw tpa::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no tpa::Error thrown (expected: " << parts.front() << ")";
  } catch (const tpa::Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

TEST(TpaErrors, InvalidConfigsNameTheValueAndTheRule) {
  const TpaConfig ok = make_config(32, 4, 8, 2, 2, 2, RopeStyle::kHalfSplitReversed);
  const TpaWeights w = TpaWeights::random(ok, 1);
  auto build = [&](const TpaConfig& c) { return [c, &w] { Tpa layer(c, w); }; };
  TpaConfig c = ok;
  c.q_rank = 0;
  expect_error(build(c), {"TensorProductAttention", "q_rank (0)", ">= 1"});
  c = ok, c.k_rank = 0;
  expect_error(build(c), {"k_rank (0)", ">= 1"});
  c = ok, c.v_rank = -2;
  expect_error(build(c), {"v_rank (-2)", ">= 1"});
  c = ok, c.n_heads = 0;
  expect_error(build(c), {"n_heads (0)"});
  c = ok, c.head_dim = 0;
  expect_error(build(c), {"head_dim (0)"});
  c = ok, c.d_model = 0;
  expect_error(build(c), {"d_model (0)"});
  c = ok, c.rope.rotary_dim = 16;
  expect_error(build(c), {"rotary_dim (16)", "larger than", "(8)"});
  c = ok, c.rope.rotary_dim = 5;
  expect_error(build(c), {"rotary dim (5)", "even"});
  c = ok, c.rope.base = -1;
  expect_error(build(c), {"rope.base (-1)"});
  c = ok, c.softmax_scale = -0.5f;
  expect_error(build(c), {"softmax_scale (-0.5)"});
  c = ok, c.softmax_scale = std::nanf("");
  expect_error(build(c), {"softmax_scale"});
  c = ok, c.norm_eps = 0;
  expect_error(build(c), {"norm_eps (0)"});
  c = ok, c.kv_only = true, c.q_rank = -1;
  expect_error([c] { c.validate(); }, {"q_rank (-1)"});
  // kv_only ignores q_rank (0 is fine) but needs c_q.
  c = ok, c.kv_only = true, c.q_rank = 0;
  EXPECT_NO_THROW(c.validate());
  expect_error(build(c), {"c_qkv.c_q.weight", "[0, 0]", "[32, 32]"});
  EXPECT_NO_THROW(Tpa(c, TpaWeights::random(c, 2)));
}

TEST(TpaErrors, WrongWeightShapesNameTheWeight) {
  const TpaConfig c = make_config(32, 4, 8, 2, 2, 3, RopeStyle::kHalfSplitReversed, false, true);
  const TpaWeights ok = TpaWeights::random(c, 1);
  auto with = [&](auto mutate) {
    TpaWeights w = ok;
    mutate(w);
    return [c, w] { Tpa layer(c, w); };
  };
  expect_error(with([](TpaWeights& w) { w.W_A_q.resize(7, 32); }),
               {"c_qkv.W_A_q.weight", "[7, 32]", "expected [8, 32]"});
  expect_error(with([](TpaWeights& w) { w.W_B_k.resize(16, 31); }),
               {"c_qkv.W_B_k.weight", "expected [16, 32]"});
  expect_error(with([](TpaWeights& w) { w.W_A_v.resize(8, 32); }),
               {"c_qkv.W_A_v.weight", "expected [12, 32]"});
  expect_error(with([](TpaWeights& w) { w.W_B_v.resize(0, 0); }), {"c_qkv.W_B_v.weight"});
  expect_error(with([](TpaWeights& w) { w.c_proj.resize(32, 16); }),
               {"c_proj.weight", "expected [32, 32]"});
  expect_error(with([](TpaWeights& w) { w.subln.resize(0); }), {"subln.weight", "expected [8]"});
}

TEST(TpaErrors, BadCallsThrowAndLeaveTheCacheUnchanged) {
  TpaConfig c = make_config(32, 4, 8, 2, 2, 2, RopeStyle::kHalfSplitReversed);
  c.rope.max_positions = 16;
  const Tpa layer(c, TpaWeights::random(c, 1));
  tpa::Context ctx;
  tpa::KVCache<float> cache({layer.cache_layout()}, 4, 6);  // room for 24 tokens
  const auto a = cache.add_sequence();
  const auto b = cache.add_sequence();
  const auto gone = cache.add_sequence();
  cache.free_sequence(gone);
  tpa::Tensor<float, 2> y5(5, 32), y3(3, 32);
  layer.forward(ctx, random_tensor(5, 32, 1), y5, cache, 0, a);
  layer.forward(ctx, random_tensor(3, 32, 2), y3, cache, 0, b);
  const auto before = tpa_test::snapshot(cache, {a, b});
  auto unchanged = [&](const char* what) {
    EXPECT_TRUE(tpa_test::snapshot(cache, {a, b}) == before) << what;
    EXPECT_EQ(cache.length(a), 5) << what;
    EXPECT_EQ(cache.length(b), 3) << what;
  };

  const auto x1 = random_tensor(1, 32, 3);
  tpa::Tensor<float, 2> y1(1, 32);
  {
    const auto bad = random_tensor(2, 31, 4);
    tpa::Tensor<float, 2> y(2, 31);
    expect_error([&] { layer.forward(ctx, bad, y, cache, 0, a); }, {"d_model (32)"});
    unchanged("x with the wrong width");
    tpa::Tensor<float, 2> y_wrong(2, 32);
    expect_error([&] { layer.forward(ctx, x1, y_wrong, cache, 0, a); }, {"y is [2, 32]"});
    unchanged("y with the wrong shape");
  }
  expect_error([&] { layer.forward(ctx, x1, y1, cache, 1, a); }, {"layer (1)"});
  unchanged("unknown layer");
  expect_error([&] { layer.forward(ctx, x1, y1, cache, 0, 42); }, {"sequence 42"});
  expect_error([&] { layer.forward(ctx, x1, y1, cache, 0, gone); }, {"not a live sequence"});
  unchanged("unknown sequence");

  // Positions past the RoPE table: a holds 5 tokens; 12 more would reach position 16 (the
  // blocks they need, 3, are free).
  {
    const auto x12 = random_tensor(12, 32, 5);
    tpa::Tensor<float, 2> y12(12, 32);
    expect_error([&] { layer.forward(ctx, x12, y12, cache, 0, a); },
                 {"position 16", "rope.max_positions = 16"});
    unchanged("past the RoPE table");
  }
  // Batched decode: wrong count, repeated sequence, one bad sequence after a good one.
  {
    const auto x2 = random_tensor(2, 32, 7);
    tpa::Tensor<float, 2> y2(2, 32);
    expect_error([&] { layer.decode(ctx, x2, y2, cache, 0, {a}); }, {"1 sequences for 2 rows"});
    expect_error([&] { layer.decode(ctx, x2, y2, cache, 0, {a, a}); }, {"more than once"});
    expect_error([&] { layer.decode(ctx, x2, y2, cache, 0, {a, gone}); }, {"not a live"});
    unchanged("bad batched decode");
  }
  // A full cache. Fill b to 12 tokens (3 blocks) and a to 8 (2 blocks): 5 of the 6 blocks are
  // used. 5 more tokens for a need 2 new blocks; a batched decode of a and b needs one new
  // block for each, though each sequence alone would fit.
  {
    auto x = random_tensor(9, 32, 8);
    tpa::Tensor<float, 2> y(9, 32);
    layer.forward(ctx, x, y, cache, 0, b);
    auto x3 = random_tensor(3, 32, 9);
    tpa::Tensor<float, 2> y3b(3, 32);
    layer.forward(ctx, x3, y3b, cache, 0, a);
    ASSERT_EQ(cache.length(a), 8);
    ASSERT_EQ(cache.length(b), 12);
    ASSERT_EQ(cache.available_blocks(), 1);
    const auto full_before = tpa_test::snapshot(cache, {a, b});
    const auto x5 = random_tensor(5, 32, 6);
    tpa::Tensor<float, 2> y5b(5, 32);
    expect_error([&] { layer.forward(ctx, x5, y5b, cache, 0, a); },
                 {"cache is full", "needs 2 new blocks", "only 1"});
    EXPECT_TRUE(tpa_test::snapshot(cache, {a, b}) == full_before);
    EXPECT_EQ(cache.available_blocks(), 1);
    const auto x2 = random_tensor(2, 32, 10);
    tpa::Tensor<float, 2> y2(2, 32);
    expect_error([&] { layer.decode(ctx, x2, y2, cache, 0, {a, b}); }, {"cache is full"});
    EXPECT_TRUE(tpa_test::snapshot(cache, {a, b}) == full_before);
  }
  // A cache laid out for another kind or other ranks.
  {
    tpa::KVCache<float> gqa({tpa::CacheLayout("GQA", {{"K", 2, 8, true}, {"V", 2, 8, false}})}, 4,
                            4);
    const auto s = gqa.add_sequence();
    expect_error([&] { layer.forward(ctx, x1, y1, gqa, 0, s); }, {"'GQA'", "'TPA'"});
    EXPECT_EQ(gqa.length(s), 0);
    EXPECT_EQ(gqa.bytes_used(), 0u);
    TpaConfig other = c;
    other.v_rank = 3;
    const Tpa other_layer(other, TpaWeights::random(other, 2));
    tpa::KVCache<float> oc({other_layer.cache_layout()}, 4, 4);
    const auto s2 = oc.add_sequence();
    expect_error([&] { layer.forward(ctx, x1, y1, oc, 0, s2); }, {"layout"});
    EXPECT_EQ(oc.length(s2), 0);
    EXPECT_TRUE(oc.block_table(s2).empty());
  }
  // No-cache forward: too many tokens for the RoPE table, empty input.
  {
    const auto x17 = random_tensor(17, 32, 11);
    tpa::Tensor<float, 2> y17(17, 32);
    expect_error([&] { layer.forward(ctx, x17, y17); }, {"position 16", "past the RoPE table"});
    tpa::Tensor<float, 2> x0(0, 32), y0(0, 32);
    expect_error([&] { layer.forward(ctx, x0, y0); }, {"0 tokens"});
  }
}

}  // namespace tpa_layer_test
