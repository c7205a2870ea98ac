// Attention variants (issue 25, items 1-4): sliding window, attention sinks, logit soft-cap and
// ALiBi, for every kind and backend.
//  - Kernels: grouped_attention and tpa_attention of every backend (with forced split-K pieces
//    on several threads) against an independent double-precision evaluation of the formulas
//    (README, "Attention variants") from materialised per-head q, k, v.
//  - Layers: every kind of every backend, cached (odd prefill, a chunk, single-token decode
//    steps, 3 threads) against the Reference layer without a cache (decode == prefill).
//  - Identities: window ≥ context ≡ no window (bit-identical), soft-cap 1e30 ≡ none, zero slopes
//    ≡ none, a sink of −inf ≡ none; the standard ALiBi slopes.
//  - KVCache::drop_before: a windowed two-layer model keeps a bounded cache over 10× the window
//    with the outputs of an undropped cache; a call that would read a released key throws and
//    changes nothing; forks keep their shared blocks.
//  - Validation of every new config field, and the `sinks` weight through the checkpoint loader.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <tpa/io/checkpoint.hpp>
#include <tpa/tpa.hpp>
#include <type_traits>
#include <vector>

#include "test_util.hpp"

namespace variant_test {

using tpa::Index;
using tpa::SeqId;
using Tensor2 = tpa::Tensor<float, 2>;
using tpa_test::AnyLayer;

constexpr float kInf = std::numeric_limits<float>::infinity();

// ---- the variant cases
// ---------------------------------------------------------------------------

struct Case {
  const char* name;
  tpa::AttentionVariant v;
};

std::vector<Case> cases(Index n_heads) {
  std::vector<Case> c;
  tpa::AttentionVariant v;
  v.window = 5;
  c.push_back({"window5", v});
  v = {};
  v.sinks = true;
  c.push_back({"sinks", v});
  v = {};
  v.logit_softcap = 0.7f;  // small: most scores are bent
  c.push_back({"softcap", v});
  v = {};
  v.alibi = true;
  c.push_back({"alibi", v});
  v = {};
  v.alibi = true;
  for (Index h = 0; h < n_heads; ++h) v.alibi_slopes.push_back(0.3f - 0.2f * static_cast<float>(h));
  c.push_back({"alibi-given", v});
  v = {};
  v.window = 7;
  v.sinks = true;
  v.logit_softcap = 1.5f;
  v.alibi = true;
  c.push_back({"all", v});
  return c;
}

// ---- kernels against an independent double-precision evaluation --------------------------------

// o[i][h] for queries at q_pos0 + i over keys k[t][h], values v[t][h] (per head, materialised),
// with the variant's formulas written out.
std::vector<double> ref_attention(const std::vector<std::vector<double>>& q,  // [n_q·H][d]
                                  const std::vector<std::vector<double>>& k,  // [L·H][d]
                                  const std::vector<std::vector<double>>& v,  // [L·H][dv]
                                  Index n_q, Index q_pos0, Index H, double scale,
                                  const tpa::AttentionVariant& var,
                                  const std::vector<float>& slopes,
                                  const std::vector<float>& sinks) {
  const Index dv = static_cast<Index>(v[0].size());
  std::vector<double> o(static_cast<std::size_t>(n_q * H * dv), 0.0);
  for (Index i = 0; i < n_q; ++i) {
    const Index p = q_pos0 + i;
    const Index lo = var.window ? std::max<Index>(0, p - *var.window + 1) : 0;
    for (Index h = 0; h < H; ++h) {
      std::vector<double> z;
      double m = var.sinks ? static_cast<double>(sinks[static_cast<std::size_t>(h)])
                           : -std::numeric_limits<double>::infinity();
      for (Index t = lo; t <= p; ++t) {
        double s = 0;
        const auto& qv = q[static_cast<std::size_t>(i * H + h)];
        const auto& kv = k[static_cast<std::size_t>(t * H + h)];
        for (std::size_t j = 0; j < qv.size(); ++j) s += qv[j] * kv[j];
        s *= scale;
        if (var.logit_softcap) s = *var.logit_softcap * std::tanh(s / *var.logit_softcap);
        if (var.alibi) s -= slopes[static_cast<std::size_t>(h)] * static_cast<double>(p - t);
        z.push_back(s);
        m = std::max(m, s);
      }
      double den = var.sinks ? std::exp(sinks[static_cast<std::size_t>(h)] - m) : 0.0;
      for (double& s : z) den += (s = std::exp(s - m));
      double* out = o.data() + (i * H + h) * dv;
      for (Index t = lo; t <= p; ++t)
        for (Index j = 0; j < dv; ++j)
          out[j] += z[static_cast<std::size_t>(t - lo)] *
                    v[static_cast<std::size_t>(t * H + h)][static_cast<std::size_t>(j)] / den;
    }
  }
  return o;
}

std::vector<float> random_floats(Index n, std::mt19937_64& rng, float scale = 1.f) {
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> x(static_cast<std::size_t>(n));
  for (auto& e : x) e = u(rng);
  return x;
}

// The storage scalar of a cache view (in decltype only).
template <class S>
S scalar_of(const tpa::SeqView<S>&);

// x rounded to bfloat16 and back: values that a float and a bfloat16 cache hold alike.
std::vector<float> bf16_exact(std::vector<float> x) {
  for (float& e : x) e = static_cast<float>(tpa::bfloat16(e));
  return x;
}

// The kernel's ScoreVariant of `v` over `slopes` and `sinks`.
tpa::ScoreVariant kernel_variant(const tpa::AttentionVariant& v, const std::vector<float>& slopes,
                                 const std::vector<float>& sinks) {
  tpa::ScoreVariant s;
  s.window = v.window.value_or(0);
  s.softcap = v.logit_softcap.value_or(0.f);
  s.alibi = v.alibi ? slopes.data() : nullptr;
  s.sinks = v.sinks ? sinks.data() : nullptr;
  return s;
}

template <class B>
class VariantKernels : public ::testing::Test {};
TYPED_TEST_SUITE(VariantKernels, tpa_test::AllBackends, tpa_test::BackendName);

// (n_q, q_pos0) of decode, a chunk and a whole prefill over L = 37 cached tokens (blocks of 8,
// so a window of 5 skips whole blocks and tiles).
constexpr Index kL = 37, kBlk = 8;
const std::pair<Index, Index> kCalls[] = {{1, kL - 1}, {9, kL - 9}, {kL, 0}};

// A grouped-attention shape: H query heads over G KV heads; the key is the first k0 elements of
// factor 0 then (k1 > 0) the k1 elements of factor 1; the value is factor 0's first d_v elements
// (latent, MLA's absorbed form) or a factor of its own.
struct GroupedShape {
  const char* name;
  Index H, G, k0, k1, d_v;
  bool v_in_key;
};

TYPED_TEST(VariantKernels, GroupedMatchesDoubleReference) {
  using B = TypeParam;
  const GroupedShape shapes[] = {{"GQA", 6, 2, 16, 0, 16, false},
                                 {"MHA", 6, 6, 16, 0, 16, false},
                                 {"MQA", 6, 1, 16, 0, 16, false},
                                 {"MLA-latent", 8, 1, 256, 16, 256, true}};
  std::mt19937_64 rng(11);
  for (const GroupedShape& sh : shapes) {
    const Index H = sh.H, G = sh.G, gs = H / G, dk = sh.k0 + sh.k1, dv = sh.d_v;
    std::vector<tpa::FactorSpec> f = {{"K0", G, sh.k0, true}};
    if (sh.k1 > 0) f.push_back({"K1", G, sh.k1, true});
    if (!sh.v_in_key) f.push_back({"V", G, dv, false});
    // The same values (bfloat16-exact) in a float and a bfloat16 cache.
    tpa::KVCache<float> cache({tpa::CacheLayout(sh.name, f)}, kBlk, 64);
    tpa::KVCache<tpa::bfloat16> cache16({tpa::CacheLayout(sh.name, f)}, kBlk, 64);
    const SeqId seq = cache.add_sequence();
    const SeqId seq16 = cache16.add_sequence();
    std::vector<std::vector<float>> data;
    std::vector<tpa::FactorRows> rows;
    for (const auto& fs : f) data.push_back(bf16_exact(random_floats(kL * fs.elements(), rng)));
    for (std::size_t i = 0; i < f.size(); ++i) rows.push_back({data[i].data(), f[i].elements()});
    cache.append(seq, 0, kL, rows.data());
    cache16.append(seq16, 0, kL, rows.data());
    const std::size_t v_factor = sh.v_in_key ? 0 : f.size() - 1;
    const std::vector<float> sinks = random_floats(H, rng, 2.f);
    std::vector<std::vector<double>> k(kL * H), v(kL * H);
    for (Index t = 0; t < kL; ++t)
      for (Index h = 0; h < H; ++h) {
        const Index g = h / gs;
        auto& kk = k[static_cast<std::size_t>(t * H + h)];
        const float* k0 = data[0].data() + (t * G + g) * sh.k0;
        kk.assign(k0, k0 + sh.k0);
        if (sh.k1 > 0) {
          const float* k1 = data[1].data() + (t * G + g) * sh.k1;
          kk.insert(kk.end(), k1, k1 + sh.k1);
        }
        const Index v_cols = f[v_factor].cols;
        const float* vr = data[v_factor].data() + (t * G + g) * v_cols;
        v[static_cast<std::size_t>(t * H + h)].assign(vr, vr + dv);
      }
    const float scale = 1.f / std::sqrt(static_cast<float>(dk));
    for (const Case& c : cases(H)) {
      const std::vector<float> slopes = c.v.resolved_alibi_slopes(H);
      for (const auto& [n_q, q_pos0] : kCalls) {
        const std::vector<float> q = random_floats(n_q * H * dk, rng, 2.f);
        std::vector<std::vector<double>> qd(static_cast<std::size_t>(n_q * H));
        for (Index r = 0; r < n_q * H; ++r)
          qd[static_cast<std::size_t>(r)].assign(q.data() + r * dk, q.data() + (r + 1) * dk);
        const std::vector<double> ref =
            ref_attention(qd, k, v, n_q, q_pos0, H, scale, c.v, slopes, sinks);
        const std::vector<double> plain =
            ref_attention(qd, k, v, n_q, q_pos0, H, scale, {}, slopes, sinks);
        EXPECT_GT(tpa_test::rel_err(ref, plain, n_q * H * dv), 1e-3)
            << c.name << ": the variant must change the output";
        auto run = [&](int workers, const auto& kv) {
          using S = decltype(scalar_of(kv));
          tpa::Context ctx(workers == 1 ? 1 : 2);
          std::vector<float> o(static_cast<std::size_t>(n_q * H * dv), -7.f);
          tpa::GroupedAttentionParams<S> p;
          p.q = q.data();
          p.q_stride = H * dk;
          p.o = o.data();
          p.o_stride = H * dv;
          p.n_q = n_q;
          p.q_pos0 = q_pos0;
          p.n_heads = H;
          p.n_kv_heads = G;
          p.k_factor[0] = 0;
          p.k_dims[0] = sh.k0;
          p.k_factor[1] = 1;
          p.k_dims[1] = sh.k1;
          p.v_factor = v_factor;
          p.d_v = dv;
          p.scale = scale;
          p.kv = kv;
          p.variant = kernel_variant(c.v, slopes, sinks);
          tpa::grouped_attention<B>(ctx, &p, 1, tpa_test::forced_split(workers));
          EXPECT_LT(tpa_test::rel_err(o, ref, n_q * H * dv), 2e-5)
              << sh.name << " " << c.name << " n_q " << n_q << " q_pos0 " << q_pos0 << " workers "
              << workers << " cache " << (std::is_same<S, float>::value ? "f32" : "bf16");
        };
        for (int workers : {1, 3}) {
          run(workers, cache.view(seq, 0));
          run(workers, cache16.view(seq16, 0));
        }
      }
    }
  }
}

TYPED_TEST(VariantKernels, TpaMatchesDoubleReference) {
  using B = TypeParam;
  const Index H = 5, d = 12, RQ = 3, RK = 2, RV = 2;
  std::mt19937_64 rng(12);
  const std::vector<tpa::FactorSpec> f = {
      {"A_K", H, RK, false}, {"B_K", RK, d, true}, {"A_V", H, RV, false}, {"B_V", RV, d, false}};
  tpa::KVCache<float> cache({tpa::CacheLayout("TPA", f)}, kBlk, 64);
  tpa::KVCache<tpa::bfloat16> cache16({tpa::CacheLayout("TPA", f)}, kBlk, 64);
  const SeqId seq = cache.add_sequence();
  const SeqId seq16 = cache16.add_sequence();
  std::vector<std::vector<float>> data;
  std::vector<tpa::FactorRows> rows;
  for (const auto& fs : f) data.push_back(bf16_exact(random_floats(kL * fs.elements(), rng, 1.5f)));
  for (std::size_t i = 0; i < f.size(); ++i) rows.push_back({data[i].data(), f[i].elements()});
  cache.append(seq, 0, kL, rows.data());
  cache16.append(seq16, 0, kL, rows.data());
  const std::vector<float> sinks = random_floats(H, rng, 2.f);
  // Materialised k_h(t) = (1/R_K) Σ_s A_K[h,s] B_K[s], v likewise.
  std::vector<std::vector<double>> k(kL * H, std::vector<double>(d)),
      v(kL * H, std::vector<double>(d));
  for (Index t = 0; t < kL; ++t)
    for (Index h = 0; h < H; ++h)
      for (Index j = 0; j < d; ++j) {
        double sk = 0, sv = 0;
        for (Index s = 0; s < RK; ++s)
          sk += double(data[0][t * H * RK + h * RK + s]) * data[1][t * RK * d + s * d + j];
        for (Index s = 0; s < RV; ++s)
          sv += double(data[2][t * H * RV + h * RV + s]) * data[3][t * RV * d + s * d + j];
        k[static_cast<std::size_t>(t * H + h)][static_cast<std::size_t>(j)] = sk / RK;
        v[static_cast<std::size_t>(t * H + h)][static_cast<std::size_t>(j)] = sv / RV;
      }
  for (const Case& c : cases(H)) {
    const std::vector<float> slopes = c.v.resolved_alibi_slopes(H);
    for (const auto& [n_q, q_pos0] : kCalls) {
      for (bool factored : {true, false}) {
        const std::vector<float> a_q = random_floats(n_q * H * RQ, rng, 1.5f);
        const std::vector<float> b_q = random_floats(n_q * RQ * d, rng, 1.5f);
        const std::vector<float> q_full = random_floats(n_q * H * d, rng, 1.5f);
        std::vector<std::vector<double>> qd(static_cast<std::size_t>(n_q * H),
                                            std::vector<double>(d));
        for (Index i = 0; i < n_q; ++i)
          for (Index h = 0; h < H; ++h)
            for (Index j = 0; j < d; ++j) {
              double s = 0;
              if (factored) {
                for (Index r = 0; r < RQ; ++r)
                  s += double(a_q[(i * H + h) * RQ + r]) * b_q[(i * RQ + r) * d + j];
                s /= RQ;
              } else {
                s = q_full[(i * H + h) * d + j];
              }
              qd[static_cast<std::size_t>(i * H + h)][static_cast<std::size_t>(j)] = s;
            }
        const std::vector<double> ref =
            ref_attention(qd, k, v, n_q, q_pos0, H, 0.3, c.v, slopes, sinks);
        const std::vector<double> plain =
            ref_attention(qd, k, v, n_q, q_pos0, H, 0.3, {}, slopes, sinks);
        EXPECT_GT(tpa_test::rel_err(ref, plain, n_q * H * d), 1e-3)
            << c.name << ": the variant must change the output";
        auto run = [&](int workers, const auto& kv) {
          using S = decltype(scalar_of(kv));
          tpa::Context ctx(workers == 1 ? 1 : 2);
          std::vector<float> o(static_cast<std::size_t>(n_q * H * d), -7.f);
          tpa::TpaAttentionParams<S> p;
          if (factored) {
            p.q_rank = RQ;
            p.a_q = a_q.data();
            p.a_q_stride = H * RQ;
            p.b_q = b_q.data();
            p.b_q_stride = RQ * d;
          } else {
            p.q = q_full.data();
            p.q_stride = H * d;
          }
          p.o = o.data();
          p.o_stride = H * d;
          p.n_q = n_q;
          p.q_pos0 = q_pos0;
          p.n_heads = H;
          p.head_dim = d;
          p.k_rank = RK;
          p.v_rank = RV;
          p.scale = 0.3f;
          p.kv = kv;
          p.variant = kernel_variant(c.v, slopes, sinks);
          tpa::TpaSplit split;
          split.max_workers = workers;
          split.min_work_per_worker = 0;
          tpa::tpa_attention<B>(ctx, &p, 1, split);
          EXPECT_LT(tpa_test::rel_err(o, ref, n_q * H * d), 2e-5)
              << c.name << (factored ? " factored" : " full") << " n_q " << n_q << " q_pos0 "
              << q_pos0 << " workers " << workers << " cache "
              << (std::is_same<S, float>::value ? "f32" : "bf16");
        };
        for (int workers : {1, 3}) {
          run(workers, cache.view(seq, 0));
          run(workers, cache16.view(seq16, 0));
        }
      }
    }
  }
}

// ---- layers -----------------------------------------------------------------------------------

tpa::GqaConfig gqa_config(const tpa::AttentionVariant& v) {
  tpa::GqaConfig g;
  g.d_model = 24;
  g.n_heads = 6;
  g.n_kv_heads = 2;
  g.head_dim = 8;
  g.variant = v;
  return g;
}
tpa::TpaConfig tpa_config(const tpa::AttentionVariant& v) {
  tpa::TpaConfig t;
  t.d_model = 24;
  t.n_heads = 6;
  t.head_dim = 8;
  t.q_rank = 3;
  t.k_rank = 2;
  t.v_rank = 2;
  t.variant = v;
  return t;
}
tpa::MlaConfig mla_config(const tpa::AttentionVariant& v) {
  tpa::MlaConfig m;
  m.d_model = 24;
  m.n_heads = 6;
  m.kv_lora_rank = 12;
  m.qk_nope_head_dim = 4;
  m.qk_rope_head_dim = 4;
  m.v_head_dim = 6;
  m.variant = v;
  return m;
}

// Every kind (as tpa_test::all_kinds) on backend B.
template <class B>
std::vector<AnyLayer> kinds_on(const tpa::AttentionVariant& v) {
  tpa::GqaConfig g = gqa_config(v);
  tpa::TpaConfig t = tpa_config(v);
  tpa::MlaConfig m = mla_config(v);
  using tpa_test::wrap;
  std::vector<AnyLayer> out;
  out.push_back(wrap("GQA", std::make_shared<const tpa::GroupedQueryAttention<B>>(
                                g, tpa::GqaWeights::random(g, 1))));
  g.n_kv_heads = g.n_heads;
  out.push_back(wrap(
      "MHA", std::make_shared<const tpa::MultiHeadAttention<B>>(g, tpa::GqaWeights::random(g, 2))));
  g.n_kv_heads = 1;
  out.push_back(wrap("MQA", std::make_shared<const tpa::MultiQueryAttention<B>>(
                                g, tpa::GqaWeights::random(g, 3))));
  out.push_back(wrap("TPA", std::make_shared<const tpa::TensorProductAttention<B>>(
                                t, tpa::TpaWeights::random(t, 4))));
  t.kv_only = true;
  out.push_back(wrap("TPA-KV", std::make_shared<const tpa::TensorProductAttention<B>>(
                                   t, tpa::TpaWeights::random(t, 5))));
  for (auto form : {tpa::MlaForm::kAbsorbed, tpa::MlaForm::kExplicit}) {
    m.form = form;
    out.push_back(wrap(form == tpa::MlaForm::kAbsorbed ? "MLA-absorbed" : "MLA-explicit",
                       std::make_shared<const tpa::MultiHeadLatentAttention<B>>(
                           m, tpa::MlaWeights::random(m, 6))));
  }
  return out;
}

// Runs x through layer `l` with a cache: prefill 13 tokens, a chunk of 6, then single-token
// decode steps; returns the outputs in token order.
Tensor2 run_cached(const AnyLayer& l, tpa::Context& ctx, const Tensor2& x, Index block = 4) {
  const Index N = x.dimension(0), D = x.dimension(1);
  tpa::KVCache<float> cache({l.layout}, block, 256);
  const SeqId s = cache.add_sequence();
  Tensor2 y(N, D);
  Index at = 0;
  for (Index n : {Index(13), Index(6)}) {
    Tensor2 yc(n, D);
    l.forward_cached(ctx, tpa_test::rows(x, at, n), yc, cache, 0, s);
    std::copy(yc.data(), yc.data() + n * D, y.data() + at * D);
    at += n;
  }
  for (; at < N; ++at) {
    Tensor2 yc(1, D);
    l.decode(ctx, tpa_test::rows(x, at, 1), yc, cache, 0, {s});
    std::copy(yc.data(), yc.data() + D, y.data() + at * D);
  }
  return y;
}

template <class B>
class VariantLayers : public ::testing::Test {};
TYPED_TEST_SUITE(VariantLayers, tpa_test::AllBackends, tpa_test::BackendName);

TYPED_TEST(VariantLayers, CachedMatchesReferenceEveryKind) {
  const Index N = 23;
  const Tensor2 x = tpa_test::random_tensor(N, 24, 7);
  tpa::Context ref_ctx(1), ctx(3);
  for (const Case& c : cases(6)) {
    const auto ref = kinds_on<tpa::Reference>(c.v);
    const auto got = kinds_on<TypeParam>(c.v);
    for (std::size_t k = 0; k < ref.size(); ++k) {
      Tensor2 y_ref(N, 24), y_whole(N, 24);
      ref[k].forward(ref_ctx, x, y_ref);
      got[k].forward(ctx, x, y_whole);
      const Tensor2 y = run_cached(got[k], ctx, x);
      EXPECT_LT(tpa_test::rel_err(y_whole.data(), y_ref.data(), N * 24), 1e-4)
          << c.name << " " << got[k].name << " (no cache)";
      EXPECT_LT(tpa_test::rel_err(y.data(), y_ref.data(), N * 24), 1e-4)
          << c.name << " " << got[k].name << " (cached: prefill, chunk, decode)";
    }
  }
}

// Max |a − b| over all elements.
double max_diff(const Tensor2& a, const Tensor2& b) {
  double e = 0;
  for (Index i = 0; i < a.size(); ++i)
    e = std::max(e, std::abs(static_cast<double>(a.data()[i]) - b.data()[i]));
  return e;
}

// An identity: layers with variant `a` and with `b` give outputs within `tol` of each other
// (bit-identical for tol 0), for every kind, cached and not, on the native backend and
// Reference.
template <class B>
void expect_same(const tpa::AttentionVariant& a, const tpa::AttentionVariant& b, double tol,
                 const char* what) {
  const Index N = 23;
  const Tensor2 x = tpa_test::random_tensor(N, 24, 8);
  tpa::Context ctx(2);
  const auto la = kinds_on<B>(a), lb = kinds_on<B>(b);
  for (std::size_t k = 0; k < la.size(); ++k) {
    Tensor2 ya(N, 24), yb(N, 24);
    la[k].forward(ctx, x, ya);
    lb[k].forward(ctx, x, yb);
    EXPECT_LE(max_diff(ya, yb), tol) << what << " " << la[k].name << " " << B::name;
    EXPECT_LE(max_diff(run_cached(la[k], ctx, x), run_cached(lb[k], ctx, x)), tol)
        << what << " " << la[k].name << " cached " << B::name;
  }
}

TYPED_TEST(VariantLayers, Identities) {
  using B = TypeParam;
  const tpa::AttentionVariant none;
  tpa::AttentionVariant v;
  v.window = 23;  // ≥ every query's context (23 tokens)
  expect_same<B>(v, none, 0.0, "window >= context");
  v = {};
  v.window = 1000;
  expect_same<B>(v, none, 0.0, "window 1000");
  v = {};
  v.logit_softcap = 1e30f;
  expect_same<B>(v, none, 1e-5, "soft-cap 1e30");
  v = {};
  v.logit_softcap = kInf;
  expect_same<B>(v, none, 0.0, "soft-cap inf");
  v = {};
  v.alibi = true;
  v.alibi_slopes.assign(6, 0.f);
  expect_same<B>(v, none, 0.0, "zero slopes");
  // A sink of −inf: the same weights with sinks = −inf against none.
  const Index N = 23;
  const Tensor2 x = tpa_test::random_tensor(N, 24, 9);
  tpa::Context ctx(2);
  tpa::AttentionVariant s;
  s.sinks = true;
  tpa::GqaConfig g0 = gqa_config(none), g1 = gqa_config(s);
  tpa::GqaWeights w = tpa::GqaWeights::random(g0, 1);
  tpa::GroupedQueryAttention<B> plain(g0, w);
  w.sinks = Eigen::VectorXf::Constant(6, -kInf);
  tpa::GroupedQueryAttention<B> sunk(g1, w);
  Tensor2 y0(N, 24), y1(N, 24);
  plain.forward(ctx, x, y0);
  sunk.forward(ctx, x, y1);
  EXPECT_EQ(max_diff(y0, y1), 0.0) << "GQA sink -inf";
  tpa::TpaConfig t0 = tpa_config(none), t1 = tpa_config(s);
  tpa::TpaWeights tw = tpa::TpaWeights::random(t0, 4);
  tpa::TensorProductAttention<B> tplain(t0, tw);
  tw.sinks = Eigen::VectorXf::Constant(6, -kInf);
  tpa::TensorProductAttention<B> tsunk(t1, tw);
  tplain.forward(ctx, x, y0);
  tsunk.forward(ctx, x, y1);
  EXPECT_EQ(max_diff(y0, y1), 0.0) << "TPA sink -inf";
  tpa::MlaConfig m0 = mla_config(none), m1 = mla_config(s);
  tpa::MlaWeights mw = tpa::MlaWeights::random(m0, 6);
  tpa::MultiHeadLatentAttention<B> mplain(m0, mw);
  mw.sinks = Eigen::VectorXf::Constant(6, -kInf);
  tpa::MultiHeadLatentAttention<B> msunk(m1, mw);
  mplain.forward(ctx, x, y0);
  msunk.forward(ctx, x, y1);
  EXPECT_EQ(max_diff(y0, y1), 0.0) << "MLA sink -inf";
}

TEST(VariantConfig, StandardAlibiSlopes) {
  // Powers of two: 2^(−8(h+1)/H). Otherwise (BLOOM, MPT): the power-of-two slopes of the
  // largest P ≤ H, then every other slope of 2P heads: 2^(−4(2j+1)/P).
  const auto s8 = tpa::AttentionVariant::standard_alibi_slopes(8);
  ASSERT_EQ(s8.size(), 8u);
  for (int h = 0; h < 8; ++h)
    EXPECT_FLOAT_EQ(s8[static_cast<std::size_t>(h)], std::exp2(-(h + 1.f)));
  const auto s12 = tpa::AttentionVariant::standard_alibi_slopes(12);
  ASSERT_EQ(s12.size(), 12u);
  for (int h = 0; h < 8; ++h)
    EXPECT_FLOAT_EQ(s12[static_cast<std::size_t>(h)], s8[static_cast<std::size_t>(h)]);
  for (int j = 0; j < 4; ++j)
    EXPECT_FLOAT_EQ(s12[static_cast<std::size_t>(8 + j)], std::exp2(-(2 * j + 1) / 2.f));
  const auto s6 = tpa::AttentionVariant::standard_alibi_slopes(6);
  const float want6[] = {0.25f, 0.0625f, 0.015625f, 0.00390625f, 0.5f, 0.125f};
  for (int h = 0; h < 6; ++h) EXPECT_FLOAT_EQ(s6[static_cast<std::size_t>(h)], want6[h]);
}

TEST(VariantConfig, ValidatesEveryField) {
  auto throws_with = [](const tpa::AttentionVariant& v, const char* text) {
    tpa::GqaConfig g = gqa_config(v);
    try {
      g.validate();
      ADD_FAILURE() << "no error for " << text;
    } catch (const tpa::Error& e) {
      EXPECT_NE(std::string(e.what()).find(text), std::string::npos) << e.what();
    }
  };
  tpa::AttentionVariant v;
  v.window = 0;
  throws_with(v, "variant.window (0) must be >= 1");
  v.window = -3;
  throws_with(v, "variant.window (-3)");
  v = {};
  v.logit_softcap = 0.f;
  throws_with(v, "variant.logit_softcap (0) must be > 0");
  v.logit_softcap = -1.f;
  throws_with(v, "variant.logit_softcap (-1)");
  v.logit_softcap = std::nanf("");
  throws_with(v, "variant.logit_softcap (nan)");
  v = {};
  v.alibi_slopes.assign(6, 0.5f);
  throws_with(v, "variant.alibi is false");
  v.alibi = true;
  v.alibi_slopes.assign(5, 0.5f);
  throws_with(v, "has 5 entries, must have one per head (n_heads 6)");
  v.alibi_slopes.assign(6, 0.5f);
  v.alibi_slopes[2] = kInf;
  throws_with(v, "variant.alibi_slopes[2] (inf) must be finite");
  // Valid ones pass for every kind.
  v = {};
  v.window = 1;
  v.logit_softcap = kInf;
  v.alibi = true;
  EXPECT_NO_THROW(gqa_config(v).validate());
  EXPECT_NO_THROW(tpa_config(v).validate());
  EXPECT_NO_THROW(mla_config(v).validate());
  // The same rules for TPA and MLA.
  v.window = 0;
  EXPECT_THROW(tpa_config(v).validate(), tpa::Error);
  EXPECT_THROW(mla_config(v).validate(), tpa::Error);
  // Sinks of the wrong shape, or NaN.
  tpa::AttentionVariant s;
  s.sinks = true;
  tpa::GqaConfig g = gqa_config(s);
  tpa::GqaWeights w = tpa::GqaWeights::random(g, 1);
  ASSERT_EQ(w.sinks.size(), 6);
  w.sinks.resize(5);
  try {
    tpa::GroupedQueryAttention<> l(g, w);
    ADD_FAILURE() << "no error for 5 sinks";
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("weight 'sinks' has shape [5], expected [6]"),
              std::string::npos)
        << e.what();
  }
  w.sinks = Eigen::VectorXf::Zero(6);
  w.sinks[1] = std::nanf("");
  EXPECT_THROW((tpa::GroupedQueryAttention<>(g, w)), tpa::Error);
  tpa::TpaConfig t = tpa_config(s);
  tpa::TpaWeights tw = tpa::TpaWeights::random(t, 1);
  tw.sinks.resize(2);
  EXPECT_THROW((tpa::TensorProductAttention<>(t, tw)), tpa::Error);
  tpa::MlaConfig m = mla_config(s);
  tpa::MlaWeights mw = tpa::MlaWeights::random(m, 1);
  mw.sinks.resize(0);
  EXPECT_THROW((tpa::MultiHeadLatentAttention<>(m, mw)), tpa::Error);
}

