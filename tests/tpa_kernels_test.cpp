// FlashTPA kernel tests: the tiled TPA kernel of every compiled backend (detail::TpaTiled) and the
// threaded work split over it (tpa::tpa_attention) against the Reference backend, which builds
// k_h(t), v_h(t) in double and runs plain softmax attention.
//
// Tolerance, per output element. The backends compute in f32 in FlashTPA order; Reference in
// double on the same stored, widened factors (so storage rounding cancels out). With
// u = 2⁻²⁴ and the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019) — an
// n-term f32 sum of products is off by ≤ λ·√n·u·Σ|terms| with probability ≥ 1 − 2n·e^(−λ²/2);
// λ = 8, so < 1e-12 per sum:
//   - score s_t: factored, qk_scale·Σ_{r,s,j} A_Q[h,r]·A_K[h,s]·B_Q[r,j]·B_K[s,j], evaluated as a
//     d-term sum (C = B_Q·B_Kᵀ), an R_Q-term sum (A_Q mix) and an R_K-term sum (A_K mix) after
//     rounding A_Q·qk_scale: |δs_t| ≤ λ·√(d + R_Q + R_K + 1)·u·σ_t with σ_t the same sum of
//     absolute terms; full query: a d-term then an R_K-term sum, λ·√(d + R_K + 1)·u·σ_t.
//     e^(s − m) adds ≤ 2 ulp, so ε = max_t |δs_t| + 4u bounds every weight's relative error;
//   - to first order o_j = Σ_t p_t v_tj moves by ≤ ε·Σ_t p_t |v_tj − o_j| (p the exact softmax
//     weights, v_tj = (1/R_V)·Σ_s A_V[h,s] B_V[s,j]);
//   - the value side sums N·R_V products (p_t·A_V[h,s])·B_V[s,j] with the per-tile rescales, and
//     l sums N weights: ≤ 2λ·√(N·R_V + 2)·u·Σ_t p_t (1/R_V) Σ_s |A_V[h,s] B_V[s,j]|;
//   - the final scaling by 1/R_V and division by l: 2u·|o_j|.
// tol_j is the sum, computed in double from the data; a test passes when
// max_j |o_j − o_ref,j| / tol_j ≤ 1. Observed ratios are ≤ 0.05 (printed by the Long test).
// Split-K versus unsplit is held to the same tolerance: both are f32 evaluations of the same
// quantity, and the log-sum-exp merge adds O(u) relative per merge.

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"
#include "tpa/backend/backends.hpp"
#include "tpa/cache/kv_cache.hpp"
#include "tpa/dispatch/tpa_decode.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {
namespace tpa_kernels_test {

using tpa_test::BackendName;
using tpa_test::Backends;
using tpa_test::kU;

// One TPA shape; q_rank 0 = full query (K/V-only).
struct Shape {
  Index n_heads, head_dim, q_rank, k_rank, v_rank;
  std::string name() const {
    return "H" + std::to_string(n_heads) + "_d" + std::to_string(head_dim) + "_RQ" +
           std::to_string(q_rank) + "_RK" + std::to_string(k_rank) + "_RV" + std::to_string(v_rank);
  }
};

// A sequence of n_tokens cached tokens (appended in uneven chunks, so blocks fill across calls
// and the last one is partial), and n_q queries at its end (q_pos0 = n_tokens − n_q).
template <class S>
struct Problem {
  Shape shape;
  std::unique_ptr<KVCache<S>> cache;
  SeqId seq = 0;
  Index n_q = 0, n_tokens = 0;
  float scale = 0;
  std::vector<float> a_q, b_q, q;
  std::vector<float> o_ref;  // Reference output
  std::vector<double> tol;   // per-element tolerance (see the top of the file)

