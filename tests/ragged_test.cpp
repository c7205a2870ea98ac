// The ragged call forward(ctx, x, y, cache, layer, chunks) of every layer kind: a mix of prefill
// chunks, decode tokens and speculative drafts in one call gives each chunk the bits it gets
// alone; every call gives the same bits with 1, 2 and 3 threads (outputs and cache contents);
// speculative decoding (draft as one chunk, verify, truncate) leaves the cache as plain decode
// would; bad chunk lists throw and change nothing.
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "test_util.hpp"

using tpa::Chunk;
using tpa::Index;
using tpa::KVCache;
using tpa::SeqId;

namespace ragged_test {

using Tensor2 = tpa::Tensor<float, 2>;
constexpr Index kD = 96;

// Sizes chosen so that the work is split: projections over several 128-feature tiles, decode
// calls over a long history cut into key pieces, prefill chunks cut along their queries.
std::vector<tpa_test::AnyLayer> kinds() {
  tpa::GqaConfig g;
  g.d_model = kD;
  g.n_heads = 8;
  g.n_kv_heads = 2;
  g.head_dim = 32;
  g.head_norm = true;
  g.rope.max_positions = 4096;
  tpa::TpaConfig t;
  t.d_model = kD;
  t.n_heads = 8;
  t.head_dim = 32;
  t.q_rank = 4;
  t.k_rank = 2;
  t.v_rank = 2;
  t.rope.max_positions = 4096;
  tpa::MlaConfig m;
  m.d_model = kD;
  m.n_heads = 8;
  m.q_lora_rank = 48;
  m.kv_lora_rank = 64;
  m.qk_nope_head_dim = 16;
  m.qk_rope_head_dim = 8;
  m.v_head_dim = 16;
  m.rope.max_positions = 4096;
  auto v = tpa_test::all_kinds(g, t, m);
  // MLA with kAuto: each chunk picks its own form (long prefill explicit, decode absorbed).
  m.form = tpa::MlaForm::kAuto;
  v.push_back(tpa_test::wrap("MLA-auto", std::make_shared<const tpa::MultiHeadLatentAttention<>>(
                                             m, tpa::MlaWeights::random(m, 7))));
  return v;
}

bool same_bits(const Tensor2& a, const Tensor2& b) {
  return a.size() == b.size() &&
         std::memcmp(a.data(), b.data(), sizeof(float) * static_cast<std::size_t>(a.size())) == 0;
}

Tensor2 rows_of(const Tensor2& x, Index r0, Index n) { return tpa_test::rows(x, r0, n); }

// Cache contents of `seqs` (lengths and every cached element, all layers).
std::vector<float> contents(const KVCache<float>& c, const std::vector<SeqId>& seqs) {
  std::vector<float> out;
  for (const auto& s : tpa_test::snapshot(c, seqs).contents) out.insert(out.end(), s.begin(), s.end());
  for (const auto& l : tpa_test::snapshot(c, seqs).lengths)
    for (Index n : l) out.push_back(static_cast<float>(n));
  return out;
}

// Histories of the four sequences of the mixed batch: a (long: its decode token is cut into key
// pieces), b (a prefill chunk on top of a history), c (fresh), d (a speculative draft).
const Index kHistory[4] = {3000, 130, 0, 5};
const Chunk kShape[4] = {{0, 1}, {0, 70}, {0, 45}, {0, 3}};

// A cache of one layer holding the four sequences with their histories, prefilled on ctx
// (the first one `first` tokens long instead, for the tests that need no key pieces).
KVCache<float> make_cache(const tpa_test::AnyLayer& k, tpa::Context& ctx, std::vector<SeqId>& seqs,
                          Index first = kHistory[0]) {
  KVCache<float> c({k.layout}, 16, 1024);
  seqs.clear();
  for (int i = 0; i < 4; ++i) {
    seqs.push_back(c.add_sequence());
    const Index n = i == 0 ? first : kHistory[i];
    if (n == 0) continue;
    const Tensor2 h = tpa_test::random_tensor(n, kD, 50 + static_cast<std::uint64_t>(i));
    Tensor2 y(n, kD);
    k.forward_cached(ctx, h, y, c, 0, seqs.back());
  }
  return c;
}

// The histories are prefilled once per kind; each run works on forks of them (so the appends
// also copy the shared partly filled blocks on write).
TEST(RaggedCall, MixedBatchEqualsEachChunkAloneWithAnyThreadCount) {
  Index total = 0;
  for (const Chunk& ch : kShape) total += ch.tokens;
  const Tensor2 x = tpa_test::random_tensor(total, kD, 7);
  for (const auto& k : kinds()) {
    SCOPED_TRACE(k.name);
    tpa::Context one(1);
    std::vector<SeqId> base;
    KVCache<float> c = make_cache(k, one, base);
    auto forks = [&] {
      std::vector<SeqId> f;
      for (SeqId s : base) f.push_back(c.fork(s));
      return f;
    };
    // Reference: each chunk alone, one thread.
    const std::vector<SeqId> sa = forks();
    Tensor2 y_alone(total, kD);
    Index row = 0;
    for (int i = 0; i < 4; ++i) {
      const Index n = kShape[i].tokens;
      Tensor2 yi(n, kD);
      k.forward_cached(one, rows_of(x, row, n), yi, c, 0, sa[static_cast<std::size_t>(i)]);
      std::memcpy(y_alone.data() + row * kD, yi.data(), sizeof(float) * static_cast<std::size_t>(n * kD));
      row += n;
    }
    const std::vector<float> c_alone = contents(c, sa);
    for (int threads : {1, 2, 3}) {
      SCOPED_TRACE(std::to_string(threads) + " threads");
      tpa::Context ctx(threads);
      const std::vector<SeqId> sr = forks();
      std::vector<Chunk> chunks;
      for (int i = 0; i < 4; ++i) chunks.push_back({sr[static_cast<std::size_t>(i)], kShape[i].tokens});
      Tensor2 y(total, kD);
      k.ragged(ctx, x, y, c, 0, chunks);
      EXPECT_TRUE(same_bits(y, y_alone));
      EXPECT_EQ(contents(c, sr), c_alone);
      for (SeqId s : sr) c.free_sequence(s);
    }
  }
}

TEST(RaggedCall, EveryCallShapeGivesTheSameBitsWithOneTwoAndThreeThreads) {
  for (const auto& k : kinds()) {
    SCOPED_TRACE(k.name);
    std::vector<Tensor2> ys[3];
    std::vector<float> cs[3];
    for (int threads : {1, 2, 3}) {
      tpa::Context ctx(threads);
      auto& out = ys[threads - 1];
      // No cache, many rows (the case the issue found differing).
      const Tensor2 x = tpa_test::random_tensor(300, kD, 9);
      Tensor2 y(300, kD);
      k.forward(ctx, x, y);
      out.push_back(y);
      // One sequence: prefill of 1200 rows, a chunk of 77, then decode batches of both.
      KVCache<float> c({k.layout}, 16, 1024);
      const SeqId a = c.add_sequence(), b = c.add_sequence();
      Tensor2 y1(1200, kD);
      k.forward_cached(ctx, tpa_test::random_tensor(1200, kD, 10), y1, c, 0, a);
      out.push_back(y1);
      Tensor2 y2(77, kD);
      k.forward_cached(ctx, tpa_test::random_tensor(77, kD, 11), y2, c, 0, b);
      out.push_back(y2);
      for (int step = 0; step < 3; ++step) {
        Tensor2 yd(2, kD);
        k.decode(ctx, tpa_test::random_tensor(2, kD, 20 + static_cast<std::uint64_t>(step)), yd, c,
                 0, {a, b});
        out.push_back(yd);
        Tensor2 y3(1, kD);
        k.forward_cached(ctx, tpa_test::random_tensor(1, kD, 30 + static_cast<std::uint64_t>(step)),
                         y3, c, 0, a);
        out.push_back(y3);
      }
      cs[threads - 1] = contents(c, {a, b});
    }
    for (int t : {1, 2}) {
      ASSERT_EQ(ys[t].size(), ys[0].size());
      for (std::size_t i = 0; i < ys[0].size(); ++i)
        EXPECT_TRUE(same_bits(ys[t][i], ys[0][i])) << "call " << i << ", " << t + 1 << " threads";
      EXPECT_EQ(cs[t], cs[0]) << t + 1 << " threads";
    }
  }
}

TEST(RaggedCall, DecodeIsTheRaggedCallWithOneTokenChunks) {
  for (const auto& k : kinds()) {
    SCOPED_TRACE(k.name);
    tpa::Context ctx(2);
    std::vector<SeqId> s1, s2;
    KVCache<float> c1 = make_cache(k, ctx, s1, 300), c2 = make_cache(k, ctx, s2, 300);
    const Tensor2 x = tpa_test::random_tensor(4, kD, 12);
    Tensor2 y1(4, kD), y2(4, kD);
    k.decode(ctx, x, y1, c1, 0, s1);
    k.ragged(ctx, x, y2, c2, 0, {{s2[0], 1}, {s2[1], 1}, {s2[2], 1}, {s2[3], 1}});
    EXPECT_TRUE(same_bits(y1, y2));
    EXPECT_EQ(contents(c1, s1), contents(c2, s2));
  }
}

// Speculative decoding: a draft of 4 tokens appended as one chunk (beside another sequence's
// decode token), 2 accepted, the rest truncated; then decoding goes on. The cache ends up with
// the bits of plain decode of the accepted tokens, and every later step gives plain decode's
// outputs; the draft's outputs agree with plain decode's to rounding (a 4-query chunk reduces in
// another order than one query).
TEST(RaggedCall, SpeculativeVerifyAndTruncateEqualsPlainDecode) {
  for (const auto& k : kinds()) {
    SCOPED_TRACE(k.name);
    tpa::Context ctx(2);
    std::vector<SeqId> sp, ss;
    KVCache<float> plain = make_cache(k, ctx, sp, 300), spec = make_cache(k, ctx, ss, 300);
    const Tensor2 draft = tpa_test::random_tensor(4, kD, 13);
    const Tensor2 other = tpa_test::random_tensor(1, kD, 14);
    // Speculative: [other's token for seq 0 | draft of 4 for seq 3] in one call.
    Tensor2 xs(5, kD), ys(5, kD);
    std::memcpy(xs.data(), other.data(), sizeof(float) * kD);
    std::memcpy(xs.data() + kD, draft.data(), sizeof(float) * 4 * kD);
    const Index len3 = spec.length(ss[3], 0);
    k.ragged(ctx, xs, ys, spec, 0, {{ss[0], 1}, {ss[3], 4}});
    spec.truncate(ss[3], len3 + 2);
    // Plain: seq 0's token, then the two accepted draft tokens one at a time.
    Tensor2 y0(1, kD);
    k.forward_cached(ctx, other, y0, plain, 0, sp[0]);
    EXPECT_TRUE(same_bits(y0, rows_of(ys, 0, 1)));
    for (Index i = 0; i < 2; ++i) {
      Tensor2 yi(1, kD);
      k.forward_cached(ctx, rows_of(draft, i, 1), yi, plain, 0, sp[3]);
      EXPECT_LE(tpa_test::rel_err(rows_of(ys, 1 + i, 1).data(), yi.data(), kD), 1e-5) << "draft row " << i;
    }
    EXPECT_EQ(contents(spec, ss), contents(plain, sp));
    // Truncate then re-append == never appended: the next tokens decode identically.
    for (int step = 0; step < 2; ++step) {
      const Tensor2 xn = tpa_test::random_tensor(2, kD, 40 + static_cast<std::uint64_t>(step));
      Tensor2 ya(2, kD), yb(2, kD);
      k.decode(ctx, xn, ya, spec, 0, {ss[3], ss[1]});
      k.decode(ctx, xn, yb, plain, 0, {sp[3], sp[1]});
      EXPECT_TRUE(same_bits(ya, yb)) << "step " << step;
    }
    EXPECT_EQ(contents(spec, ss), contents(plain, sp));
  }
}

// Bad chunk lists throw tpa::Error naming the rule, and change nothing.
TEST(RaggedCall, BadChunkListsThrowAndChangeNothing) {
  for (const auto& k : kinds()) {
    SCOPED_TRACE(k.name);
    tpa::Context ctx(2);
    std::vector<SeqId> s;
    KVCache<float> c = make_cache(k, ctx, s, 300);
    const SeqId stale = c.add_sequence();
    c.free_sequence(stale);
    const auto before = tpa_test::snapshot(c, s);
    const Tensor2 x = tpa_test::random_tensor(5, kD, 15);
    Tensor2 y(5, kD);
    auto expect_error = [&](const std::vector<Chunk>& chunks, const std::string& what) {
      try {
        k.ragged(ctx, x, y, c, 0, chunks);
        ADD_FAILURE() << "no error for " << what;
      } catch (const tpa::Error& e) {
        EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
      }
      EXPECT_TRUE(tpa_test::snapshot(c, s) == before) << what;
    };
    expect_error({}, "at least one chunk");
    expect_error({{s[0], 2}, {s[1], 0}, {s[2], 3}}, "needs at least 1");
    expect_error({{s[0], 2}, {s[1], 2}}, "must be equal");
    expect_error({{s[0], 4}, {s[1], 2}}, "more tokens than x has rows");
    expect_error({{s[0], 2}, {s[1], 1}, {s[0], 2}}, "more than once");
    expect_error({{s[0], 2}, {stale, 3}}, std::to_string(stale));
    // A chunk reaching past the RoPE table (positions 300 … 4096) after a valid one: nothing
    // appended.
    const Tensor2 xl = tpa_test::random_tensor(2 + 3797, kD, 16);
    Tensor2 yl(2 + 3797, kD);
    try {
      k.ragged(ctx, xl, yl, c, 0, {{s[2], 2}, {s[0], 3797}});
      ADD_FAILURE() << "no error past the RoPE table";
    } catch (const tpa::Error& e) {
      EXPECT_NE(std::string(e.what()).find("max_positions = 4096"), std::string::npos) << e.what();
    }
    EXPECT_TRUE(tpa_test::snapshot(c, s) == before);
  }
}

}  // namespace ragged_test