TEST(VariantCheckpoint, SinksLoadByTheirReferenceName) {
  tpa::AttentionVariant s;
  s.sinks = true;
  const tpa::GqaConfig g = gqa_config(s);
  const tpa::GqaWeights w = tpa::GqaWeights::random(g, 3);
  tpa::io::SafetensorsWriter out;
  tpa::io::save_gqa_weights(out, "model.layers.0.self_attn.", g, w, tpa::io::DType::kF32);
  const std::string path = ::testing::TempDir() + "variant_sinks.safetensors";
  out.write(path);
  const auto file = tpa::io::SafetensorsFile::open(path);
  ASSERT_TRUE(file.contains("model.layers.0.self_attn.sinks"));
  EXPECT_EQ(file.info("model.layers.0.self_attn.sinks").shape, std::vector<Index>{6});
  const tpa::GqaWeights r = tpa::io::load_gqa_weights(file, "model.layers.0.self_attn.", g);
  ASSERT_EQ(r.sinks.size(), 6);
  for (Index h = 0; h < 6; ++h) EXPECT_EQ(r.sinks[h], w.sinks[h]);
  // Without variant.sinks the tensor is unexpected, and named so.
  try {
    (void)tpa::io::load_gqa_weights(file, "model.layers.0.self_attn.", gqa_config({}));
    ADD_FAILURE() << "sinks accepted without variant.sinks";
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("used only with variant.sinks = true"), std::string::npos)
        << e.what();
  }
}

