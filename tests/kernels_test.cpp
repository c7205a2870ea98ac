// Kernel tests: the online-softmax state and its merge, and the grouped attention kernel of every
// compiled backend (and the threaded work split over it) against the Reference backend.
//
// Tolerance of the grouped kernel, per output element (all backends compute in f32; Reference
// in double on the same stored, widened values, so storage rounding cancels out). With
// u = 2⁻²⁴ and the probabilistic rounding-error bound of Higham & Mary (SIAM J. Sci. Comput.
// 41(5), 2019) — an n-term f32 sum is off by ≤ λ·√n·u·Σ|terms| with probability
// ≥ 1 − 2n·e^(−λ²/2); λ = 8, so < 1e-12 per sum:
//   - score s_t is a D-term dot product (D = d_qk) plus the rounding of q·scale:
//     |δs_t| ≤ λ·√(D + 1)·u·σ_t, σ_t = scale·Σ_j |q_j k_tj|; e^(s − m) adds ≤ 2 ulp, so
//     ε = max_t |δs_t| + 4u bounds every weight's relative error;
//   - to first order o_j = Σ_t p_t v_tj moves by Σ_t p_t·ε_t·(v_tj − o_j), so by
//     ≤ ε·Σ_t p_t |v_tj − o_j| (p the exact softmax weights);
//   - the weighted sums over N keys (acc and l, with the per-tile rescales) add
//     ≤ 2λ·√N·u·Σ_t p_t |v_tj|;  the final division adds u·|o_j|.
// tol_j is the sum of the three, computed in double from the data; a test passes when
// max_j |o_j − o_ref,j| / tol_j ≤ 1. Observed ratios are ≤ 0.02. Split-K versus unsplit is
// held to the same tolerance: both are f32 evaluations of the same quantity, and the
// log-sum-exp merge adds O(u) relative per merge.

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
#include "tpa/dispatch/grouped_decode.hpp"
#include "tpa/kernels/softmax.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {
namespace kernels_test {

using tpa_test::BackendName;
using tpa_test::Backends;
using tpa_test::kU;

// ---- SoftmaxState ------------------------------------------------------------------------------

// Exact softmax(s)·V and log Σ e^s in double.
void exact(const std::vector<float>& s, const std::vector<float>& v, Index dim,
           std::vector<double>& out, double& lse) {
  double m = -std::numeric_limits<double>::infinity();
  for (float x : s) m = std::max(m, static_cast<double>(x));
  double l = 0;
  out.assign(static_cast<std::size_t>(dim), 0.0);
  for (std::size_t t = 0; t < s.size(); ++t) {
    const double w = std::exp(static_cast<double>(s[t]) - m);
    l += w;
    for (Index j = 0; j < dim; ++j) out[static_cast<std::size_t>(j)] += w * v[t * dim + j];
  }
  for (auto& x : out) x /= l;
  lse = m + std::log(l);
}

TEST(SoftmaxState, AddMatchesExactSoftmax) {
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.f, 3.f);
  const Index dim = 7, n = 50;
  std::vector<float> s(n), v(n * dim);
  for (auto& x : s) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  std::vector<float> acc(dim), out(dim);
  SoftmaxState st(acc.data(), dim);
  EXPECT_TRUE(st.empty());
  EXPECT_EQ(st.lse(), -std::numeric_limits<float>::infinity());
  for (Index t = 0; t < n; ++t) st.add(s[t], v.data() + t * dim);
  st.normalize(out.data());
  std::vector<double> ref;
  double lse;
  exact(s, v, dim, ref, lse);
  // n sequential f32 updates: relative error ≤ ~2n·u of max|v| (≤ 9 here).
  for (Index j = 0; j < dim; ++j) EXPECT_NEAR(out[j], ref[j], 2 * n * kU * 9) << j;
  EXPECT_NEAR(st.lse(), lse, 2 * n * kU * std::abs(lse) + 1e-6);
}

TEST(SoftmaxState, MergeOfSplitsEqualsWhole) {
  std::mt19937 rng(2);
  std::normal_distribution<float> nd(0.f, 4.f);
  const Index dim = 5, n = 64;
  std::vector<float> s(n), v(n * dim);
  for (auto& x : s) x = nd(rng);
  for (auto& x : v) x = nd(rng);
  s[40] = 30.f;  // one dominant key in the last piece: the merge must rescale the first pieces
  std::vector<double> ref;
  double lse;
  exact(s, v, dim, ref, lse);
  for (Index pieces : {1, 2, 3, 7}) {
    std::vector<std::vector<float>> accs(static_cast<std::size_t>(pieces), std::vector<float>(dim));
    std::vector<SoftmaxState> st;
    for (Index p = 0; p < pieces; ++p) {
      st.emplace_back(accs[static_cast<std::size_t>(p)].data(), dim);
      for (Index t = p * n / pieces; t < (p + 1) * n / pieces; ++t)
        st.back().add(s[t], v.data() + t * dim);
    }
    for (Index p = 1; p < pieces; ++p) st[0].merge(st[static_cast<std::size_t>(p)]);
    std::vector<float> out(dim);
    st[0].normalize(out.data());
    for (Index j = 0; j < dim; ++j) EXPECT_NEAR(out[j], ref[j], 4 * n * kU * 12) << pieces;
    EXPECT_NEAR(st[0].lse(), lse, 4 * n * kU * std::abs(lse)) << pieces;
  }
}

