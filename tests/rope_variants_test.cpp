// Issue 25, items 5–7: RoPE with decay, RoPE off, and sigmoid TPA factors, through every kind
// (MHA, GQA, MQA, TPA, TPA-KV, MLA in both forms) and every compiled backend, against a
// double-precision reference written here from SPEC.md and the T6 repository's code
// (model/*_partialrope_decay.py: y_rot = rotate(x)·decay_base^(p·θ_i) on query and key rows;
// decode/flashtpa_decode_*_sigmoid.py: q_h = (1/R) Σ_r σ(A_Q[h,r]) B_Q[r], likewise k and v).
// Each case runs a no-cache forward, a chunked prefill of odd length, single-token decode steps
// and ragged batched decode steps on 1 and 3 threads; every output row must match the reference
// at its position (so decode == prefill). Identities: decay_base 1 ≡ plain RoPE (bit for bit),
// RoPE off ≡ rotation by angle 0; far positions whose decay underflows stay finite. Config
// validation of the new fields, through every kind's config.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace rope_variants_test {

using tpa::Index;
using tpa::RopeConfig;
using tpa::RopeStyle;
using Tensor2 = tpa::Tensor<float, 2>;
using Vec = std::vector<double>;

// ---- the double-precision reference ------------------------------------------------------------

// RoPE of SPEC.md on v[0 … dim), with decay: each rotated pair is turned by φ = ±p·θ_i, then both
// of its dims are multiplied by decay_base^(p·θ_i) (std::pow here; the library uses exp∘log).
// RoPE off (kNone) is a rotation of every pair by angle 0 (cos 0 = 1, sin 0 = 0), computed as
// such.
void ref_rope(double* v, Index dim, Index p, const RopeConfig& rc) {
  const bool off = rc.style == RopeStyle::kNone;
  const Index r = off ? dim - dim % 2 : (rc.rotary_dim == 0 ? dim : rc.rotary_dim);
  const Index half = r / 2;
  const double sign = rc.style == RopeStyle::kHalfSplitReversed ? -1.0 : 1.0;
  for (Index i = 0; i < half; ++i) {
    const double theta = std::pow(rc.base, -2.0 * static_cast<double>(i) / static_cast<double>(r));
    const double angle = off ? 0.0 : static_cast<double>(p) * theta;
    const double phi = sign * angle;
    const double decay = std::pow(rc.decay_base, angle);
    const bool inter = rc.style == RopeStyle::kInterleaved;
    double& a = v[inter ? 2 * i : i];
    double& b = v[inter ? 2 * i + 1 : i + half];
    const double a0 = a, b0 = b;
    a = (a0 * std::cos(phi) - b0 * std::sin(phi)) * decay;
    b = (a0 * std::sin(phi) + b0 * std::cos(phi)) * decay;
  }
}

double sigmoid(double a) { return 1.0 / (1.0 + std::exp(-a)); }

// W x for a [out, in] weight and one input row.
Vec matvec(const tpa::Matrix<float>& w, const float* x) {
  Vec y(static_cast<std::size_t>(w.rows()));
  for (Index o = 0; o < w.rows(); ++o) {
    double s = 0;
    for (Index i = 0; i < w.cols(); ++i) s += static_cast<double>(w(o, i)) * x[i];
    y[static_cast<std::size_t>(o)] = s;
  }
  return y;
}

// Causal softmax attention: q [T, H, dq], k [T, G, dq], v [T, G, dv]; head h reads KV head
// h / (H/G). Returns o [T, H, dv].
Vec attend(const Vec& q, const Vec& k, const Vec& v, Index T, Index H, Index G, Index dq, Index dv,
           double scale) {
  Vec o(static_cast<std::size_t>(T * H * dv), 0.0);
  for (Index t = 0; t < T; ++t)
    for (Index h = 0; h < H; ++h) {
      const Index g = h / (H / G);
      Vec s(static_cast<std::size_t>(t + 1));
      double m = -1e300, sum = 0;
      for (Index u = 0; u <= t; ++u) {
        double dot = 0;
        for (Index i = 0; i < dq; ++i) dot += q[(t * H + h) * dq + i] * k[(u * G + g) * dq + i];
        s[u] = dot * scale;
        m = std::max(m, s[u]);
      }
      for (double& e : s) sum += (e = std::exp(e - m));
      for (Index u = 0; u <= t; ++u)
        for (Index i = 0; i < dv; ++i) o[(t * H + h) * dv + i] += s[u] / sum * v[(u * G + g) * dv + i];
    }
  return o;
}