// ---- drop_before and bounded memory
// --------------------------------------------------------------

TEST(VariantCache, WindowedModelKeepsBoundedCache) {
  constexpr Index W = 8, kBlock = 4, kSteps = 10 * W;
  tpa::AttentionVariant v;
  v.window = W;
  const tpa::GqaConfig g = gqa_config(v);
  const tpa::TpaConfig t = tpa_config(v);
  const tpa::GroupedQueryAttention<> l0(g, tpa::GqaWeights::random(g, 1));
  const tpa::TensorProductAttention<> l1(t, tpa::TpaWeights::random(t, 2));
  auto make_cache = [&] {
    return tpa::KVCache<float>({l0.cache_layout(), l1.cache_layout()}, kBlock, 64);
  };
  tpa::KVCache<float> dropped = make_cache(), kept = make_cache();
  const SeqId a = dropped.add_sequence(), b = kept.add_sequence();
  tpa::Context ctx(2);
  const Tensor2 x = tpa_test::random_tensor(kSteps, 24, 5);
  Index max_blocks = 0;
  for (Index i = 0; i < kSteps; ++i) {
    const Tensor2 xi = tpa_test::rows(x, i, 1);
    Tensor2 h0(1, 24), h1(1, 24), y0(1, 24), y1(1, 24);
    l0.forward(ctx, xi, h0, dropped, 0, a);
    l1.forward(ctx, h0, y0, dropped, 1, a);
    l0.forward(ctx, xi, h1, kept, 0, b);
    l1.forward(ctx, h1, y1, kept, 1, b);
    ASSERT_EQ(max_diff(y0, y1), 0.0) << "step " << i;
    // The next query (position i + 1) needs keys from i + 2 − W on.
    dropped.drop_before(a, std::max<Index>(0, i + 2 - W));
    max_blocks = std::max(max_blocks, dropped.allocated_blocks());
  }
  EXPECT_LE(max_blocks, W / kBlock + 2) << "blocks held at most";
  EXPECT_EQ(kept.allocated_blocks(), kSteps / kBlock);
  EXPECT_EQ(dropped.length(a, 0), kSteps);  // positions stay absolute
  EXPECT_EQ(dropped.first_token(a), (kSteps + 1 - W) / kBlock * kBlock);
  EXPECT_LT(dropped.bytes_used(), kept.bytes_used() / 4);

  // A layer without a window needs the released keys: it throws and changes nothing.
  const tpa::GqaConfig g_plain = gqa_config({});
  const tpa::GroupedQueryAttention<> plain(g_plain, tpa::GqaWeights::random(g_plain, 1));
  const auto before = dropped.block_table(a);
  Tensor2 y(1, 24);
  try {
    plain.forward(ctx, tpa_test::rows(x, 0, 1), y, dropped, 0, a);
    ADD_FAILURE() << "read released keys";
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("drop_before"), std::string::npos) << e.what();
  }
  EXPECT_EQ(dropped.length(a, 0), kSteps);
  EXPECT_EQ(dropped.block_table(a), before);
  // So does a window longer than what is left.
  tpa::AttentionVariant wide;
  wide.window = 3 * W;
  const tpa::GqaConfig g_wide = gqa_config(wide);
  const tpa::GroupedQueryAttention<> l_wide(g_wide, tpa::GqaWeights::random(g_wide, 1));
  EXPECT_THROW(l_wide.forward(ctx, tpa_test::rows(x, 0, 1), y, dropped, 0, a), tpa::Error);
  EXPECT_EQ(dropped.length(a, 0), kSteps);
  // truncate may not cut into the released prefix; drop_before checks its position.
  EXPECT_THROW(dropped.truncate(a, 1), tpa::Error);
  EXPECT_THROW(dropped.drop_before(a, kSteps + 1), tpa::Error);
  EXPECT_THROW(dropped.drop_before(a, -1), tpa::Error);
}