TEST(SoftmaxState, MergeWithEmptyAndMaskedKeys) {
  const Index dim = 3;
  std::vector<float> a(dim), b(dim), out(dim);
  const float v[3] = {1.f, -2.f, 4.f};
  SoftmaxState sa(a.data(), dim), sb(b.data(), dim);
  sb.add(-std::numeric_limits<float>::infinity(), v);  // masked: no effect
  EXPECT_TRUE(sb.empty());
  sa.merge(sb);  // empty into empty
  EXPECT_TRUE(sa.empty());
  sb.add(0.5f, v);
  sa.merge(sb);  // non-empty into empty: a copy
  EXPECT_EQ(sa.m, 0.5f);
  EXPECT_EQ(sa.l, 1.f);
  SoftmaxState sc(out.data(), dim);
  sa.merge(sc);  // empty into non-empty: unchanged
  sa.normalize(out.data());
  for (Index j = 0; j < dim; ++j) EXPECT_EQ(out[j], v[j]);
  EXPECT_FLOAT_EQ(sa.lse(), 0.5f);
}

// ---- vector primitives of each backend ---------------------------------------------------------

template <class B>
struct OpsOf;
template <>
struct OpsOf<Portable> {
  using type = detail::EigenOps;
};
#if defined(TPA_HAVE_AVX2)
template <>
struct OpsOf<Avx2> {
  using type = detail::Avx2Ops;
};
#endif
#if defined(TPA_HAVE_AVX512)
template <>
struct OpsOf<Avx512> {
  using type = detail::Avx512Ops;
};
#endif

template <class B>
class BackendOps : public ::testing::Test {};
TYPED_TEST_SUITE(BackendOps, Backends, BackendName);

// exp on its contract: ≤ 2 ulp against the double exp on [−87.3, 0] (the softmax's domain),
// exactly 0 below −87.3 and for −inf (no denormal weights), NaN kept.
TYPED_TEST(BackendOps, ExpAccuracy) {
  using Ops = typename OpsOf<TypeParam>::type;
  constexpr Index W = Ops::kWidth;
  alignas(64) float x[W], y[W];
  double worst_ulp = 0;
  for (int k = 0; k <= 200000; ++k) {
    const float v = -87.29f * static_cast<float>(k) / 200000.f;
    for (Index i = 0; i < W; ++i) x[i] = v * (1.f - 1e-7f * static_cast<float>(i));
    Ops::store(y, Ops::exp(Ops::load(x)));
    for (Index i = 0; i < W; ++i) {
      const double e = std::exp(static_cast<double>(x[i]));
      const double ulp = std::ldexp(1.0, std::ilogb(e) - 23);
      worst_ulp = std::max(worst_ulp, std::abs(y[i] - e) / ulp);
    }
  }
  EXPECT_LE(worst_ulp, 2.0);
  const float special[] = {-87.31f,
                           -88.f,
                           -100.f,
                           -1e30f,
                           -std::numeric_limits<float>::infinity(),
                           std::numeric_limits<float>::quiet_NaN(),
                           0.f};
  for (float v : special) {
    for (Index i = 0; i < W; ++i) x[i] = v;
    Ops::store(y, Ops::exp(Ops::load(x)));
    for (Index i = 0; i < W; ++i) {
      if (v != v)
        EXPECT_TRUE(y[i] != y[i]) << "NaN in, NaN out";
      else if (v == 0.f)
        EXPECT_EQ(y[i], 1.f);
      else
        EXPECT_EQ(y[i], 0.f) << v;
    }
  }
}

// A storage element holding v (an integer in [−127, 127] for tpa::q8, whose integers the Ops
// widen without any scale), and an element as the Ops widen it.
template <class S>
S stored(float v) {
  if constexpr (tpa::is_quantized_v<S>) {
    return S{static_cast<std::int8_t>(v)};
  } else {
    return S(v);
  }
}
template <class S>
float widened(S x) {
  return tpa::detail::widen_raw(x);
}

