// NaN and Inf in the inputs (issue 9, part 5; README, "NaN and Inf"). A non-finite value in the
// input rows of one sequence reaches only that sequence: its outputs for that token and (through
// its cache entries) its later tokens. Every other sequence of the same batched decode call and
// of the same cache gets outputs bit-identical to a run in which the bad rows were finite — with
// one thread and with two (split-K of the decode calls), for every kind — and nothing crashes.
// Within a sequence, causality holds for NaN too: tokens before the bad one are unaffected.

#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include <tpa/tpa.hpp>

#include "test_util.hpp"

namespace nonfinite_test {

using tpa::Index;
using tpa::KVCache;
using tpa::SeqId;
using tpa_test::AnyLayer;
using tpa_test::random_tensor;
using Tensor2 = tpa::Tensor<float, 2>;

constexpr Index kD = 48;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// Head sizes that are not multiples of the SIMD width, so padded lanes are in play.
std::vector<AnyLayer> kinds() {
  tpa::GqaConfig g;
  g.d_model = kD;
  g.n_heads = 4;
  g.n_kv_heads = 2;
  g.head_dim = 12;
  g.head_norm = true;
  g.rope.max_positions = 256;
  tpa::TpaConfig t;
  t.d_model = kD;
  t.n_heads = 4;
  t.head_dim = 12;
  t.q_rank = 3;
  t.k_rank = 2;
  t.v_rank = 2;
  t.head_norm = true;
  t.rope.max_positions = 256;
  tpa::MlaConfig m;
  m.d_model = kD;
  m.n_heads = 4;
  m.q_lora_rank = 16;
  m.kv_lora_rank = 12;
  m.qk_nope_head_dim = 8;
  m.qk_rope_head_dim = 4;
  m.v_head_dim = 10;
  m.rope.max_positions = 256;
  return tpa_test::all_kinds(g, t, m);
}

bool same_bits(const float* a, const float* b, Index n) {
  return std::memcmp(a, b, static_cast<std::size_t>(n) * sizeof(float)) == 0;
}
bool all_finite(const float* a, Index n) {
  for (Index i = 0; i < n; ++i)
    if (!std::isfinite(a[i])) return false;
  return true;
}
bool cache_finite(const KVCache<float>& c, SeqId s) {
  const auto snap = tpa_test::snapshot(c, {s});
  for (float v : snap.contents[0])
    if (!std::isfinite(v)) return false;
  return true;
}

// One world: a cache with three sequences prefilled with the same finite prompts.
struct World {
  tpa::Context ctx;
  KVCache<float> cache;
  SeqId s[3];
  World(const AnyLayer& l, int threads) : ctx(threads), cache({l.layout}, 16, 64) {
    const Index len[3] = {70, 33, 101};
    for (int i = 0; i < 3; ++i) {
      s[i] = cache.add_sequence();
      const Tensor2 x = random_tensor(len[i], kD, 10 + static_cast<std::uint64_t>(i));
      Tensor2 y(len[i], kD);
      l.forward_cached(ctx, x, y, cache, 0, s[i]);
    }
  }
};

class NonFinite : public ::testing::TestWithParam<int> {};  // threads

// Batched decode of (s1: NaN, s0: clean, s2: +Inf), then three steps with finite inputs for all:
// s0's outputs and cache entries are bit-identical to a run where s1 and s2 stayed finite.
TEST_P(NonFinite, BadRowsReachOnlyTheirOwnSequence) {
  const int threads = GetParam();
  for (const AnyLayer& l : kinds()) {
    SCOPED_TRACE(l.name + ", threads " + std::to_string(threads));
    World bad(l, threads), ref(l, threads);
    const std::vector<SeqId> order = {bad.s[1], bad.s[0], bad.s[2]};
    ASSERT_EQ(order, (std::vector<SeqId>{ref.s[1], ref.s[0], ref.s[2]}));
    for (int step = 0; step < 4; ++step) {
      const Tensor2 x = random_tensor(3, kD, 100 + static_cast<std::uint64_t>(step));
      Tensor2 xb = x;
      if (step == 0) {
        xb(0, 5) = kNaN;   // row 0 is s1
        xb(2, 7) = kInf;   // row 2 is s2
        xb(2, 9) = -kInf;
      }
      Tensor2 yb(3, kD), yr(3, kD);
      ASSERT_NO_THROW(l.decode(bad.ctx, xb, yb, bad.cache, 0, order));
      l.decode(ref.ctx, x, yr, ref.cache, 0, order);
      EXPECT_TRUE(same_bits(yb.data() + kD, yr.data() + kD, kD)) << "step " << step;
      EXPECT_TRUE(all_finite(yr.data(), 3 * kD));
      // The bad sequences' outputs are not finite, from the bad token on.
      EXPECT_FALSE(all_finite(yb.data(), kD)) << "NaN row, step " << step;
      EXPECT_FALSE(all_finite(yb.data() + 2 * kD, kD)) << "Inf row, step " << step;
    }
    EXPECT_TRUE(tpa_test::snapshot(bad.cache, {bad.s[0]}) ==
                tpa_test::snapshot(ref.cache, {ref.s[0]}));
    EXPECT_TRUE(cache_finite(bad.cache, bad.s[0]));
    EXPECT_FALSE(cache_finite(bad.cache, bad.s[1]));
    EXPECT_FALSE(cache_finite(bad.cache, bad.s[2]));
    // s0 alone afterwards: a prefill chunk and a single decode step.
    const Tensor2 x = random_tensor(5, kD, 200);
    Tensor2 yb(5, kD), yr(5, kD);
    l.forward_cached(bad.ctx, x, yb, bad.cache, 0, bad.s[0]);
    l.forward_cached(ref.ctx, x, yr, ref.cache, 0, ref.s[0]);
    EXPECT_TRUE(same_bits(yb.data(), yr.data(), 5 * kD));
    // A fresh sequence in the poisoned cache, batched with the bad ones.
    const SeqId fresh_b = bad.cache.add_sequence(), fresh_r = ref.cache.add_sequence();
    const Tensor2 p = random_tensor(9, kD, 300);
    Tensor2 pb(9, kD), pr(9, kD);
    l.forward_cached(bad.ctx, p, pb, bad.cache, 0, fresh_b);
    l.forward_cached(ref.ctx, p, pr, ref.cache, 0, fresh_r);
    EXPECT_TRUE(same_bits(pb.data(), pr.data(), 9 * kD));
    const Tensor2 x3 = random_tensor(3, kD, 301);
    Tensor2 y3b(3, kD), y3r(3, kD);
    l.decode(bad.ctx, x3, y3b, bad.cache, 0, {bad.s[2], fresh_b, bad.s[1]});
    l.decode(ref.ctx, x3, y3r, ref.cache, 0, {ref.s[2], fresh_r, ref.s[1]});
    EXPECT_TRUE(same_bits(y3b.data() + kD, y3r.data() + kD, kD));
  }
}

// A NaN token inside a prefill chunk: the tokens before it are unaffected (causal), the ones
// from it on are not finite; the same for the forward without a cache. Nothing throws.
TEST_P(NonFinite, PrefillIsCausalForNaN) {
  const int threads = GetParam();
  for (const AnyLayer& l : kinds()) {
    SCOPED_TRACE(l.name + ", threads " + std::to_string(threads));
    World bad(l, threads), ref(l, threads);
    const Index n = 40, at = 23;
    const Tensor2 x = random_tensor(n, kD, 400);
    Tensor2 xb = x;
    xb(at, 3) = kNaN;
    Tensor2 yb(n, kD), yr(n, kD);
    ASSERT_NO_THROW(l.forward_cached(bad.ctx, xb, yb, bad.cache, 0, bad.s[1]));
    l.forward_cached(ref.ctx, x, yr, ref.cache, 0, ref.s[1]);
    EXPECT_TRUE(same_bits(yb.data(), yr.data(), at * kD));
    for (Index t = at; t < n; ++t) EXPECT_FALSE(all_finite(yb.data() + t * kD, kD)) << t;

    Tensor2 zb(n, kD), zr(n, kD);
    ASSERT_NO_THROW(l.forward(bad.ctx, xb, zb));
    l.forward(ref.ctx, x, zr);
    EXPECT_TRUE(same_bits(zb.data(), zr.data(), at * kD));
    for (Index t = at; t < n; ++t) EXPECT_FALSE(all_finite(zb.data() + t * kD, kD)) << t;
  }
}

INSTANTIATE_TEST_SUITE_P(Threads, NonFinite, ::testing::Values(1, 2),
                         [](const ::testing::TestParamInfo<int>& i) {
                           return std::to_string(i.param) + "thread";
                         });

}  // namespace nonfinite_test
