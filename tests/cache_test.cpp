// The paged KV cache: layouts, sequences, block reuse, exact byte accounting, append contents,
// and the strong guarantee of every throwing call.
#include <gtest/gtest.h>

#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "test_util.hpp"

using tpa::CacheLayout;
using tpa::FactorRows;
using tpa::Index;
using tpa::KVCache;

namespace cache_test {

// K [g, d] and V [g, d], placed like GroupedQueryAttention's (head-major) unless told otherwise.
CacheLayout kv_layout(Index g, Index d, tpa::TileOrder order = tpa::TileOrder::kHeadMajor) {
  return CacheLayout("GQA", {{"K", g, d, true, order}, {"V", g, d, false, order}});
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

class KVCacheOrders : public ::testing::TestWithParam<tpa::TileOrder> {};
INSTANTIATE_TEST_SUITE_P(TileOrder, KVCacheOrders,
                         ::testing::Values(tpa::TileOrder::kTokenMajor,
                                           tpa::TileOrder::kHeadMajor));

TEST_P(KVCacheOrders, AppendStoresFactorsAcrossBlocksAndLayers) {
  KVCache<float> c({kv_layout(2, 3, GetParam()), kv_layout(1, 5, GetParam())}, 4, 16);
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

// blocks_needed is public (the README uses it): an unknown sequence or layer, or a negative
// count, throws instead of reading out of bounds (issue 27).
TEST(KVCache, BlocksNeededChecksItsArguments) {
  KVCache<float> c({kv_layout(1, 4)}, 4, 3);
  const auto a = c.add_sequence();
  append(c, a, 0, 3);
  EXPECT_EQ(c.blocks_needed(a, 0, 1), 0);
  EXPECT_EQ(c.blocks_needed(a, 0, 2), 1);
  auto expect_error = [](auto&& call, const char* what) {
    try {
      call();
      ADD_FAILURE() << what << ": no error";
    } catch (const tpa::Error& e) {
      EXPECT_NE(std::string(e.what()).find(what), std::string::npos) << e.what();
    }
  };
  expect_error([&] { (void)c.blocks_needed(a + 1, 0, 1); }, "sequence 1 is not a live sequence");
  expect_error([&] { (void)c.blocks_needed(-7, 0, 1); }, "sequence -7 is not a live sequence");
  expect_error([&] { (void)c.blocks_needed(a, 1, 1); }, "layer (1) is not in [0, 1)");
  expect_error([&] { (void)c.blocks_needed(a, -1, 1); }, "layer (-1)");
  expect_error([&] { (void)c.blocks_needed(a, 0, -1); }, "n (-1) must be >= 0");
  c.free_sequence(a);
  expect_error([&] { (void)c.blocks_needed(a, 0, 1); }, "not a live sequence");
}

// max_blocks is a bound, not a reservation: a cache that may hold 2^31 − 1 blocks costs nothing
// until blocks are allocated (it reserved bookkeeping for all of them and threw std::bad_alloc,
// issue 27), and its bookkeeping grows with the blocks in use.
TEST(KVCache, MaxBlocksIsABoundNotAReservation) {
  KVCache<float> c({kv_layout(1, 4)}, 4, std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(c.max_blocks(), std::numeric_limits<std::int32_t>::max());
  EXPECT_EQ(c.allocated_blocks(), 0);
  EXPECT_EQ(c.bytes_reserved(), 0u);
  const auto a = c.add_sequence();
  append(c, a, 0, 4 * 100 + 1);  // 101 blocks: the bookkeeping grows several times
  EXPECT_EQ(c.allocated_blocks(), 101);
  expect_contents(c, a, 0);
  const auto b = c.add_sequence();
  append(c, b, 0, 7);
  expect_contents(c, a, 0);
  expect_contents(c, b, 0);
  c.free_sequence(a);
  EXPECT_EQ(c.free_blocks(), 101);
  append(c, b, 0, 40);  // from the free list
  EXPECT_EQ(c.allocated_blocks(), 103);
  expect_contents(c, b, 0);
  EXPECT_EQ(c.release_free_blocks(), 91);
  EXPECT_EQ(c.allocated_blocks(), 12);
  c.reserve_blocks(20);
  EXPECT_EQ(c.allocated_blocks(), 20);
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

// Where append places factors inside a block, by address arithmetic through SeqView: head-major,
// head g's rows of a block's tokens are one contiguous run (token_stride = d), the heads' runs
// follow each other (row_stride = block_tokens·d) and V's region follows K's; token-major, a
// token's rows are adjacent (row_stride = d, token_stride = G·d). Both store the same values.
TEST(KVCache, HeadMajorPlacesEachHeadsTileContiguously) {
  const Index G = 3, d = 5, bt = 4, T = 10;
  for (auto order : {tpa::TileOrder::kHeadMajor, tpa::TileOrder::kTokenMajor}) {
    const bool hm = order == tpa::TileOrder::kHeadMajor;
    SCOPED_TRACE(hm ? "head-major" : "token-major");
    // A TPA-like token-major layer first, so the GQA layer's region starts inside the block.
    const CacheLayout tpa_like("T", {{"A", 2, 3, false}});
    KVCache<float> c({tpa_like, kv_layout(G, d, order)}, bt, 8);
    const auto s = c.add_sequence();
    std::vector<float> k(static_cast<std::size_t>(T * G * d)), v(k.size()), a(T * 6);
    for (std::size_t i = 0; i < k.size(); ++i) {
      k[i] = static_cast<float>(i);
      v[i] = -static_cast<float>(i) - 1;
    }
    for (Index t0 = 0; t0 < T; t0 += 3) {  // uneven chunks across block ends
      const Index n = std::min<Index>(3, T - t0);
      const FactorRows kv[2] = {{k.data() + t0 * G * d, G * d}, {v.data() + t0 * G * d, G * d}};
      const FactorRows ar[1] = {{a.data() + t0 * 6, 6}};
      c.append(s, 0, n, ar);
      c.append(s, 1, n, kv);
    }
    const auto view = c.view(s, 1);
    EXPECT_EQ(view.row_stride(0), hm ? bt * d : d);
    EXPECT_EQ(view.token_stride(0), hm ? d : G * d);
    for (Index b = 0; b < view.num_blocks(); ++b) {
      const float* k0 = view.row(0, b, 0);
      EXPECT_EQ(view.row(1, b, 0), k0 + bt * G * d) << "V's region follows K's";
      for (Index g = 0; g < G; ++g) {
        const float* tile = view.row(0, b, g);
        if (hm) {
          EXPECT_EQ(tile, k0 + g * bt * d) << "head " << g << " block " << b;
        } else {
          EXPECT_EQ(tile, k0 + g * d) << "head " << g << " block " << b;
        }
        for (Index i = 0; i < view.block_len(b); ++i) {
          const Index t = b * bt + i;
          // Head-major: token i of the tile right after token i − 1, no gap.
          EXPECT_EQ(view.row_at(0, t, g), tile + i * (hm ? d : G * d));
          EXPECT_EQ(view.row_at(1, t, g), view.row(1, b, g) + i * (hm ? d : G * d));
          for (Index j = 0; j < d; ++j) {
            ASSERT_EQ(view.row_at(0, t, g)[j], k[static_cast<std::size_t>((t * G + g) * d + j)]);
            ASSERT_EQ(view.row_at(1, t, g)[j], v[static_cast<std::size_t>((t * G + g) * d + j)]);
            ASSERT_EQ(view.at(0, t, g * d + j), k[static_cast<std::size_t>((t * G + g) * d + j)]);
          }
        }
      }
    }
  }
}

// The layers' layouts: MHA/GQA/MQA place K and V head-major; TPA's factors and MLA's latents
// (read whole per token) stay token-major. A GQA layer's cache built by forward() holds head g's
// tile of every block as one run of block_len·d elements.
TEST(KVCache, LayerLayoutsChooseTheirTileOrder) {
  tpa::GqaConfig gc;
  gc.d_model = 32;
  gc.n_heads = 4;
  gc.n_kv_heads = 2;
  gc.head_dim = 8;
  const tpa::GroupedQueryAttention<tpa::Native> gqa(gc, tpa::GqaWeights::random(gc, 1));
  for (std::size_t f = 0; f < 2; ++f)
    EXPECT_EQ(gqa.cache_layout().factor(f).order, tpa::TileOrder::kHeadMajor) << f;
  tpa::TpaConfig tc;
  tc.d_model = 32;
  tc.n_heads = 4;
  tc.head_dim = 8;
  tc.q_rank = 2;
  tc.k_rank = 2;
  tc.v_rank = 2;
  const tpa::TensorProductAttention<tpa::Native> tpa_layer(tc, tpa::TpaWeights::random(tc, 1));
  for (std::size_t f = 0; f < 4; ++f)
    EXPECT_EQ(tpa_layer.cache_layout().factor(f).order, tpa::TileOrder::kTokenMajor) << f;
  tpa::MlaConfig mc;
  mc.d_model = 32;
  mc.n_heads = 2;
  mc.kv_lora_rank = 16;
  mc.qk_nope_head_dim = 8;
  mc.qk_rope_head_dim = 8;
  mc.v_head_dim = 8;
  const tpa::MultiHeadLatentAttention<tpa::Native> mla(mc, tpa::MlaWeights::random(mc, 1));
  for (std::size_t f = 0; f < 2; ++f)
    EXPECT_EQ(mla.cache_layout().factor(f).order, tpa::TileOrder::kTokenMajor) << f;

  const Index bt = 4, T = 11, G = 2, d = 8;
  KVCache<float> c({gqa.cache_layout()}, bt, 8);
  const auto s = c.add_sequence();
  tpa::Context ctx(1);
  const auto x = tpa_test::random_tensor(T, 32, 5);
  tpa::Tensor<float, 2> y(T, 32);
  gqa.forward(ctx, x, y, c, 0, s);
  const auto view = c.view(s, 0);
  for (std::size_t f = 0; f < 2; ++f)
    for (Index b = 0; b < view.num_blocks(); ++b)
      for (Index g = 0; g < G; ++g)
        for (Index i = 0; i < view.block_len(b); ++i)
          EXPECT_EQ(view.row_at(f, b * bt + i, g), view.row(f, b, g) + i * d);
  EXPECT_EQ(view.row(0, 0, 1), view.row(0, 0, 0) + bt * d);
  // Other placements of the same factors are other layouts: the layer rejects such a cache.
  KVCache<float> token_major({kv_layout(G, d, tpa::TileOrder::kTokenMajor)}, bt, 8);
  const auto s2 = token_major.add_sequence();
  EXPECT_THROW(gqa.forward(ctx, x, y, token_major, 0, s2), tpa::Error);
  EXPECT_EQ(token_major.length(s2), 0);
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

}  // namespace cache_test