// transpose_block and load_widen for every partial shape and storage scalar.
template <class Ops, class S>
void check_transpose() {
  constexpr Index W = Ops::kWidth;
  const Index ld = W + 3;
  std::vector<S> src(static_cast<std::size_t>((W + 1) * ld));
  for (std::size_t k = 0; k < src.size(); ++k) src[k] = stored<S>(static_cast<float>(k % 97) - 40.f);
  alignas(64) float dst[W * W];
  for (Index rows = 0; rows <= W; ++rows) {
    for (Index cols = 1; cols <= W; ++cols) {
      std::fill(dst, dst + W * W, -1.f);
      Ops::template transpose_block<S>(src.data(), ld, rows, cols, dst, W);
      for (Index c = 0; c < W; ++c)
        for (Index r = 0; r < W; ++r) {
          const float want = c >= cols  ? -1.f
                             : r < rows ? widened(src[r * ld + c])
                                        : 0.f;
          ASSERT_EQ(dst[c * W + r], want) << rows << "x" << cols << " at " << r << "," << c;
        }
      alignas(64) float row[W];
      Ops::store(row, Ops::template load_widen<S>(src.data() + ld, cols));
      for (Index c = 0; c < W; ++c)
        ASSERT_EQ(row[c], c < cols ? widened(src[ld + c]) : 0.f) << cols;
    }
  }
}
TYPED_TEST(BackendOps, TransposeAndWiden) {
  using Ops = typename OpsOf<TypeParam>::type;
  check_transpose<Ops, float>();
  check_transpose<Ops, bfloat16>();
  check_transpose<Ops, half>();
  check_transpose<Ops, tpa::q8>();
}

// chunk_transpose (the several-row score kernels' epilogue) for every RB dividing the width:
// chunk b of v[r] comes out as chunk r of v[b] was (shuffles on Avx512, memory otherwise).
template <class Ops, int RB>
void check_chunk_transpose() {
  constexpr Index W = Ops::kWidth;
  if constexpr (RB <= W && W % RB == 0) {
    constexpr Index TB = W / RB;
    typename Ops::V v[RB];
    alignas(64) float x[W];
    for (int b = 0; b < RB; ++b) {
      for (Index i = 0; i < W; ++i) x[i] = static_cast<float>(100 * b + i);
      v[b] = Ops::load(x);
    }
    tpa::detail::chunk_transpose<Ops, RB>(v);
    for (int r = 0; r < RB; ++r) {
      Ops::store(x, v[r]);
      for (Index b = 0; b < RB; ++b)
        for (Index t = 0; t < TB; ++t)
          ASSERT_EQ(x[b * TB + t], static_cast<float>(100 * b + r * TB + t))
              << "RB " << RB << ", vector " << r << ", chunk " << b << ", lane " << t;
    }
  }
}
TYPED_TEST(BackendOps, ChunkTranspose) {
  using Ops = typename OpsOf<TypeParam>::type;
  check_chunk_transpose<Ops, 1>();
  check_chunk_transpose<Ops, 2>();
  check_chunk_transpose<Ops, 4>();
  check_chunk_transpose<Ops, 8>();
  check_chunk_transpose<Ops, 16>();
}

// load_strided for strides 1 … 5 and every lane count: the last element read ends an exact-size
// heap allocation, so a read past it is an AddressSanitizer error.
template <class Ops, class S>
void check_strided() {
  constexpr Index W = Ops::kWidth;
  for (Index stride = 1; stride <= 5; ++stride)
    for (Index n = 1; n <= W; ++n)
      for (Index first = 0; first < stride; ++first) {  // start inside an interleaved row
        const Index size = first + (n - 1) * stride + 1;
        std::vector<S> src(static_cast<std::size_t>(size));
        for (Index k = 0; k < size; ++k) src[k] = stored<S>(static_cast<float>(k % 53) - 20.f);
        alignas(64) float out[W];
        Ops::store(out, Ops::template load_strided<S>(src.data() + first, stride, n));
        for (Index i = 0; i < W; ++i)
          ASSERT_EQ(out[i], i < n ? widened(src[first + i * stride]) : 0.f)
              << "stride " << stride << ", n " << n << ", lane " << i;
      }
}
TYPED_TEST(BackendOps, LoadStrided) {
  using Ops = typename OpsOf<TypeParam>::type;
  check_strided<Ops, float>();
  check_strided<Ops, bfloat16>();
  check_strided<Ops, half>();
  check_strided<Ops, tpa::q8>();
}

// ---- grouped attention ------------------------------------------------------------------------

// One attention shape. Two-part keys: k_dims[1] > 0; `v_in_key`: the value is the first key
// part (MLA's absorbed form: G = 1, d_v ≤ k_dims[0]).
struct Shape {
  Index n_heads, n_kv_heads, d_k0, d_k1, d_v;
  bool v_in_key;
  std::string name() const {
    return "H" + std::to_string(n_heads) + "_G" + std::to_string(n_kv_heads) + "_k" +
           std::to_string(d_k0) + "+" + std::to_string(d_k1) + "_v" + std::to_string(d_v) +
           (v_in_key ? "_mla" : "");
  }
};

