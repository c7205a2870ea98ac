// libFuzzer target: a random sequence of KVCache operations (add_sequence, free_sequence, raw
// append, reserve_tokens, reserve_blocks, ensure_free_blocks, truncate, fork, strict reservation
// on and off, and prefill/decode calls of a small GQA, MLA or TPA layer through the cache), valid
// and invalid (stale handles included), checked after every step against a simple model of what
// the cache must hold: the live sequences, each one's length per layer and block table (which
// blocks it shares with which forks: the model names blocks itself, and its names must map one to
// one onto the cache's block ids), reference counts, the exact contents of every cached token,
// bytes_used (each stored token once) and available_blocks.
// A call predicted to fail must throw tpa::Error and change nothing (bytes_reserved included); a
// call predicted to succeed must not throw. Any mismatch traps.
#include <fuzzer/FuzzedDataProvider.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <map>
#include <memory>
#include <set>
#include <tpa/tpa.hpp>
#include <vector>

namespace {

using tpa::Index;
using tpa::SeqId;
using Cache = tpa::KVCache<float>;

#define CHECK(cond)               \
  do {                            \
    if (!(cond)) __builtin_trap(); \
  } while (0)

constexpr int kLayers = 2;
constexpr Index kMaxPositions = 24;

// A layer of each kind with random weights, built once per process; all with d_model 16.
struct AnyLayer {
  virtual ~AnyLayer() = default;
  virtual tpa::CacheLayout layout() const = 0;
  virtual void forward(tpa::Context&, const tpa::Tensor<float, 2>&, tpa::Tensor<float, 2>&,
                       Cache&, int, SeqId) const = 0;
  virtual void decode(tpa::Context&, const tpa::Tensor<float, 2>&, tpa::Tensor<float, 2>&,
                      Cache&, int, const std::vector<SeqId>&) const = 0;
};
template <class L>
struct LayerOf : AnyLayer {
  explicit LayerOf(L l) : layer(std::move(l)) {}
  tpa::CacheLayout layout() const override { return layer.cache_layout(); }
  void forward(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
               Cache& c, int l, SeqId s) const override {
    layer.forward(ctx, x, y, c, l, s);
  }
  void decode(tpa::Context& ctx, const tpa::Tensor<float, 2>& x, tpa::Tensor<float, 2>& y,
              Cache& c, int l, const std::vector<SeqId>& s) const override {
    layer.decode(ctx, x, y, c, l, s);
  }
  L layer;
};
constexpr Index kD = 16;

const AnyLayer& layer_of_kind(int kind) {
  static const std::unique_ptr<AnyLayer> layers[3] = {
      [] {
        tpa::GqaConfig c;
        c.d_model = kD, c.n_heads = 2, c.n_kv_heads = 1, c.head_dim = 8;
        c.rope.max_positions = kMaxPositions;
        return std::unique_ptr<AnyLayer>(new LayerOf<tpa::GroupedQueryAttention<>>(
            tpa::GroupedQueryAttention<>(c, tpa::GqaWeights::random(c, 1))));
      }(),
      [] {
        tpa::MlaConfig c;
        c.d_model = kD, c.n_heads = 2, c.q_lora_rank = 0, c.kv_lora_rank = 8;
        c.qk_nope_head_dim = 4, c.qk_rope_head_dim = 4, c.v_head_dim = 4;
        c.rope.max_positions = kMaxPositions;
        return std::unique_ptr<AnyLayer>(new LayerOf<tpa::MultiHeadLatentAttention<>>(
            tpa::MultiHeadLatentAttention<>(c, tpa::MlaWeights::random(c, 2))));
      }(),
      [] {
        tpa::TpaConfig c;
        c.d_model = kD, c.n_heads = 2, c.head_dim = 4, c.q_rank = 2, c.k_rank = 1, c.v_rank = 2;
        c.rope.max_positions = kMaxPositions;
        return std::unique_ptr<AnyLayer>(new LayerOf<tpa::TensorProductAttention<>>(
            tpa::TensorProductAttention<>(c, tpa::TpaWeights::random(c, 3))));
      }()};
  return *layers[kind];
}

// What the cache must hold.
struct Model {
  struct Seq {
    std::vector<int> table;                           // the model's names of its blocks
    std::vector<std::vector<float>> tokens[kLayers];  // per layer, per token: all factors
    Index len(int l) const { return static_cast<Index>(tokens[l].size()); }
  };
  std::map<SeqId, Seq> seqs;
  std::vector<SeqId> freed;  // handles of freed sequences (stale)
  Index block_tokens = 1, max_blocks = 1;
  std::size_t elems = 0;  // elements per token per layer (both layers have the same layout)
  int next_block = 0;     // the next block name
  bool strict = false;