TEST(VariantCache, DropBeforeWithForks) {
  tpa::KVCache<float> cache({tpa::CacheLayout("X", {{"K", 1, 4, false}})}, 4, 32);
  const SeqId a = cache.add_sequence();
  std::vector<float> data(4 * 20, 1.f);
  const tpa::FactorRows rows[1] = {{data.data(), 4}};
  cache.append(a, 0, 18, rows);  // 5 blocks
  const SeqId b = cache.fork(a);
  const std::vector<std::int32_t> shared = cache.block_table(a);
  EXPECT_EQ(cache.drop_before(a, 9), 2);  // blocks 0, 1 wholly before position 9
  EXPECT_EQ(cache.first_token(a), 8);
  EXPECT_EQ(cache.first_token(b), 0);
  EXPECT_EQ(cache.block_refs(shared[0]), 1);  // still held by the fork
  EXPECT_EQ(cache.free_blocks(), 0);
  EXPECT_EQ(cache.drop_before(b, 18), 4);  // the fork releases 0..3: 0, 1 go free
  EXPECT_EQ(cache.free_blocks(), 2);
  EXPECT_EQ(cache.block_refs(shared[2]), 1);
  const SeqId c = cache.fork(b);  // a fork of a dropped sequence shares only live blocks
  EXPECT_EQ(cache.first_token(c), 16);
  EXPECT_EQ(cache.block_refs(shared[4]), 3);
  cache.append(c, 0, 1, rows);  // copy on write of the shared last block
  EXPECT_EQ(cache.length(c), 19);
  cache.free_sequence(a);
  cache.free_sequence(b);
  cache.free_sequence(c);
  EXPECT_EQ(cache.bytes_used(), 0u);
  EXPECT_EQ(cache.free_blocks(), cache.allocated_blocks());
}

}  // namespace variant_test
