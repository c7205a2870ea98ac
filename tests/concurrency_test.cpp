// Thread safety (README, "Thread safety"): one layer and one KVCache shared by several
// std::threads, each with its own Context, decoding distinct sequences at the same time. The
// sequences' blocks are taken up front with KVCache::reserve_tokens, which is what makes
// concurrent appends to distinct sequences race-free. Outputs must equal, bit for bit, the same
// calls run one after another. Run under ThreadSanitizer by scripts/test.sh (ctest label
// `threads`).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <thread>
#include <tpa/tpa.hpp>
#include <vector>

#include "test_util.hpp"

namespace concurrency_test {

using tpa::Index;
using tpa::SeqId;
using tpa_test::random_tensor;

constexpr Index kD = 64;
constexpr int kLayers = 2;      // the same layer twice, as two layers of a model
constexpr int kThreads = 4;     // std::threads sharing the layer and the cache
constexpr int kSeqsPerThread = 2;
constexpr int kSeqs = kThreads * kSeqsPerThread;
constexpr Index kSteps = 10;    // decode steps per sequence
constexpr Index kBlockTokens = 4;

Index prompt_len(int s) { return 3 + (5 * s) % 11; }

tpa::GqaConfig gqa_config() {
  tpa::GqaConfig c;
  c.d_model = kD;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.head_dim = 16;
  c.rope.max_positions = 64;
  return c;
}

tpa::MlaConfig mla_config() {
  tpa::MlaConfig c;
  c.d_model = kD;
  c.n_heads = 4;
  c.q_lora_rank = 32;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 8;
  c.v_head_dim = 16;
  c.rope.max_positions = 64;
  return c;
}

tpa::TpaConfig tpa_config() {
  tpa::TpaConfig c;
  c.d_model = kD;
  c.n_heads = 4;
  c.head_dim = 16;
  c.q_rank = 4;
  c.k_rank = 2;
  c.v_rank = 2;
  c.rope.max_positions = 64;
  return c;
}

template <class Layer>
Layer make_layer();
template <>
tpa::GroupedQueryAttention<> make_layer() {
  return tpa::GroupedQueryAttention<>(gqa_config(), tpa::GqaWeights::random(gqa_config(), 1));
}
template <>
tpa::MultiHeadLatentAttention<> make_layer() {
  return tpa::MultiHeadLatentAttention<>(mla_config(), tpa::MlaWeights::random(mla_config(), 2));
}
template <>
tpa::TensorProductAttention<tpa::Native, tpa::bfloat16> make_layer() {
  return tpa::TensorProductAttention<tpa::Native, tpa::bfloat16>(
      tpa_config(), tpa::TpaWeights::random(tpa_config(), 3));
}

// Outputs of one run: per sequence, the last layer's output rows of all decode steps.
using Outputs = std::vector<std::vector<float>>;

// The prompts and decode inputs of every sequence (fixed seeds).
struct Inputs {
  std::vector<tpa::Tensor<float, 2>> prompt, steps;
  Inputs() {
    for (int s = 0; s < kSeqs; ++s) {
      prompt.push_back(random_tensor(prompt_len(s), kD, 100 + static_cast<std::uint64_t>(s)));
      steps.push_back(random_tensor(kSteps, kD, 200 + static_cast<std::uint64_t>(s)));
    }
  }
};

template <class Layer>
class ConcurrencyTest : public ::testing::Test {
 protected:
  using Cache = typename Layer::Cache;

  ConcurrencyTest() : layer_(make_layer<Layer>()) {}

  // A cache holding every sequence's prompt (prefilled here, on one thread), each sequence
  // with room for all its decode steps reserved. `forked`: the second half of the sequences are
  // forks of the first half (sharing their prompts' blocks), and the room is reserved after the
  // forks, which copies the shared blocks the decode steps will write into.
  Cache prefilled(std::vector<SeqId>& seqs, bool forked = false) {
    Cache cache(std::vector<tpa::CacheLayout>(kLayers, layer_.cache_layout()), kBlockTokens, 256);
    tpa::Context ctx(1);
    seqs.clear();
    for (int s = 0; s < kSeqs; ++s) {
      if (forked && s >= kSeqs / 2) {
        seqs.push_back(cache.fork(seqs[static_cast<std::size_t>(s - kSeqs / 2)]));
        continue;
      }
      const SeqId id = cache.add_sequence();
      seqs.push_back(id);
      if (!forked) cache.reserve_tokens(id, prompt_len(s) + kSteps);
      tpa::Tensor<float, 2> x = in_.prompt[static_cast<std::size_t>(s)], y(prompt_len(s), kD);
      for (int l = 0; l < kLayers; ++l) {
        layer_.forward(ctx, x, y, cache, l, id);
        x = y;
      }
    }
    if (forked)
      for (SeqId id : seqs) cache.reserve_tokens(id, cache.length(id, 0) + kSteps);
    return cache;
  }