  // Sequences holding block b.
  Index refs(int b) const {
    Index n = 0;
    for (const auto& s : seqs)
      n += static_cast<Index>(std::count(s.second.table.begin(), s.second.table.end(), b));
    return n;
  }
  Index in_use() const {
    std::set<int> b;
    for (const auto& s : seqs) b.insert(s.second.table.begin(), s.second.table.end());
    return static_cast<Index>(b.size());
  }
  Index available() const { return max_blocks - in_use(); }
  Index blocks_for(Index tokens) const { return (tokens + block_tokens - 1) / block_tokens; }
  // Shared blocks among table indices [first, last) of s.
  Index shared(const Seq& s, Index first, Index last) const {
    Index n = 0;
    for (Index i = first; i < std::min<Index>(last, static_cast<Index>(s.table.size())); ++i)
      n += refs(s.table[static_cast<std::size_t>(i)]) > 1;
    return n;
  }
  // Blocks appending n tokens to layer l of s takes: new ones and copies of shared ones.
  Index need(const Seq& s, int l, Index n) const {
    const Index end = blocks_for(s.len(l) + n);
    return std::max<Index>(0, end - static_cast<Index>(s.table.size())) +
           (n > 0 ? shared(s, s.len(l) / block_tokens, end) : 0);
  }
  // Makes s's blocks [first, last) its own (copy on write) and gives it `end` blocks at least.
  void own(Seq& s, Index first, Index last, Index end) {
    for (Index i = first; i < std::min<Index>(last, static_cast<Index>(s.table.size())); ++i)
      if (refs(s.table[static_cast<std::size_t>(i)]) > 1) s.table[static_cast<std::size_t>(i)] = next_block++;
    while (static_cast<Index>(s.table.size()) < end) s.table.push_back(next_block++);
  }
  // After appending n tokens to layer l of s (before its tokens are recorded).
  void appended(Seq& s, int l, Index n) {
    if (n == 0) return;
    const Index end = blocks_for(s.len(l) + n);
    own(s, s.len(l) / block_tokens, end, end);
  }
};

// Every factor of token t of (seq, layer), in layout order.
std::vector<float> read_token(const Cache& cache, SeqId seq, int layer, Index t) {
  const auto v = cache.view(seq, layer);
  std::vector<float> out;
  for (std::size_t f = 0; f < cache.layout(layer).num_factors(); ++f)
    for (Index e = 0; e < v.elements(f); ++e) out.push_back(v.at(f, t, e));
  return out;
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

void check_against(const Cache& cache, const Model& m) {
  CHECK(cache.num_sequences() == static_cast<Index>(m.seqs.size()));
  CHECK(cache.available_blocks() == m.available());
  CHECK(cache.strict_reservation() == m.strict);
  std::map<int, std::int32_t> name_to_id;  // must be one to one
  std::map<std::int32_t, int> id_to_name;
  std::set<std::pair<std::int32_t, Index>> slots[kLayers];  // (block, token slot) holding a token
  for (const auto& [id, s] : m.seqs) {
    CHECK(cache.contains(id));
    const auto& table = cache.block_table(id);
    CHECK(table.size() == s.table.size());
    for (std::size_t i = 0; i < table.size(); ++i) {
      CHECK(name_to_id.emplace(s.table[i], table[i]).first->second == table[i]);
      CHECK(id_to_name.emplace(table[i], s.table[i]).first->second == s.table[i]);
      CHECK(cache.block_refs(table[i]) == m.refs(s.table[i]));
    }
    for (int l = 0; l < kLayers; ++l) {
      const Index len = s.len(l);
      CHECK(cache.length(id, l) == len);
      CHECK(cache.view(id, l).n_tokens == len);
      for (Index t = 0; t < len; ++t) {
        slots[l].insert({table[static_cast<std::size_t>(t / m.block_tokens)], t % m.block_tokens});
        CHECK(same_bits(read_token(cache, id, l, t), s.tokens[l][static_cast<std::size_t>(t)]));
      }
    }
  }
  for (SeqId id : m.freed) CHECK(!cache.contains(id));
  std::size_t used = 0;
  for (int l = 0; l < kLayers; ++l) used += slots[l].size() * cache.bytes_per_token(l);
  CHECK(cache.bytes_used() == used);
  CHECK(cache.free_blocks() == cache.allocated_blocks() - m.in_use());
}

// Runs op; it must throw tpa::Error iff !expect_ok. On a throw, the cache must be as before.
template <class Op>
bool run(Cache& cache, const Model& m, bool expect_ok, Op op) {
  const std::size_t reserved = cache.bytes_reserved();
  try {
    op();
  } catch (const tpa::Error&) {
    CHECK(!expect_ok);
    CHECK(cache.bytes_reserved() == reserved);
    check_against(cache, m);
    return false;
  }
  CHECK(expect_ok);
  return true;
}

// A sequence id: usually a live one, sometimes a freed (stale), dead or out-of-range one.
SeqId pick_seq(FuzzedDataProvider& in, const Model& m) {
  const int k = in.ConsumeIntegralInRange<int>(0, 7);
  if (!m.seqs.empty() && k >= 2) {
    auto it = m.seqs.begin();
    std::advance(it, in.ConsumeIntegralInRange<std::size_t>(0, m.seqs.size() - 1));
    return it->first;
  }
  if (!m.freed.empty() && k == 1)
    return m.freed[in.ConsumeIntegralInRange<std::size_t>(0, m.freed.size() - 1)];
  return in.ConsumeIntegralInRange<SeqId>(-2, 40);
}

tpa::Tensor<float, 2> input_rows(FuzzedDataProvider& in, Index n) {
  tpa::Tensor<float, 2> x(n, kD);
  for (Index i = 0; i < x.size(); ++i)
    x.data()[i] = static_cast<float>(in.ConsumeIntegralInRange<int>(-64, 64)) / 64.f;
  return x;
}

// After a successful layer call: the new tokens' stored contents become the model's.
void record_new_tokens(const Cache& cache, Model& m, SeqId seq, int layer, Index n) {
  m.appended(m.seqs[seq], layer, n);
  auto& toks = m.seqs[seq].tokens[layer];
  const Index start = static_cast<Index>(toks.size());
  for (Index t = start; t < start + n; ++t) {
    toks.push_back(read_token(cache, seq, layer, t));
    for (float v : toks.back()) CHECK(std::isfinite(v));  // finite inputs, finite projections
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  const AnyLayer& layer = layer_of_kind(in.ConsumeIntegralInRange<int>(0, 2));
  Model m;
  m.block_tokens = in.ConsumeIntegralInRange<Index>(1, 5);
  m.max_blocks = in.ConsumeIntegralInRange<Index>(1, 24);
  const tpa::CacheLayout layout = layer.layout();
  m.elems = static_cast<std::size_t>(layout.elements_per_token());
  Cache cache(std::vector<tpa::CacheLayout>(kLayers, layout), m.block_tokens, m.max_blocks);
  tpa::Context ctx(1);

  for (int step = 0; step < 64 && in.remaining_bytes() > 0; ++step) {
    switch (in.ConsumeIntegralInRange<int>(0, 10)) {
      case 0: {  // add_sequence: a handle no live sequence has
        const SeqId id = cache.add_sequence();
        CHECK(m.seqs.count(id) == 0);
        m.seqs[id];
        break;
      }
      case 1: {  // free_sequence
        const SeqId id = pick_seq(in, m);
        if (run(cache, m, m.seqs.count(id) == 1, [&] { cache.free_sequence(id); })) {
          m.seqs.erase(id);
          m.freed.push_back(id);
        }
        break;
      }
      case 2: {  // raw append of arbitrary bit patterns (NaN, Inf, denormals included)
        const SeqId id = pick_seq(in, m);
        const int l = in.ConsumeIntegralInRange<int>(-1, kLayers);
        const Index n = in.ConsumeIntegralInRange<Index>(-2, 2 * m.block_tokens + 1);
        // (One spare token, so that the row pointers are never null.)
        std::vector<float> src(static_cast<std::size_t>(std::max<Index>(n, 0) + 1) * m.elems);
        for (float& v : src) {
          const std::uint32_t bits = in.ConsumeIntegral<std::uint32_t>();
          std::memcpy(&v, &bits, sizeof v);
        }
        // Factor f of token i at src + i·elems + (offset of f).
        std::vector<tpa::FactorRows> rows;
        for (std::size_t f = 0; f < layout.num_factors(); ++f)
          rows.push_back({src.data() + layout.factor_offset(f), static_cast<Index>(m.elems)});
        const bool ok = m.seqs.count(id) && l >= 0 && l < kLayers && n >= 0 &&
                        m.need(m.seqs[id], l, n) <= m.available() &&
                        !(m.strict && m.need(m.seqs[id], l, n) > 0);
        if (run(cache, m, ok, [&] { cache.append(id, l, n, rows.data()); })) {
          auto& s = m.seqs[id];
          m.appended(s, l, n);
          for (Index i = 0; i < n; ++i)
            s.tokens[l].emplace_back(src.begin() + i * static_cast<Index>(m.elems),
                                     src.begin() + (i + 1) * static_cast<Index>(m.elems));
        }
        break;
      }
      case 3: {  // reserve_tokens
        const SeqId id = pick_seq(in, m);
        const Index tokens = in.ConsumeIntegralInRange<Index>(-1, 4 * m.block_tokens);
        bool ok = m.seqs.count(id) && tokens >= 0;
        Index first = m.blocks_for(tokens);  // first block an append up to `tokens` writes
        if (ok) {
          const auto& s = m.seqs[id];
          for (int l = 0; l < kLayers; ++l)
            if (s.len(l) < tokens) first = std::min(first, s.len(l) / m.block_tokens);
          ok = std::max<Index>(0, m.blocks_for(tokens) - static_cast<Index>(s.table.size())) +
                   m.shared(s, first, m.blocks_for(tokens)) <=
               m.available();
        }
        if (run(cache, m, ok, [&] { cache.reserve_tokens(id, tokens); })) {
          m.own(m.seqs[id], first, m.blocks_for(tokens), m.blocks_for(tokens));
          for (int l = 0; l < kLayers; ++l)  // appends up to `tokens` now take no block
            CHECK(cache.blocks_needed(id, l, std::max<Index>(0, tokens - m.seqs[id].len(l))) == 0);
        }
        break;
      }
      case 4: {  // storage only: contents, tables and available blocks stay the same
        const Index n = in.ConsumeIntegralInRange<Index>(0, m.max_blocks + 1);
        if (in.ConsumeBool()) {
          run(cache, m, n <= m.max_blocks, [&] { cache.reserve_blocks(n); });
          if (n <= m.max_blocks) CHECK(cache.allocated_blocks() >= n);
        } else {
          run(cache, m, n <= m.available(), [&] { cache.ensure_free_blocks(n); });
        }
        break;
      }
      case 5: {  // prefill chunk through the layer
        const SeqId id = pick_seq(in, m);
        const int l = in.ConsumeIntegralInRange<int>(-1, kLayers);
        const Index n = in.ConsumeIntegralInRange<Index>(1, 6);
        const tpa::Tensor<float, 2> x = input_rows(in, n);
        tpa::Tensor<float, 2> y(n, kD);
        bool ok = m.seqs.count(id) && l >= 0 && l < kLayers;
        if (ok) {
          const auto& s = m.seqs[id];
          ok = static_cast<Index>(s.tokens[l].size()) + n <= kMaxPositions &&
               m.need(s, l, n) <= m.available() && !(m.strict && m.need(s, l, n) > 0);
        }
        if (run(cache, m, ok, [&] { layer.forward(ctx, x, y, cache, l, id); }))
          record_new_tokens(cache, m, id, l, n);
        break;
      }
      case 8: {  // truncate
        const SeqId id = pick_seq(in, m);
        const Index n = in.ConsumeIntegralInRange<Index>(-1, 3 * m.block_tokens);
        bool ok = m.seqs.count(id) && n >= 0;
        if (ok)
          for (int l = 0; l < kLayers; ++l) ok = ok && n <= m.seqs[id].len(l);
        if (run(cache, m, ok, [&] { cache.truncate(id, n); })) {
          auto& s = m.seqs[id];
          for (auto& t : s.tokens) t.resize(static_cast<std::size_t>(n));
          s.table.resize(static_cast<std::size_t>(m.blocks_for(n)));
        }
        break;
      }
      case 9: {  // fork
        const SeqId id = pick_seq(in, m);
        const bool ok = m.seqs.count(id) == 1;
        SeqId child = -1;
        if (run(cache, m, ok, [&] { child = cache.fork(id); })) {
          CHECK(m.seqs.count(child) == 0 && child != id);
          Model::Seq c = m.seqs[id];
          c.table.resize(static_cast<std::size_t>(
              m.blocks_for(std::max(c.len(0), c.len(1)))));
          m.seqs[child] = c;
        }
        break;
      }
      case 10: {  // strict reservation on or off
        m.strict = in.ConsumeBool();
        cache.set_strict_reservation(m.strict);
        break;
      }
      default: {  // decode: one token for each of 0–3 sequences (repeats and dead ones possible)
        const int l = in.ConsumeIntegralInRange<int>(-1, kLayers);
        std::vector<SeqId> ids(in.ConsumeIntegralInRange<std::size_t>(0, 3));
        for (auto& id : ids) id = pick_seq(in, m);
        const Index n = static_cast<Index>(ids.size());
        const tpa::Tensor<float, 2> x = input_rows(in, n);
        tpa::Tensor<float, 2> y(n, kD);
        bool ok = n >= 1 && l >= 0 && l < kLayers &&
                  std::set<SeqId>(ids.begin(), ids.end()).size() == ids.size();
        Index need = 0;
        for (SeqId id : ids) {
          if (!ok || !m.seqs.count(id)) {
            ok = false;
            break;
          }
          const auto& s = m.seqs[id];
          ok = static_cast<Index>(s.tokens[l].size()) + 1 <= kMaxPositions &&
               !(m.strict && m.need(s, l, 1) > 0);
          // A copy counted for each holder of a shared block in the call: an upper bound.
          need += m.need(s, l, 1);
        }
        ok = ok && need <= m.available();
        if (run(cache, m, ok, [&] { layer.decode(ctx, x, y, cache, l, ids); })) {
          for (SeqId id : ids) record_new_tokens(cache, m, id, l, 1);
        }
        break;
      }
    }
    check_against(cache, m);
  }
  // Freeing everything returns every block to the pool.
  for (const auto& s : m.seqs) cache.free_sequence(s.first);
  CHECK(cache.available_blocks() == m.max_blocks);
  CHECK(cache.bytes_used() == 0 && cache.num_sequences() == 0);
  return 0;
}
