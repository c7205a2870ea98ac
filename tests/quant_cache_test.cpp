// Int8 KV caches (tpa::q8, issue 26) for every attention kind and every compiled backend.
//
//  - Quantization: a row round-trips within half a quantization step (max|x| / 254); a zero row
//    stores scale 0 and reads back exactly 0; a row with NaN or Inf reads back as NaN; the block
//    holds the scales beside the data, and bytes_per_token counts values and scales.
//  - Kernels: prefill (one sequence in two chunks) and batched decode steps with an int8 cache,
//    on each backend, equal the Reference backend on the same int8 cache (same stored integers
//    and scales; f32 against double arithmetic) within 1e-4 of max|y|, so a kernel that drops
//    or misapplies a scale cannot pass; and they stay within 3e-2 of max|y| of the same layer
//    with a float cache (the quantization error itself, printed; README "Quantized caches"
//    measures it at long context), and differ from it (the cache really quantizes).
//  - Decode == prefill: the tokens a sequence decodes one at a time give the outputs of one
//    prefill of the same tokens (each token is quantized on its own, so the cache holds the
//    same bytes either way).
//  - Non-finite inputs stay in their sequence; fork and truncate; a failing append changes
//    nothing (strong guarantee).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include <tpa/tpa.hpp>

#include "test_util.hpp"