  Problem(const Shape& sh, Index n_tokens_, Index n_q_, Index block_tokens, unsigned seed)
      : shape(sh), n_q(n_q_), n_tokens(n_tokens_) {
    const Index H = sh.n_heads, d = sh.head_dim, RK = sh.k_rank, RV = sh.v_rank, RQ = sh.q_rank;
    const std::vector<FactorSpec> f = {
        {"A_K", H, RK, false}, {"B_K", RK, d, true}, {"A_V", H, RV, false}, {"B_V", RV, d, false}};
    cache = std::make_unique<KVCache<S>>(std::vector<CacheLayout>{CacheLayout("TPA", f)},
                                         block_tokens, n_tokens / block_tokens + 2);
    seq = cache->add_sequence();
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    tpa_test::append_random_tokens(*cache, seq, f, n_tokens, [&] { return nd(rng); });
    if (RQ > 0) {
      a_q.resize(static_cast<std::size_t>(n_q * H * RQ));
      b_q.resize(static_cast<std::size_t>(n_q * RQ * d));
      for (auto& x : a_q) x = nd(rng);
      for (auto& x : b_q) x = nd(rng);
    } else {
      q.resize(static_cast<std::size_t>(n_q * H * d));
      for (auto& x : q) x = nd(rng);
    }
    scale = 1.f / std::sqrt(static_cast<float>(d));
    reference();
  }

  // Recomputes o_ref and tol from the current data.
  void reference() {
    o_ref.assign(static_cast<std::size_t>(n_q * shape.n_heads * shape.head_dim), 0.f);
    Kernels<Reference>::tpa_attention(params(o_ref.data()));
    tol = tolerance();
  }

  TpaAttentionParams<S> params(float* o) const {
    TpaAttentionParams<S> p;
    const Index H = shape.n_heads, d = shape.head_dim, RQ = shape.q_rank;
    p.q_rank = RQ;
    if (RQ > 0) {
      p.a_q = a_q.data();
      p.a_q_stride = H * RQ;
      p.b_q = b_q.data();
      p.b_q_stride = RQ * d;
    } else {
      p.q = q.data();
      p.q_stride = H * d;
    }
    p.o = o;
    p.o_stride = H * d;
    p.n_q = n_q;
    p.q_pos0 = n_tokens - n_q;
    p.n_heads = H;
    p.head_dim = d;
    p.k_rank = shape.k_rank;
    p.v_rank = shape.v_rank;
    p.scale = scale;
    p.kv = cache->view(seq, 0);
    return p;
  }

