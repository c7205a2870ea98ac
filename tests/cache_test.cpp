// The paged KV cache: layouts, sequences, block reuse, exact byte accounting, append contents,
// and the strong guarantee of every throwing call.
#include <gtest/gtest.h>

#include <limits>
#include <numeric>
#include <vector>

#include "test_util.hpp"

using tpa::CacheLayout;
using tpa::FactorRows;
using tpa::Index;
using tpa::KVCache;

namespace {

CacheLayout kv_layout(Index g, Index d) {
  return CacheLayout("GQA", {{"K", g, d, true}, {"V", g, d, false}});
}

// Appends n tokens whose factor f element e of token i is value(layer, f, pos, e).
float value(int layer, int f, Index pos, Index e) {
  return static_cast<float>(layer * 100000 + f * 10000 + pos * 10 + e % 10) * 0.5f;
}
void append(KVCache<float>& c, tpa::SeqId s, int layer, Index n) {
  const CacheLayout& l = c.layout(layer);
  const Index pos0 = c.length(s, layer);
  std::vector<std::vector<float>> data(l.num_factors());
  std::vector<FactorRows> rows(l.num_factors());
  for (std::size_t f = 0; f < l.num_factors(); ++f) {
    const Index e = l.factor(f).elements();
    data[f].resize(static_cast<std::size_t>(n * e));
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < e; ++j)
        data[f][static_cast<std::size_t>(i * e + j)] = value(layer, static_cast<int>(f), pos0 + i, j);
    rows[f] = FactorRows{data[f].data(), e};
  }
  c.append(s, layer, n, rows.data());
}
void expect_contents(const KVCache<float>& c, tpa::SeqId s, int layer) {
  const auto v = c.view(s, layer);
  for (std::size_t f = 0; f < c.layout(layer).num_factors(); ++f)
    for (Index t = 0; t < v.n_tokens; ++t)
      for (Index j = 0; j < v.elements(f); ++j)
        ASSERT_EQ(v.at(f, t, j), value(layer, static_cast<int>(f), t, j))
            << "layer " << layer << " factor " << f << " token " << t;
  // Block-wise access sees the same rows contiguously.
  Index t = 0;
  for (Index b = 0; b < v.num_blocks(); ++b)
    for (Index i = 0; i < v.block_len(b); ++i, ++t)
      ASSERT_EQ(v.row(1, b, 0)[i * v.token_stride(1)], value(layer, 1, t, 0));
  EXPECT_EQ(t, v.n_tokens);
}

TEST(CacheLayout, ElementsAndOffsets) {
  CacheLayout l("TPA", {{"A_K", 4, 2, false}, {"B_K", 2, 16, true}, {"A_V", 4, 2, false},
                        {"B_V", 2, 16, false}});
  EXPECT_EQ(l.elements_per_token(), (2 + 2) * (4 + 16));
  EXPECT_EQ(l.factor_offset(2), 8 + 32);
  EXPECT_THROW(CacheLayout("x", {}), tpa::Error);
  EXPECT_THROW(CacheLayout("x", {{"K", 0, 4, false}}), tpa::Error);
}

TEST(KVCache, BytesPerTokenAreExact) {
  KVCache<float> c({kv_layout(2, 16), kv_layout(1, 8)}, 4, 10);
  EXPECT_EQ(c.bytes_per_token(0), 2u * 2 * 16 * 4);
  EXPECT_EQ(c.bytes_per_token(1), 2u * 8 * 4);
  EXPECT_EQ(c.bytes_per_token(), c.bytes_per_token(0) + c.bytes_per_token(1));
  KVCache<tpa::bfloat16> h({kv_layout(2, 16)}, 4, 10);
  EXPECT_EQ(h.bytes_per_token(), 2u * 2 * 16 * 2);
  EXPECT_EQ(c.bytes_used(), 0u);
  EXPECT_EQ(c.bytes_reserved(), 0u);
}