// y [T, D] = W_o o for every token.
Vec out_proj(const tpa::Matrix<float>& w, const Vec& o, Index T) {
  const Index D = w.rows(), in = w.cols();
  Vec y(static_cast<std::size_t>(T * D));
  for (Index t = 0; t < T; ++t)
    for (Index j = 0; j < D; ++j) {
      double s = 0;
      for (Index i = 0; i < in; ++i) s += static_cast<double>(w(j, i)) * o[t * in + i];
      y[t * D + j] = s;
    }
  return y;
}

Vec ref_gqa(const tpa::GqaConfig& c, const tpa::GqaWeights& w, const Tensor2& x) {
  const Index T = x.dimension(0), D = c.d_model, H = c.n_heads, G = c.kv_heads(), d = c.head_dim;
  Vec q, k, v;
  for (Index t = 0; t < T; ++t) {
    Vec qt = matvec(w.c_q, x.data() + t * D), kt = matvec(w.c_k, x.data() + t * D);
    const Vec vt = matvec(w.c_v, x.data() + t * D);
    for (Index h = 0; h < H; ++h) ref_rope(&qt[h * d], d, t, c.rope);
    for (Index g = 0; g < G; ++g) ref_rope(&kt[g * d], d, t, c.rope);
    q.insert(q.end(), qt.begin(), qt.end());
    k.insert(k.end(), kt.begin(), kt.end());
    v.insert(v.end(), vt.begin(), vt.end());
  }
  return out_proj(w.c_proj, attend(q, k, v, T, H, G, d, d, c.scale()), T);
}

Vec ref_tpa(const tpa::TpaConfig& c, const tpa::TpaWeights& w, const Tensor2& x) {
  const Index T = x.dimension(0), D = c.d_model, H = c.n_heads, d = c.head_dim;
  const Index RQ = c.q_rank, RK = c.k_rank, RV = c.v_rank;
  const bool sig = c.factor_activation == tpa::FactorActivation::kSigmoid;
  auto act = [&](Vec a) {
    if (sig)
      for (double& e : a) e = sigmoid(e);
    return a;
  };
  // Σ_r A[h, r] B[r] / R for every head.
  auto combine = [&](const Vec& a, const Vec& b, Index R, Vec& out) {
    for (Index h = 0; h < H; ++h)
      for (Index i = 0; i < d; ++i) {
        double s = 0;
        for (Index r = 0; r < R; ++r) s += a[h * R + r] * b[r * d + i];
        out.push_back(s / static_cast<double>(R));
      }
  };
  Vec q, k, v;
  for (Index t = 0; t < T; ++t) {
    const float* xt = x.data() + t * D;
    Vec bk = matvec(w.W_B_k, xt);
    for (Index r = 0; r < RK; ++r) ref_rope(&bk[r * d], d, t, c.rope);
    combine(act(matvec(w.W_A_k, xt)), bk, RK, k);
    combine(act(matvec(w.W_A_v, xt)), matvec(w.W_B_v, xt), RV, v);
    if (c.kv_only) {
      Vec qt = matvec(w.c_q, xt);
      for (Index h = 0; h < H; ++h) ref_rope(&qt[h * d], d, t, c.rope);
      q.insert(q.end(), qt.begin(), qt.end());
    } else {
      Vec bq = matvec(w.W_B_q, xt);
      for (Index r = 0; r < RQ; ++r) ref_rope(&bq[r * d], d, t, c.rope);
      combine(act(matvec(w.W_A_q, xt)), bq, RQ, q);
    }
  }
  return out_proj(w.c_proj, attend(q, k, v, T, H, H, d, d, c.scale()), T);
}

Vec rms_norm(Vec z, const Eigen::VectorXf& w, double eps) {
  double ss = 0;
  for (double e : z) ss += e * e;
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(z.size()) + eps);
  for (std::size_t i = 0; i < z.size(); ++i) z[i] *= inv * static_cast<double>(w[static_cast<Index>(i)]);
  return z;
}