  // The decode steps of thread t's sequences: at even steps one batched call over both (decode,
  // or every other time the ragged call), at odd steps one forward call per sequence; every call
  // through all layers.
  void run_thread(int t, tpa::Context& ctx, Cache& cache, const std::vector<SeqId>& seqs,
                  Outputs& out) const {
    const int s0 = t * kSeqsPerThread;
    for (Index k = 0; k < kSteps; ++k) {
      if (k % 2 == 0) {
        tpa::Tensor<float, 2> x(kSeqsPerThread, kD), y(kSeqsPerThread, kD);
        std::vector<SeqId> ids;
        for (int j = 0; j < kSeqsPerThread; ++j) {
          const auto& src = in_.steps[static_cast<std::size_t>(s0 + j)];
          std::memcpy(x.data() + j * kD, src.data() + k * kD, sizeof(float) * kD);
          ids.push_back(seqs[static_cast<std::size_t>(s0 + j)]);
        }
        std::vector<tpa::Chunk> chunks;
        for (SeqId id : ids) chunks.push_back({id, 1});
        for (int l = 0; l < kLayers; ++l) {
          if (k % 4 == 0) {
            layer_.decode(ctx, x, y, cache, l, ids);
          } else {
            layer_.forward(ctx, x, y, cache, l, chunks);  // the same step as a ragged call
          }
          x = y;
        }
        for (int j = 0; j < kSeqsPerThread; ++j) {
          auto& o = out[static_cast<std::size_t>(s0 + j)];
          o.insert(o.end(), y.data() + j * kD, y.data() + (j + 1) * kD);
        }
      } else {
        for (int j = 0; j < kSeqsPerThread; ++j) {
          const int s = s0 + j;
          tpa::Tensor<float, 2> x = tpa_test::rows(in_.steps[static_cast<std::size_t>(s)], k, 1);
          tpa::Tensor<float, 2> y(1, kD);
          for (int l = 0; l < kLayers; ++l) {
            layer_.forward(ctx, x, y, cache, l, seqs[static_cast<std::size_t>(s)]);
            x = y;
          }
          auto& o = out[static_cast<std::size_t>(s)];
          o.insert(o.end(), y.data(), y.data() + kD);
        }
      }
    }
  }

  // Threads 0, 2 run single-threaded Contexts, threads 1, 3 Contexts with a 2-thread pool.
  static int context_threads(int t) { return 1 + t % 2; }

  Layer layer_;
  Inputs in_;
};

using Layers = ::testing::Types<tpa::GroupedQueryAttention<>, tpa::MultiHeadLatentAttention<>,
                                tpa::TensorProductAttention<tpa::Native, tpa::bfloat16>>;
TYPED_TEST_SUITE(ConcurrencyTest, Layers);

TYPED_TEST(ConcurrencyTest, ConcurrentDecodeEqualsSequential) {
  // Sequential reference: the same calls with the same Context thread counts, one after another.
  std::vector<SeqId> seqs_ref;
  auto ref_cache = this->prefilled(seqs_ref);
  Outputs ref(kSeqs);
  for (int t = 0; t < kThreads; ++t) {
    tpa::Context ctx(this->context_threads(t));
    this->run_thread(t, ctx, ref_cache, seqs_ref, ref);
  }

  std::vector<SeqId> seqs;
  auto cache = this->prefilled(seqs);
  const Index blocks_before = cache.allocated_blocks();
  const Index available_before = cache.available_blocks();
  Outputs out(kSeqs);
  {
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        tpa::Context ctx(this->context_threads(t));
        ready.fetch_add(1);
        while (ready.load() < kThreads) std::this_thread::yield();  // start together
        this->run_thread(t, ctx, cache, seqs, out);
      });
    }
    for (auto& th : threads) th.join();
  }

  // No block was taken from the pool while the threads ran, every token landed.
  EXPECT_EQ(cache.allocated_blocks(), blocks_before);
  EXPECT_EQ(cache.available_blocks(), available_before);
  std::size_t used = 0;
  for (int s = 0; s < kSeqs; ++s) {
    for (int l = 0; l < kLayers; ++l)
      EXPECT_EQ(cache.length(seqs[static_cast<std::size_t>(s)], l), prompt_len(s) + kSteps);
    used += static_cast<std::size_t>(prompt_len(s) + kSteps) * cache.bytes_per_token();
  }
  EXPECT_EQ(cache.bytes_used(), used);

  // Bit-identical to the sequential run: outputs and cached contents.
  for (int s = 0; s < kSeqs; ++s) {
    const auto& a = out[static_cast<std::size_t>(s)];
    const auto& b = ref[static_cast<std::size_t>(s)];
    ASSERT_EQ(a.size(), static_cast<std::size_t>(kSteps * kD));
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "sequence " << s;
  }
  EXPECT_TRUE(tpa_test::snapshot(cache, seqs).contents ==
              tpa_test::snapshot(ref_cache, seqs_ref).contents);
}