  // Per-element tolerance of the output (see the top of the file).
  std::vector<double> tolerance() const {
    const auto p = params(nullptr);
    const Index H = p.n_heads, d = p.head_dim, RQ = p.q_rank, RK = p.k_rank, RV = p.v_rank;
    const double lambda = 8, qk_scale = p.qk_scale(), v_scale = p.v_scale();
    auto at = [&](std::size_t f, Index t, Index k) {  // dequantized for q8
      return static_cast<double>(p.kv.value(f, t, k / p.kv.cols(f), k % p.kv.cols(f)));
    };
    std::vector<double> tol(o_ref.size());
    std::vector<double> w, qh(static_cast<std::size_t>(d)), v, vabs;
    for (Index i = 0; i < n_q; ++i) {
      const Index n_keys = p.q_pos0 + i + 1;
      for (Index h = 0; h < H; ++h) {
        w.assign(static_cast<std::size_t>(n_keys), 0.0);
        double m = -std::numeric_limits<double>::infinity(), eps = 0;
        for (Index t = 0; t < n_keys; ++t) {
          double dot = 0, sigma = 0;
          for (Index s = 0; s < RK; ++s) {
            const double ak = at(p.a_k_factor, t, h * RK + s);
            for (Index j = 0; j < d; ++j) {
              const double bk = at(p.b_k_factor, t, s * d + j);
              if (RQ > 0) {
                for (Index r = 0; r < RQ; ++r) {
                  const double x = static_cast<double>(a_q[(i * H + h) * RQ + r]) * ak *
                                   static_cast<double>(b_q[(i * RQ + r) * d + j]) * bk;
                  dot += x;
                  sigma += std::abs(x);
                }
              } else {
                const double x = static_cast<double>(q[(i * H + h) * d + j]) * ak * bk;
                dot += x;
                sigma += std::abs(x);
              }
            }
          }
          const double terms = static_cast<double>(d + RK + 1 + RQ);
          w[static_cast<std::size_t>(t)] = dot * qk_scale;
          m = std::max(m, dot * qk_scale);
          eps = std::max(eps, lambda * std::sqrt(terms) * kU * sigma * qk_scale);
        }
        eps += 4 * kU;
        double l = 0;
        for (auto& x : w) l += (x = std::exp(x - m));
        for (auto& x : w) x /= l;
        // int8 caches: the value product may round a head's weights of a tile to int16 against
        // their maximum (TpaTiled::pv_q8): weight (t, s) = p_t·A_V[h, s]·sb(t, s) (sb: B_V's
        // scale) is off by ≤ its tile's largest / 65534 (taken as / 32767) and multiplies B_V's
        // integer B_V[s, j] / sb(t, s). A tile holds ≤ 64 tokens, so every weight of t's tile is
        // within 63 tokens of t: wq[t] = the largest weight of tokens t − 63 … t + 63, / 32767.
        std::vector<double> wq;
        if constexpr (is_quantized_v<S>) {
          std::vector<double> u(static_cast<std::size_t>(n_keys), 0.0);
          for (Index t = 0; t < n_keys; ++t)
            for (Index s = 0; s < RV; ++s)
              u[static_cast<std::size_t>(t)] =
                  std::max(u[static_cast<std::size_t>(t)],
                           w[static_cast<std::size_t>(t)] *
                               std::abs(at(p.a_v_factor, t, h * RV + s)) * bv_scale(p, t, s));
          wq.assign(static_cast<std::size_t>(n_keys), 0.0);
          for (Index t = 0; t < n_keys; ++t)
            for (Index t2 = std::max<Index>(0, t - 63); t2 < std::min(n_keys, t + 64); ++t2)
              wq[static_cast<std::size_t>(t)] =
                  std::max(wq[static_cast<std::size_t>(t)], u[static_cast<std::size_t>(t2)] / 32767);
        }
        for (Index j = 0; j < d; ++j) {
          v.assign(static_cast<std::size_t>(n_keys), 0.0);
          vabs.assign(static_cast<std::size_t>(n_keys), 0.0);
          double o = 0;
          for (Index t = 0; t < n_keys; ++t) {
            for (Index s = 0; s < RV; ++s) {
              const double x = at(p.a_v_factor, t, h * RV + s) * at(p.b_v_factor, t, s * d + j);
              v[static_cast<std::size_t>(t)] += x * v_scale;
              vabs[static_cast<std::size_t>(t)] += std::abs(x) * v_scale;
            }
            o += w[static_cast<std::size_t>(t)] * v[static_cast<std::size_t>(t)];
          }
          double dev = 0, mag = 0;
          for (Index t = 0; t < n_keys; ++t) {
            const auto k = static_cast<std::size_t>(t);
            dev += w[k] * std::abs(v[k] - o);
            mag += w[k] * vabs[k];
          }
          double q16 = 0;  // int8: the int16 weights' error
          for (Index t = 0; t < static_cast<Index>(wq.size()); ++t)
            for (Index s = 0; s < RV; ++s)
              q16 += wq[static_cast<std::size_t>(t)] * std::abs(at(p.b_v_factor, t, s * d + j)) /
                     bv_scale(p, t, s) * v_scale;
          tol[static_cast<std::size_t>((i * H + h) * d + j)] =
              eps * dev + 2 * lambda * std::sqrt(static_cast<double>(n_keys * RV + 2)) * kU * mag +
              2 * kU * std::abs(o) + q16;
        }
      }
    }
    return tol;
  }

  // int8: B_V's scale of token t, rank s.
  static double bv_scale(const TpaAttentionParams<S>& p, Index t, Index s) {
    return p.kv.scales(p.b_v_factor, t / p.kv.block_tokens, s)[t % p.kv.block_tokens];
  }