// A sequence of n_tokens cached tokens of one shape (appended in uneven chunks, so blocks fill
// across calls and the last one is partial), and n_q queries at the end of it. K and V are
// placed in `order` (token-major, as GroupedQueryAttention's cache_layout(), by default).
template <class S>
struct Problem {
  Shape shape;
  std::unique_ptr<KVCache<S>> cache;
  SeqId seq = 0;
  Index n_q = 0, n_tokens = 0;
  float scale = 0;
  std::vector<float> q;
  std::vector<float> o_ref;  // Reference output
  std::vector<double> tol;   // per-element tolerance (see the top of the file)

  Problem(const Shape& sh, Index n_tokens_, Index n_q_, Index block_tokens, unsigned seed,
          TileOrder order = TileOrder::kTokenMajor)
      : shape(sh), n_q(n_q_), n_tokens(n_tokens_) {
    const Index G = sh.n_kv_heads;
    std::vector<FactorSpec> f = {{"K0", G, sh.d_k0, true, order}};
    if (sh.d_k1 > 0) f.push_back({"K1", G, sh.d_k1, true, order});
    if (!sh.v_in_key) f.push_back({"V", G, sh.d_v, false, order});
    CacheLayout layout("test", f);
    cache = std::make_unique<KVCache<S>>(std::vector<CacheLayout>{layout}, block_tokens,
                                         n_tokens / block_tokens + 2);
    seq = cache->add_sequence();
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd;
    tpa_test::append_random_tokens(*cache, seq, f, n_tokens, [&] { return nd(rng); });
    const Index d_qk = sh.d_k0 + sh.d_k1;
    q.resize(static_cast<std::size_t>(n_q * sh.n_heads * d_qk));
    for (auto& x : q) x = nd(rng);
    scale = 1.f / std::sqrt(static_cast<float>(d_qk));
    o_ref.assign(static_cast<std::size_t>(n_q * sh.n_heads * sh.d_v), 0.f);
    Kernels<Reference>::grouped_attention(params(o_ref.data()));
    if constexpr (!is_quantized_v<S>) tol = tolerance();  // int8: see check_paired_values
  }

  GroupedAttentionParams<S> params(float* o) const {
    GroupedAttentionParams<S> p;
    const Index d_qk = shape.d_k0 + shape.d_k1;
    p.q = q.data();
    p.q_stride = shape.n_heads * d_qk;
    p.o = o;
    p.o_stride = shape.n_heads * shape.d_v;
    p.n_q = n_q;
    p.q_pos0 = n_tokens - n_q;
    p.n_heads = shape.n_heads;
    p.n_kv_heads = shape.n_kv_heads;
    p.k_factor[0] = 0;
    p.k_dims[0] = shape.d_k0;
    p.k_factor[1] = 1;
    p.k_dims[1] = shape.d_k1;
    p.v_factor = shape.v_in_key ? 0 : (shape.d_k1 > 0 ? 2 : 1);
    p.d_v = shape.d_v;
    p.scale = scale;
    p.kv = cache->view(seq, 0);
    return p;
  }

  // Per-element tolerance of the output (see the top of the file).
  std::vector<double> tolerance() const {
    const auto p = params(nullptr);
    const Index d_qk = p.d_qk(), gs = p.group_size();
    const double lambda = 8;
    std::vector<double> tol(o_ref.size());
    std::vector<double> w;
    for (Index i = 0; i < n_q; ++i) {
      const Index n_keys = p.q_pos0 + i + 1;
      for (Index h = 0; h < p.n_heads; ++h) {
        const Index g = h / gs;
        const float* qh = q.data() + (i * p.n_heads + h) * d_qk;
        w.assign(static_cast<std::size_t>(n_keys), 0.0);
        double m = -std::numeric_limits<double>::infinity(), eps = 0;
        for (Index t = 0; t < n_keys; ++t) {
          double dot = 0, sigma = 0;
          Index j = 0;
          for (int part = 0; part < 2; ++part)
            for (Index e = 0; e < p.k_dims[part]; ++e, ++j) {
              const double x =
                  static_cast<double>(qh[j]) *
                  static_cast<float>(p.kv.row_at(p.k_factor[part], t, g)[e]);
              dot += x;
              sigma += std::abs(x);
            }
          w[static_cast<std::size_t>(t)] = dot * scale;
          m = std::max(m, dot * scale);
          eps = std::max(eps, lambda * std::sqrt(d_qk + 1.0) * kU * sigma * scale);
        }
        eps += 4 * kU;
        double l = 0;
        for (auto& x : w) l += (x = std::exp(x - m));
        for (Index j = 0; j < p.d_v; ++j) {
          double o = 0, dev = 0, mag = 0;
          auto v = [&](Index t) {
            return static_cast<double>(
                static_cast<float>(p.kv.row_at(p.v_factor, t, g)[j]));
          };
          for (Index t = 0; t < n_keys; ++t) o += w[static_cast<std::size_t>(t)] / l * v(t);
          for (Index t = 0; t < n_keys; ++t) {
            dev += w[static_cast<std::size_t>(t)] / l * std::abs(v(t) - o);
            mag += w[static_cast<std::size_t>(t)] / l * std::abs(v(t));
          }
          tol[static_cast<std::size_t>((i * p.n_heads + h) * p.d_v + j)] =
              eps * dev + 2 * lambda * std::sqrt(static_cast<double>(n_keys)) * kU * mag +
              kU * std::abs(o);
        }
      }
    }
    return tol;
  }

