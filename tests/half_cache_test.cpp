// Half-width KV caches (bfloat16, half) for every attention kind and every compiled backend:
// prefill (one sequence in two chunks) and batched decode steps with a 16-bit cache stay within
// a derived bound of the same layer with a float cache, and the cache holds exactly half the
// bytes per token.
//
// Why the bound holds. The layers compute in f32 (Reference: double) in both runs; the only
// difference is that every cached number x is stored as x(1 + δ), |δ| ≤ u, rounded once when
// appended (round to nearest even: u = 2^-8 for bfloat16's 8 significant bits, 2^-11 for half's
// 11; half's subnormals, |x| < 2^-14, err by ≤ 2^-25 absolutely, covered by the slack below).
// Per head and query, o = Σ_t p_t v_t with p = softmax(s), s_t = scale · q·k_t.
//  - Keys. k_t is a product of m_k stored factors (m_k = 1: GQA's K, MLA's [c_kv | k_pe];
//    m_k = 2: TPA's k_h = (1/R_K) Σ_r A_K[h,r] B_K[r]), so each key element moves by at most
//    ((1+u)^m_k − 1) times its absolute-value evaluation k̄ (k̄ = |k| for m_k = 1,
//    (1/R_K) Σ_r |A_K[h,r]| |B_K[r]| for TPA), and by Cauchy–Schwarz
//      |Δs_t| ≤ ε := ((1+u)^m_k − 1) · scale · max‖q‖ · max‖k̄_t‖
//    (RoPE rotates q and k by orthogonal maps, so the norms before rotation serve).
//  - Softmax. If every score moves by at most ε, each p_t moves by a factor in
//    [e^-2ε, e^2ε], so |Σ_t (p̃_t − p_t) v_t| ≤ (e^2ε − 1) · V̄ with V̄ = max |v̄| over the
//    value elements (v̄ the absolute-value evaluation of v, as k̄).
//  - Values. |Σ_t p̃_t (ṽ_t − v_t)| ≤ ((1+u)^m_v − 1) · V̄.
//  So every attention output element moves by at most
//      Δo ≤ [((1+u)^m_v − 1) + (e^2ε − 1)] · V̄,
//  and the layer output y = W_out o by at most ‖W_out‖∞ · Δo (‖·‖∞: largest absolute row sum).
//  W_out is c_proj, except for MLA, where the attention runs over the latents (V̄ = max |c_kv|)
//  and W_out = c_proj · blockdiag_h(W_UV,h) maps them to y; its explicit form computes the same
//  function of the rounded latents, so the same bound applies.
//  Slack for the f32 arithmetic of the two runs (dot products of length ≤ d_qk, sums over ≤ T
//  keys, exp ≤ 2 ulp, the output projection over H·d_v): γ = 2(H·d_v + d_qk + T + 16) · 2^-24,
//  added as γ · ‖W_out‖∞ · V̄.
// The test prints the observed max|Δy| beside the bound (the bound is a worst case over signs
// and over all tokens at once; random data stays well below it), and checks the error is not 0
// (the cache really was rounded). Since a worst-case bound is loose, each SIMD backend's
// 16-bit-cache output is also held to the Reference backend's on the same 16-bit cache: the
// same rounded numbers, f32 against double arithmetic, within 1e-4 of max|y| (the kernel tests
// derive ~1e-6 per element for these sizes), so a kernel that widens wrongly cannot hide under
// the loose bound.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include <tpa/tpa.hpp>

#include "test_util.hpp"