// MLA in its explicit form (SPEC.md): per-head keys [k_nope_h | k_pe], values v_h.
Vec ref_mla(const tpa::MlaConfig& c, const tpa::MlaWeights& w, const Tensor2& x) {
  const Index T = x.dimension(0), D = c.d_model, H = c.n_heads, d_c = c.kv_lora_rank;
  const Index d_n = c.qk_nope_head_dim, d_R = c.qk_rope_head_dim, d_v = c.v_head_dim;
  const Index d_qk = d_n + d_R;
  const double eps = static_cast<double>(c.norm_eps);
  Vec q, k, v;
  for (Index t = 0; t < T; ++t) {
    const float* xt = x.data() + t * D;
    Vec qt;
    if (c.q_lora_rank > 0) {
      const Vec cq = rms_norm(matvec(w.q_a_proj, xt), w.q_a_layernorm, eps);
      qt.assign(static_cast<std::size_t>(H * d_qk), 0.0);
      for (Index o = 0; o < H * d_qk; ++o)
        for (Index i = 0; i < c.q_lora_rank; ++i)
          qt[static_cast<std::size_t>(o)] += static_cast<double>(w.q_b_proj(o, i)) * cq[i];
    } else {
      qt = matvec(w.q_proj, xt);
    }
    for (Index h = 0; h < H; ++h) ref_rope(&qt[h * d_qk + d_n], d_R, t, c.rope);
    const Vec a = matvec(w.kv_a_proj_with_mqa, xt);
    const Vec ckv = rms_norm(Vec(a.begin(), a.begin() + d_c), w.kv_a_layernorm, eps);
    Vec kpe(a.begin() + d_c, a.end());
    ref_rope(kpe.data(), d_R, t, c.rope);
    for (Index h = 0; h < H; ++h) {
      for (Index j = 0; j < d_n + d_v; ++j) {
        double s = 0;
        for (Index i = 0; i < d_c; ++i) s += static_cast<double>(w.kv_b_proj(h * (d_n + d_v) + j, i)) * ckv[i];
        (j < d_n ? k : v).push_back(s);
      }
      k.insert(k.end(), kpe.begin(), kpe.end());
    }
    q.insert(q.end(), qt.begin(), qt.end());
  }
  return out_proj(w.c_proj, attend(q, k, v, T, H, H, d_qk, d_v, c.scale()), T);
}

// ---- the variants and the kinds ----------------------------------------------------------------

struct Variant {
  std::string name;
  RopeConfig rope;          // style, rotary_dim (applied as min(rotary_dim, the kind's dims)), …
  bool sigmoid = false;     // TPA kinds only (the other kinds are skipped)
};

RopeConfig rope(RopeStyle style, Index rotary, double decay, Index max_positions = 64) {
  RopeConfig r;
  r.style = style;
  r.rotary_dim = rotary;
  r.decay_base = decay;
  r.max_positions = max_positions;
  return r;
}

std::vector<Variant> variants() {
  return {
      {"decay", rope(RopeStyle::kHalfSplitReversed, 0, 0.9)},
      {"partial_decay", rope(RopeStyle::kInterleaved, 4, 0.8)},
      {"partial", rope(RopeStyle::kHalfSplit, 4, 1.0)},
      // max_positions 8 < the 19 tokens run: RoPE off has no table to bound them.
      {"rope_off", rope(RopeStyle::kNone, 0, 1.0, 8)},
      {"sigmoid", rope(RopeStyle::kHalfSplitReversed, 0, 1.0), true},
      {"sigmoid_partial_decay", rope(RopeStyle::kHalfSplitReversed, 6, 0.95), true},
  };
}

// One kind under test: the layer behind AnyLayer, and its double reference.
struct Kind {
  tpa_test::AnyLayer layer;
  Index d_model = 0;
  std::function<Vec(const Tensor2&)> ref;
};