  // max_k |o_k − o_ref,k| / tol_k: ≤ 1 passes (∞ on NaN).
  double error(const std::vector<float>& o) const { return tpa_test::tol_ratio(o, o_ref, tol); }
};

template <class B, class S>
std::vector<float> run(const Problem<S>& pr, int threads, int workers) {
  std::vector<float> o(pr.o_ref.size(), std::numeric_limits<float>::quiet_NaN());
  Context ctx(threads);
  const auto p = pr.params(o.data());
  grouped_attention<B>(ctx, &p, 1, tpa_test::forced_split(workers));
  return o;
}

template <class B>
class GroupedKernel : public ::testing::Test {};
TYPED_TEST_SUITE(GroupedKernel, Backends, BackendName);

// Head dims 40/64/72/128/192 × G = H, H/4, 1; decode and prefill (q_pos0 > 0); 203 or 117
// tokens in blocks of 24 (not multiples of any tile or block size); one thread and two.
TYPED_TEST(GroupedKernel, HeadDimsAndGroupsFloat) {
  using B = TypeParam;
  for (Index d : {40, 64, 72, 128, 192}) {
    for (Index G : {8, 2, 1}) {
      const Shape sh{8, G, d, 0, d, false};
      for (Index n_q : {1, 3, 13}) {  // 3: few rows per KV head: causal masks on token lanes
        const Problem<float> pr(sh, n_q == 1 ? 203 : 117, n_q, 24,
                                7u * static_cast<unsigned>(d + G));
        SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
        std::vector<float> o(pr.o_ref.size());
        Kernels<B>::grouped_attention(pr.params(o.data()));
        EXPECT_LE(pr.error(o), 1.0) << "single-call entry";
        EXPECT_LE(pr.error(run<B>(pr, 1, 1)), 1.0) << "1 thread";
        EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0) << "2 threads";
      }
    }
  }
}

// A prefill longer than one pass (64 rows): passes of 64 queries, the last one with few rows
// (token lanes), over several blocks, with q_pos0 > 0.
TYPED_TEST(GroupedKernel, LongPrefillPasses) {
  using B = TypeParam;
  for (Index G : {4, 1}) {
    const Shape sh{4, G, 40, 0, 40, false};
    const Problem<float> pr(sh, 260, 197, 32, 21u);
    SCOPED_TRACE(sh.name());
    EXPECT_LE(pr.error(run<B>(pr, 1, 1)), 1.0) << "1 thread";
    EXPECT_LE(pr.error(run<B>(pr, 2, 3)), 1.0) << "2 threads, 3 pieces";
  }
}

// Two-part keys: MLA's absorbed decode (512 + 64, value = the 512-part) and small ones, with the
// value inside the key or in its own factor; decode and prefill. Decode with ≥ 8 query heads
// per KV head and d_v ≥ 256 accumulates transposed (rows in lanes): 12 heads (padding lanes),
// 20 heads (a partial second row vector), two KV heads in one pass, d_v 264 and 300 (partial
// value blocks and vectors); with 40 heads a prefill pass holds one query, and accumulates
// transposed too.
TYPED_TEST(GroupedKernel, TwoPartKeys) {
  using B = TypeParam;
  const Shape shapes[] = {{4, 1, 512, 64, 512, true},   {6, 1, 24, 8, 24, true},
                          {6, 1, 40, 8, 16, true},      {4, 2, 24, 8, 20, false},
                          {12, 1, 256, 32, 256, true},  {20, 1, 264, 8, 264, true},
                          {16, 2, 300, 0, 300, false},  {40, 1, 256, 0, 256, false}};
  for (const Shape& sh : shapes) {
    for (Index n_q : {1, 9}) {
      const Problem<float> pr(sh, 150, n_q, 32, 11u + static_cast<unsigned>(sh.d_k0));
      SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
      EXPECT_LE(pr.error(run<B>(pr, 1, 1)), 1.0) << "1 thread";
      EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0) << "2 threads";
    }
  }
}

