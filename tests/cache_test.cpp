// The paged KV cache: layouts, sequences, block reuse, exact byte accounting, append contents,
// and the strong guarantee of every throwing call.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "test_util.hpp"

using tpa::CacheLayout;
using tpa::FactorRows;
using tpa::Index;
using tpa::KVCache;

namespace cache_test {

// K [g, d] and V [g, d], token-major unless told otherwise.
CacheLayout kv_layout(Index g, Index d, tpa::TileOrder order = tpa::TileOrder::kTokenMajor) {
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
  EXPECT_NE(b, a);  // slot reused, with the next generation: a new handle
  EXPECT_FALSE(c.contains(a));
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

// SeqView::huge_pages: set for blocks of 2 MiB or more (2 MiB aligned, advised to huge pages)
// when the system has transparent huge pages on, never for smaller blocks.
TEST(KVCache, ViewsCarryTheHugePageHint) {
  KVCache<float> small({kv_layout(1, 4)}, 4, 8);  // 128-byte blocks
  const auto a = small.add_sequence();
  append(small, a, 0, 5);
  EXPECT_FALSE(small.view(a, 0).huge_pages);
  KVCache<float> big({kv_layout(2, 1024)}, 128, 2);  // K and V of 2 × 1024 floats: 2 MiB blocks
  const auto b = big.add_sequence();
  append(big, b, 0, 3);
  EXPECT_EQ(big.view(b, 0).huge_pages, tpa::detail::transparent_huge_pages());
  EXPECT_EQ(reinterpret_cast<std::uintptr_t>(big.view(b, 0).row(0, 0, 0)) % (2u << 20), 0u);
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

// The layers' layouts are token-major, except GQA's K and V, which are head-major where each KV
// head serves at most one query head per cached byte or at least two, or the cache is int8
// (tpa::kv_tile_order), and token-major in between.
// A cache of a GQA layer's factors placed otherwise than it places them is another layout, which
// the layer rejects; filled through the kernels' path (append), head g's tile of every block is
// one run of block_len·d elements.
TEST(KVCache, LayerLayoutsChooseTheirTileOrder) {
  tpa::GqaConfig gc;
  gc.d_model = 32;
  gc.n_heads = 4;
  gc.n_kv_heads = 2;
  gc.head_dim = 8;
  const tpa::GroupedQueryAttention<tpa::Native> gqa(gc, tpa::GqaWeights::random(gc, 1));
  // K/V head-major up to 1 and from 2 query heads per KV head and byte of a cached element,
  // and for int8 always.
  for (Index kv_heads : {48, 24, 16, 12, 8, 6, 4, 2}) {
    tpa::GqaConfig c = gc;
    c.n_heads = 48;
    c.d_model = 48 * c.head_dim;
    c.n_kv_heads = kv_heads;
    const Index group = 48 / kv_heads;
    const auto w = tpa::GqaWeights::random(c, 1);
    auto order = [&](const auto& layer) {
      const auto& l = layer.cache_layout();
      EXPECT_EQ(l.factor(0).order, l.factor(1).order);
      return l.factor(0).order;
    };
    auto expect = [](bool head) {
      return head ? tpa::TileOrder::kHeadMajor : tpa::TileOrder::kTokenMajor;
    };
    SCOPED_TRACE("group " + std::to_string(group));
    EXPECT_EQ(order(tpa::GroupedQueryAttention<tpa::Native>(c, w)),
              expect(group <= 4 || group >= 8));
    EXPECT_EQ(order(tpa::GroupedQueryAttention<tpa::Native, tpa::bfloat16>(c, w)),
              expect(group <= 2 || group >= 4));
    EXPECT_EQ(order(tpa::GroupedQueryAttention<tpa::Native, tpa::q8>(c, w)), expect(true));
  }
  for (std::size_t f = 0; f < 2; ++f)
    EXPECT_EQ(gqa.cache_layout().factor(f).order, tpa::TileOrder::kHeadMajor) << f;
  {  // One KV head (MQA): both placements are the same bytes, so every scalar's layout agrees.
    tpa::GqaConfig c = gc;
    c.n_heads = 6;  // f32 token-major, bf16 head-major
    c.d_model = 6 * c.head_dim;
    c.n_kv_heads = 1;
    const auto w = tpa::GqaWeights::random(c, 1);
    const tpa::GroupedQueryAttention<tpa::Native> f32(c, w);
    const tpa::GroupedQueryAttention<tpa::Native, tpa::bfloat16> bf16(c, w);
    EXPECT_NE(f32.cache_layout().factor(0).order, bf16.cache_layout().factor(0).order);
    EXPECT_EQ(f32.cache_layout(), bf16.cache_layout());
  }
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
  KVCache<float> c({kv_layout(G, d, tpa::TileOrder::kHeadMajor)}, bt, 8);
  const auto s = c.add_sequence();
  std::vector<float> kv(static_cast<std::size_t>(T * G * d));
  for (std::size_t i = 0; i < kv.size(); ++i) kv[i] = static_cast<float>(i);
  const FactorRows rows[2] = {{kv.data(), G * d}, {kv.data(), G * d}};
  c.append(s, 0, T, rows);
  const auto view = c.view(s, 0);
  for (std::size_t f = 0; f < 2; ++f)
    for (Index b = 0; b < view.num_blocks(); ++b)
      for (Index g = 0; g < G; ++g)
        for (Index i = 0; i < view.block_len(b); ++i)
          EXPECT_EQ(view.row_at(f, b * bt + i, g), view.row(f, b, g) + i * d);
  EXPECT_EQ(view.row(0, 0, 1), view.row(0, 0, 0) + bt * d);
  // Another placement of the same factors is another layout: the (head-major) layer rejects a
  // token-major cache.
  tpa::Context ctx(1);
  const auto x = tpa_test::random_tensor(T, 32, 5);
  tpa::Tensor<float, 2> y(T, 32);
  KVCache<float> other({kv_layout(G, d, tpa::TileOrder::kTokenMajor)}, bt, 8);
  const auto s2 = other.add_sequence();
  EXPECT_THROW(gqa.forward(ctx, x, y, other, 0, s2), tpa::Error);
  EXPECT_EQ(other.length(s2), 0);
  KVCache<float> same({gqa.cache_layout()}, bt, 8);
  const auto s3 = same.add_sequence();
  EXPECT_NO_THROW(gqa.forward(ctx, x, y, same, 0, s3));
  EXPECT_EQ(same.length(s3), T);
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

// ---- serving: truncate, fork (copy on write), generation handles, strict reservation ---------

// Appends n tokens to s in `layer` whose factor f element e of token i is tag(tag0 + i, f, e), so
// that tokens of diverging forks differ.
float tag_value(Index tag, std::size_t f, Index e) {
  return static_cast<float>(tag) + 0.5f * static_cast<float>(f) + static_cast<float>(e % 8) / 16;
}
void append_tagged(KVCache<float>& c, tpa::SeqId s, int layer, Index n, Index tag0) {
  const CacheLayout& l = c.layout(layer);
  std::vector<std::vector<float>> data(l.num_factors());
  std::vector<FactorRows> rows(l.num_factors());
  for (std::size_t f = 0; f < l.num_factors(); ++f) {
    const Index e = l.factor(f).elements();
    data[f].resize(static_cast<std::size_t>(std::max<Index>(n, 1) * e));
    for (Index i = 0; i < n; ++i)
      for (Index j = 0; j < e; ++j) data[f][static_cast<std::size_t>(i * e + j)] = tag_value(tag0 + i, f, j);
    rows[f] = FactorRows{data[f].data(), e};
  }
  c.append(s, layer, n, rows.data());
}
// Tags of every token of s in each layer, read back from the cache.
std::vector<std::vector<Index>> read_tags(const KVCache<float>& c, tpa::SeqId s) {
  std::vector<std::vector<Index>> out(static_cast<std::size_t>(c.num_layers()));
  for (int l = 0; l < c.num_layers(); ++l) {
    const auto v = c.view(s, l);
    for (Index t = 0; t < v.n_tokens; ++t) {
      const auto tag = static_cast<Index>(v.at(0, t, 0));
      for (std::size_t f = 0; f < c.layout(l).num_factors(); ++f)
        for (Index e = 0; e < v.elements(f); ++e)
          EXPECT_EQ(v.at(f, t, e), tag_value(tag, f, e)) << "layer " << l << " token " << t;
      out[static_cast<std::size_t>(l)].push_back(tag);
    }
  }
  return out;
}

// bytes_used() as documented: each (block, layer, token slot) holding a token of at least one
// live sequence counts once.
std::size_t distinct_token_bytes(const KVCache<float>& c, const std::vector<tpa::SeqId>& live) {
  std::size_t n = 0;
  for (int l = 0; l < c.num_layers(); ++l) {
    std::set<std::pair<std::int32_t, Index>> slots;
    for (auto s : live)
      for (Index t = 0; t < c.length(s, l); ++t)
        slots.insert({c.block_table(s)[static_cast<std::size_t>(t / c.block_tokens())],
                      t % c.block_tokens()});
    n += slots.size() * c.bytes_per_token(l);
  }
  return n;
}

// Reference counts, free list and availability against the live sequences' tables.
void expect_block_accounting(const KVCache<float>& c, const std::vector<tpa::SeqId>& live) {
  std::map<std::int32_t, Index> holders;
  for (auto s : live) {
    const auto& t = c.block_table(s);
    EXPECT_EQ(std::set<std::int32_t>(t.begin(), t.end()).size(), t.size()) << "duplicate block";
    for (auto b : t) ++holders[b];
  }
  for (const auto& [b, n] : holders) EXPECT_EQ(c.block_refs(b), n) << "block " << b;
  const auto in_use = static_cast<Index>(holders.size());
  EXPECT_EQ(c.free_blocks(), c.allocated_blocks() - in_use);
  EXPECT_EQ(c.available_blocks(), c.max_blocks() - in_use);
  EXPECT_EQ(c.bytes_used(), distinct_token_bytes(c, live));
  EXPECT_EQ(c.num_sequences(), static_cast<Index>(live.size()));
}

TEST(KVCacheServing, TruncateCutsEveryLayerAndReturnsBlocks) {
  KVCache<float> c({kv_layout(2, 4), kv_layout(1, 4)}, 4, 8);
  const auto a = c.add_sequence();
  append_tagged(c, a, 0, 10, 100);
  append_tagged(c, a, 1, 9, 200);
  c.reserve_tokens(a, 16);  // 4 blocks
  EXPECT_EQ(c.available_blocks(), 4);
  try {
    c.truncate(a, 10);  // layer 1 holds 9
    FAIL() << "no error";
  } catch (const tpa::Error& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("n_tokens (10) exceeds the length of sequence 0 (slot 0, generation 0) in "
                     "layer 1 (9)"), std::string::npos) << m;
  }
  EXPECT_THROW(c.truncate(a, -1), tpa::Error);
  EXPECT_EQ(c.length(a, 0), 10);
  c.truncate(a, 5);
  EXPECT_EQ(c.length(a, 0), 5);
  EXPECT_EQ(c.length(a, 1), 5);
  EXPECT_EQ(c.block_table(a).size(), 2u);  // reserved room past the tokens is returned too
  EXPECT_EQ(c.available_blocks(), 6);
  EXPECT_EQ(c.bytes_used(), 5 * c.bytes_per_token());
  auto tags = read_tags(c, a);
  EXPECT_EQ(tags[0], (std::vector<Index>{100, 101, 102, 103, 104}));
  EXPECT_EQ(tags[1], (std::vector<Index>{200, 201, 202, 203, 204}));
  append_tagged(c, a, 0, 2, 300);  // overwrites the dropped tokens' slots
  EXPECT_EQ(read_tags(c, a)[0], (std::vector<Index>{100, 101, 102, 103, 104, 300, 301}));
  c.truncate(a, 0);
  EXPECT_TRUE(c.block_table(a).empty());
  EXPECT_EQ(c.bytes_used(), 0u);
  EXPECT_EQ(c.available_blocks(), 8);
}

TEST(KVCacheServing, ForkSharesBlocksAndCopiesOnFirstWrite) {
  KVCache<float> c({kv_layout(2, 4), kv_layout(1, 4)}, 4, 8);
  const auto p = c.add_sequence();
  append_tagged(c, p, 0, 6, 100);
  append_tagged(c, p, 1, 6, 200);
  c.reserve_tokens(p, 12);  // a third block, not shared
  const std::size_t used = c.bytes_used();
  const auto child = c.fork(p);
  EXPECT_NE(child, p);
  EXPECT_EQ(read_tags(c, child), read_tags(c, p));
  const auto pt = c.block_table(p);
  const auto ct = c.block_table(child);
  ASSERT_EQ(ct.size(), 2u);
  EXPECT_EQ(ct[0], pt[0]);
  EXPECT_EQ(ct[1], pt[1]);
  EXPECT_EQ(c.block_refs(pt[0]), 2);
  EXPECT_EQ(c.block_refs(pt[2]), 1);
  EXPECT_EQ(c.bytes_used(), used);  // shared blocks count once
  EXPECT_EQ(c.available_blocks(), 5);
  expect_block_accounting(c, {p, child});

  // The child's append into the shared, partly filled block copies it.
  EXPECT_EQ(c.copies_needed(child, 0, 1), 1);
  EXPECT_EQ(c.blocks_needed(child, 0, 3), 2);  // the copy and a new block
  EXPECT_EQ(c.copies_needed(p, 0, 1), 1);       // the parent's would too
  append_tagged(c, child, 0, 1, 500);
  EXPECT_NE(c.block_table(child)[1], pt[1]);
  EXPECT_EQ(c.block_table(child)[0], pt[0]);
  EXPECT_EQ(c.block_refs(pt[1]), 1);
  EXPECT_EQ(c.copies_needed(p, 0, 1), 0);       // the parent owns its block alone now
  EXPECT_EQ(c.copies_needed(child, 1, 2), 0);   // the copy holds layer 1's tokens too
  append_tagged(c, child, 1, 2, 600);
  append_tagged(c, p, 0, 2, 700);
  auto pt_tags = read_tags(c, p), ct_tags = read_tags(c, child);
  EXPECT_EQ(pt_tags[0], (std::vector<Index>{100, 101, 102, 103, 104, 105, 700, 701}));
  EXPECT_EQ(ct_tags[0], (std::vector<Index>{100, 101, 102, 103, 104, 105, 500}));
  EXPECT_EQ(ct_tags[1], (std::vector<Index>{200, 201, 202, 203, 204, 205, 600, 601}));
  EXPECT_EQ(pt_tags[1].size(), 6u);
  expect_block_accounting(c, {p, child});

  // Freeing the parent keeps the block the child still holds.
  c.free_sequence(p);
  EXPECT_EQ(c.block_refs(pt[0]), 1);
  EXPECT_EQ(read_tags(c, child), ct_tags);
  expect_block_accounting(c, {child});
  c.free_sequence(child);
  EXPECT_EQ(c.available_blocks(), 8);
  EXPECT_EQ(c.bytes_used(), 0u);
}

TEST(KVCacheServing, TruncateOfAForkKeepsSharedBlocks) {
  KVCache<float> c({kv_layout(1, 4)}, 2, 8);
  const auto p = c.add_sequence();
  append_tagged(c, p, 0, 7, 10);  // 4 blocks, the last half full
  const auto f = c.fork(p);
  c.truncate(f, 3);  // keeps 2 shared blocks, the second one half used by f
  EXPECT_EQ(c.block_table(f).size(), 2u);
  EXPECT_EQ(c.block_refs(c.block_table(p)[3]), 1);
  EXPECT_EQ(c.bytes_used(), 7 * c.bytes_per_token());  // f's tokens are all in p's blocks
  expect_block_accounting(c, {p, f});
  EXPECT_EQ(c.copies_needed(f, 0, 1), 1);  // token 3 goes into the shared block 1
  append_tagged(c, f, 0, 2, 90);
  EXPECT_EQ(read_tags(c, f)[0], (std::vector<Index>{10, 11, 12, 90, 91}));
  EXPECT_EQ(read_tags(c, p)[0], (std::vector<Index>{10, 11, 12, 13, 14, 15, 16}));
  expect_block_accounting(c, {p, f});
  c.truncate(p, 0);
  EXPECT_EQ(read_tags(c, f)[0], (std::vector<Index>{10, 11, 12, 90, 91}));
  expect_block_accounting(c, {p, f});
}

TEST(KVCacheServing, ReserveTokensCopiesSharedBlocksUpFront) {
  KVCache<float> c({kv_layout(1, 4), kv_layout(1, 4)}, 4, 8);
  const auto p = c.add_sequence();
  append_tagged(c, p, 0, 6, 10);
  append_tagged(c, p, 1, 2, 20);  // layer 1 behind: it will write into shared block 0 too
  const auto f = c.fork(p);
  EXPECT_EQ(c.blocks_needed(f, 1, 4), 2);
  c.reserve_tokens(f, 6);  // copies both shared blocks, takes nothing new
  EXPECT_EQ(c.block_refs(c.block_table(p)[0]), 1);
  EXPECT_EQ(c.block_refs(c.block_table(p)[1]), 1);
  for (int l = 0; l < 2; ++l) EXPECT_EQ(c.blocks_needed(f, l, 6 - c.length(f, l)), 0);
  EXPECT_EQ(read_tags(c, f), read_tags(c, p));
  // And the parent's shared blocks are its own again: its appends take no block either.
  EXPECT_EQ(c.blocks_needed(p, 0, 2), 0);
  c.set_strict_reservation(true);
  append_tagged(c, f, 1, 4, 30);
  append_tagged(c, p, 0, 2, 40);
  expect_block_accounting(c, {p, f});
}

TEST(KVCacheServing, StaleHandlesThrowAndFreeNothing) {
  KVCache<float> c({kv_layout(1, 4)}, 2, 8);
  const auto a = c.add_sequence();
  EXPECT_EQ(a, 0);  // generation 0: the slot
  append_tagged(c, a, 0, 3, 1);
  c.free_sequence(a);
  try {
    c.free_sequence(a);
    FAIL() << "double free";
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("sequence 0 (slot 0, generation 0) is not a live "
                                         "sequence of this cache: it was freed"),
              std::string::npos) << e.what();
  }
  const auto b = c.add_sequence();  // same slot, next generation
  EXPECT_NE(a, b);
  EXPECT_TRUE(c.contains(b));
  EXPECT_FALSE(c.contains(a));
  append_tagged(c, b, 0, 2, 50);
  const auto before = tpa_test::snapshot(c, {b});
  for (auto call : std::vector<std::function<void()>>{
           [&] { c.free_sequence(a); }, [&] { (void)c.length(a); },
           [&] { append_tagged(c, a, 0, 1, 9); }, [&] { c.truncate(a, 0); },
           [&] { (void)c.fork(a); }, [&] { c.reserve_tokens(a, 8); },
           [&] { (void)c.view(a, 0); }}) {
    try {
      call();
      ADD_FAILURE() << "stale handle accepted";
    } catch (const tpa::Error& e) {
      EXPECT_NE(std::string(e.what()).find("(slot 0, generation 0)"), std::string::npos)
          << e.what();
      EXPECT_NE(std::string(e.what()).find("now holds generation 1, live"), std::string::npos)
          << e.what();
    }
    EXPECT_TRUE(tpa_test::snapshot(c, {b}) == before);
  }
  EXPECT_EQ(read_tags(c, b)[0], (std::vector<Index>{50, 51}));
  c.free_sequence(b);
  EXPECT_EQ(c.num_sequences(), 0);
  EXPECT_THROW(c.free_sequence(b), tpa::Error);
  EXPECT_FALSE(c.contains(-1));
  EXPECT_FALSE(c.contains(std::int64_t(1) << 40));
}

TEST(KVCacheServing, StrictReservationThrowsInsteadOfTakingABlock) {
  KVCache<float> c({kv_layout(1, 4), kv_layout(1, 4)}, 4, 8);
  EXPECT_FALSE(c.strict_reservation());
  c.set_strict_reservation(true);
  const auto a = c.add_sequence();
  const auto before = tpa_test::snapshot(c, {a});
  try {
    append_tagged(c, a, 0, 1, 1);
    FAIL() << "no error";
  } catch (const tpa::Error& e) {
    EXPECT_NE(std::string(e.what()).find("strict reservation"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("reserve_tokens"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(tpa_test::snapshot(c, {a}) == before);
  c.reserve_tokens(a, 6);
  append_tagged(c, a, 0, 6, 1);
  append_tagged(c, a, 1, 5, 1);
  EXPECT_THROW(append_tagged(c, a, 0, 3, 9), tpa::Error);  // past the reservation
  // A copy on write takes a block as well.
  const auto f = c.fork(a);
  EXPECT_THROW(append_tagged(c, f, 1, 1, 9), tpa::Error);
  EXPECT_THROW(append_tagged(c, a, 1, 1, 9), tpa::Error);
  c.reserve_tokens(f, 6);
  append_tagged(c, f, 1, 1, 9);
  append_tagged(c, a, 1, 1, 9);  // a's block is no longer shared
  c.set_strict_reservation(false);
  append_tagged(c, a, 0, 3, 9);
  expect_block_accounting(c, {a, f});
}

// Random add / fork / append / truncate / reserve / free (and strict mode on and off) against a
// model of every sequence's tokens per layer; after every step the cache must hold exactly the
// model's tokens, with exact reference counts, free list, availability and bytes_used(); a call
// that throws must change nothing.
TEST(KVCacheServing, RandomOperationsMatchAModel) {
  for (std::uint32_t seed = 1; seed <= 12; ++seed) {
    std::mt19937 rng(seed);
    auto pick = [&](int n) { return static_cast<int>(rng() % static_cast<unsigned>(n)); };
    KVCache<float> c({kv_layout(1, 3), kv_layout(2, 2, tpa::TileOrder::kTokenMajor)},
                     1 + pick(4), 6 + pick(10));
    std::map<tpa::SeqId, std::vector<std::vector<Index>>> model;
    std::vector<tpa::SeqId> stale;
    Index tag = 1;
    auto live = [&] {
      std::vector<tpa::SeqId> v;
      for (const auto& kv : model) v.push_back(kv.first);
      return v;
    };
    auto any = [&] {
      auto v = live();
      if (!stale.empty() && pick(8) == 0) return stale[static_cast<std::size_t>(pick(static_cast<int>(stale.size())))];
      return v.empty() ? tpa::SeqId(-1) : v[static_cast<std::size_t>(pick(static_cast<int>(v.size())))];
    };
    for (int step = 0; step < 400; ++step) {
      const auto before = tpa_test::snapshot(c, live());
      const Index available = c.available_blocks();
      bool threw = false;
      try {
        switch (pick(8)) {
          case 0: {
            const auto s = c.add_sequence();
            ASSERT_EQ(model.count(s), 0u);
            model[s].assign(2, {});
            break;
          }
          case 1: {
            const auto s = any();
            const auto f = c.fork(s);
            ASSERT_EQ(model.count(f), 0u);
            model[f] = model.at(s);
            break;
          }
          case 2:
          case 3:
          case 4: {
            const auto s = any();
            const int l = pick(2);
            const Index n = pick(7);
            append_tagged(c, s, l, n, tag);
            for (Index i = 0; i < n; ++i) model.at(s)[static_cast<std::size_t>(l)].push_back(tag + i);
            tag += n;
            break;
          }
          case 5: {
            const auto s = any();
            Index m = model.count(s) ? static_cast<Index>(std::min(model[s][0].size(), model[s][1].size())) : 0;
            const Index n = pick(8) == 0 ? m + 1 : (m > 0 ? pick(static_cast<int>(m) + 1) : 0);
            c.truncate(s, n);
            for (auto& v : model.at(s)) v.resize(static_cast<std::size_t>(n));
            break;
          }
          case 6: {
            const auto s = any();
            if (pick(3) == 0) {
              c.set_strict_reservation(!c.strict_reservation());
              break;
            }
            const Index n = model.count(s) ? static_cast<Index>(model[s][0].size()) + pick(6) : 1;
            c.reserve_tokens(s, n);
            ASSERT_TRUE(model.count(s));
            for (int l = 0; l < 2; ++l)
              EXPECT_EQ(c.blocks_needed(s, l, std::max<Index>(0, n - c.length(s, l))), 0);
            break;
          }
          default: {
            if (pick(2) == 0) break;
            const auto s = any();
            c.free_sequence(s);
            model.erase(s);  // throws nothing if already gone
            stale.push_back(s);
            break;
          }
        }
      } catch (const tpa::Error&) {
        threw = true;
      }
      const auto now = live();
      if (threw) {
        ASSERT_TRUE(tpa_test::snapshot(c, now) == before) << "seed " << seed << " step " << step;
        ASSERT_EQ(c.available_blocks(), available);
      }
      for (auto s : now) {
        ASSERT_EQ(read_tags(c, s), model.at(s)) << "seed " << seed << " step " << step;
      }
      for (auto s : stale) ASSERT_EQ(c.contains(s), model.count(s) != 0);
      expect_block_accounting(c, now);
      if (::testing::Test::HasFailure()) return;
    }
  }
}

// A fork decoded through real layers (two stacked layers of each kind, so one cache block holds
// both layers' tokens) gives the outputs the same tokens give on sequences prefilled from scratch.
TEST(KVCacheServing, ForkedSequencesDecodeLikeFreshOnes) {
  tpa::GqaConfig g;
  g.d_model = 32;
  g.n_heads = 4;
  g.n_kv_heads = 2;
  g.head_dim = 8;
  g.rope.max_positions = 64;
  tpa::TpaConfig t;
  t.d_model = 32;
  t.n_heads = 4;
  t.head_dim = 8;
  t.q_rank = 2;
  t.k_rank = 2;
  t.v_rank = 2;
  t.rope.max_positions = 64;
  tpa::MlaConfig m;
  m.d_model = 32;
  m.n_heads = 4;
  m.q_lora_rank = 16;
  m.kv_lora_rank = 8;
  m.qk_nope_head_dim = 8;
  m.qk_rope_head_dim = 4;
  m.v_head_dim = 8;
  m.rope.max_positions = 64;
  using Tensor2 = tpa::Tensor<float, 2>;
  tpa::Context ctx(1);
  for (const auto& k : tpa_test::all_kinds(g, t, m)) {
    SCOPED_TRACE(k.name);
    const Index prompt = 6, steps = 5, bt = 4;
    const Tensor2 xp = tpa_test::random_tensor(prompt, 32, 11);
    // Runs x through both layers as seqs' next tokens (one row each, or all rows for one seq).
    auto run = [&](KVCache<float>& c, const Tensor2& x, const std::vector<tpa::SeqId>& seqs) {
      Tensor2 h(x.dimension(0), 32), y(x.dimension(0), 32);
      if (seqs.size() == 1) {
        k.forward_cached(ctx, x, h, c, 0, seqs[0]);
        k.forward_cached(ctx, h, y, c, 1, seqs[0]);
      } else {
        k.decode(ctx, x, h, c, 0, seqs);
        k.decode(ctx, h, y, c, 1, seqs);
      }
      return y;
    };
    std::vector<Tensor2> xs;
    for (Index i = 0; i < steps; ++i) xs.push_back(tpa_test::random_tensor(2, 32, 100 + static_cast<std::uint64_t>(i)));
    // Forked: p prefilled, f = fork(p); each step decodes row 0 on p and row 1 on f, batched.
    KVCache<float> fc({k.layout, k.layout}, bt, 16);
    const auto p = fc.add_sequence();
    (void)run(fc, xp, {p});
    const auto f = fc.fork(p);
    // From scratch: two sequences each prefilled with the prompt.
    KVCache<float> rc({k.layout, k.layout}, bt, 16);
    const auto r0 = rc.add_sequence(), r1 = rc.add_sequence();
    (void)run(rc, xp, {r0});
    (void)run(rc, xp, {r1});
    for (Index i = 0; i < steps; ++i) {
      const Tensor2 yf = run(fc, xs[static_cast<std::size_t>(i)], {p, f});
      const Tensor2 yr = run(rc, xs[static_cast<std::size_t>(i)], {r0, r1});
      ASSERT_EQ(std::memcmp(yf.data(), yr.data(), sizeof(float) * 64), 0) << "step " << i;
    }
    EXPECT_TRUE(tpa_test::snapshot(fc, {p, f}).contents == tpa_test::snapshot(rc, {r0, r1}).contents);
    // p and f share block 0 (tokens 0-3) only: block 1 was copied on the first decode.
    EXPECT_EQ(fc.block_table(p)[0], fc.block_table(f)[0]);
    EXPECT_NE(fc.block_table(p)[1], fc.block_table(f)[1]);
    EXPECT_EQ(fc.bytes_used(), rc.bytes_used() - 4 * fc.bytes_per_token());
    expect_block_accounting(fc, {p, f});
  }
}

}  // namespace cache_test