tpa::GqaConfig gqa_config(Index kv_heads, const RopeConfig& r) {
  tpa::GqaConfig c;
  c.d_model = 40;
  c.n_heads = 4;
  c.n_kv_heads = kv_heads;
  c.head_dim = 12;
  c.rope = r;
  return c;
}
tpa::TpaConfig tpa_config(bool kv_only, const Variant& v) {
  tpa::TpaConfig c;
  c.d_model = 36;
  c.n_heads = 3;
  c.head_dim = 12;
  c.q_rank = kv_only ? 0 : 3;
  c.k_rank = 2;
  c.v_rank = 3;
  c.kv_only = kv_only;
  c.rope = v.rope;
  if (v.sigmoid) c.factor_activation = tpa::FactorActivation::kSigmoid;
  return c;
}
tpa::MlaConfig mla_config(tpa::MlaForm form, const RopeConfig& r) {
  tpa::MlaConfig c;
  c.d_model = 36;
  c.n_heads = 3;
  c.q_lora_rank = 16;
  c.kv_lora_rank = 12;
  c.qk_nope_head_dim = 8;
  c.qk_rope_head_dim = 6;
  c.v_head_dim = 10;
  c.rope = r;
  c.form = form;
  return c;
}

// Every kind of backend B with the variant's settings (sigmoid variants: the TPA kinds only).
template <class B>
std::vector<Kind> kinds(const Variant& v) {
  std::vector<Kind> out;
  std::uint64_t seed = 11;
  if (!v.sigmoid) {
    for (const auto& [name, G] : {std::pair<const char*, Index>{"GQA", 2}, {"MHA", 4}, {"MQA", 1}}) {
      const tpa::GqaConfig c = gqa_config(G, v.rope);
      const auto w = tpa::GqaWeights::random(c, seed++);
      out.push_back({tpa_test::wrap(name, std::make_shared<const tpa::GroupedQueryAttention<B>>(c, w)),
                     c.d_model, [c, w](const Tensor2& x) { return ref_gqa(c, w, x); }});
    }
    for (auto form : {tpa::MlaForm::kAbsorbed, tpa::MlaForm::kExplicit}) {
      const tpa::MlaConfig c = mla_config(form, v.rope);
      const auto w = tpa::MlaWeights::random(c, seed++);
      out.push_back(
          {tpa_test::wrap(form == tpa::MlaForm::kAbsorbed ? "MLA-absorbed" : "MLA-explicit",
                          std::make_shared<const tpa::MultiHeadLatentAttention<B>>(c, w)),
           c.d_model, [c, w](const Tensor2& x) { return ref_mla(c, w, x); }});
    }
  }
  for (bool kv_only : {false, true}) {
    const tpa::TpaConfig c = tpa_config(kv_only, v);
    const auto w = tpa::TpaWeights::random(c, seed++);
    out.push_back({tpa_test::wrap(kv_only ? "TPA-KV" : "TPA",
                                  std::make_shared<const tpa::TensorProductAttention<B>>(c, w)),
                   c.d_model, [c, w](const Tensor2& x) { return ref_tpa(c, w, x); }});
  }
  return out;
}

// Tolerance against the double reference, relative to max |y|: f32 projections over ≤ 40 terms,
// f32 RoPE tables, f32 attention over ≤ 19 keys (the other layer tests observe ≤ 5e-7).
constexpr double kTol = 1e-5;

// |rows [r0, r0 + n) of y − rows [t0, t0 + n) of ref| relative to max |ref|.
double row_err(const Tensor2& y, Index r0, const Vec& ref, Index t0, Index n, Index D) {
  double num = 0, den = 0;
  for (double e : ref) den = std::max(den, std::abs(e));
  for (Index i = 0; i < n * D; ++i) {
    const double a = y.data()[r0 * D + i];
    if (!std::isfinite(a)) return std::numeric_limits<double>::infinity();
    num = std::max(num, std::abs(a - ref[t0 * D + i]));
  }
  return num / std::max(den, 1e-30);
}