  // max_k |o_k − o_ref,k| / tol_k: ≤ 1 passes (∞ on NaN).
  double error(const std::vector<float>& o) const { return tpa_test::tol_ratio(o, o_ref, tol); }
};

// tpa_attention<B> with the work cut into `workers` pieces over `threads` threads.
template <class B, class S>
std::vector<float> run(const Problem<S>& pr, int threads, int workers) {
  std::vector<float> o(pr.o_ref.size(), std::numeric_limits<float>::quiet_NaN());
  Context ctx(threads);
  const auto p = pr.params(o.data());
  tpa_attention<B>(ctx, &p, 1, tpa_test::forced_split(workers));
  return o;
}

template <class B>
class TpaKernel : public ::testing::Test {};
TYPED_TEST_SUITE(TpaKernel, Backends, BackendName);

// Head dims 40/64/72/128 × heads 1/5/32/47 × ranks (factored with R_Q 1–8 and 12, R_K ≠ R_V,
// and the full query); decode (203 keys) and 13 queries at q_pos0 = 104; blocks of 24 tokens
// (not a multiple of any tile, several blocks); the single-call entry, 1 thread and 2 threads.
// R_Q 12 takes the rank-mixing loop that reloads A_Qᵀ with 32 heads and, with AVX-512, the one
// that keeps it in registers with 5 heads (TpaTiled::scores).
TYPED_TEST(TpaKernel, HeadDimsHeadsRanksFloat) {
  using B = TypeParam;
  const Shape ranks[] = {{1, 0, 1, 1, 1}, {5, 0, 6, 2, 2},   {32, 0, 6, 2, 2}, {47, 0, 3, 5, 8},
                         {5, 0, 8, 8, 3}, {5, 0, 1, 3, 1},   {32, 0, 0, 2, 2}, {47, 0, 0, 7, 4},
                         {1, 0, 0, 4, 6}, {32, 0, 12, 2, 2}, {5, 0, 12, 3, 2}};
  for (Index d : {40, 64, 72, 128}) {
    for (Shape sh : ranks) {
      sh.head_dim = d;
      for (Index n_q : {1, 13}) {
        const Problem<float> pr(sh, n_q == 1 ? 203 : 117, n_q, 24,
                                static_cast<unsigned>(7 * d + 3 * sh.n_heads + sh.q_rank));
        SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
        std::vector<float> o(pr.o_ref.size());
        Kernels<B>::tpa_attention(pr.params(o.data()));
        EXPECT_LE(pr.error(o), 1.0) << "single-call entry";
        EXPECT_LE(pr.error(run<B>(pr, 1, 1)), 1.0) << "1 thread";
        EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0) << "2 threads";
      }
    }
  }
}

// Every rank 1–8 on each side (R_Q = r, R_K = r, R_V = 9 − r, and R_K = R_V = r with a full
// query), decode and prefill, odd block size.
TYPED_TEST(TpaKernel, AllRanks) {
  using B = TypeParam;
  for (Index r = 1; r <= 8; ++r) {
    for (const Shape& sh : {Shape{5, 24, r, r, 9 - r}, Shape{3, 16, 0, r, r}}) {
      for (Index n_q : {1, 7}) {
        const Problem<float> pr(sh, 90, n_q, 19, static_cast<unsigned>(r + 100 * n_q));
        SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
        EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0);
      }
    }
  }
}

// A long decode (4100 keys in 64-token blocks) at the benchmark shape and at T6-medium's, one
// piece and split over 2 threads.
TYPED_TEST(TpaKernel, LongDecode) {
  using B = TypeParam;
  for (const Shape& sh :
       {Shape{32, 128, 6, 2, 2}, Shape{47, 64, 6, 2, 2}, Shape{29, 64, 0, 2, 2}}) {
    const Problem<float> pr(sh, 4100, 1, 64, 17u);
    SCOPED_TRACE(sh.name());
    const double e1 = pr.error(run<B>(pr, 1, 1)), e2 = pr.error(run<B>(pr, 2, 2));
    EXPECT_LE(e1, 1.0);
    EXPECT_LE(e2, 1.0);
    std::printf("[ info ] %s %s: error / tolerance = %.3g (1 piece), %.3g (2 pieces)\n", B::name,
                sh.name().c_str(), e1, e2);
  }
}