namespace quant_cache_test {

using tpa::Index;
using tpa::KVCache;
using tpa::q8;
using tpa::SeqId;
using Tensor2 = tpa::Tensor<float, 2>;

constexpr Index kPrefillA = 37;  // sequence A: one prefill call (3 blocks of 16, the last partial)
constexpr Index kPrefillB1 = 11, kPrefillB2 = 9;  // sequence B: chunked prefill
constexpr Index kSteps = 4;                       // batched decode steps of A and B
constexpr Index kBlock = 16;

// ---- the quantized storage itself ---------------------------------------------------------------

TEST(QuantCache, RoundTripZeroAndNonfiniteRows) {
  // One factor of 3 rows of 40 (a scale per row), one of [4, 2] (a scale per token).
  const tpa::CacheLayout layout("T", {{"K", 3, 40, false, tpa::TileOrder::kHeadMajor},
                                      {"A", 4, 2, false, tpa::TileOrder::kTokenMajor}});
  KVCache<q8> cache({layout}, 8, 4);
  EXPECT_EQ(cache.scales_per_token(0), 3 + 1);
  EXPECT_EQ(cache.bytes_per_token(), static_cast<std::size_t>(3 * 40 + 8 + 4 * (3 + 1)));
  EXPECT_EQ(cache.bytes_per_token(0), cache.bytes_per_token());
  const SeqId s = cache.add_sequence();
  const Index n = 11;  // two blocks, the second partial
  Tensor2 k = tpa_test::random_tensor(n, 3 * 40, 5), a = tpa_test::random_tensor(n, 8, 6);
  for (Index j = 0; j < 40; ++j) k(2, 40 + j) = 0.f;  // token 2, row 1: zero
  for (Index j = 0; j < 8; ++j) a(3, j) = 0.f;         // token 3: zero A
  for (Index j = 0; j < 40; ++j) k(4, j) *= 1e-30f;    // token 4, row 0: tiny values
  k(5, 2 * 40 + 7) = std::numeric_limits<float>::quiet_NaN();  // token 5, row 2
  a(6, 3) = std::numeric_limits<float>::infinity();             // token 6: A
  const tpa::FactorRows rows[2] = {{k.data(), 3 * 40}, {a.data(), 8}};
  cache.append(s, 0, n, rows);
  const auto v = cache.view(s, 0);
  for (Index t = 0; t < n; ++t) {
    for (Index r = 0; r < 3; ++r) {
      float amax = 0;
      for (Index j = 0; j < 40; ++j) amax = std::max(amax, std::abs(k(t, r * 40 + j)));
      for (Index j = 0; j < 40; ++j) {
        const float x = k(t, r * 40 + j), y = v.value(0, t, r, j);
        if (t == 5 && r == 2) {
          EXPECT_TRUE(std::isnan(y));
        } else {
          EXPECT_LE(std::abs(y - x), amax / 254 * (1 + 1e-6)) << t << " " << r << " " << j;
          if (amax == 0) {
            EXPECT_EQ(y, 0.f);
          }
        }
      }
    }
    float amax = 0;
    for (Index e = 0; e < 8; ++e) amax = std::max(amax, std::abs(a(t, e)));
    for (Index e = 0; e < 8; ++e) {
      const float y = v.value(1, t, e / 2, e % 2);
      if (t == 6) {
        EXPECT_TRUE(std::isnan(y));
      } else {
        EXPECT_LE(std::abs(y - a(t, e)), amax / 254 * (1 + 1e-6));
        if (t == 3) {
          EXPECT_EQ(y, 0.f);
        }
      }
    }
  }
  EXPECT_EQ(v.scales(0, 0, 1)[2], 0.f);  // the zero row's scale
  // The largest element of a row is stored as ±127: it comes back to within f32 rounding.
  Index jmax = 0;
  for (Index j = 1; j < 40; ++j)
    if (std::abs(k(0, j)) > std::abs(k(0, jmax))) jmax = j;
  EXPECT_NEAR(v.value(0, 0, 0, jmax), k(0, jmax), 1e-6 * std::abs(k(0, jmax)));
  EXPECT_EQ(std::abs(v.row_at(0, 0, 0)[jmax].v), 127);
}

// A failing append (the cache is full) leaves values, scales and bookkeeping as they were.
TEST(QuantCache, FailedAppendChangesNothing) {
  const tpa::CacheLayout layout("T", {{"K", 2, 24, false, tpa::TileOrder::kHeadMajor}});
  KVCache<q8> cache({layout}, 4, 2);
  const SeqId s = cache.add_sequence();
  const Tensor2 x = tpa_test::random_tensor(12, 48, 9);
  tpa::FactorRows rows[1] = {{x.data(), 48}};
  cache.append(s, 0, 6, rows);
  const auto before = tpa_test::snapshot(cache, {s});
  rows[0].data = x.data() + 6 * 48;
  EXPECT_THROW(cache.append(s, 0, 6, rows), tpa::Error);  // needs a third block
  EXPECT_TRUE(tpa_test::snapshot(cache, {s}) == before);
  cache.append(s, 0, 2, rows);  // still fits
  EXPECT_EQ(cache.length(s), 8);
}

// ---- every kind, every backend ------------------------------------------------------------------

struct Inputs {
  Tensor2 a, b;  // [kPrefillA + kSteps, D], [kPrefillB1 + kPrefillB2 + kSteps, D]
};
Inputs make_inputs(Index D) {
  return Inputs{tpa_test::random_tensor(kPrefillA + kSteps, D, 101),
                tpa_test::random_tensor(kPrefillB1 + kPrefillB2 + kSteps, D, 202)};
}

// Prefill A (one call) and B (two chunks), then kSteps decode steps of the batch {A, B}; every
// output row of every call, in call order. With `nan_b`, B's first decode input is NaN.
template <class Layer, class S>
std::vector<float> run(const Layer& layer, KVCache<S>& cache, const Inputs& in, Index D,
                       bool nan_b = false, int threads = 2) {
  tpa::Context ctx(threads);
  std::vector<float> out;
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  auto call = [&](const Tensor2& x, SeqId seq) {
    Tensor2 y(x.dimension(0), D);
    layer.forward(ctx, x, y, cache, 0, seq);
    out.insert(out.end(), y.data(), y.data() + y.size());
  };
  call(tpa_test::rows(in.a, 0, kPrefillA), a);
  call(tpa_test::rows(in.b, 0, kPrefillB1), b);
  call(tpa_test::rows(in.b, kPrefillB1, kPrefillB2), b);
  for (Index s = 0; s < kSteps; ++s) {
    Tensor2 x(2, D), y(2, D);
    std::copy(in.a.data() + (kPrefillA + s) * D, in.a.data() + (kPrefillA + s + 1) * D, x.data());
    std::copy(in.b.data() + (kPrefillB1 + kPrefillB2 + s) * D,
              in.b.data() + (kPrefillB1 + kPrefillB2 + s + 1) * D, x.data() + D);
    if (nan_b && s == 0) x(1, 3) = std::numeric_limits<float>::quiet_NaN();
    layer.decode(ctx, x, y, cache, 0, {a, b});
    out.insert(out.end(), y.data(), y.data() + y.size());
  }
  return out;
}

// Rows of run()'s output that belong to A's decode steps.
std::vector<float> a_decode_rows(const std::vector<float>& y, Index D) {
  std::vector<float> r;
  const Index base = (kPrefillA + kPrefillB1 + kPrefillB2) * D;
  for (Index s = 0; s < kSteps; ++s)
    r.insert(r.end(), y.begin() + base + 2 * s * D, y.begin() + base + (2 * s + 1) * D);
  return r;
}
std::vector<float> b_rows(const std::vector<float>& y, Index D) {
  std::vector<float> r(y.begin() + kPrefillA * D, y.begin() + (kPrefillA + kPrefillB1 + kPrefillB2) * D);
  const Index base = (kPrefillA + kPrefillB1 + kPrefillB2) * D;
  for (Index s = 0; s < kSteps; ++s)
    r.insert(r.end(), y.begin() + base + (2 * s + 1) * D, y.begin() + base + (2 * s + 2) * D);
  return r;
}

template <class T>
struct Tag {
  using type = T;
};

// make(Tag<Backend>, Tag<CacheScalar>) builds the kind's layer.
template <class B, class Make>
void check_kind(const std::string& what, Index D, Make&& make) {
  SCOPED_TRACE(what);
  const auto layer32 = make(Tag<B>{}, Tag<float>{});
  const auto layer8 = make(Tag<B>{}, Tag<q8>{});
  const auto ref8 = make(Tag<tpa::Reference>{}, Tag<q8>{});
  // The int8 layer's layout may place K/V otherwise than the f32 one's (tpa::kv_tile_order).
  const tpa::CacheLayout layout = layer8.cache_layout();
  const Inputs in = make_inputs(D);

  KVCache<float> cache32({layer32.cache_layout()}, kBlock, 16);
  KVCache<q8> cache8({layout}, kBlock, 16);
  const std::vector<float> y32 = run(layer32, cache32, in, D);
  const std::vector<float> y8 = run(layer8, cache8, in, D);
  const auto n = static_cast<Index>(y32.size());
  ASSERT_EQ(y8.size(), y32.size());
  for (float v : y8) ASSERT_TRUE(std::isfinite(v));

  // Bytes: one per element plus four per scale.
  Index scales = 0;
  for (std::size_t f = 0; f < layout.num_factors(); ++f)
    scales += layout.factor(f).cols >= tpa::kQ8MinRowCols ? layout.factor(f).rows : 1;
  EXPECT_EQ(cache8.bytes_per_token(),
            static_cast<std::size_t>(layout.elements_per_token() + 4 * scales));

  // Against the float cache: the quantization error, small but not zero.
  const double err = tpa_test::rel_err(y8, y32, n);
  std::printf("[int8 cache] %-13s %-9s: max|dy| / max|y| %.3g\n", what.c_str(),
              ::testing::UnitTest::GetInstance()->current_test_info()->name(), err);
  EXPECT_LE(err, 3e-2);
  EXPECT_GT(err, 1e-6);

  // Against the Reference backend on the same int8 cache contents.
  if (!std::is_same<B, tpa::Reference>::value) {
    KVCache<q8> cache_ref({layout}, kBlock, 16);
    const std::vector<float> yref = run(ref8, cache_ref, in, D);
    EXPECT_LE(tpa_test::rel_err(y8, yref, n), 1e-4);
  }

  // Decode == prefill: A's tokens in one prefill call. (3e-5, not f32's 1e-5: with AVX-512
  // VNNI, token-lane decode rounds each query row and each tile's probabilities to int16 for
  // integer products with the int8 cache, ≤ 1.5e-5 of their largest element; row-lane prefill
  // keeps them in f32. Measured up to 1.6e-5; a dropped or misapplied scale is O(1).)
  {
    KVCache<q8> cache({layout}, kBlock, 16);
    tpa::Context ctx(2);
    const SeqId a = cache.add_sequence();
    Tensor2 y(kPrefillA + kSteps, D);
    layer8.forward(ctx, in.a, y, cache, 0, a);
    const std::vector<float> dec = a_decode_rows(y8, D);
    std::vector<float> pre(y.data() + kPrefillA * D, y.data() + y.size());
    EXPECT_LE(tpa_test::rel_err(dec, pre, static_cast<Index>(pre.size())), 3e-5);
  }

  // A NaN in B's decode input: A's outputs are bit-identical, B's later outputs not finite.
  {
    KVCache<q8> cache({layout}, kBlock, 16);
    const std::vector<float> yn = run(layer8, cache, in, D, /*nan_b=*/true);
    const std::vector<float> da = a_decode_rows(yn, D), da0 = a_decode_rows(y8, D);
    EXPECT_TRUE(std::equal(da.begin(), da.end(), da0.begin()));
    const std::vector<float> bn = b_rows(yn, D);
    EXPECT_TRUE(std::isnan(bn.back()));
  }

  // Fork and truncate: a fork of B after its prefill continues like B; truncating B's decoded
  // tokens and decoding them again gives the same outputs.
  {
    KVCache<q8> cache({layout}, kBlock, 16);
    tpa::Context ctx(2);
    const SeqId b = cache.add_sequence();
    const Index nb = kPrefillB1 + kPrefillB2;
    Tensor2 yb(nb, D);
    layer8.forward(ctx, tpa_test::rows(in.b, 0, nb), yb, cache, 0, b);
    const SeqId f = cache.fork(b);
    const Tensor2 next = tpa_test::rows(in.b, nb, kSteps);
    Tensor2 y1(kSteps, D), y2(kSteps, D), y3(kSteps, D);
    layer8.forward(ctx, next, y1, cache, 0, f);
    layer8.forward(ctx, next, y2, cache, 0, b);
    cache.truncate(b, nb);
    layer8.forward(ctx, next, y3, cache, 0, b);
    for (Index i = 0; i < y1.size(); ++i) {
      EXPECT_EQ(y1.data()[i], y2.data()[i]);
      EXPECT_EQ(y1.data()[i], y3.data()[i]);
    }
  }
}

tpa::GqaConfig gqa_config(Index kv_heads, Index head_dim, Index n_heads) {
  tpa::GqaConfig c;
  c.d_model = 64;
  c.n_heads = n_heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = head_dim;
  c.rope.max_positions = 64;
  return c;
}

template <class B>
void check_grouped(const std::string& what, Index kv_heads, Index head_dim = 36,
                   Index n_heads = 4) {
  const tpa::GqaConfig c = gqa_config(kv_heads, head_dim, n_heads);
  const tpa::GqaWeights w = tpa::GqaWeights::random(c, 7);
  check_kind<B>(what, c.d_model, [&](auto b, auto s) {
    return tpa::GroupedQueryAttention<typename decltype(b)::type, typename decltype(s)::type>(c, w);
  });
}

// wide: 16 heads over a 256-element latent, so absorbed decode takes the row-lane score and
// transposed value paths (GroupedTiled's acc_t) on every SIMD backend.
template <class B>
void check_mla(tpa::MlaForm form, bool wide = false) {
  tpa::MlaConfig c;
  c.d_model = 64;
  c.n_heads = wide ? 16 : 4;
  c.q_lora_rank = 0;
  c.kv_lora_rank = wide ? 256 : 40;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 12;
  c.v_head_dim = 20;
  c.rope.max_positions = 64;
  c.form = form;
  const tpa::MlaWeights w = tpa::MlaWeights::random(c, 9);
  check_kind<B>(std::string(form == tpa::MlaForm::kAbsorbed ? "MLA absorbed" : "MLA explicit") +
                    (wide ? " wide" : ""),
                c.d_model,
                [&](auto b, auto s) {
                  return tpa::MultiHeadLatentAttention<typename decltype(b)::type,
                                                       typename decltype(s)::type>(c, w);
                });
}

// wide_ranks: k_rank 16, so A_K's rows get a scale each (per head and token).
template <class B>
void check_tpa(bool kv_only, bool wide_ranks = false) {
  tpa::TpaConfig c;
  c.d_model = 64;
  c.n_heads = 4;
  c.head_dim = kv_only ? 36 : 32;
  c.q_rank = kv_only ? 0 : 4;
  c.k_rank = wide_ranks ? 16 : kv_only ? 3 : 2;
  c.v_rank = kv_only ? 1 : 2;
  c.kv_only = kv_only;
  c.rope.max_positions = 64;
  const tpa::TpaWeights w = tpa::TpaWeights::random(c, 11);
  check_kind<B>(std::string(kv_only ? "TPA-KV" : "TPA") + (wide_ranks ? " R_K 16" : ""),
                c.d_model, [&](auto b, auto s) {
                  return tpa::TensorProductAttention<typename decltype(b)::type,
                                                     typename decltype(s)::type>(c, w);
                });
}

template <class B>
class QuantCacheKinds : public ::testing::Test {};
TYPED_TEST_SUITE(QuantCacheKinds, tpa_test::AllBackends, tpa_test::BackendName);

TYPED_TEST(QuantCacheKinds, Mha) {
  check_grouped<TypeParam>("MHA", 4);
  check_grouped<TypeParam>("MHA d 12", 4, 12);  // rows under kQ8MinRowCols: a scale per token
}
TYPED_TEST(QuantCacheKinds, Gqa) { check_grouped<TypeParam>("GQA-2", 2); }
// 3, 6 and 7 query heads per KV head: decode's several-row score micro-kernel with padded row
// groups (of 4 and 8 on Avx512), int8 K scaled per score, int8 V read in place.
TYPED_TEST(QuantCacheKinds, GqaRowGroups) {
  check_grouped<TypeParam>("GQA 12/4", 4, 36, 12);
  check_grouped<TypeParam>("GQA 12/2", 2, 48, 12);
  check_grouped<TypeParam>("GQA 14/2", 2, 32, 14);
  // Head sizes in blocks of 32: int8 V by integer products on AVX-512 VNNI (pv_pair).
  check_grouped<TypeParam>("MHA d 64", 4, 64);
  check_grouped<TypeParam>("GQA 12/4 d 64", 4, 64, 12);
  check_grouped<TypeParam>("GQA 14/2 d 128", 2, 128, 14);
  check_grouped<TypeParam>("GQA 16/2 d 128", 2, 128, 16);  // 8 rows per KV head
}
// Token-lane decode scores of int8 keys (Avx512 with VNNI: int16 q rows × int8 K in integer
// lanes, GroupedTiled::qk_i16) for 1 (MHA) … 8 query heads per KV head and head dims 40 (a tail
// past the 32-dim blocks), 64 and 128: within 1e-4 of max|y| of Reference (check_kind), and
// bit-identical for one and two threads.
TYPED_TEST(QuantCacheKinds, TokenLaneScores) {
  using B = TypeParam;
  for (Index gs : {1, 2, 3, 4, 5, 6, 7, 8})
    for (Index d : {40, 64, 128}) {
      const tpa::GqaConfig c = gqa_config(2, d, 2 * gs);
      const tpa::GqaWeights w = tpa::GqaWeights::random(c, 7);
      auto make = [&](auto b, auto s) {
        return tpa::GroupedQueryAttention<typename decltype(b)::type,
                                          typename decltype(s)::type>(c, w);
      };
      const std::string what = "G/Q " + std::to_string(gs) + " d " + std::to_string(d);
      check_kind<B>(what, c.d_model, make);
      const auto layer = make(Tag<B>{}, Tag<q8>{});
      const Inputs in = make_inputs(c.d_model);
      KVCache<q8> c1({layer.cache_layout()}, kBlock, 16), c2({layer.cache_layout()}, kBlock, 16);
      EXPECT_TRUE(run(layer, c1, in, c.d_model, false, 1) == run(layer, c2, in, c.d_model, false, 2))
          << what;
    }
}
TYPED_TEST(QuantCacheKinds, Mqa) { check_grouped<TypeParam>("MQA", 1); }
TYPED_TEST(QuantCacheKinds, MlaAbsorbed) {
  check_mla<TypeParam>(tpa::MlaForm::kAbsorbed);
  check_mla<TypeParam>(tpa::MlaForm::kAbsorbed, true);
}
TYPED_TEST(QuantCacheKinds, MlaExplicit) { check_mla<TypeParam>(tpa::MlaForm::kExplicit); }
TYPED_TEST(QuantCacheKinds, Tpa) {
  check_tpa<TypeParam>(false);
  check_tpa<TypeParam>(false, true);
}
TYPED_TEST(QuantCacheKinds, TpaKvOnly) {
  check_tpa<TypeParam>(true);
  check_tpa<TypeParam>(true, true);
}

}  // namespace quant_cache_test