// Split-K: a batch-1 MQA/MLA decode cut into 2, 3 and 7 key ranges (on 1 and 2 threads) equals
// the unsplit result within the f32 bound, and so does a GQA decode whose KV heads are cut.
TYPED_TEST(GroupedKernel, SplitKEqualsUnsplit) {
  using B = TypeParam;
  const Shape shapes[] = {
      {8, 1, 64, 0, 64, false}, {4, 1, 128, 32, 128, true}, {8, 2, 72, 0, 72, false},
      {16, 1, 256, 32, 256, true}};  // the last one accumulates transposed
  for (const Shape& sh : shapes) {
    const Problem<float> pr(sh, 515, 1, 64, 5u);
    SCOPED_TRACE(sh.name());
    tpa_test::expect_splits_equal_unsplit(pr, [&](int t, int w) { return run<B>(pr, t, w); });
  }
}

// Several sequences of different lengths in one call (a decode batch, plus a prefill call),
// split over 1-3 threads and over more workers than sequences × KV heads. Each call's output is
// the same bits with any thread count and workers, and as when it runs alone (key pieces
// depend on the call alone; prefill is cut on pass boundaries).
TYPED_TEST(GroupedKernel, BatchOfSequences) {
  using B = TypeParam;
  for (const Shape& sh : {Shape{8, 2, 64, 0, 64, false}, Shape{8, 8, 40, 0, 40, false},
                          Shape{8, 1, 64, 0, 64, false}}) {
    SCOPED_TRACE(sh.name());
    std::vector<std::unique_ptr<Problem<float>>> prs;
    const Index lengths[] = {1, 40, 333, 97, 230};
    const Index n_qs[] = {1, 1, 1, 1, 150};
    for (Index i = 0; i < 5; ++i)
      prs.push_back(std::make_unique<Problem<float>>(sh, lengths[i], n_qs[i], 16,
                                                     100u + static_cast<unsigned>(i)));
    std::vector<std::vector<float>> alone;
    for (auto& pr : prs) alone.push_back(run<B>(*pr, 1, 1));
    for (int threads : {1, 2, 3}) {
      for (int workers : {1, 2, 5}) {
        std::vector<std::vector<float>> outs;
        std::vector<GroupedAttentionParams<float>> calls;
        for (auto& pr : prs) outs.emplace_back(pr->o_ref.size());
        for (std::size_t i = 0; i < prs.size(); ++i)
          calls.push_back(prs[i]->params(outs[i].data()));
        Context ctx(threads);
        grouped_attention<B>(ctx, calls.data(), static_cast<Index>(calls.size()),
                             tpa_test::forced_split(workers));
        for (std::size_t i = 0; i < prs.size(); ++i) {
          EXPECT_LE(prs[i]->error(outs[i]), 1.0) << "sequence " << i << ", " << workers;
          EXPECT_TRUE(outs[i] == alone[i])
              << "sequence " << i << ", " << workers << " workers, " << threads << " threads";
        }
      }
    }
  }
}

// 16-bit storage: the kernels widen K and V to f32 as they read; the Reference reads the same
// stored values, so the f32 bound applies unchanged (bf16 row lanes with AVX512-BF16 score
// against q held to about 16 bits, 2^-17 relative, well inside it).
template <class B, class S>
void check_storage() {
  const Shape shapes[] = {{8, 2, 72, 0, 72, false},
                          {8, 8, 40, 0, 40, false},
                          {8, 1, 64, 0, 64, false},
                          {4, 1, 40, 8, 40, true},
                          {8, 1, 264, 8, 264, true},   // transposed accumulators in decode
                          {32, 1, 128, 0, 128, false},  // MQA: row lanes (bf16: pair products)
                          {18, 2, 41, 0, 41, false}};   // row lanes, odd key size
  for (const Shape& sh : shapes) {
    for (Index n_q : {1, 6}) {
      const Problem<S> pr(sh, 77, n_q, 16, 3u);
      SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
      EXPECT_LE(pr.error(run<B>(pr, 2, 2)), 1.0);
    }
  }
}
// Token-lane decode with 1 (MHA) and 2 … 8 rows per KV head (GQA; 9 is Avx512's first row-lane
// case): K read in place by the one-row and several-row score micro-kernels (groups of 2, 4 or
// 8 rows, padded rows repeating the last one; bf16 on Avx512 by its even/odd split over 32-dim
// blocks), 16-bit V widened in registers by the value micro-kernel (7–8 rows: Avx512's wide
// 8-row block); key sizes with a tail past the 32-dim blocks (40) and whole blocks (64, 128),
// f32 and 16-bit storage, short last tiles (77 tokens in blocks of 16),
// within the f32 bound and bit-identical for one and two threads.
template <class B, class S>
void check_several_rows() {
  for (Index gs : {1, 2, 3, 4, 5, 6, 7, 8, 9})
    for (Index d : {40, 64, 128}) {
      const Shape sh{2 * gs, 2, d, 0, d, false};
      for (Index n_q : {1, 2}) {
        const Problem<S> pr(sh, 77, n_q, 16, 29u + static_cast<unsigned>(gs));
        SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q));
        const std::vector<float> one = run<B>(pr, 1, 1);
        EXPECT_LE(pr.error(one), 1.0);
        EXPECT_TRUE(one == run<B>(pr, 2, 2));
      }
    }
}
TYPED_TEST(GroupedKernel, SeveralRowsPerKvHead) {
  check_several_rows<TypeParam, float>();
  check_several_rows<TypeParam, bfloat16>();
  check_several_rows<TypeParam, half>();
}