// SeqView::huge_pages only decides whether FlashTPA touches each 4 KiB page of a tile before
// prefetching it: the outputs are the same bits with and without it.
TYPED_TEST(TpaKernel, HugePageHintChangesNoBits) {
  using B = TypeParam;
  for (const Shape& sh : {Shape{32, 128, 6, 2, 2}, Shape{29, 64, 0, 2, 2}}) {
    const Problem<float> pr(sh, 515, 1, 64, 3u);
    SCOPED_TRACE(sh.name());
    std::vector<float> o[2];
    for (int huge = 0; huge < 2; ++huge) {
      o[huge].assign(pr.o_ref.size(), std::numeric_limits<float>::quiet_NaN());
      Context ctx(2);
      auto p = pr.params(o[huge].data());
      p.kv.huge_pages = huge == 1;
      tpa_attention<B>(ctx, &p, 1, tpa_test::forced_split(2));
    }
    EXPECT_EQ(o[0], o[1]);
    EXPECT_LE(pr.error(o[1]), 1.0);
  }
}

// Split-K: a batch-1 decode cut into 2, 3 and 7 key ranges (on 1 and 2 threads) equals the
// unsplit result within the f32 bound; a prefill cut along its queries likewise.
TYPED_TEST(TpaKernel, SplitEqualsUnsplit) {
  using B = TypeParam;
  for (const Shape& sh : {Shape{8, 64, 6, 2, 2}, Shape{5, 72, 0, 3, 2}, Shape{47, 40, 1, 1, 4}}) {
    for (Index n_q : {1, 40}) {
      const Problem<float> pr(sh, 515, n_q, 64, 5u);
      SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
      tpa_test::expect_splits_equal_unsplit(pr, [&](int t, int w) { return run<B>(pr, t, w); });
    }
  }
}

// Several sequences of different lengths in one call (a decode batch, plus a chunked-prefill
// call), split over 1-3 threads and over more workers than sequences. Each call's output is the
// same bits with any thread count and workers, and as when it runs alone.
TYPED_TEST(TpaKernel, BatchOfSequences) {
  using B = TypeParam;
  const Shape sh{6, 64, 4, 2, 3};
  std::vector<std::unique_ptr<Problem<float>>> prs;
  const Index lengths[] = {1, 40, 333, 97, 150};
  const Index n_qs[] = {1, 1, 1, 1, 30};
  for (Index i = 0; i < 5; ++i)
    prs.push_back(std::make_unique<Problem<float>>(sh, lengths[i], n_qs[i], 16,
                                                   100u + static_cast<unsigned>(i)));
  std::vector<std::vector<float>> alone;
  for (auto& pr : prs) alone.push_back(run<B>(*pr, 1, 1));
  for (int threads : {1, 2, 3}) {
    for (int workers : {1, 2, 5, 9}) {
      std::vector<std::vector<float>> outs;
      std::vector<TpaAttentionParams<float>> calls;
      for (auto& pr : prs) outs.emplace_back(pr->o_ref.size());
      for (std::size_t i = 0; i < prs.size(); ++i) calls.push_back(prs[i]->params(outs[i].data()));
      Context ctx(threads);
      tpa_attention<B>(ctx, calls.data(), static_cast<Index>(calls.size()),
                       tpa_test::forced_split(workers));
      for (std::size_t i = 0; i < prs.size(); ++i) {
        EXPECT_LE(prs[i]->error(outs[i]), 1.0) << "sequence " << i << ", " << workers << " workers";
        EXPECT_TRUE(outs[i] == alone[i])
            << "sequence " << i << ", " << workers << " workers, " << threads << " threads";
      }
    }
  }
}

// 16-bit storage: the kernels widen the factors to f32 as they read; the Reference reads the
// same stored values, so the f32 bound applies unchanged.
template <class B, class S>
void check_storage() {
  for (const Shape& sh : {Shape{32, 128, 6, 2, 2}, Shape{5, 72, 3, 4, 1}, Shape{47, 40, 0, 2, 5}}) {
    for (Index n_q : {1, 6}) {
      const Problem<S> pr(sh, 77, n_q, 16, 3u);
      SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
      EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0);
      std::vector<float> o(pr.o_ref.size());
      Kernels<B>::tpa_attention(pr.params(o.data()));
      EXPECT_LE(pr.error(o), 1.0) << "single-call entry";
    }
  }
}
TYPED_TEST(TpaKernel, Bfloat16Storage) { check_storage<TypeParam, bfloat16>(); }
TYPED_TEST(TpaKernel, HalfStorage) { check_storage<TypeParam, half>(); }