// The scenario: sequence A (19 tokens): no-cache forward; prefill 7, chunk 5, then 7 decode
// steps, the first 3 alone (forward) and the last 4 batched with sequence B (13 tokens: prefill
// 6, then 3 single steps alone, then the 4 batched ones), on `threads` threads. Every output row
// is compared with the reference at its position.
void run_scenario(const Kind& k, int threads, double tol = kTol) {
  constexpr Index kA = 19, kB = 13;
  const Index D = k.d_model;
  const Tensor2 xa = tpa_test::random_tensor(kA, D, 101), xb = tpa_test::random_tensor(kB, D, 202);
  const Vec ra = k.ref(xa), rb = k.ref(xb);
  tpa::Context ctx(threads);
  SCOPED_TRACE(k.layer.name + ", " + std::to_string(threads) + " threads");

  Tensor2 y(kA, D);
  k.layer.forward(ctx, xa, y);
  EXPECT_LE(row_err(y, 0, ra, 0, kA, D), tol) << "no-cache forward";

  tpa::KVCache<float> cache({k.layer.layout}, 4, 64);
  const tpa::SeqId a = cache.add_sequence(), b = cache.add_sequence();
  auto call = [&](tpa::SeqId seq, const Tensor2& x, const Vec& ref, Index t0, Index n,
                  const char* what) {
    Tensor2 yy(n, D);
    k.layer.forward_cached(ctx, tpa_test::rows(x, t0, n), yy, cache, 0, seq);
    EXPECT_LE(row_err(yy, 0, ref, t0, n, D), tol) << what << " at " << t0;
  };
  call(a, xa, ra, 0, 7, "prefill");
  call(a, xa, ra, 7, 5, "chunk");
  call(b, xb, rb, 0, 6, "prefill B");
  for (Index t = 0; t < 3; ++t) {
    call(a, xa, ra, 12 + t, 1, "decode");
    call(b, xb, rb, 6 + t, 1, "decode B");
  }
  for (Index s = 0; s < 4; ++s) {
    Tensor2 x2(2, D), y2(2, D);
    std::copy(xa.data() + (15 + s) * D, xa.data() + (16 + s) * D, x2.data());
    std::copy(xb.data() + (9 + s) * D, xb.data() + (10 + s) * D, x2.data() + D);
    k.layer.decode(ctx, x2, y2, cache, 0, {a, b});
    EXPECT_LE(row_err(y2, 0, ra, 15 + s, 1, D), tol) << "batched decode A at " << 15 + s;
    EXPECT_LE(row_err(y2, 1, rb, 9 + s, 1, D), tol) << "batched decode B at " << 9 + s;
  }
  EXPECT_EQ(cache.length(a), kA);
  EXPECT_EQ(cache.length(b), kB);
}

template <class B>
class RopeVariants : public ::testing::Test {};
TYPED_TEST_SUITE(RopeVariants, tpa_test::AllBackends, tpa_test::BackendName);

// Every variant, every kind: against the reference, on 1 and 3 threads.
TYPED_TEST(RopeVariants, EveryKindMatchesTheDoubleReference) {
  for (const Variant& v : variants()) {
    SCOPED_TRACE(v.name);
    for (const Kind& k : kinds<TypeParam>(v))
      for (int threads : {1, 3}) run_scenario(k, threads);
  }
}

// decay_base 1 is plain RoPE: each kind's outputs are bit for bit those of a layer whose config
// never mentioned decay. And the decaying layer differs from both (the test is not vacuous).
TYPED_TEST(RopeVariants, DecayBaseOneIsPlainRopeBitForBit) {
  Variant plain{"plain", rope(RopeStyle::kHalfSplitReversed, 4, 1.0)};
  Variant one = plain, decay = plain;
  one.rope.decay_base = 1.0;
  decay.rope.decay_base = 0.5;
  const auto kp = kinds<TypeParam>(plain), k1 = kinds<TypeParam>(one), kd = kinds<TypeParam>(decay);
  tpa::Context ctx(2);
  for (std::size_t i = 0; i < kp.size(); ++i) {
    SCOPED_TRACE(kp[i].layer.name);
    const Index D = kp[i].d_model;
    const Tensor2 x = tpa_test::random_tensor(13, D, 5);
    Tensor2 yp(13, D), y1(13, D), yd(13, D);
    kp[i].layer.forward(ctx, x, yp);
    k1[i].layer.forward(ctx, x, y1);
    kd[i].layer.forward(ctx, x, yd);
    EXPECT_TRUE(std::equal(yp.data(), yp.data() + yp.size(), y1.data()));
    EXPECT_GT(tpa_test::rel_err(yd.data(), yp.data(), yp.size()), 1e-3);
  }
}