namespace half_cache_test {

using tpa::bfloat16;
using tpa::half;
using tpa::Index;
using tpa::KVCache;
using tpa::SeqId;
using Tensor2 = tpa::Tensor<float, 2>;

// ---- the scenario ------------------------------------------------------------------------------

constexpr Index kPrefillA = 37;  // sequence A: one prefill call (3 blocks of 16, the last partial)
constexpr Index kPrefillB1 = 11, kPrefillB2 = 9;  // sequence B: chunked prefill
constexpr Index kSteps = 4;                       // batched decode steps of A and B
constexpr Index kBlock = 16;
constexpr Index kMaxTokens = kPrefillA + kSteps;  // T: the most keys one query sees

template <class S>
constexpr double unit_roundoff() {
  return std::is_same<S, bfloat16>::value ? 1.0 / 256 : 1.0 / 2048;
}
template <class S>
const char* scalar_name() {
  return std::is_same<S, bfloat16>::value ? "bf16" : "f16";
}

// Inputs of both sequences, U(−1, 1).
struct Inputs {
  Tensor2 a, b;  // [kPrefillA + kSteps, D], [kPrefillB1 + kPrefillB2 + kSteps, D]
};
Inputs make_inputs(Index D) {
  Inputs in{tpa_test::random_tensor(kPrefillA + kSteps, D, 101),
            tpa_test::random_tensor(kPrefillB1 + kPrefillB2 + kSteps, D, 202)};
  return in;
}

struct Outputs {
  std::vector<float> y;  // every output row of every call, in call order
  std::size_t bytes_per_token = 0;
};

// Prefill A (one call) and B (two chunks), then kSteps decode steps of the batch {A, B}; the
// cache is left holding both sequences (ids 0 and 1).
template <class Layer, class S>
Outputs run(const Layer& layer, KVCache<S>& cache, const Inputs& in, Index D) {
  tpa::Context ctx(2);
  Outputs out;
  out.bytes_per_token = cache.bytes_per_token();
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  auto call = [&](const Tensor2& x, SeqId seq) {
    Tensor2 y(x.dimension(0), D);
    layer.forward(ctx, x, y, cache, 0, seq);
    out.y.insert(out.y.end(), y.data(), y.data() + y.size());
  };
  call(tpa_test::rows(in.a, 0, kPrefillA), a);
  call(tpa_test::rows(in.b, 0, kPrefillB1), b);
  call(tpa_test::rows(in.b, kPrefillB1, kPrefillB2), b);
  for (Index s = 0; s < kSteps; ++s) {
    Tensor2 x(2, D), y(2, D);
    std::copy(in.a.data() + (kPrefillA + s) * D, in.a.data() + (kPrefillA + s + 1) * D, x.data());
    std::copy(in.b.data() + (kPrefillB1 + kPrefillB2 + s) * D,
              in.b.data() + (kPrefillB1 + kPrefillB2 + s + 1) * D, x.data() + D);
    layer.decode(ctx, x, y, cache, 0, {a, b});
    out.y.insert(out.y.end(), y.data(), y.data() + y.size());
  }
  return out;
}

// ---- pieces of the bound -----------------------------------------------------------------------

// Largest absolute row sum of a row-major [rows, cols] matrix.
double inf_norm(const float* w, Index rows, Index cols) {
  double best = 0;
  for (Index r = 0; r < rows; ++r) {
    double s = 0;
    for (Index c = 0; c < cols; ++c) s += std::abs(static_cast<double>(w[r * cols + c]));
    best = std::max(best, s);
  }
  return best;
}

double norm2(const double* v, Index n) {
  double s = 0;
  for (Index i = 0; i < n; ++i) s += v[i] * v[i];
  return std::sqrt(s);
}

// Rows W[r0 … r0+n) · x for every input row of both sequences: calls f(values [n]).
template <class F>
void for_each_projection(const Inputs& in, const float* w, Index D, Index r0, Index n, F&& f) {
  std::vector<double> v(static_cast<std::size_t>(n));
  for (const Tensor2* x : {&in.a, &in.b})
    for (Index t = 0; t < x->dimension(0); ++t) {
      for (Index r = 0; r < n; ++r) {
        double s = 0;
        for (Index c = 0; c < D; ++c)
          s += static_cast<double>(w[(r0 + r) * D + c]) * x->data()[t * D + c];
        v[static_cast<std::size_t>(r)] = s;
      }
      f(v.data());
    }
}

// Calls f(at) for every token of factor f of both sequences of the float cache, at(e) the
// token's element e (row-major in the factor's [rows, cols]).
template <class F>
void for_each_token(const KVCache<float>& cache, std::size_t factor, F&& f) {
  for (SeqId seq : {SeqId{0}, SeqId{1}}) {
    const auto view = cache.view(seq, 0);
    for (Index t = 0; t < view.n_tokens; ++t) f([&](Index e) { return view.at(factor, t, e); });
  }
}

struct BoundTerms {
  int m_k = 1, m_v = 1;  // stored factors multiplied per key / value element
  double q_norm = 0;     // max ‖q‖ over heads and queries
  double k_norm = 0;     // max ‖k̄‖ over KV heads and keys
  double scale = 0;      // softmax scale
  double v_max = 0;      // V̄
  double w_out = 0;      // ‖W_out‖∞
  Index d_qk = 0, d_out = 0;  // key size; inputs of the output projection (H·d_v)
};

double bound(const BoundTerms& b, double u) {
  const double grow_k = std::pow(1 + u, b.m_k) - 1, grow_v = std::pow(1 + u, b.m_v) - 1;
  const double eps = grow_k * b.scale * b.q_norm * b.k_norm;
  const double gamma = 2.0 * static_cast<double>(b.d_out + b.d_qk + kMaxTokens + 16) / (1 << 24);
  return (grow_v + std::expm1(2 * eps) + gamma) * b.v_max * b.w_out;
}

// Runs the float and the 16-bit cache through the same scenario and checks the bound.
template <class S, class Layer16, class Ref16, class Layer32, class Terms>
void compare(const std::string& what, const Layer16& layer16, const Ref16& ref16,
             const Layer32& layer32, const Inputs& in, Index D, Terms&& terms) {
  const tpa::CacheLayout layout = layer32.cache_layout();
  KVCache<float> cache32({layout}, kBlock, 16);
  KVCache<S> cache16({layout}, kBlock, 16);
  const Outputs o32 = run(layer32, cache32, in, D);
  const Outputs o16 = run(layer16, cache16, in, D);
  SCOPED_TRACE(what + " " + scalar_name<S>());

  EXPECT_EQ(o32.bytes_per_token, static_cast<std::size_t>(layout.elements_per_token()) * 4);
  EXPECT_EQ(o16.bytes_per_token * 2, o32.bytes_per_token);

  const BoundTerms bt = terms(cache32);
  const double limit = bound(bt, unit_roundoff<S>());
  ASSERT_EQ(o16.y.size(), o32.y.size());
  double err = 0, y_max = 0;
  for (std::size_t i = 0; i < o32.y.size(); ++i) {
    ASSERT_TRUE(std::isfinite(o16.y[i]));
    err = std::max(err, std::abs(static_cast<double>(o16.y[i]) - o32.y[i]));
    y_max = std::max(y_max, std::abs(static_cast<double>(o32.y[i])));
  }
  std::printf("[half cache] %-12s %-9s %s: max|dy| %.3g (%.3g of max|y| %.3g), bound %.3g (%.1fx)\n",
              what.c_str(), ::testing::UnitTest::GetInstance()->current_test_info()->name(),
              scalar_name<S>(), err, err / y_max, y_max, limit, limit / err);
  EXPECT_LE(err, limit);
  EXPECT_GT(err, 0.0);  // the 16-bit cache really rounds
  if (std::is_same<Layer16, Ref16>::value) return;  // the Reference backend itself
  KVCache<S> cache_ref({layout}, kBlock, 16);
  const Outputs oref = run(ref16, cache_ref, in, D);
  EXPECT_LE(tpa_test::rel_err(o16.y, oref.y, static_cast<Index>(oref.y.size())), 1e-4);
}

// ---- the kinds ---------------------------------------------------------------------------------

tpa::GqaConfig gqa_config(Index kv_heads) {
  tpa::GqaConfig c;
  c.d_model = 64;
  c.n_heads = 4;
  c.n_kv_heads = kv_heads;
  c.head_dim = 36;  // not a multiple of 8 or 16: tails in every backend
  c.rope.max_positions = 64;
  return c;
}

template <class B, class S>
void check_grouped(const std::string& what, Index kv_heads) {
  const tpa::GqaConfig c = gqa_config(kv_heads);
  const tpa::GqaWeights w = tpa::GqaWeights::random(c, 7);
  const tpa::GroupedQueryAttention<B, float> layer32(c, w);
  const tpa::GroupedQueryAttention<B, S> layer16(c, w);
  const tpa::GroupedQueryAttention<tpa::Reference, S> ref16(c, w);
  const Inputs in = make_inputs(c.d_model);
  const Index H = c.n_heads, G = c.kv_heads(), d = c.head_dim;
  compare<S>(what, layer16, ref16, layer32, in, c.d_model, [&](const KVCache<float>& cache) {
    BoundTerms b;
    b.scale = c.scale();
    for (Index h = 0; h < H; ++h)
      for_each_projection(in, w.c_q.data(), c.d_model, h * d, d,
                          [&](const double* q) { b.q_norm = std::max(b.q_norm, norm2(q, d)); });
    std::vector<double> k(static_cast<std::size_t>(d));
    for_each_token(cache, 0, [&](const auto& t) {
      for (Index g = 0; g < G; ++g) {
        for (Index j = 0; j < d; ++j) k[static_cast<std::size_t>(j)] = t(g * d + j);
        b.k_norm = std::max(b.k_norm, norm2(k.data(), d));
      }
    });
    for_each_token(cache, 1, [&](const auto& t) {
      for (Index j = 0; j < G * d; ++j) b.v_max = std::max(b.v_max, std::abs(double(t(j))));
    });
    b.w_out = inf_norm(w.c_proj.data(), c.d_model, H * d);
    b.d_qk = d;
    b.d_out = H * d;
    return b;
  });
}

template <class B, class S>
void check_mla(tpa::MlaForm form) {
  tpa::MlaConfig c;
  c.d_model = 64;
  c.n_heads = 4;
  c.q_lora_rank = 0;  // q = q_proj · x
  c.kv_lora_rank = 40;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 12;
  c.v_head_dim = 20;
  c.rope.max_positions = 64;
  c.form = form;
  const tpa::MlaWeights w = tpa::MlaWeights::random(c, 9);
  const tpa::MultiHeadLatentAttention<B, float> layer32(c, w);
  const tpa::MultiHeadLatentAttention<B, S> layer16(c, w);
  const tpa::MultiHeadLatentAttention<tpa::Reference, S> ref16(c, w);
  const Inputs in = make_inputs(c.d_model);
  const Index H = c.n_heads, d_c = c.kv_lora_rank, d_n = c.qk_nope_head_dim;
  const Index d_R = c.qk_rope_head_dim, d_v = c.v_head_dim, d_q = d_n + d_R;
  const std::string what = form == tpa::MlaForm::kAbsorbed ? "MLA absorbed" : "MLA explicit";
  compare<S>(what, layer16, ref16, layer32, in, c.d_model, [&](const KVCache<float>& cache) {
    BoundTerms b;
    b.scale = c.scale();
    // Over the latents: q_h' = [W_UK,hᵀ q_nope_h | q_pe_h] against k' = [c_kv | k_pe].
    std::vector<double> ql(static_cast<std::size_t>(d_c + d_R));
    for (Index h = 0; h < H; ++h)
      for_each_projection(in, w.q_proj.data(), c.d_model, h * d_q, d_q, [&](const double* q) {
        for (Index k = 0; k < d_c; ++k) {
          double s = 0;
          for (Index i = 0; i < d_n; ++i)
            s += q[i] * static_cast<double>(w.kv_b_proj(h * (d_n + d_v) + i, k));
          ql[static_cast<std::size_t>(k)] = s;
        }
        for (Index j = 0; j < d_R; ++j) ql[static_cast<std::size_t>(d_c + j)] = q[d_n + j];
        b.q_norm = std::max(b.q_norm, norm2(ql.data(), d_c + d_R));
      });
    for (SeqId seq : {SeqId{0}, SeqId{1}}) {
      const auto view = cache.view(seq, 0);
      for (Index t = 0; t < view.n_tokens; ++t) {
        std::vector<double> k(static_cast<std::size_t>(d_c + d_R));
        for (Index j = 0; j < d_c; ++j) {
          k[static_cast<std::size_t>(j)] = view.at(0, t, j);
          b.v_max = std::max(b.v_max, std::abs(double(view.at(0, t, j))));
        }
        for (Index j = 0; j < d_R; ++j) k[static_cast<std::size_t>(d_c + j)] = view.at(1, t, j);
        b.k_norm = std::max(b.k_norm, norm2(k.data(), d_c + d_R));
      }
    }
    // W_out = c_proj · blockdiag_h(W_UV,h): [D, H·d_c].
    std::vector<float> m(static_cast<std::size_t>(c.d_model * H * d_c));
    for (Index r = 0; r < c.d_model; ++r)
      for (Index h = 0; h < H; ++h)
        for (Index k = 0; k < d_c; ++k) {
          double s = 0;
          for (Index i = 0; i < d_v; ++i)
            s += static_cast<double>(w.c_proj(r, h * d_v + i)) *
                 static_cast<double>(w.kv_b_proj(h * (d_n + d_v) + d_n + i, k));
          m[static_cast<std::size_t>((r * H + h) * d_c + k)] = static_cast<float>(s);
        }
    b.w_out = inf_norm(m.data(), c.d_model, H * d_c) * (1 + 1e-6);  // f32 rounding of m
    b.d_qk = std::max(d_q, d_c + d_R);
    b.d_out = H * std::max(d_v, d_c);
    return b;
  });
}

template <class B, class S>
void check_tpa(bool kv_only) {
  tpa::TpaConfig c;
  c.d_model = 64;
  c.n_heads = 4;
  c.head_dim = kv_only ? 36 : 32;
  c.q_rank = kv_only ? 0 : 4;
  c.k_rank = kv_only ? 3 : 2;
  c.v_rank = kv_only ? 1 : 2;
  c.kv_only = kv_only;
  c.rope.max_positions = 64;
  const tpa::TpaWeights w = tpa::TpaWeights::random(c, 11);
  const tpa::TensorProductAttention<B, float> layer32(c, w);
  const tpa::TensorProductAttention<B, S> layer16(c, w);
  const tpa::TensorProductAttention<tpa::Reference, S> ref16(c, w);
  const Inputs in = make_inputs(c.d_model);
  const Index H = c.n_heads, d = c.head_dim, RQ = c.q_rank, RK = c.k_rank, RV = c.v_rank;
  compare<S>(kv_only ? "TPA K/V-only" : "TPA", layer16, ref16, layer32, in, c.d_model,
             [&](const KVCache<float>& cache) {
               BoundTerms b;
               b.m_k = 2;
               b.m_v = 2;
               b.scale = c.scale();
               if (kv_only) {
                 for (Index h = 0; h < H; ++h)
                   for_each_projection(in, w.c_q.data(), c.d_model, h * d, d, [&](const double* q) {
                     b.q_norm = std::max(b.q_norm, norm2(q, d));
                   });
               } else {
                 // ‖q_h‖ = ‖(1/R_Q) Σ_r A_Q[h,r] B_Q[r]‖ ≤ (1/R_Q) Σ_r |A_Q[h,r]| ‖B_Q[r]‖.
                 std::vector<double> bq_norm;
                 for_each_projection(in, w.W_B_q.data(), c.d_model, 0, RQ * d,
                                     [&](const double* bq) {
                                       for (Index r = 0; r < RQ; ++r)
                                         bq_norm.push_back(norm2(bq + r * d, d));
                                     });
                 std::size_t token = 0;
                 for_each_projection(in, w.W_A_q.data(), c.d_model, 0, H * RQ,
                                     [&](const double* aq) {
                                       for (Index h = 0; h < H; ++h) {
                                         double s = 0;
                                         for (Index r = 0; r < RQ; ++r)
                                           s += std::abs(aq[h * RQ + r]) * bq_norm[token * RQ + r];
                                         b.q_norm = std::max(b.q_norm, s / RQ);
                                       }
                                       ++token;
                                     });
               }
               // k̄_h(t) = (1/R_K) Σ_r |A_K[h,r]| |B_K[r]|, v̄ likewise.
               std::vector<double> kb(static_cast<std::size_t>(d));
               for (SeqId seq : {SeqId{0}, SeqId{1}}) {
                 const auto view = cache.view(seq, 0);
                 for (Index t = 0; t < view.n_tokens; ++t)
                   for (Index h = 0; h < H; ++h) {
                     for (Index j = 0; j < d; ++j) {
                       double sk = 0, sv = 0;
                       for (Index r = 0; r < RK; ++r)
                         sk += std::abs(double(view.at(0, t, h * RK + r))) *
                               std::abs(double(view.at(1, t, r * d + j)));
                       for (Index r = 0; r < RV; ++r)
                         sv += std::abs(double(view.at(2, t, h * RV + r))) *
                               std::abs(double(view.at(3, t, r * d + j)));
                       kb[static_cast<std::size_t>(j)] = sk / RK;
                       b.v_max = std::max(b.v_max, sv / RV);
                     }
                     b.k_norm = std::max(b.k_norm, norm2(kb.data(), d));
                   }
               }
               b.w_out = inf_norm(w.c_proj.data(), c.d_model, H * d);
               b.d_qk = d;
               b.d_out = H * d;
               return b;
             });
}

// ---- every compiled backend ---------------------------------------------------------------------

template <class B>
class HalfCache : public ::testing::Test {};

// Reference too: the 16-bit reads of every backend, the scalar one included.
TYPED_TEST_SUITE(HalfCache, tpa_test::AllBackends, tpa_test::BackendName);

TYPED_TEST(HalfCache, Mha) {
  check_grouped<TypeParam, bfloat16>("MHA", 4);
  check_grouped<TypeParam, half>("MHA", 4);
}
TYPED_TEST(HalfCache, Gqa) {
  check_grouped<TypeParam, bfloat16>("GQA-2", 2);
  check_grouped<TypeParam, half>("GQA-2", 2);
}
TYPED_TEST(HalfCache, Mqa) {
  check_grouped<TypeParam, bfloat16>("MQA", 1);
  check_grouped<TypeParam, half>("MQA", 1);
}
TYPED_TEST(HalfCache, MlaAbsorbed) {
  check_mla<TypeParam, bfloat16>(tpa::MlaForm::kAbsorbed);
  check_mla<TypeParam, half>(tpa::MlaForm::kAbsorbed);
}
TYPED_TEST(HalfCache, MlaExplicit) {
  check_mla<TypeParam, bfloat16>(tpa::MlaForm::kExplicit);
  check_mla<TypeParam, half>(tpa::MlaForm::kExplicit);
}
// The explicit form widens the cached latents kGather (128) tokens at a time: a 300-token
// prompt (three chunks, the last partial) and decode steps on a bf16 cache give what the
// absorbed form gives on the same cache, up to f32 rounding (both compute the same function of
// the same rounded latents).
TEST(HalfCacheMla, ExplicitFormOverSeveralGatherChunks) {
  tpa::MlaConfig c;
  c.d_model = 64;
  c.n_heads = 4;
  c.kv_lora_rank = 40;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 12;
  c.v_head_dim = 20;
  c.rope.max_positions = 512;
  const tpa::MlaWeights w = tpa::MlaWeights::random(c, 9);
  const Index T = 300, steps = 3, D = c.d_model;
  const Tensor2 x = tpa_test::random_tensor(T + steps, D, 303);
  std::vector<float> y[2];
  for (int f = 0; f < 2; ++f) {
    c.form = f == 0 ? tpa::MlaForm::kExplicit : tpa::MlaForm::kAbsorbed;
    const tpa::MultiHeadLatentAttention<tpa::Native, bfloat16> layer(c, w);
    KVCache<bfloat16> cache({layer.cache_layout()}, kBlock, 32);
    tpa::Context ctx(2);
    const SeqId seq = cache.add_sequence();
    Tensor2 out(T, D);
    layer.forward(ctx, tpa_test::rows(x, 0, T), out, cache, 0, seq);
    y[f].assign(out.data(), out.data() + out.size());
    for (Index s = 0; s < steps; ++s) {
      Tensor2 o1(1, D);
      layer.forward(ctx, tpa_test::rows(x, T + s, 1), o1, cache, 0, seq);
      y[f].insert(y[f].end(), o1.data(), o1.data() + o1.size());
    }
  }
  EXPECT_LE(tpa_test::rel_err(y[0], y[1], static_cast<Index>(y[1].size())), 1e-4);
}

TYPED_TEST(HalfCache, Tpa) {
  check_tpa<TypeParam, bfloat16>(false);
  check_tpa<TypeParam, half>(false);
}
TYPED_TEST(HalfCache, TpaKvOnly) {
  check_tpa<TypeParam, bfloat16>(true);
  check_tpa<TypeParam, half>(true);
}

}  // namespace half_cache_test