// int8 storage: the Reference reads the same dequantized values; the bound adds the int16
// weights' rounding (see tolerance()). Shapes for pv_q8 (head dims that are multiples of 32, an
// odd number of weight rows with R_V 1, heads not a multiple of its 4-row blocks) and for the
// f32 value product it leaves to d = 72 and 40; decode, prefill, a 4100-key decode.
TYPED_TEST(TpaKernel, Int8Storage) {
  using B = TypeParam;
  for (const Shape& sh : {Shape{32, 128, 6, 2, 2}, Shape{5, 96, 3, 4, 1}, Shape{47, 64, 0, 2, 3},
                          Shape{6, 32, 2, 1, 5}, Shape{5, 72, 3, 4, 1}, Shape{47, 40, 0, 2, 5}}) {
    for (Index n_q : {1, 6}) {
      const Problem<q8> pr(sh, 77, n_q, 16, 3u);
      SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
      EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0);
      std::vector<float> o(pr.o_ref.size());
      Kernels<B>::tpa_attention(pr.params(o.data()));
      EXPECT_LE(pr.error(o), 1.0) << "single-call entry";
    }
  }
  for (const Shape& sh : {Shape{32, 128, 6, 2, 2}, Shape{29, 64, 0, 2, 2}}) {
    const Problem<q8> pr(sh, 4100, 1, 64, 17u);
    SCOPED_TRACE(sh.name());
    EXPECT_LE(pr.error(run<B>(pr, 1, 1)), 1.0);
    EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0);
  }
}

// Large score ranges: far-below-max and masked keys must weigh exactly 0 (no NaN from
// −inf − −inf, no denormals), and a dominant key must win.
TYPED_TEST(TpaKernel, ExtremeScores) {
  using B = TypeParam;
  for (const Shape& sh : {Shape{8, 16, 2, 2, 2}, Shape{8, 16, 0, 2, 2}}) {
    for (Index n_q : {1, 9}) {
      Problem<float> pr(sh, 70, n_q, 16, 9u);
      for (auto& x : pr.b_q) x *= 40.f;  // scores of ±hundreds: most weights underflow to 0
      for (auto& x : pr.q) x *= 60.f;
      pr.reference();
      SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
      EXPECT_LE(pr.error(run<B>(pr, 2, 3)), 1.0);
    }
  }
}

// An empty call (n_q = 0) next to a real one does nothing and costs nothing.
TYPED_TEST(TpaKernel, EmptyCalls) {
  using B = TypeParam;
  const Problem<float> pr({4, 32, 2, 2, 2}, 50, 1, 16, 4u);
  std::vector<float> o(pr.o_ref.size());
  TpaAttentionParams<float> calls[2] = {pr.params(nullptr), pr.params(o.data())};
  calls[0].n_q = 0;
  Context ctx(2);
  tpa_attention<B>(ctx, calls, 2);
  EXPECT_LE(pr.error(o), 1.0);
  tpa_attention<B>(ctx, calls, 1);  // only the empty call
}

TEST(TpaKernel, RejectsInconsistentCalls) {
  const Problem<float> pr({4, 8, 2, 2, 2}, 10, 1, 4, 1u);
  std::vector<float> o(pr.o_ref.size(), 0.f);
  Context ctx(2);
  auto p = pr.params(o.data());
  p.k_rank = 3;  // the cached B_K rows do not match
  EXPECT_THROW(tpa_attention<Native>(ctx, &p, 1), Error);
  EXPECT_THROW(Kernels<Native>::tpa_attention(p), Error);
  p = pr.params(o.data());
  p.q_pos0 = 10;  // the query's own token is not cached
  EXPECT_THROW(tpa_attention<Native>(ctx, &p, 1), Error);
  p = pr.params(o.data());
  p.b_q = nullptr;
  EXPECT_THROW(tpa_attention<Native>(ctx, &p, 1), Error);
  EXPECT_TRUE(std::all_of(o.begin(), o.end(), [](float x) { return x == 0.f; }));
}

TEST(TpaKernel, CompiledBackends) { tpa_test::check_compiled_backends(); }

}  // namespace tpa_kernels_test
}  // namespace tpa