TEST(KVCache, AppendStoresFactorsAcrossBlocksAndLayers) {
  KVCache<float> c({kv_layout(2, 3), kv_layout(1, 5)}, 4, 16);
  const auto a = c.add_sequence(), b = c.add_sequence();
  append(c, a, 0, 3);
  append(c, b, 0, 6);
  append(c, a, 0, 7);  // crosses two block boundaries
  append(c, a, 1, 10);
  append(c, b, 1, 2);
  EXPECT_EQ(c.length(a, 0), 10);
  EXPECT_EQ(c.length(a, 1), 10);
  EXPECT_EQ(c.length(b, 0), 6);
  EXPECT_EQ(c.length(b, 1), 2);
  EXPECT_EQ(c.block_table(a).size(), 3u);  // ceil(10 / 4), shared by both layers
  EXPECT_EQ(c.block_table(b).size(), 2u);
  for (int l = 0; l < 2; ++l) {
    expect_contents(c, a, l);
    expect_contents(c, b, l);
  }
  EXPECT_EQ(c.bytes_used(), 10 * c.bytes_per_token() + 6 * c.bytes_per_token(0) +
                                2 * c.bytes_per_token(1));
  EXPECT_EQ(c.bytes_reserved(), 5 * 4 * c.bytes_per_token());
}

TEST(KVCache, FreedBlocksAreReused) {
  KVCache<float> c({kv_layout(1, 4)}, 2, 4);
  const auto a = c.add_sequence();
  append(c, a, 0, 8);  // all 4 blocks
  const auto blocks = c.block_table(a);
  const auto reserved = c.bytes_reserved();
  c.free_sequence(a);
  EXPECT_FALSE(c.contains(a));
  EXPECT_EQ(c.bytes_used(), 0u);
  EXPECT_EQ(c.bytes_reserved(), reserved);
  EXPECT_EQ(c.available_blocks(), 4);
  const auto b = c.add_sequence();
  EXPECT_EQ(b, a);  // handle reused
  append(c, b, 0, 8);
  auto sorted_old = blocks, sorted_new = c.block_table(b);
  std::sort(sorted_old.begin(), sorted_old.end());
  std::sort(sorted_new.begin(), sorted_new.end());
  EXPECT_EQ(sorted_old, sorted_new);
  EXPECT_EQ(c.bytes_reserved(), reserved);  // nothing new allocated
  expect_contents(c, b, 0);
}