// Forked sequences (README, "Thread safety"): reserve_tokens on a fork and on its parent copies
// the blocks they share that their appends would write into, so that they too decode
// concurrently without taking a block; strict reservation mode would turn a missed copy into an
// error rather than a race. Parents run on threads 0 and 1, their forks on threads 2 and 3.
TYPED_TEST(ConcurrencyTest, ForkedSequencesDecodeConcurrentlyAfterReserveTokens) {
  std::vector<SeqId> seqs_ref;
  auto ref_cache = this->prefilled(seqs_ref, true);
  ref_cache.set_strict_reservation(true);
  Outputs ref(kSeqs);
  for (int t = 0; t < kThreads; ++t) {
    tpa::Context ctx(this->context_threads(t));
    this->run_thread(t, ctx, ref_cache, seqs_ref, ref);
  }

  std::vector<SeqId> seqs;
  auto cache = this->prefilled(seqs, true);
  cache.set_strict_reservation(true);
  // Sequence 1's prompt (8 tokens) fills two blocks, which its fork (5) still shares.
  ASSERT_EQ(prompt_len(1), 8);
  EXPECT_EQ(cache.block_table(seqs[1])[0], cache.block_table(seqs[5])[0]);
  EXPECT_EQ(cache.block_table(seqs[1])[1], cache.block_table(seqs[5])[1]);
  const Index blocks_before = cache.allocated_blocks();
  const Index available_before = cache.available_blocks();
  const std::size_t used_before = cache.bytes_used();
  Outputs out(kSeqs);
  {
    std::atomic<int> ready{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        tpa::Context ctx(this->context_threads(t));
        ready.fetch_add(1);
        while (ready.load() < kThreads) std::this_thread::yield();  // start together
        this->run_thread(t, ctx, cache, seqs, out);
      });
    }
    for (auto& th : threads) th.join();
  }
  EXPECT_EQ(cache.allocated_blocks(), blocks_before);
  EXPECT_EQ(cache.available_blocks(), available_before);
  EXPECT_EQ(cache.bytes_used(), used_before + kSeqs * kSteps * cache.bytes_per_token());
  for (int s = 0; s < kSeqs; ++s) {
    const auto& a = out[static_cast<std::size_t>(s)];
    const auto& b = ref[static_cast<std::size_t>(s)];
    ASSERT_EQ(a.size(), static_cast<std::size_t>(kSteps * kD));
    ASSERT_EQ(a.size(), b.size());
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << "sequence " << s;
  }
  EXPECT_TRUE(tpa_test::snapshot(cache, seqs).contents ==
              tpa_test::snapshot(ref_cache, seqs_ref).contents);
}