// RoPE off is a rotation by angle 0 (the reference above computes it so); the layers must also
// differ from their RoPE-on selves beyond the first token (at position 0 every angle is 0, so
// there the two agree bit for bit), and accept positions past any rope.max_positions.
TYPED_TEST(RopeVariants, RopeOffIsRotationByAngleZeroWithNoPositionBound) {
  const Variant off{"off", rope(RopeStyle::kNone, 0, 1.0, 1)};
  const Variant on{"on", rope(RopeStyle::kHalfSplitReversed, 0, 1.0, 64)};
  const auto koff = kinds<TypeParam>(off), kon = kinds<TypeParam>(on);
  tpa::Context ctx(2);
  for (std::size_t i = 0; i < koff.size(); ++i) {
    SCOPED_TRACE(koff[i].layer.name);
    const Index D = koff[i].d_model;
    const Tensor2 x = tpa_test::random_tensor(9, D, 6);
    Tensor2 y0(1, D), y0on(1, D), y(9, D), yon(9, D);
    koff[i].layer.forward(ctx, tpa_test::rows(x, 0, 1), y0);
    kon[i].layer.forward(ctx, tpa_test::rows(x, 0, 1), y0on);
    EXPECT_TRUE(std::equal(y0.data(), y0.data() + D, y0on.data())) << "position 0";
    koff[i].layer.forward(ctx, x, y);
    kon[i].layer.forward(ctx, x, yon);
    EXPECT_GT(tpa_test::rel_err(y.data(), yon.data(), y.size()), 1e-3);
    EXPECT_LE(row_err(y, 0, koff[i].ref(x), 0, 9, D), kTol);
    // 100 tokens through the cache of a layer whose (ignored) max_positions is 1.
    tpa::KVCache<float> cache({koff[i].layer.layout}, 16, 16);
    const tpa::SeqId s = cache.add_sequence();
    const Tensor2 xl = tpa_test::random_tensor(100, D, 7);
    Tensor2 yl(100, D);
    koff[i].layer.forward_cached(ctx, xl, yl, cache, 0, s);
    EXPECT_EQ(cache.length(s), 100);
    EXPECT_LE(row_err(yl, 0, koff[i].ref(xl), 0, 100, D), kTol);
  }
}

// Far positions: with decay_base 1e-3 the decay of pair i underflows f32 past p ≈ 12.7·10^(i/3)
// (θ_i = 10000^(−2i/r), r = 12 here for most kinds), so over 240 tokens whole pairs of every
// query and key decay to exact zeros. Outputs stay finite and match the double reference (whose
// tiny values are as good as 0), through prefill and decode, on 2 threads (splits).
TYPED_TEST(RopeVariants, UnderflowingDecayStaysFiniteAndMatchesTheReference) {
  const Variant v{"underflow", rope(RopeStyle::kHalfSplitReversed, 0, 1e-3, 256)};
  tpa::Context ctx(2);
  for (const Kind& k : kinds<TypeParam>(v)) {
    SCOPED_TRACE(k.layer.name);
    const Index D = k.d_model, T = 240;
    const Tensor2 x = tpa_test::random_tensor(T, D, 8);
    const Vec ref = k.ref(x);
    tpa::KVCache<float> cache({k.layer.layout}, 16, 32);
    const tpa::SeqId s = cache.add_sequence();
    Tensor2 yp(200, D);
    k.layer.forward_cached(ctx, tpa_test::rows(x, 0, 200), yp, cache, 0, s);
    EXPECT_LE(row_err(yp, 0, ref, 0, 200, D), kTol) << "prefill";
    double worst = 0;
    for (Index t = 200; t < T; ++t) {
      Tensor2 y1(1, D);
      k.layer.forward_cached(ctx, tpa_test::rows(x, t, 1), y1, cache, 0, s);
      worst = std::max(worst, row_err(y1, 0, ref, t, 1, D));
    }
    EXPECT_LE(worst, kTol) << "decode";
  }
}

// ---- config validation of the new fields, through every kind -----------------------------------

template <class F>
void expect_error(F&& f, const std::vector<std::string>& parts) {
  try {
    f();
    ADD_FAILURE() << "no tpa::Error";
  } catch (const tpa::Error& e) {
    for (const auto& p : parts) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
  }
}