TEST(KVCache, AppendThatDoesNotFitChangesNothing) {
  KVCache<float> c({kv_layout(2, 4), kv_layout(1, 4)}, 4, 4);
  const auto a = c.add_sequence(), b = c.add_sequence();
  append(c, a, 0, 5);
  append(c, b, 0, 3);
  const auto before = tpa_test::snapshot(c, {a, b});
  EXPECT_THROW(append(c, b, 0, 6), tpa::Error);  // needs 2 more blocks, 1 available
  EXPECT_TRUE(tpa_test::snapshot(c, {a, b}) == before);
  try {
    append(c, a, 1, 13);
    FAIL();
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("full"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(tpa_test::snapshot(c, {a, b}) == before);
  append(c, b, 0, 5);  // exactly fits: 8 tokens in 2 blocks
  EXPECT_EQ(c.available_blocks(), 0);
}

TEST(KVCache, UnknownSequenceAndLayerThrow) {
  KVCache<float> c({kv_layout(1, 4)}, 4, 3);
  const auto a = c.add_sequence();
  EXPECT_THROW(c.length(a + 1), tpa::Error);
  EXPECT_THROW(c.length(-1), tpa::Error);
  EXPECT_THROW(c.length(a, 1), tpa::Error);
  EXPECT_THROW(c.view(a, -1), tpa::Error);
  c.free_sequence(a);
  EXPECT_THROW(c.free_sequence(a), tpa::Error);  // double free
  EXPECT_THROW(c.length(a), tpa::Error);
  const auto b = c.add_sequence();
  EXPECT_THROW(c.check_layout("test", 0, kv_layout(2, 4)), tpa::Error);
  EXPECT_NO_THROW(c.check_layout("test", 0, kv_layout(1, 4)));
  EXPECT_EQ(c.length(b), 0);
}

TEST(KVCache, InvalidConstructionThrows) {
  EXPECT_THROW(KVCache<float>({}, 4, 4), tpa::Error);
  EXPECT_THROW(KVCache<float>({kv_layout(1, 4)}, 0, 4), tpa::Error);
  EXPECT_THROW(KVCache<float>({kv_layout(1, 4)}, 4, 0), tpa::Error);
  // Sizes whose element counts would overflow (found by fuzz_config).
  constexpr Index kMax = std::numeric_limits<Index>::max();
  EXPECT_THROW(CacheLayout("T", {{"K", kMax, 2, false}}), tpa::Error);
  EXPECT_THROW(CacheLayout("T", {{"K", Index(1) << 40, 1, false}, {"V", Index(1) << 57, 1, false}}),
               tpa::Error);
  EXPECT_THROW(KVCache<float>({kv_layout(1, 4)}, kMax, 4), tpa::Error);
}

TEST(KVCache, BadAppendArgumentsThrowAndChangeNothing) {
  KVCache<float> c({kv_layout(1, 4), kv_layout(1, 4)}, 4, 3);
  const auto a = c.add_sequence();
  append(c, a, 0, 3);
  std::vector<float> src(64, 1.f);
  const FactorRows rows[2] = {{src.data(), 4}, {src.data(), 4}};
  // A negative count, an unknown layer, a count whose length would overflow (found by
  // fuzz_cache_ops and fuzz_config).
  EXPECT_THROW(c.append(a, 0, -1, rows), tpa::Error);
  EXPECT_THROW(c.append(a, -1, 1, rows), tpa::Error);
  EXPECT_THROW(c.append(a, 2, 1, rows), tpa::Error);
  EXPECT_THROW(c.append(a, 0, std::numeric_limits<Index>::max(), rows), tpa::Error);
  EXPECT_THROW(c.reserve_tokens(a, std::numeric_limits<Index>::max()), tpa::Error);
  EXPECT_EQ(c.length(a, 0), 3);
  EXPECT_EQ(c.length(a, 1), 0);
  EXPECT_EQ(c.block_table(a).size(), 1u);
  expect_contents(c, a, 0);
}

TEST(KVCache, ReserveBlocksAllocatesUpFront) {
  KVCache<float> c({kv_layout(1, 4)}, 4, 8);
  c.reserve_blocks(3);
  EXPECT_EQ(c.allocated_blocks(), 3);
  EXPECT_EQ(c.bytes_reserved(), 3 * 4 * c.bytes_per_token());
  EXPECT_THROW(c.reserve_blocks(9), tpa::Error);
  const auto a = c.add_sequence();
  append(c, a, 0, 12);
  EXPECT_EQ(c.allocated_blocks(), 3);
}

TEST(KVCache, EnsureFreeBlocksMakesTheNextAppendsAllocationFree) {
  KVCache<float> c({kv_layout(1, 4)}, 4, 4);
  const auto a = c.add_sequence();
  append(c, a, 0, 2);
  c.ensure_free_blocks(2);
  EXPECT_EQ(c.allocated_blocks(), 3);
  EXPECT_EQ(c.length(a), 2);
  EXPECT_THROW(c.ensure_free_blocks(4), tpa::Error);  // only 3 more can exist
  append(c, a, 0, 10);  // takes the two prepared blocks
  EXPECT_EQ(c.allocated_blocks(), 3);
  expect_contents(c, a, 0);
}

TEST(KVCache, HalfWidthStorageRoundsOnAppend) {
  KVCache<tpa::bfloat16> c({kv_layout(1, 2)}, 4, 2);
  const auto a = c.add_sequence();
  const float k[2] = {1.00390625f, -3.f}, v[2] = {0.1f, 2.f};  // 1 + 2^-8 rounds to 1 in bf16
  const FactorRows rows[2] = {{k, 2}, {v, 2}};
  c.append(a, 0, 1, rows);
  const auto view = c.view(a, 0);
  EXPECT_EQ(static_cast<float>(view.at(0, 0, 0)), 1.f);
  EXPECT_EQ(static_cast<float>(view.at(0, 0, 1)), -3.f);
  EXPECT_NEAR(static_cast<float>(view.at(1, 0, 0)), 0.1f, 0.1f * (1.f / 256));
}

}  // namespace
