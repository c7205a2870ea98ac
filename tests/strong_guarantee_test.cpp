// The strong exception guarantee of the public API (issue 9, part 3): every call that throws —
// tpa::Error on bad input, std::bad_alloc when memory runs out — leaves the cache (contents,
// block tables, lengths, bytes used and reserved, free list), the layer, the context's scratch
// and the checkpoint writer / weights it was given exactly as they were.
//
// Inventory of the throwing paths reachable from the public API and where each is tested:
//   KVCache ctor (layouts, block_tokens, max_blocks)        cache_test InvalidConstructionThrows
//   KVCache add_sequence (bad_alloc)                        here, CacheFaults
//   KVCache free_sequence / length / view / block_table /
//     layout / check_append / check_layout (unknown seq,
//     layer, layout)                                        here, CacheErrors (+ cache_test)
//   KVCache reserve_blocks / ensure_free_blocks /
//     reserve_tokens (over the pool, bad_alloc)             here, CacheErrors + CacheFaults
//   KVCache append (seq, layer, full, bad_alloc)            here + cache_test
//   KVCache truncate / fork (length, stale handle,
//     bad_alloc), strict reservation, copy on write into a
//     shared block (full, bad_alloc)                        here, CacheErrors + CacheFaults
//                                                           + ForkErrors (+ cache_test)
//   Layer calls on forked sequences (copy on write),
//     strict reservation                                    here, LayerErrors + LayerFaults
//   Layer forward(ctx, x, y[, cache, layer, seq]), the ragged forward(…, chunks) and
//     decode(…, seqs) for GQA, MHA, MQA, TPA, TPA-KV, MLA
//     absorbed / explicit: shapes, empty x, unknown or
//     freed sequence, layer, layout, RoPE table, full
//     cache, batch that does not fit, seqs count, repeat,
//     one bad sequence in a batch; bad_alloc of blocks      here, LayerErrors + LayerFaults
//     (gqa/tpa/mla_test check a subset per kind)
//   Configs validate() and layer ctors (every rule),
//     weights check(), RopeTable, CacheLayout, Context      here, ConfigErrors (+ per-kind tests)
//   Checkpoint load_*_weights (missing, shape, unexpected,
//     invalid config), save_*_weights (duplicate name),
//     SafetensorsWriter::add                                here, CheckpointErrors
//   SafetensorsFile::open / from_bytes / reads             safetensors_test (immutable object)
//   grouped_attention / tpa_attention param checks          kernels tests (no state: outputs only)
//
// std::bad_alloc is injected by replacing the global operator new (the cache's blocks, the
// context's scratch chunks and every std container allocate through it): the n-th allocation of
// a call throws, for n = 0, 1, … until the call succeeds. Layer calls are swept with the scratch
// made to grow at every point of the call (before, between and after its appends).

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include <tpa/io/checkpoint.hpp>
#include <tpa/tpa.hpp>

#include "test_util.hpp"

namespace fault {
std::atomic<long> fail_at{-1};  // index of the allocation that throws; -1: none
std::atomic<long> count{0};     // allocations since arming
std::atomic<long> injected{0};  // failures injected since arming

bool should_fail() {
  if (fail_at.load(std::memory_order_relaxed) < 0) return false;
  if (count.fetch_add(1) != fail_at.load()) return false;
  injected.fetch_add(1);
  return true;
}
void* allocate(std::size_t n, std::size_t align) {
  if (should_fail()) return nullptr;
  if (n == 0) n = 1;
  return align > alignof(std::max_align_t)
             ? std::aligned_alloc(align, (n + align - 1) / align * align)
             : std::malloc(n);
}
[[gnu::noinline]] void release(void* p) noexcept { std::free(p); }

/// Arms the n-th allocation (0-based) from now to fail, until destroyed.
struct FailNth {
  explicit FailNth(long n) {
    count = 0;
    injected = 0;
    fail_at = n;
  }
  ~FailNth() { fail_at = -1; }
  FailNth(const FailNth&) = delete;
  FailNth& operator=(const FailNth&) = delete;
};
}  // namespace fault