TEST(RopeVariantsValidation, BadDecayBaseAndFactorActivationThrowForEveryKind) {
  // Weights drawn for a valid config (the random() of each kind validates its config too).
  const auto gw = tpa::GqaWeights::random(gqa_config(2, RopeConfig{}), 1);
  const auto tw = tpa::TpaWeights::random(tpa_config(false, Variant{"ok", RopeConfig{}}), 1);
  const auto mw = tpa::MlaWeights::random(mla_config(tpa::MlaForm::kAuto, RopeConfig{}), 1);
  for (double bad : {0.0, -1.0, 1.25, std::nan(""), std::numeric_limits<double>::infinity()}) {
    RopeConfig r;
    r.decay_base = bad;
    const auto g = gqa_config(2, r);
    expect_error([&] { tpa::GroupedQueryAttention<>(g, gw); },
                 {"GroupedQueryAttention: rope.decay_base (", "must be finite and in (0, 1]"});
    const auto t = tpa_config(false, Variant{"bad", r});
    expect_error([&] { tpa::TensorProductAttention<>(t, tw); },
                 {"TensorProductAttention: rope.decay_base (", "(0, 1]"});
    const auto m = mla_config(tpa::MlaForm::kAuto, r);
    expect_error([&] { tpa::MultiHeadLatentAttention<>(m, mw); },
                 {"MultiHeadLatentAttention: rope.decay_base (", "(0, 1]"});
  }
  const auto g = gqa_config(2, rope(RopeStyle::kNone, 0, 0.5));
  expect_error([&] { tpa::GroupedQueryAttention<>(g, gw); },
               {"rope.decay_base (0.5) must be 1 when rope.style is none"});
  auto t = tpa_config(true, Variant{"ok", RopeConfig{}});
  t.factor_activation = static_cast<tpa::FactorActivation>(7);
  expect_error([&] { t.validate(); }, {"TensorProductAttention: factor_activation (7)",
                                       "is not a FactorActivation value"});
  EXPECT_STREQ(tpa::factor_activation_name(tpa::FactorActivation::kSigmoid), "sigmoid");
  EXPECT_STREQ(tpa::factor_activation_name(tpa::FactorActivation::kNone), "none");
  // RoPE off ignores the table fields it does not use.
  RopeConfig off = rope(RopeStyle::kNone, 5, 1.0, 0);
  off.base = 0;
  auto m = mla_config(tpa::MlaForm::kAuto, off);
  EXPECT_NO_THROW(m.validate());
}

// Sigmoid factors are cached after the activation: every cached A_K, A_V element is σ of the
// projection, in (0, 1), for T6 and K/V-only.
TEST(RopeVariantsSigmoid, CachedHeadFactorsAreActivated) {
  for (bool kv_only : {false, true}) {
    Variant v{"sigmoid", RopeConfig{}, true};
    const tpa::TpaConfig c = tpa_config(kv_only, v);
    const auto w = tpa::TpaWeights::random(c, 3);
    const tpa::TensorProductAttention<> layer(c, w);
    tpa::KVCache<float> cache({layer.cache_layout()}, 8, 8);
    const tpa::SeqId s = cache.add_sequence();
    const Tensor2 x = tpa_test::random_tensor(5, c.d_model, 4);
    Tensor2 y(5, c.d_model);
    tpa::Context ctx;
    layer.forward(ctx, x, y, cache, 0, s);
    const auto view = cache.view(s, 0);
    double err = 0;
    for (Index t = 0; t < 5; ++t) {
      const Vec ak = matvec(w.W_A_k, x.data() + t * c.d_model);
      const Vec av = matvec(w.W_A_v, x.data() + t * c.d_model);
      for (Index e = 0; e < c.n_heads * c.k_rank; ++e)
        err = std::max(err, std::abs(view.at(0, t, e) - sigmoid(ak[e])));
      for (Index e = 0; e < c.n_heads * c.v_rank; ++e)
        err = std::max(err, std::abs(view.at(2, t, e) - sigmoid(av[e])));
    }
    EXPECT_LE(err, 1e-6) << (kv_only ? "TPA-KV" : "TPA");
  }
}

}  // namespace rope_variants_test