// Token-lane decode and short prefill (rows per KV head ≤ 8) with 1 … 8 rows per KV head and
// bf16 or int8 V read in place: Avx512's paired value micro-kernel (pv_pair; int8 with VNNI)
// for d_v 64 and 128 (2 and 4 blocks of 32 dims), the unpaired one for d_v 40; blocks of 24
// tokens (every tile short, odd lengths) and 64 (whole tiles, an 11-token last one); one key
// piece and three (split-K states merged), each on 1 and 2 threads bit-identical. bf16 within
// the f32 bound; int8 within 1e-4 of max|y| of Reference on the same cache (as
// quant_cache_test: pv_pair rounds int8's probabilities to int16).
template <class B, class S>
void check_paired_values() {
  for (Index gs : {1, 2, 3, 4, 5, 6, 7, 8})
    for (Index d : {40, 64, 128})
      for (Index n_q : {1, 2})
        for (Index block : {24, 64}) {
          if (n_q * gs > 8 && n_q > 1) continue;  // prefill: only passes of ≤ kPvRowsMax rows
          const Shape sh{2 * gs, 2, d, 0, d, false};
          const Problem<S> pr(sh, 203, n_q, block, 41u + static_cast<unsigned>(gs * d + block));
          SCOPED_TRACE(sh.name() + " n_q " + std::to_string(n_q) + " block " +
                       std::to_string(block));
          for (int workers : {1, 3}) {
            const std::vector<float> one = run<B>(pr, 1, workers);
            if constexpr (is_quantized_v<S>)
              EXPECT_LE(tpa_test::rel_err(one, pr.o_ref, static_cast<Index>(one.size())), 1e-4)
                  << workers << " pieces";
            else
              EXPECT_LE(pr.error(one), 1.0) << workers << " pieces";
            EXPECT_TRUE(one == run<B>(pr, 2, workers)) << workers << " pieces, 2 threads";
          }
        }
}
TYPED_TEST(GroupedKernel, PairedValues) {
  check_paired_values<TypeParam, bfloat16>();
  check_paired_values<TypeParam, q8>();
}

TYPED_TEST(GroupedKernel, Bfloat16Storage) { check_storage<TypeParam, bfloat16>(); }
TYPED_TEST(GroupedKernel, HalfStorage) { check_storage<TypeParam, half>(); }

// Large score ranges: masked-out and far-below-max keys must weigh exactly 0 (no NaN from
// −inf − −inf, no denormals), and a dominant key must win exactly.
TYPED_TEST(GroupedKernel, ExtremeScores) {
  using B = TypeParam;
  const Shape sh{8, 1, 16, 0, 16, false};
  Problem<float> pr(sh, 70, 1, 16, 9u);
  for (auto& x : pr.q) x *= 60.f;  // scores of ±hundreds: most weights underflow to 0
  std::fill(pr.o_ref.begin(), pr.o_ref.end(), 0.f);
  Kernels<Reference>::grouped_attention(pr.params(pr.o_ref.data()));
  pr.tol = pr.tolerance();
  EXPECT_LE(pr.error(run<B>(pr, 2, 3)), 1.0);
}

