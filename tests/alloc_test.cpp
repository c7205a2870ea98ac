// No heap allocation inside a decode step after warm-up (DESIGN.md, "Kernels"): the global
// operator new/delete are replaced by counting versions, Eigen's own allocator is armed to
// report any call (EIGEN_RUNTIME_NO_MALLOC), and the scratch arena and the cache must not grow.

#include <atomic>
#include <cstdlib>
#include <new>

// Must precede every Eigen include: Eigen then checks is_malloc_allowed() in its allocator, and
// its asserts (also on in release builds here) report to the counter below.
namespace alloc_test {
inline std::atomic<long> eigen_malloc_failures{0};
inline void eigen_assert_failed() { eigen_malloc_failures.fetch_add(1); }
}  // namespace alloc_test
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) ((x) ? static_cast<void>(0) : alloc_test::eigen_assert_failed())

#include <gtest/gtest.h>

#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "tpa/tpa.hpp"

namespace alloc_test {
std::atomic<long> news{0};

void* counted(std::size_t n, std::size_t align = 0) {
  news.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t)
                ? std::aligned_alloc(align, (n + align - 1) / align * align)
                : std::malloc(n);
  return p;
}
// Out of line, so that GCC does not see free() applied to a pointer from operator new where a
// replaced operator delete is inlined (-Wmismatched-new-delete).
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }
}  // namespace alloc_test