// reserve_tokens: the blocks move into the sequence's table at once, later appends up to that
// length take none, the unused ones return to the pool on free; errors change nothing.
TEST(ReserveTokens, TakesBlocksUpFrontAndFreesThem) {
  const tpa::CacheLayout layout("T", {{"K", 2, 4, false}});
  tpa::KVCache<float> cache({layout, layout}, 4, 5);
  const SeqId a = cache.add_sequence(), b = cache.add_sequence();
  cache.reserve_tokens(a, 9);  // 3 blocks of 4
  EXPECT_EQ(cache.block_table(a).size(), 3u);
  EXPECT_EQ(cache.available_blocks(), 2);
  EXPECT_EQ(cache.bytes_used(), 0u);
  EXPECT_EQ(cache.blocks_needed(a, 0, 12), 0);
  EXPECT_EQ(cache.blocks_needed(a, 1, 13), 1);
  cache.reserve_tokens(a, 5);  // already has room: no change
  EXPECT_EQ(cache.block_table(a).size(), 3u);

  std::vector<float> src(8 * 12);
  for (std::size_t i = 0; i < src.size(); ++i) src[i] = static_cast<float>(i);
  const tpa::FactorRows rows[1] = {{src.data(), 8}};
  const auto table = cache.block_table(a);
  cache.append(a, 0, 12, rows);
  cache.append(a, 1, 7, rows);
  EXPECT_EQ(cache.block_table(a), table);
  EXPECT_EQ(cache.bytes_used(), 19u * 8 * sizeof(float));
  EXPECT_EQ(cache.view(a, 0).at(0, 11, 7), static_cast<float>(11 * 8 + 7));
  EXPECT_EQ(cache.view(a, 1).at(0, 6, 0), static_cast<float>(6 * 8));

  // Too many blocks, a negative count, a dead sequence: Error, nothing changes.
  const auto before = tpa_test::snapshot(cache, {a, b});
  EXPECT_THROW(cache.reserve_tokens(b, 4 * 3), tpa::Error);
  EXPECT_THROW(cache.reserve_tokens(b, -1), tpa::Error);
  EXPECT_THROW(cache.reserve_tokens(7, 1), tpa::Error);
  EXPECT_TRUE(tpa_test::snapshot(cache, {a, b}) == before);
  EXPECT_EQ(cache.available_blocks(), 2);

  cache.reserve_tokens(b, 8);
  EXPECT_EQ(cache.available_blocks(), 0);
  cache.free_sequence(a);
  cache.free_sequence(b);
  EXPECT_EQ(cache.available_blocks(), 5);
  EXPECT_EQ(cache.bytes_used(), 0u);
}

// Context::parallel_for: every index runs exactly once, and what the pool's threads wrote is
// visible to the caller when the call returns (the join is an atomic counter the caller spins
// on, not a lock: ThreadSanitizer checks the happens-before), over many back-to-back calls and
// with more threads than this machine may have cores (the join then yields its core).
TEST(ContextParallelFor, RunsEveryIndexOnceAndPublishesItsWrites) {
  for (int threads : {1, 2, 3, 5}) {
    tpa::Context ctx(threads);
    for (Index n : {0, 1, 2, 3, 7, 64}) {
      std::vector<int> hits(static_cast<std::size_t>(n), 0);  // plain ints: one writer each
      std::vector<std::atomic<int>> runs(static_cast<std::size_t>(n));
      for (auto& r : runs) r.store(0);
      const int calls = 300;
      for (int c = 0; c < calls; ++c) {
        ctx.parallel_for(n, [&](Index i) {
          ++hits[static_cast<std::size_t>(i)];
          runs[static_cast<std::size_t>(i)].fetch_add(1, std::memory_order_relaxed);
        });
        for (Index i = 0; i < n; ++i)
          ASSERT_EQ(hits[static_cast<std::size_t>(i)], c + 1)
              << "threads " << threads << ", n " << n << ", index " << i << ", call " << c;
      }
      for (Index i = 0; i < n; ++i) EXPECT_EQ(runs[static_cast<std::size_t>(i)].load(), calls);
    }
  }
}

// The pool's idle threads poll for `spin`, then sleep on a condition variable: calls that come
// after they fell asleep (spin 0: always; 50 µs: after the 300 µs pauses) must wake them and
// still run every index once. A negative spin is rejected.
TEST(ContextParallelFor, WakesSleepingThreads) {
  using std::chrono::microseconds;
  for (const microseconds spin : {microseconds(0), microseconds(50)}) {
    tpa::Context ctx(3, spin);
    std::vector<int> hits(6, 0);
    for (int c = 0; c < 40; ++c) {
      if (c % 4 == 0) std::this_thread::sleep_for(microseconds(300));
      ctx.parallel_for(6, [&](Index i) { ++hits[static_cast<std::size_t>(i)]; });
      for (int h : hits) ASSERT_EQ(h, c + 1) << "spin " << spin.count() << " us, call " << c;
    }
  }
  EXPECT_THROW(tpa::Context(2, microseconds(-1)), tpa::Error);
  EXPECT_THROW(tpa::Context(0), tpa::Error);
}

}  // namespace concurrency_test