// The placement of K and V inside a block (TileOrder) changes addresses, not arithmetic: the same
// tokens token-major and head-major give bit-identical outputs, for every backend, f32, 16-bit
// and int8 storage (int8 within 1e-4 of max|y| of Reference, as in check_paired_values), decode
// and prefill, one and two threads (split-K included), with blocks of 24 tokens (tiles cut at
// block ends) and of 64 (whole tiles).
template <class B, class S>
void check_orders_agree() {
  const Shape shapes[] = {{8, 8, 64, 0, 64, false},  // MHA: one row per KV head
                          {8, 2, 72, 0, 72, false},  // GQA: packed K tile
                          {16, 2, 40, 0, 40, false}, // GQA: 8 rows per KV head
                          {4, 2, 24, 8, 20, false},  // two-part keys, d_v < d_k
                          {8, 1, 64, 0, 64, false},  // MQA: both orders place alike
                          {16, 1, 64, 0, 64, false}}; // MQA decode in row lanes
  for (const Shape& sh : shapes)
    for (Index block : {24, 64})
      for (Index n_q : {1, 7}) {
        const Problem<S> tok(sh, 150, n_q, block, 17u, TileOrder::kTokenMajor);
        const Problem<S> head(sh, 150, n_q, block, 17u, TileOrder::kHeadMajor);
        SCOPED_TRACE(sh.name() + " block " + std::to_string(block) + " n_q " +
                     std::to_string(n_q));
        EXPECT_TRUE(tok.o_ref == head.o_ref) << "Reference";
        for (int threads : {1, 2}) {
          const std::vector<float> a = run<B>(tok, threads, threads);
          const std::vector<float> b = run<B>(head, threads, threads);
          EXPECT_TRUE(a == b) << threads << " threads";
          if constexpr (is_quantized_v<S>)
            EXPECT_LE(tpa_test::rel_err(b, head.o_ref, static_cast<Index>(b.size())), 1e-4)
                << threads << " threads";
          else
            EXPECT_LE(head.error(b), 1.0) << threads << " threads";
        }
      }
}
TYPED_TEST(GroupedKernel, TileOrdersGiveIdenticalOutputs) {
  check_orders_agree<TypeParam, float>();
  check_orders_agree<TypeParam, bfloat16>();
  check_orders_agree<TypeParam, q8>();
}

// Decode over a head-major cache equals prefill over it: each token's query as its own decode
// call (n_q 1, q_pos0 t) against all of them in one prefill call (n_q = n_tokens), both within
// the f32 bound of the Reference and of each other.
TYPED_TEST(GroupedKernel, HeadMajorDecodeStepsEqualPrefill) {
  using B = TypeParam;
  for (const Shape& sh : {Shape{8, 8, 64, 0, 64, false}, Shape{8, 2, 40, 0, 40, false},
                          Shape{8, 1, 72, 0, 72, false}}) {
    const Index T = 70;
    const Problem<float> pr(sh, T, T, 16, 23u, TileOrder::kHeadMajor);
    SCOPED_TRACE(sh.name());
    const std::vector<float> prefill = run<B>(pr, 2, 2);
    EXPECT_LE(pr.error(prefill), 1.0) << "prefill";
    std::vector<float> decode(pr.o_ref.size(), std::numeric_limits<float>::quiet_NaN());
    Context ctx(2);
    const Index q_row = sh.n_heads * (sh.d_k0 + sh.d_k1), o_row = sh.n_heads * sh.d_v;
    for (Index t = 0; t < T; ++t) {
      auto p = pr.params(decode.data() + t * o_row);
      p.q = pr.q.data() + t * q_row;
      p.n_q = 1;
      p.q_pos0 = t;
      grouped_attention<B>(ctx, &p, 1);
    }
    EXPECT_LE(pr.error(decode), 1.0) << "decode";
    EXPECT_LE(tpa_test::tol_ratio(decode, prefill, pr.tol), 1.0) << "decode vs prefill";
  }
}

TEST(GroupedKernel, RejectsInconsistentCalls) {
  const Problem<float> pr({4, 2, 8, 0, 8, false}, 10, 1, 4, 1u);
  std::vector<float> o(pr.o_ref.size());
  Context ctx(1);
  auto p = pr.params(o.data());
  p.n_kv_heads = 3;
  EXPECT_THROW(grouped_attention<Native>(ctx, &p, 1), Error);
  p = pr.params(o.data());
  p.q_pos0 = 10;  // the query's own token is not cached
  EXPECT_THROW(grouped_attention<Native>(ctx, &p, 1), Error);
  p = pr.params(o.data());
  p.k_dims[0] = 9;  // wider than the cached K rows
  EXPECT_THROW(grouped_attention<Native>(ctx, &p, 1), Error);
  p = pr.params(o.data());
  p.n_heads = 8;
  p.n_kv_heads = 4;  // the cached K and V have 2 rows (KV heads)
  EXPECT_THROW(grouped_attention<Native>(ctx, &p, 1), Error);
  EXPECT_TRUE(std::all_of(o.begin(), o.end(), [](float x) { return x == 0.f; }));
}

TEST(GroupedKernel, CompiledBackends) { tpa_test::check_compiled_backends(); }

}  // namespace kernels_test
}  // namespace tpa