void* operator new(std::size_t n) {
  if (void* p = alloc_test::counted(n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = alloc_test::counted(n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return alloc_test::counted(n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return alloc_test::counted(n);
}
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = alloc_test::counted(n, static_cast<std::size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) {
  if (void* p = alloc_test::counted(n, static_cast<std::size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return alloc_test::counted(n, static_cast<std::size_t>(a));
}
void* operator new[](std::size_t n, std::align_val_t a, const std::nothrow_t&) noexcept {
  return alloc_test::counted(n, static_cast<std::size_t>(a));
}
void operator delete(void* p) noexcept { alloc_test::release(p); }
void operator delete[](void* p) noexcept { alloc_test::release(p); }
void operator delete(void* p, std::size_t) noexcept { alloc_test::release(p); }
void operator delete[](void* p, std::size_t) noexcept { alloc_test::release(p); }
void operator delete(void* p, const std::nothrow_t&) noexcept { alloc_test::release(p); }
void operator delete[](void* p, const std::nothrow_t&) noexcept { alloc_test::release(p); }
void operator delete(void* p, std::align_val_t) noexcept { alloc_test::release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { alloc_test::release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { alloc_test::release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { alloc_test::release(p); }
void operator delete(void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  alloc_test::release(p);
}
void operator delete[](void* p, std::align_val_t, const std::nothrow_t&) noexcept {
  alloc_test::release(p);
}

namespace tpa {
namespace {

Tensor<float, 2> random_rows(Index n, Index d, unsigned seed) {
  Tensor<float, 2> x(n, d);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = nd(rng);
  return x;
}

// Fills `seq` with n tokens of random keys and values straight into the cache (the decode
// steps under test do not care how they got there, and this skips an O(n²) prefill).
template <class S>
void fill(KVCache<S>& cache, SeqId seq, const GqaConfig& cfg, Index n, unsigned seed) {
  const Index w = cfg.kv_heads() * cfg.head_dim;
  const Tensor<float, 2> kv = random_rows(n, 2 * w, seed);
  const FactorRows rows[2] = {{kv.data(), 2 * w}, {kv.data() + w, 2 * w}};
  cache.append(seq, 0, n, rows);
}

// Two sequences of kLenA and kLenB tokens, with blocks reserved for every step below.
constexpr Index kBlock = 16, kSteps = 40, kWarm = 4, kLenA = 2000, kLenB = 700;
template <class S = float>
struct TwoSequences {
  KVCache<S> cache;
  SeqId a, b;
  explicit TwoSequences(const CacheLayout& layout) : cache({layout}, kBlock, 1024) {
    cache.reserve_blocks((kLenA + 4 * (kWarm + kSteps)) / kBlock +
                         (kLenB + 3 * (kWarm + kSteps)) / kBlock + 4);
    a = cache.add_sequence();
    b = cache.add_sequence();
  }
};

// Decode steps of `layer` on 2 threads, once the caller has filled s.a and s.b: one token of a
// (forward), a batch of one token each of a and b (decode) and a ragged call (2 draft tokens of
// b, 1 of a), kWarm times to warm up, then
// kSteps times with no operator new, no Eigen heap allocation, and neither the scratch arena nor
// the cache growing.
template <class Layer, class S>
void check_steps_allocate_nothing(const Layer& layer, Index d_model, TwoSequences<S>& s) {
  Context ctx(2);
  KVCache<S>& cache = s.cache;
  const SeqId a = s.a;
  const std::vector<SeqId> batch = {a, s.b};
  // A ragged step: a 2-token draft of b beside a decode token of a.
  const std::vector<tpa::Chunk> chunks = {{s.b, 2}, {a, 1}};
  const Tensor<float, 2> x1 = random_rows(1, d_model, 4), xb = random_rows(2, d_model, 5);
  const Tensor<float, 2> xr = random_rows(3, d_model, 6);
  Tensor<float, 2> y1(1, d_model), yb(2, d_model), yr(3, d_model);

  for (Index i = 0; i < kWarm; ++i) {  // warm-up: the scratch arena reaches its size
    layer.forward(ctx, x1, y1, cache, 0, a);
    layer.decode(ctx, xb, yb, cache, 0, batch);
    layer.forward(ctx, xr, yr, cache, 0, chunks);
  }
  const std::size_t scratch_before = ctx.scratch().capacity();
  const std::size_t cache_before = cache.bytes_reserved();
  const long news_before = alloc_test::news.load();
  const long eigen_before = alloc_test::eigen_malloc_failures.load();
  Eigen::internal::set_is_malloc_allowed(false);
  for (Index i = 0; i < kSteps; ++i) {
    layer.forward(ctx, x1, y1, cache, 0, a);
    layer.decode(ctx, xb, yb, cache, 0, batch);
    layer.forward(ctx, xr, yr, cache, 0, chunks);
  }
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(alloc_test::news.load() - news_before, 0) << "operator new calls in decode steps";
  EXPECT_EQ(alloc_test::eigen_malloc_failures.load() - eigen_before, 0) << "Eigen heap allocations";
  EXPECT_EQ(ctx.scratch().capacity(), scratch_before) << "the scratch arena grew";
  EXPECT_EQ(cache.bytes_reserved(), cache_before) << "the cache allocated blocks";
  EXPECT_EQ(cache.length(a), kLenA + kWarm * 3 + kSteps * 3);
  EXPECT_EQ(cache.length(s.b), kLenB + kWarm * 3 + kSteps * 3);
  for (Index i = 0; i < yr.size(); ++i) ASSERT_TRUE(std::isfinite(yr.data()[i]));
  for (Index i = 0; i < yb.size(); ++i) ASSERT_TRUE(std::isfinite(yb.data()[i]));
  for (Index i = 0; i < y1.size(); ++i) ASSERT_TRUE(std::isfinite(y1.data()[i]));
}

// GQA decode of one sequence and of a batch of two, with long enough contexts that the work is
// split over both threads (KV heads for GQA, split-K for MQA).
// `rope` as given (RoPE variants: decay, off); `v`, the attention variants.
template <class S = float>
void check_decode_allocates_nothing(Index n_kv_heads, tpa::RopeConfig rope = {},
                                    const tpa::AttentionVariant& v = {}) {
  GqaConfig cfg;
  cfg.variant = v;
  cfg.d_model = 256;
  cfg.n_heads = 16;
  cfg.n_kv_heads = n_kv_heads;
  cfg.head_dim = 64;
  cfg.rope = rope;
  cfg.rope.max_positions = 8192;
  const GroupedQueryAttention<Native, S> layer(cfg, GqaWeights::random(cfg, 1));
  TwoSequences<S> s(layer.cache_layout());
  fill(s.cache, s.a, cfg, kLenA, 2);
  fill(s.cache, s.b, cfg, kLenB, 3);
  check_steps_allocate_nothing(layer, cfg.d_model, s);
}

// TPA (T6, or K/V-only) decode of one sequence (split-K over both threads) and of a batch of two,
// after the caches hold random factors. `variants`: sigmoid factors and partial RoPE with decay;
// `v`, the attention variants.
template <class S = float>
void check_tpa_decode_allocates_nothing(bool kv_only, bool variants = false,
                                        const tpa::AttentionVariant& v = {}) {
  TpaConfig cfg;
  cfg.variant = v;
  cfg.d_model = 256;
  cfg.n_heads = 16;
  cfg.head_dim = 64;
  cfg.q_rank = kv_only ? 0 : 6;
  cfg.k_rank = 2;
  cfg.v_rank = 2;
  cfg.kv_only = kv_only;
  cfg.rope.max_positions = 8192;
  if (variants) {
    cfg.factor_activation = tpa::FactorActivation::kSigmoid;
    cfg.rope.rotary_dim = 32;
    cfg.rope.decay_base = 0.999;
  }
  const TensorProductAttention<Native, S> layer(cfg, TpaWeights::random(cfg, 1));
  TwoSequences<S> s(layer.cache_layout());
  for (const auto& [seq, len] : {std::pair<SeqId, Index>{s.a, kLenA}, {s.b, kLenB}}) {
    const Index w = cfg.cache_elements_per_token();
    const Tensor<float, 2> f = random_rows(len, w, static_cast<unsigned>(len));
    const Index e[4] = {cfg.n_heads * cfg.k_rank, cfg.k_rank * cfg.head_dim,
                        cfg.n_heads * cfg.v_rank, cfg.v_rank * cfg.head_dim};
    const FactorRows rows[4] = {{f.data(), w},
                                {f.data() + e[0], w},
                                {f.data() + e[0] + e[1], w},
                                {f.data() + e[0] + e[1] + e[2], w}};
    s.cache.append(seq, 0, len, rows);
  }
  check_steps_allocate_nothing(layer, cfg.d_model, s);
}

TEST(AllocTest, CountersSeeAllocations) {
  const long before = alloc_test::news.load();
  auto* v = new std::vector<int>(100);
  delete v;
  EXPECT_GE(alloc_test::news.load() - before, 2);
}

// max_blocks is only a bound (issue 27): the cache's per-block bookkeeping grows when new
// blocks are allocated, never when an append takes a block that is already allocated. A cache
// that may hold 2^31 − 1 blocks, warmed up to 200 blocks and emptied, then serves appends of
// single tokens (taking a free block every 8th) without any operator new.
TEST(AllocTest, AppendsTakingFreeBlocksAllocateNothingWithAHugeMaxBlocks) {
  const CacheLayout layout("GQA", {{"K", 2, 8, true}, {"V", 2, 8, false}});
  KVCache<float> cache({layout}, 8, std::numeric_limits<std::int32_t>::max());
  const SeqId a = cache.add_sequence();
  const Tensor<float, 2> kv = random_rows(1600, 32, 7);
  const FactorRows warm[2] = {{kv.data(), 32}, {kv.data() + 16, 32}};
  cache.append(a, 0, 1600, warm);  // 200 blocks: the bookkeeping grew several times
  cache.free_sequence(a);
  const SeqId b = cache.add_sequence();  // reuses a's slot and its block table's capacity
  const long before = alloc_test::news.load();
  for (Index i = 0; i < 1600; ++i) {
    const FactorRows rows[2] = {{kv.data() + i * 32, 32}, {kv.data() + i * 32 + 16, 32}};
    cache.append(b, 0, 1, rows);
  }
  EXPECT_EQ(alloc_test::news.load() - before, 0) << "operator new calls in appends";
  EXPECT_EQ(cache.allocated_blocks(), 200);
  EXPECT_EQ(cache.length(b), 1600);
}

TEST(AllocTest, GqaDecodeAllocatesNothingAfterWarmUp) { check_decode_allocates_nothing(2); }

TEST(AllocTest, MqaSplitKDecodeAllocatesNothingAfterWarmUp) { check_decode_allocates_nothing(1); }

TEST(AllocTest, TpaDecodeAllocatesNothingAfterWarmUp) { check_tpa_decode_allocates_nothing(false); }

// The same with an int8 cache (tpa::q8): quantizing on append and dequantizing in the kernels
// allocate nothing either.
TEST(AllocTest, Int8CacheDecodeAllocatesNothingAfterWarmUp) {
  check_decode_allocates_nothing<tpa::q8>(2);
  check_decode_allocates_nothing<tpa::q8>(1);
  check_tpa_decode_allocates_nothing<tpa::q8>(false);
  check_tpa_decode_allocates_nothing<tpa::q8>(true);
}

TEST(AllocTest, TpaKvOnlyDecodeAllocatesNothingAfterWarmUp) {
  check_tpa_decode_allocates_nothing(true);
}

// The per-layer variants of issue 25 act when a token is projected, from tables built at
// construction: RoPE with decay, RoPE off, sigmoid factors allocate nothing either.
TEST(AllocTest, VariantDecodeStepsAllocateNothingAfterWarmUp) {
  tpa::RopeConfig decay;
  decay.rotary_dim = 16;
  decay.decay_base = 0.99;
  check_decode_allocates_nothing(2, decay);
  tpa::RopeConfig off;
  off.style = tpa::RopeStyle::kNone;
  check_decode_allocates_nothing(1, off);
  check_tpa_decode_allocates_nothing(false, true);
  check_tpa_decode_allocates_nothing(true, true);
}

// Every attention variant on (issue 25): a window of 1500 (split-K over the window), sinks,
// soft-cap and ALiBi.
tpa::AttentionVariant all_variants() {
  tpa::AttentionVariant v;
  v.window = 1500;
  v.sinks = true;
  v.logit_softcap = 30.f;
  v.alibi = true;
  return v;
}

TEST(AllocTest, VariantGqaAndMqaDecodeAllocatesNothingAfterWarmUp) {
  check_decode_allocates_nothing(2, {}, all_variants());
  check_decode_allocates_nothing(1, {}, all_variants());
}

TEST(AllocTest, VariantTpaDecodeAllocatesNothingAfterWarmUp) {
  check_tpa_decode_allocates_nothing(false, false, all_variants());
  check_tpa_decode_allocates_nothing(true, false, all_variants());
}

// Serving with forks (issue 24): fork a prefilled sequence whose last block is partly filled,
// decode a batch of it and the fork (the parent's write copies the shared block), prefill a
// token of the fork, free the fork and truncate the parent back — after warm-up, with free
// blocks in the pool, none of it allocates.
TEST(AllocTest, ForkCopyOnWriteAndTruncateAllocateNothingAfterWarmUp) {
  GqaConfig cfg;
  cfg.d_model = 64;
  cfg.n_heads = 4;
  cfg.n_kv_heads = 2;
  cfg.head_dim = 16;
  cfg.rope.max_positions = 1024;
  const GroupedQueryAttention<Native> layer(cfg, GqaWeights::random(cfg, 1));
  KVCache<float> cache({layer.cache_layout()}, kBlock, 64);
  cache.reserve_blocks(32);
  const SeqId a = cache.add_sequence();
  constexpr Index kPrompt = 200;  // 12.5 blocks
  fill(cache, a, cfg, kPrompt, 2);
  Context ctx(2);
  const Tensor<float, 2> x1 = random_rows(1, cfg.d_model, 4), xb = random_rows(2, cfg.d_model, 5);
  Tensor<float, 2> y1(1, cfg.d_model), yb(2, cfg.d_model);
  std::vector<SeqId> batch(2);
  Index copies = 0;
  auto step = [&] {
    const SeqId f = cache.fork(a);
    copies += cache.copies_needed(a, 0, 1);
    batch[0] = a;
    batch[1] = f;
    layer.decode(ctx, xb, yb, cache, 0, batch);
    layer.forward(ctx, x1, y1, cache, 0, f);
    cache.free_sequence(f);
    cache.truncate(a, kPrompt);
  };
  for (Index i = 0; i < kWarm; ++i) step();
  const std::size_t scratch_before = ctx.scratch().capacity();
  const std::size_t cache_before = cache.bytes_reserved();
  const long news_before = alloc_test::news.load();
  const long eigen_before = alloc_test::eigen_malloc_failures.load();
  Eigen::internal::set_is_malloc_allowed(false);
  for (Index i = 0; i < kSteps; ++i) step();
  Eigen::internal::set_is_malloc_allowed(true);
  EXPECT_EQ(alloc_test::news.load() - news_before, 0) << "operator new calls";
  EXPECT_EQ(alloc_test::eigen_malloc_failures.load() - eigen_before, 0) << "Eigen heap allocations";
  EXPECT_EQ(ctx.scratch().capacity(), scratch_before) << "the scratch arena grew";
  EXPECT_EQ(cache.bytes_reserved(), cache_before) << "the cache allocated blocks";
  EXPECT_EQ(copies, kWarm + kSteps);  // every step copied the shared last block
  EXPECT_EQ(cache.length(a), kPrompt);
  EXPECT_EQ(cache.num_sequences(), 1);
  EXPECT_EQ(cache.bytes_used(), static_cast<std::size_t>(kPrompt) * cache.bytes_per_token());
  for (Index i = 0; i < yb.size(); ++i) ASSERT_TRUE(std::isfinite(yb.data()[i]));
}

}  // namespace
}  // namespace tpa