void* operator new(std::size_t n) {
  if (void* p = fault::allocate(n, 0)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = fault::allocate(n, 0)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, std::align_val_t a) {
  if (void* p = fault::allocate(n, static_cast<std::size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n, std::align_val_t a) {
  if (void* p = fault::allocate(n, static_cast<std::size_t>(a))) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return fault::allocate(n, 0); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept {
  return fault::allocate(n, 0);
}
void operator delete(void* p) noexcept { fault::release(p); }
void operator delete[](void* p) noexcept { fault::release(p); }
void operator delete(void* p, std::size_t) noexcept { fault::release(p); }
void operator delete[](void* p, std::size_t) noexcept { fault::release(p); }
void operator delete(void* p, std::align_val_t) noexcept { fault::release(p); }
void operator delete[](void* p, std::align_val_t) noexcept { fault::release(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { fault::release(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { fault::release(p); }

namespace {

using tpa::Index;
using tpa::KVCache;
using tpa::SeqId;
using tpa_test::AnyLayer;
using tpa_test::random_tensor;
using Tensor2 = tpa::Tensor<float, 2>;

// Everything observable about a cache, over the sequences the test knows to be live.
struct State {
  tpa_test::CacheSnapshot<float> snap;
  Index allocated = 0, free = 0, available = 0, sequences = 0;
  bool operator==(const State& o) const {
    return snap == o.snap && allocated == o.allocated && free == o.free &&
           available == o.available && sequences == o.sequences;
  }
};
State state(const KVCache<float>& c, const std::vector<SeqId>& live) {
  return State{tpa_test::snapshot(c, live), c.allocated_blocks(), c.free_blocks(),
               c.available_blocks(), c.num_sequences()};
}
bool same_mark(const tpa::Scratch::Mark& a, const tpa::Scratch::Mark& b) {
  return a.chunk == b.chunk && a.offset == b.offset;
}

// ---------------------------------------------------------------------------------------------
// KVCache
// ---------------------------------------------------------------------------------------------

tpa::CacheLayout kv_layout(Index g, Index d) {
  return tpa::CacheLayout("GQA", {{"K", g, d, true}, {"V", g, d, false}});
}

void append(KVCache<float>& c, SeqId s, int layer, Index n, std::uint64_t seed) {
  const Index e = c.layout(layer).factor(0).elements();
  const Tensor2 k = random_tensor(n, e, seed), v = random_tensor(n, e, seed + 1);
  const tpa::FactorRows rows[2] = {{k.data(), e}, {v.data(), e}};
  c.append(s, layer, n, rows);
}

// Two layers, blocks of 4 tokens, at most 8 blocks: a holds 5 tokens in both layers (2 blocks),
// b 3 tokens in layer 0 (1 block), one block on the free list, `gone` freed.
struct CacheFixture {
  KVCache<float> c{{kv_layout(2, 4), kv_layout(1, 4)}, 4, 8};
  SeqId a, b, gone;
  CacheFixture() {
    a = c.add_sequence();
    b = c.add_sequence();
    gone = c.add_sequence();
    append(c, a, 0, 5, 1);
    append(c, a, 1, 5, 3);
    append(c, b, 0, 3, 5);
    append(c, gone, 0, 2, 7);
    c.free_sequence(gone);
  }
  State now() const { return state(c, {a, b}); }
};

struct CacheCase {
  const char* name;
  const char* message;  // substring of the error
  std::function<void(CacheFixture&)> call;
};

TEST(CacheErrors, EveryThrowingMemberChangesNothing) {
  const std::vector<CacheCase> cases = {
      {"free unknown", "not a live sequence", [](CacheFixture& f) { f.c.free_sequence(42); }},
      {"double free", "not a live sequence", [](CacheFixture& f) { f.c.free_sequence(f.gone); }},
      {"free negative", "not a live sequence", [](CacheFixture& f) { f.c.free_sequence(-1); }},
      {"length layer", "layer (2)", [](CacheFixture& f) { (void)f.c.length(f.a, 2); }},
      {"view freed", "not a live", [](CacheFixture& f) { (void)f.c.view(f.gone, 0); }},
      {"block_table", "not a live", [](CacheFixture& f) { (void)f.c.block_table(9); }},
      {"layout", "layer (-1)", [](CacheFixture& f) { (void)f.c.layout(-1); }},
      {"check_layout", "holds layout",
       [](CacheFixture& f) { f.c.check_layout("t", 0, kv_layout(1, 4)); }},
      {"check_append full", "cache is full",
       [](CacheFixture& f) { f.c.check_append("t", f.b, 0, kv_layout(2, 4), 30); }},
      {"reserve_blocks", "exceeds max_blocks", [](CacheFixture& f) { f.c.reserve_blocks(9); }},
      {"ensure_free_blocks", "exceeds the available",
       [](CacheFixture& f) { f.c.ensure_free_blocks(6); }},
      {"reserve_tokens full", "needs 6 new blocks",
       [](CacheFixture& f) { f.c.reserve_tokens(f.b, 28); }},
      {"reserve_tokens negative", "must be >= 0",
       [](CacheFixture& f) { f.c.reserve_tokens(f.a, -1); }},
      {"reserve_tokens freed", "not a live",
       [](CacheFixture& f) { f.c.reserve_tokens(f.gone, 4); }},
      {"append unknown", "sequence 17", [](CacheFixture& f) { append(f.c, 17, 0, 1, 9); }},
      {"append freed", "not a live", [](CacheFixture& f) { append(f.c, f.gone, 0, 1, 9); }},
      {"append full", "cache is full", [](CacheFixture& f) { append(f.c, f.b, 0, 22, 9); }},
      {"append full other layer", "cache is full",
       [](CacheFixture& f) { append(f.c, f.a, 1, 24, 9); }},
      {"blocks_needed unknown", "sequence 42 is not a live",
       [](CacheFixture& f) { (void)f.c.blocks_needed(42, 0, 1); }},
      {"blocks_needed freed", "not a live",
       [](CacheFixture& f) { (void)f.c.blocks_needed(f.gone, 0, 1); }},
      {"blocks_needed layer", "layer (2)",
       [](CacheFixture& f) { (void)f.c.blocks_needed(f.a, 2, 1); }},
      {"blocks_needed negative", "n (-3) must be >= 0",
       [](CacheFixture& f) { (void)f.c.blocks_needed(f.a, 0, -3); }},
      {"truncate past a layer", "n_tokens (1) exceeds the length of sequence 1 (slot 1, "
       "generation 0) in layer 1 (0)", [](CacheFixture& f) { f.c.truncate(f.b, 1); }},
      {"truncate past every layer", "exceeds the length",
       [](CacheFixture& f) { f.c.truncate(f.a, 6); }},
      {"truncate negative", "n_tokens (-1) must be >= 0",
       [](CacheFixture& f) { f.c.truncate(f.a, -1); }},
      {"truncate freed", "(slot 2, generation 0) is not a live sequence of this cache: it was "
       "freed", [](CacheFixture& f) { f.c.truncate(f.gone, 0); }},
      {"fork freed", "not a live", [](CacheFixture& f) { (void)f.c.fork(f.gone); }},
      {"fork unknown", "sequence 42", [](CacheFixture& f) { (void)f.c.fork(42); }},
      {"copies_needed freed", "not a live",
       [](CacheFixture& f) { (void)f.c.copies_needed(f.gone, 0, 1); }},
      {"block_refs", "block (8) is not in", [](CacheFixture& f) { (void)f.c.block_refs(8); }},
      {"drop_before past a layer", "position (1) must be in [0, 0]",
       [](CacheFixture& f) { (void)f.c.drop_before(f.b, 1); }},
      {"drop_before negative", "position (-1)",
       [](CacheFixture& f) { (void)f.c.drop_before(f.a, -1); }},
      {"drop_before freed", "not a live",
       [](CacheFixture& f) { (void)f.c.drop_before(f.gone, 0); }},
      {"first_token freed", "not a live", [](CacheFixture& f) { (void)f.c.first_token(f.gone); }},
      {"strict append", "strict reservation", [](CacheFixture& f) {
         f.c.set_strict_reservation(true);
         append(f.c, f.b, 0, 2, 9);
       }},
      {"strict check_append", "strict reservation", [](CacheFixture& f) {
         f.c.set_strict_reservation(true);
         f.c.check_append("t", f.a, 1, kv_layout(1, 4), 4);
       }},
  };
  for (const auto& k : cases) {
    CacheFixture f;
    const State before = f.now();
    try {
      k.call(f);
      ADD_FAILURE() << k.name << ": no error";
    } catch (const tpa::Error& e) {
      EXPECT_NE(std::string(e.what()).find(k.message), std::string::npos) << k.name << ": "
                                                                           << e.what();
    }
    EXPECT_TRUE(f.now() == before) << k.name;
  }
}

// A fork of a (5 tokens in both layers: block 1 is shared and partly filled) and a pool with no
// block left: every append into the shared block needs a copy that cannot be had.
struct ForkFixture {
  KVCache<float> c{{kv_layout(2, 4), kv_layout(1, 4)}, 4, 3};
  SeqId a, b, fk;
  ForkFixture() {
    a = c.add_sequence();
    b = c.add_sequence();
    append(c, a, 0, 5, 1);
    append(c, a, 1, 5, 3);
    append(c, b, 0, 2, 5);
    fk = c.fork(a);
  }
  State now() const { return state(c, {a, b, fk}); }
};

TEST(ForkErrors, CopyOnWriteIntoAFullPoolChangesNothing) {
  const std::vector<std::pair<const char*, std::function<void(ForkFixture&)>>> cases = {
      {"append to the fork", [](ForkFixture& f) { append(f.c, f.fk, 0, 1, 9); }},
      {"append to the parent", [](ForkFixture& f) { append(f.c, f.a, 1, 2, 9); }},
      {"reserve_tokens on the fork", [](ForkFixture& f) { f.c.reserve_tokens(f.fk, 6); }},
      {"strict: the copy needs a block", [](ForkFixture& f) {
         f.c.set_strict_reservation(true);
         append(f.c, f.fk, 1, 1, 9);
       }},
  };
  for (const auto& k : cases) {
    ForkFixture f;
    EXPECT_EQ(f.c.available_blocks(), 0);
    EXPECT_EQ(f.c.blocks_needed(f.fk, 0, 1), 1);
    const State before = f.now();
    EXPECT_THROW(k.second(f), tpa::Error) << k.first;
    EXPECT_TRUE(f.now() == before) << k.first;
  }
  // Appends that write only into blocks of their own still work.
  ForkFixture f;
  append(f.c, f.b, 0, 2, 9);
  f.c.truncate(f.fk, 4);  // block 1 leaves the fork: the parent owns it alone again
  append(f.c, f.a, 0, 3, 9);
  EXPECT_EQ(f.c.length(f.a, 0), 8);
}

// Runs `call` on fresh fixtures with the n-th allocation failing, n = 0, 1, … until it
// succeeds; after each failure the state must equal the state before. Returns how many
// failures were injected.
template <class Fixture, class Call>
long fault_sweep(const char* name, Call call) {
  for (long n = 0; n < 400; ++n) {
    Fixture f;
    const auto before = f.now();
    bool threw = false;
    {
      fault::FailNth arm(n);
      try {
        call(f);
      } catch (const std::bad_alloc&) {
        threw = true;
      }
    }
    if (!threw) return n;
    EXPECT_TRUE(f.now() == before) << name << ": allocation " << n << " failed";
  }
  ADD_FAILURE() << name << ": still failing after 400 injected allocations";
  return 0;
}

TEST(CacheFaults, OutOfMemoryChangesNothing) {
  // A fixture with an empty free list and no handle to reuse: every call below allocates.
  struct F : CacheFixture {
    F() {
      (void)c.add_sequence();  // takes gone's handle
      c.release_free_blocks();
    }
  };
  const std::vector<std::pair<const char*, std::function<void(F&)>>> cases = {
      {"add_sequence", [](F& f) { (void)f.c.add_sequence(); }},
      {"reserve_blocks", [](F& f) { f.c.reserve_blocks(7); }},
      {"ensure_free_blocks", [](F& f) { f.c.ensure_free_blocks(4); }},
      {"reserve_tokens", [](F& f) { f.c.reserve_tokens(f.b, 20); }},
      {"append 2 blocks", [](F& f) { append(f.c, f.a, 0, 11, 11); }},
      {"append after release", [](F& f) { append(f.c, f.b, 1, 16, 13); }},
  };
  for (const auto& k : cases) {
    const long failures = fault_sweep<F>(k.first, k.second);
    EXPECT_GE(failures, 1) << k.first << ": no allocation to fail";
  }
}

// fork() needs a slot (no freed one here) and copies on write need a block (the free list is
// empty): out of memory in either changes nothing.
TEST(CacheFaults, ForkAndCopyOnWriteChangeNothingOnOutOfMemory) {
  struct F : CacheFixture {
    SeqId fk;
    F() {
      (void)c.add_sequence();  // takes gone's slot
      fk = c.fork(a);
      c.release_free_blocks();
    }
    State now() const { return state(c, {a, b, fk}); }
  };
  const std::vector<std::pair<const char*, std::function<void(F&)>>> cases = {
      {"fork", [](F& f) { (void)f.c.fork(f.b); }},
      {"append copies", [](F& f) { append(f.c, f.fk, 0, 1, 11); }},
      {"append copies and takes", [](F& f) { append(f.c, f.a, 1, 7, 12); }},
      {"reserve_tokens copies", [](F& f) { f.c.reserve_tokens(f.fk, 12); }},
  };
  for (const auto& k : cases) {
    const long failures = fault_sweep<F>(k.first, k.second);
    EXPECT_GE(failures, 1) << k.first << ": no allocation to fail";
  }
}

// The per-block bookkeeping grows with the blocks allocated (issue 27: it was reserved for
// max_blocks up front). A call that needs a new block id past the bookkeeping's capacity (16 ids
// here, of at most 64) grows it; a failure anywhere in that changes nothing either.
TEST(CacheFaults, BookkeepingGrowthChangesNothingOnOutOfMemory) {
  struct F {
    KVCache<float> c{{kv_layout(2, 4), kv_layout(1, 4)}, 4, 64};
    SeqId a, b;
    F() {
      a = c.add_sequence();
      b = c.add_sequence();
      append(c, a, 0, 4 * 15, 1);  // 15 blocks
      append(c, b, 0, 3, 3);       // the 16th
    }
    State now() const { return state(c, {a, b}); }
  };
  const std::vector<std::pair<const char*, std::function<void(F&)>>> cases = {
      {"append past 16 ids", [](F& f) { append(f.c, f.b, 0, 4 * 3, 5); }},
      {"reserve_blocks 40", [](F& f) { f.c.reserve_blocks(40); }},
      {"ensure_free_blocks 30", [](F& f) { f.c.ensure_free_blocks(30); }},
      {"reserve_tokens", [](F& f) { f.c.reserve_tokens(f.a, 4 * 40); }},
  };
  for (const auto& k : cases) {
    const long failures = fault_sweep<F>(k.first, k.second);
    EXPECT_GE(failures, 2) << k.first << ": the bookkeeping did not grow";
  }
}

// ---------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------

constexpr Index kD = 32;
constexpr Index kMaxPos = 16;

// Every kind, on heads of 8 and a RoPE table of kMaxPos positions.
std::vector<AnyLayer> kinds() {
  tpa::GqaConfig g;
  g.d_model = kD;
  g.n_heads = 4;
  g.n_kv_heads = 2;
  g.head_dim = 8;
  g.head_norm = true;
  g.rope.max_positions = kMaxPos;
  tpa::TpaConfig t;
  t.d_model = kD;
  t.n_heads = 4;
  t.head_dim = 8;
  t.q_rank = 3;
  t.k_rank = 2;
  t.v_rank = 2;
  t.rope.max_positions = kMaxPos;
  tpa::MlaConfig m;
  m.d_model = kD;
  m.n_heads = 4;
  m.q_lora_rank = 16;
  m.kv_lora_rank = 8;
  m.qk_nope_head_dim = 8;
  m.qk_rope_head_dim = 4;
  m.v_head_dim = 8;
  m.rope.max_positions = kMaxPos;
  return tpa_test::all_kinds(g, t, m);
}

// Two layers of one kind, blocks of 4 tokens, at most 6 blocks (24 tokens), RoPE table of 16
// positions: a holds 5 tokens (2 blocks), b 3 (1 block), c none, `gone` was freed; 3 blocks
// are available. Set up with `warm`; the calls under test use `ctx`, whose scratch is empty.
struct LayerFixture {
  const AnyLayer* layer;
  tpa::Context warm{1};
  tpa::Context ctx{1};
  KVCache<float> cache;
  KVCache<float> other;  // laid out for another kind
  SeqId a, b, c, gone, o;

  explicit LayerFixture(const AnyLayer& l)
      : layer(&l),
        cache({l.layout, l.layout}, 4, 6),
        other({tpa::CacheLayout("other", {{"X", 1, 3, false}})}, 4, 2) {
    a = cache.add_sequence();
    b = cache.add_sequence();
    gone = cache.add_sequence();
    c = cache.add_sequence();
    o = other.add_sequence();
    Tensor2 y5(5, kD), y3(3, kD);
    l.forward_cached(warm, random_tensor(5, kD, 1), y5, cache, 0, a);
    l.forward_cached(warm, random_tensor(3, kD, 2), y3, cache, 0, b);
    l.forward_cached(warm, random_tensor(3, kD, 3), y3, cache, 0, gone);
    cache.free_sequence(gone);
  }
  State now() const { return state(cache, {a, b, c}); }
  State now_other() const { return state(other, {o}); }
};

struct LayerCase {
  const char* name;
  const char* message;
  std::function<void(LayerFixture&)> prepare;  // may be empty
  std::function<void(LayerFixture&)> call;
};

// Forward of n random tokens to `seq`.
void fwd(LayerFixture& f, Index n, SeqId seq, int layer = 0, bool warm = false) {
  Tensor2 y(n, kD);
  f.layer->forward_cached(warm ? f.warm : f.ctx,
                          random_tensor(n, kD, 40 + static_cast<std::uint64_t>(n)), y, f.cache,
                          layer, seq);
}
void dec(LayerFixture& f, Index rows, const std::vector<SeqId>& seqs) {
  Tensor2 y(rows, kD);
  f.layer->decode(f.ctx, random_tensor(rows, kD, 50), y, f.cache, 0, seqs);
}

// The ragged call over `chunks` (x of `rows` random tokens).
void rag(LayerFixture& f, Index rows, const std::vector<tpa::Chunk>& chunks) {
  Tensor2 y(rows, kD);
  f.layer->ragged(f.ctx, random_tensor(rows, kD, 60), y, f.cache, 0, chunks);
}

std::vector<LayerCase> layer_cases() {
  return {
      {"x too wide", "d_model (32)", {},
       [](LayerFixture& f) {
         Tensor2 x = random_tensor(2, kD + 1, 1), y(2, kD + 1);
         f.layer->forward_cached(f.ctx, x, y, f.cache, 0, f.a);
       }},
      {"y of another shape", "must be x's shape", {},
       [](LayerFixture& f) {
         Tensor2 x = random_tensor(2, kD, 1), y(3, kD);
         f.layer->forward_cached(f.ctx, x, y, f.cache, 0, f.a);
       }},
      {"empty x", "at least 1", {},
       [](LayerFixture& f) {
         Tensor2 x(0, kD), y(0, kD);
         f.layer->forward_cached(f.ctx, x, y, f.cache, 0, f.a);
       }},
      {"unknown sequence", "sequence 42", {}, [](LayerFixture& f) { fwd(f, 1, 42); }},
      {"negative sequence", "sequence -1", {}, [](LayerFixture& f) { fwd(f, 1, -1); }},
      {"freed sequence", "not a live sequence", {}, [](LayerFixture& f) { fwd(f, 1, f.gone); }},
      {"layer past the cache", "layer (2)", {}, [](LayerFixture& f) { fwd(f, 1, f.a, 2); }},
      {"negative layer", "layer (-1)", {}, [](LayerFixture& f) { fwd(f, 1, f.a, -1); }},
      {"cache of another layout", "holds layout", {},
       [](LayerFixture& f) {
         Tensor2 x = random_tensor(1, kD, 1), y(1, kD);
         f.layer->forward_cached(f.ctx, x, y, f.other, 0, f.o);
       }},
      // a holds 5 tokens: 12 more reach position 16; the 3 blocks they need are available.
      {"past the RoPE table", "rope.max_positions = 16", {},
       [](LayerFixture& f) { fwd(f, 12, f.a); }},
      {"full cache", "cache is full", {}, [](LayerFixture& f) { fwd(f, 13, f.c); }},
      {"full cache, second layer", "cache is full", {},
       [](LayerFixture& f) { fwd(f, 16, f.c, 1); }},
      {"decode count", "1 sequences for 2 rows", {},
       [](LayerFixture& f) { dec(f, 2, {f.a}); }},
      {"decode repeat", "more than once", {}, [](LayerFixture& f) { dec(f, 3, {f.a, f.b, f.a}); }},
      {"decode freed in batch", "not a live", {},
       [](LayerFixture& f) { dec(f, 3, {f.a, f.b, f.gone}); }},
      {"decode past RoPE in batch", "rope.max_positions", [](LayerFixture& f) { fwd(f, 11, f.a); },
       [](LayerFixture& f) { dec(f, 2, {f.b, f.a}); }},
      // b at 4 tokens and c at 8 (blocks full), 1 block available: each alone fits, not both.
      {"decode batch does not fit", "this call needs 2 new blocks",
       [](LayerFixture& f) {
         fwd(f, 1, f.b);
         fwd(f, 8, f.c);
       },
       [](LayerFixture& f) { dec(f, 3, {f.a, f.b, f.c}); }},
      {"decode on another layout", "holds layout", {},
       [](LayerFixture& f) {
         Tensor2 x = random_tensor(1, kD, 1), y(1, kD);
         f.layer->decode(f.ctx, x, y, f.other, 0, {f.o});
       }},
      {"ragged without chunks", "at least one chunk", {}, [](LayerFixture& f) { rag(f, 2, {}); }},
      {"ragged empty chunk", "has 0 tokens", {},
       [](LayerFixture& f) { rag(f, 3, {{f.a, 3}, {f.b, 0}}); }},
      {"ragged tokens short of x", "must be equal", {},
       [](LayerFixture& f) { rag(f, 4, {{f.a, 1}, {f.b, 2}}); }},
      {"ragged tokens past x", "more tokens than x has rows", {},
       [](LayerFixture& f) { rag(f, 3, {{f.a, 1}, {f.b, 3}}); }},
      {"ragged repeat", "more than once", {},
       [](LayerFixture& f) { rag(f, 4, {{f.a, 1}, {f.c, 2}, {f.a, 1}}); }},
      {"ragged freed", "not a live", {},
       [](LayerFixture& f) { rag(f, 4, {{f.a, 1}, {f.gone, 3}}); }},
      // a at 5 tokens: a chunk of 12 reaches position 16, after a valid prefill chunk of c.
      {"ragged past RoPE", "rope.max_positions", {},
       [](LayerFixture& f) { rag(f, 14, {{f.c, 2}, {f.a, 12}}); }},
      // 3 blocks available: c's 9 tokens take 3, b's 2 (at 3 tokens) one more.
      {"ragged does not fit", "this call needs 4 new blocks", {},
       [](LayerFixture& f) { rag(f, 12, {{f.a, 1}, {f.c, 9}, {f.b, 2}}); }},
      // c holds no block: its token needs one, which strict mode refuses.
      {"strict reservation", "strict reservation",
       [](LayerFixture& f) { f.cache.set_strict_reservation(true); },
       [](LayerFixture& f) { dec(f, 2, {f.a, f.c}); }},
  };
}

TEST(LayerErrors, EveryBadCallChangesNothing) {
  for (const AnyLayer& l : kinds()) {
    for (const LayerCase& k : layer_cases()) {
      SCOPED_TRACE(l.name + ": " + k.name);
      LayerFixture f(l);
      if (k.prepare) k.prepare(f);
      const State before = f.now(), other_before = f.now_other();
      const tpa::Scratch::Mark mark = f.ctx.scratch().mark();
      try {
        k.call(f);
        ADD_FAILURE() << "no error";
      } catch (const tpa::Error& e) {
        EXPECT_NE(std::string(e.what()).find(k.message), std::string::npos) << e.what();
      }
      EXPECT_TRUE(f.now() == before);
      EXPECT_TRUE(f.now_other() == other_before);
      EXPECT_TRUE(same_mark(f.ctx.scratch().mark(), mark));
      // The layer still works, and the cache's sequences too.
      fwd(f, 1, f.b);
      EXPECT_EQ(f.cache.length(f.b), before.snap.lengths[1][0] + 1);
    }
  }
}

TEST(LayerErrors, ForwardWithoutCache) {
  for (const AnyLayer& l : kinds()) {
    SCOPED_TRACE(l.name);
    tpa::Context ctx(1);
    const tpa::Scratch::Mark mark = ctx.scratch().mark();
    Tensor2 x = random_tensor(kMaxPos + 1, kD, 1), y(kMaxPos + 1, kD);
    EXPECT_THROW(l.forward(ctx, x, y), tpa::Error);  // past the RoPE table
    Tensor2 xw = random_tensor(2, kD - 1, 2), yw(2, kD - 1);
    EXPECT_THROW(l.forward(ctx, xw, yw), tpa::Error);
    EXPECT_TRUE(same_mark(ctx.scratch().mark(), mark));
  }
}

// Out of memory inside layer calls: the blocks a call prepares, and any other operator new
// allocation on the way, fail one after another.
const AnyLayer* g_fault_layer = nullptr;  // the kind LayerFaults is sweeping
std::size_t g_scratch_left = 0;           // bytes left in ctx's first scratch chunk

// LayerFixture of g_fault_layer with an empty free list, whose ctx has g_scratch_left bytes
// left in its first 64 KiB scratch chunk: the call's scratch grows (allocates) at a point that
// depends on g_scratch_left — before, between or after its appends.
struct FaultFixture : LayerFixture {
  FaultFixture() : LayerFixture(*g_fault_layer) {
    cache.release_free_blocks();
    (void)ctx.scratch().bytes((std::size_t(1) << 16) - g_scratch_left);
  }
};
// ... and b, c at block boundaries (4 tokens each): a decode of a, b, c needs 2 new blocks.
struct BoundaryFixture : FaultFixture {
  BoundaryFixture() {
    fwd(*this, 1, b, 0, true);
    fwd(*this, 4, c, 0, true);
    cache.release_free_blocks();
  }
};

// ... and a fork of a (5 tokens: block 1 shared, partly filled): a decode of a and the fork
// copies block 1 (for a; the fork then owns the original) and a prefill of the fork copies it.
struct ForkedFixture : FaultFixture {
  SeqId fk;
  ForkedFixture() {
    fk = cache.fork(a);
    cache.release_free_blocks();
  }
  State now() const { return state(cache, {a, b, c, fk}); }
};

TEST(LayerFaults, OutOfMemoryChangesNothing) {
  for (const AnyLayer& l : kinds()) {
    g_fault_layer = &l;
    SCOPED_TRACE(l.name);
    for (g_scratch_left = 0; g_scratch_left <= 6144; g_scratch_left += 256) {
      SCOPED_TRACE("scratch left " + std::to_string(g_scratch_left));
      EXPECT_GE(fault_sweep<FaultFixture>("prefill", [](LayerFixture& f) { fwd(f, 9, f.c); }),
                3);
      EXPECT_GE(fault_sweep<BoundaryFixture>(
                    "decode batch", [](LayerFixture& f) { dec(f, 3, {f.a, f.b, f.c}); }),
                2);
      EXPECT_GE(fault_sweep<ForkedFixture>("decode with a fork",
                                           [](ForkedFixture& f) { dec(f, 3, {f.b, f.a, f.fk}); }),
                2);
      EXPECT_GE(fault_sweep<ForkedFixture>("prefill of a fork",
                                           [](ForkedFixture& f) { fwd(f, 6, f.fk); }),
                2);
      EXPECT_GE(fault_sweep<ForkedFixture>(
                    "ragged: prefill chunk, decode token, draft into a fork",
                    [](ForkedFixture& f) { rag(f, 7, {{f.c, 4}, {f.b, 1}, {f.fk, 2}}); }),
                2);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Configs, weights, small objects
// ---------------------------------------------------------------------------------------------

constexpr Index kIndexMax = std::numeric_limits<Index>::max();

// A valid TPA config: d_model 16, 2 heads of 4, ranks 2, 2, 1.
tpa::TpaConfig small_tpa() {
  tpa::TpaConfig t;
  t.d_model = 16;
  t.n_heads = 2;
  t.head_dim = 4;
  t.q_rank = 2;
  t.k_rank = 2;
  t.v_rank = 1;
  return t;
}

// Named changes of a config.
template <class Cfg>
using Mutations = std::vector<std::pair<const char*, std::function<void(Cfg&)>>>;

// Each of `muts` applied to `good` makes validate() and the layer's constructor throw.
template <class Cfg, class Layer, class Weights>
void expect_invalid(const char* kind, const Cfg& good, const Weights& w,
                    const Mutations<Cfg>& muts) {
  EXPECT_NO_THROW(good.validate());
  for (const auto& m : muts) {
    SCOPED_TRACE(std::string(kind) + ": " + m.first);
    Cfg c = good;
    m.second(c);
    const Cfg& cc = c;  // validate() is const, and the constructors take const Cfg&
    EXPECT_THROW(cc.validate(), tpa::Error);
    // random() validates before it computes a size from the config (issue 27).
    EXPECT_THROW((void)Weights::random(cc, 1), tpa::Error);
    Weights wc = w;
    EXPECT_THROW({ Layer layer(c, wc); }, tpa::Error);
  }
}

TEST(ConfigErrors, EveryRuleThrowsFromValidateAndTheConstructors) {
  tpa::GqaConfig g;
  g.d_model = 16;
  g.n_heads = 4;
  g.n_kv_heads = 2;
  g.head_dim = 4;
  const Mutations<tpa::RopeConfig> rope = {
      {"rope.base 0", [](tpa::RopeConfig& r) { r.base = 0; }},
      {"rope.base inf", [](tpa::RopeConfig& r) { r.base = INFINITY; }},
      {"rope.max_positions 0", [](tpa::RopeConfig& r) { r.max_positions = 0; }},
      {"rope.rotary_dim -2", [](tpa::RopeConfig& r) { r.rotary_dim = -2; }},
      {"rope.rotary_dim odd", [](tpa::RopeConfig& r) { r.rotary_dim = 3; }},
      {"rope.rotary_dim too big", [](tpa::RopeConfig& r) { r.rotary_dim = 64; }},
      // Tables past kMaxRopeTableBytes (2^61 overflowed the table size, issue 27).
      {"rope.max_positions 2^61", [](tpa::RopeConfig& r) { r.max_positions = Index(1) << 61; }},
      {"rope.max_positions 2^60", [](tpa::RopeConfig& r) { r.max_positions = Index(1) << 60; }},
      {"rope.max_positions 2^40", [](tpa::RopeConfig& r) { r.max_positions = Index(1) << 40; }},
      {"rope.max_positions max", [](tpa::RopeConfig& r) { r.max_positions = kIndexMax; }},
  };
  // Attention variants (issue 25): the same rules for every kind.
  const Mutations<tpa::AttentionVariant> variant = {
      {"variant.window 0", [](tpa::AttentionVariant& v) { v.window = 0; }},
      {"variant.window -4", [](tpa::AttentionVariant& v) { v.window = -4; }},
      {"variant.logit_softcap 0", [](tpa::AttentionVariant& v) { v.logit_softcap = 0.f; }},
      {"variant.logit_softcap -1", [](tpa::AttentionVariant& v) { v.logit_softcap = -1.f; }},
      {"variant.logit_softcap NaN", [](tpa::AttentionVariant& v) { v.logit_softcap = NAN; }},
      {"variant.alibi_slopes without alibi",
       [](tpa::AttentionVariant& v) { v.alibi_slopes.assign(4, 0.5f); }},
      {"variant.alibi_slopes length", [](tpa::AttentionVariant& v) {
         v.alibi = true;
         v.alibi_slopes.assign(3, 0.5f);
       }},
      {"variant.alibi_slopes inf", [](tpa::AttentionVariant& v) {
         v.alibi = true;
         v.alibi_slopes = {0.5f, INFINITY, 0.25f, 0.125f};
       }},
  };
  auto with_rope = [&rope, &variant](auto muts) {
    for (const auto& r : rope) muts.push_back({r.first, [f = r.second](auto& c) { f(c.rope); }});
    for (const auto& r : variant)
      muts.push_back({r.first, [f = r.second](auto& c) { f(c.variant); }});
    return muts;
  };
  using GM = Mutations<tpa::GqaConfig>;
  expect_invalid<tpa::GqaConfig, tpa::GroupedQueryAttention<>>(
      "GQA", g, tpa::GqaWeights::random(g, 1),
      with_rope(GM{{"d_model", [](tpa::GqaConfig& c) { c.d_model = 0; }},
                   {"n_heads", [](tpa::GqaConfig& c) { c.n_heads = 0; }},
                   {"head_dim", [](tpa::GqaConfig& c) { c.head_dim = -1; }},
                   {"n_kv_heads < 0", [](tpa::GqaConfig& c) { c.n_kv_heads = -2; }},
                   {"n_kv_heads divides", [](tpa::GqaConfig& c) { c.n_kv_heads = 3; }},
                   {"softmax_scale < 0", [](tpa::GqaConfig& c) { c.softmax_scale = -1; }},
                   {"softmax_scale nan", [](tpa::GqaConfig& c) { c.softmax_scale = NAN; }},
                   {"norm_eps", [](tpa::GqaConfig& c) { c.norm_eps = 0; }},
                   {"norm_eps inf", [](tpa::GqaConfig& c) { c.norm_eps = INFINITY; }},
                   {"n_heads -4", [](tpa::GqaConfig& c) { c.n_heads = -4; }},
                   {"n_heads 2^62", [](tpa::GqaConfig& c) { c.n_heads = Index(1) << 62; }},
                   {"head_dim 2^62", [](tpa::GqaConfig& c) { c.head_dim = Index(1) << 62; }},
                   {"d_model max", [](tpa::GqaConfig& c) { c.d_model = kIndexMax; }},
                   {"weights 2^41", [](tpa::GqaConfig& c) {
                      c.n_heads = Index(1) << 20;
                      c.head_dim = Index(1) << 10;
                      c.d_model = Index(1) << 11;
                    }}}));
  {
    tpa::GqaConfig c = g;
    EXPECT_THROW({ tpa::MultiHeadAttention<> l(c, tpa::GqaWeights::random(g, 1)); }, tpa::Error);
    EXPECT_THROW({ tpa::MultiQueryAttention<> l(c, tpa::GqaWeights::random(g, 1)); }, tpa::Error);
    tpa::GqaWeights w = tpa::GqaWeights::random(g, 1);
    w.c_v.resize(3, 16);
    EXPECT_THROW({ tpa::GroupedQueryAttention<> l(c, w); }, tpa::Error);
    c.head_norm = true;  // subln missing
    EXPECT_THROW({ tpa::GroupedQueryAttention<> l(c, tpa::GqaWeights::random(g, 1)); },
                 tpa::Error);
  }

  const tpa::TpaConfig t = small_tpa();
  using TM = Mutations<tpa::TpaConfig>;
  expect_invalid<tpa::TpaConfig, tpa::TensorProductAttention<>>(
      "TPA", t, tpa::TpaWeights::random(t, 2),
      with_rope(TM{{"d_model", [](tpa::TpaConfig& c) { c.d_model = 0; }},
                   {"n_heads", [](tpa::TpaConfig& c) { c.n_heads = 0; }},
                   {"head_dim", [](tpa::TpaConfig& c) { c.head_dim = 0; }},
                   {"q_rank", [](tpa::TpaConfig& c) { c.q_rank = 0; }},
                   {"q_rank kv_only", [](tpa::TpaConfig& c) {
                      c.kv_only = true;
                      c.q_rank = -1;
                    }},
                   {"k_rank", [](tpa::TpaConfig& c) { c.k_rank = 0; }},
                   {"v_rank", [](tpa::TpaConfig& c) { c.v_rank = -3; }},
                   {"softmax_scale", [](tpa::TpaConfig& c) { c.softmax_scale = INFINITY; }},
                   {"norm_eps", [](tpa::TpaConfig& c) { c.norm_eps = -1; }},
                   {"norm_eps inf", [](tpa::TpaConfig& c) { c.norm_eps = INFINITY; }},
                   {"n_heads 2^62", [](tpa::TpaConfig& c) { c.n_heads = Index(1) << 62; }},
                   {"head_dim max", [](tpa::TpaConfig& c) { c.head_dim = kIndexMax; }},
                   {"k_rank 2^62", [](tpa::TpaConfig& c) { c.k_rank = Index(1) << 62; }},
                   {"q_rank 2^50", [](tpa::TpaConfig& c) { c.q_rank = Index(1) << 50; }},
                   {"d_model 2^40", [](tpa::TpaConfig& c) { c.d_model = Index(1) << 40; }}}));

  tpa::MlaConfig m;
  m.d_model = 16;
  m.n_heads = 2;
  m.q_lora_rank = 8;
  m.kv_lora_rank = 4;
  m.qk_nope_head_dim = 4;
  m.qk_rope_head_dim = 4;
  m.v_head_dim = 4;
  using MM = Mutations<tpa::MlaConfig>;
  expect_invalid<tpa::MlaConfig, tpa::MultiHeadLatentAttention<>>(
      "MLA", m, tpa::MlaWeights::random(m, 3),
      with_rope(MM{{"d_model", [](tpa::MlaConfig& c) { c.d_model = 0; }},
                   {"n_heads", [](tpa::MlaConfig& c) { c.n_heads = 0; }},
                   {"q_lora_rank", [](tpa::MlaConfig& c) { c.q_lora_rank = -1; }},
                   {"kv_lora_rank", [](tpa::MlaConfig& c) { c.kv_lora_rank = 0; }},
                   {"qk_nope_head_dim", [](tpa::MlaConfig& c) { c.qk_nope_head_dim = 0; }},
                   {"qk_rope_head_dim", [](tpa::MlaConfig& c) { c.qk_rope_head_dim = 0; }},
                   {"v_head_dim", [](tpa::MlaConfig& c) { c.v_head_dim = 0; }},
                   {"softmax_scale", [](tpa::MlaConfig& c) { c.softmax_scale = -2; }},
                   {"norm_eps", [](tpa::MlaConfig& c) { c.norm_eps = NAN; }},
                   {"norm_eps inf", [](tpa::MlaConfig& c) { c.norm_eps = INFINITY; }},
                   {"n_heads 2^62", [](tpa::MlaConfig& c) { c.n_heads = Index(1) << 62; }},
                   {"d_n + d_R overflow", [](tpa::MlaConfig& c) {
                      c.qk_nope_head_dim = kIndexMax;
                      c.qk_rope_head_dim = kIndexMax - 1;
                    }},
                   {"kv_lora_rank 2^62",
                    [](tpa::MlaConfig& c) { c.kv_lora_rank = Index(1) << 62; }},
                   {"q_lora_rank 2^41", [](tpa::MlaConfig& c) { c.q_lora_rank = Index(1) << 41; }},
                   {"absorbed 2^41", [](tpa::MlaConfig& c) {
                      c.n_heads = Index(1) << 20;
                      c.kv_lora_rank = Index(1) << 10;
                      c.d_model = Index(1) << 11;
                      c.q_lora_rank = 1;
                    }},
                   {"form", [](tpa::MlaConfig& c) { c.form = static_cast<tpa::MlaForm>(7); }}}));

  EXPECT_THROW(tpa::Context(0), tpa::Error);
  EXPECT_THROW(tpa::CacheLayout("x", {{"K", 1, 0, false}}), tpa::Error);
  tpa::RopeConfig r;
  r.rotary_dim = 6;
  EXPECT_THROW(tpa::RopeTable(r, 4), tpa::Error);
  const tpa::RopeTable table(tpa::RopeConfig{}, 4);
  EXPECT_THROW(table.check_positions("t", table.max_positions(), 1), tpa::Error);
}

// The reproducers of issue 27 throw tpa::Error naming the value and the rule, from validate(),
// from Weights::random (before it allocates or multiplies anything) and so from
// `Layer(cfg, Weights::random(cfg, seed))`.
template <class Layer, class Cfg>
void expect_message(const Cfg& c, const std::vector<std::string>& parts) {
  for (int from = 0; from < 2; ++from) {
    try {
      if (from == 0) {
        c.validate();
      } else {
        const Layer layer(c, Layer::Weights::random(c, 7));
      }
      ADD_FAILURE() << parts[0] << ": no error";
    } catch (const tpa::Error& e) {
      for (const auto& p : parts)
        EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  }
}

TEST(ConfigErrors, HugeAndNegativeSizesNameTheValueAndTheRule) {
  tpa::GqaConfig g;
  g.d_model = 16;
  g.n_heads = 4;
  g.head_dim = 16;
  using Gqa = tpa::GroupedQueryAttention<>;
  tpa::GqaConfig c = g;
  c.rope.max_positions = Index(1) << 61;
  expect_message<Gqa>(c, {"rope.max_positions (2305843009213693952)", "at most 16777216"});
  c = g;
  c.n_heads = -4;
  expect_message<Gqa>(c, {"n_heads (-4) must be >= 1"});
  c = g;
  c.n_heads = Index(1) << 62;
  expect_message<Gqa>(c, {"n_heads x head_dim x d_model (4611686018427387904 x 16 x 16)",
                          "more than 2^40 elements"});
  c = g;
  c.n_kv_heads = -1;
  expect_message<Gqa>(c, {"n_kv_heads (-1) must be >= 0 (0 means n_heads"});
  c = g;
  c.norm_eps = INFINITY;
  expect_message<Gqa>(c, {"norm_eps (inf) must be finite and > 0"});

  tpa::TpaConfig t = small_tpa();
  t.norm_eps = INFINITY;
  expect_message<tpa::TensorProductAttention<>>(t, {"norm_eps (inf) must be finite and > 0"});
  t = small_tpa();
  t.k_rank = Index(1) << 62;
  expect_message<tpa::TensorProductAttention<>>(t, {"W_A weight", "4611686018427387904"});

  tpa::MlaConfig m;
  m.d_model = 16;
  m.n_heads = 2;
  m.kv_lora_rank = 4;
  m.qk_nope_head_dim = kIndexMax;
  m.qk_rope_head_dim = kIndexMax;
  m.v_head_dim = 4;
  expect_message<tpa::MultiHeadLatentAttention<>>(
      m, {"qk_nope_head_dim (9223372036854775807) must be <= 2^40"});
}

// ---------------------------------------------------------------------------------------------
// Checkpoints
// ---------------------------------------------------------------------------------------------

// The weights as a checkpoint's bytes: equal bytes, equal weights.
template <class Cfg, class W>
std::vector<std::uint8_t> bytes_of(const Cfg& cfg, const W& w) {
  tpa::io::SafetensorsWriter out;
  tpa::io::save_weights(out, "", cfg, w);
  return out.bytes();
}

TEST(CheckpointErrors, FailedLoadsLeaveTheWeightsAndFailedSavesTheWriterUnchanged) {
  const tpa::TpaConfig t = small_tpa();
  const tpa::TpaWeights good = tpa::TpaWeights::random(t, 7);
  tpa::io::SafetensorsWriter file;
  tpa::io::save_weights(file, "h.0.", t, good);
  const auto file_bytes = file.bytes();
  const auto ckpt = tpa::io::SafetensorsFile::from_bytes(file_bytes);

  tpa::TpaWeights w = tpa::TpaWeights::random(t, 8);  // the weights a failed load must keep
  const auto before = bytes_of(t, w);
  tpa::TpaConfig wider = t;
  wider.d_model = 24;
  tpa::TpaConfig invalid = t;
  invalid.k_rank = 0;
  tpa::TpaConfig kv_only = t;
  kv_only.kv_only = true;
  const std::vector<std::pair<const char*, std::function<void()>>> loads = {
      {"missing prefix", [&] { w = tpa::io::load_tpa_weights(ckpt, "h.1.", t); }},
      {"shapes", [&] { w = tpa::io::load_tpa_weights(ckpt, "h.0.", wider); }},
      {"invalid config", [&] { w = tpa::io::load_tpa_weights(ckpt, "h.0.", invalid); }},
      {"unexpected tensors", [&] { w = tpa::io::load_tpa_weights(ckpt, "h.0.", kv_only); }},
      {"renamed away",
       [&] {
         w = tpa::io::load_tpa_weights(ckpt, "h.0.", t, {tpa::io::t6_infer_names(), false});
       }},
  };
  for (const auto& l : loads) {
    EXPECT_THROW(l.second(), tpa::Error) << l.first;
    EXPECT_EQ(bytes_of(t, w), before) << l.first;
  }
  // A load that works replaces them.
  w = tpa::io::load_tpa_weights(ckpt, "h.0.", t);
  EXPECT_EQ(bytes_of(t, w), bytes_of(t, good));

  // Saving a layer whose third tensor clashes adds none of its tensors.
  tpa::io::SafetensorsWriter out;
  out.add("h.1.c_qkv.W_A_v.weight", tpa::io::DType::kF32, {1}, good.c_proj.data());
  const auto out_before = out.bytes();
  EXPECT_THROW(tpa::io::save_weights(out, "h.1.", t, good), tpa::Error);
  EXPECT_EQ(out.bytes(), out_before);
  EXPECT_EQ(out.size(), 1u);
  tpa::TpaWeights bad = good;
  bad.c_proj.resize(2, 2);
  EXPECT_THROW(tpa::io::save_weights(out, "h.2.", t, bad), tpa::Error);
  EXPECT_EQ(out.bytes(), out_before);
  EXPECT_THROW(out.add("h.1.c_qkv.W_A_v.weight", tpa::io::DType::kF32, {1}, good.c_proj.data()),
               tpa::Error);
  EXPECT_EQ(out.bytes(), out_before);
  // Out of memory part-way through a save: all or nothing too.
  for (long n = 0;; ++n) {
    bool threw = false;
    {
      fault::FailNth arm(n);
      try {
        tpa::io::save_weights(out, "h.3.", t, good);
      } catch (const std::bad_alloc&) {
        threw = true;
      }
    }
    if (!threw) break;
    ASSERT_EQ(out.size(), 1u) << "allocation " << n;
  }
  EXPECT_EQ(out.size(), 8u);
}

}  // namespace
