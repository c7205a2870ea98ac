// libFuzzer target: a random sequence of KVCache operations (add_sequence, free_sequence, raw
// append, reserve_tokens, reserve_blocks, ensure_free_blocks, and prefill/decode calls of a small
// GQA, MLA or TPA layer through the cache), valid and invalid, checked after every step against a
// simple model of what the cache must hold: the live sequences, each one's length per layer and
// block-table size, the exact contents of every cached token, bytes_used and available_blocks.
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
    Index table = 0;                                 // blocks in its table
    std::vector<std::vector<float>> tokens[kLayers];  // per layer, per token: all factors
  };
  std::map<SeqId, Seq> seqs;
  Index block_tokens = 1, max_blocks = 1;
  std::size_t elems = 0;  // elements per token per layer (both layers have the same layout)

  Index in_use() const {
    Index n = 0;
    for (const auto& s : seqs) n += s.second.table;
    return n;
  }
  Index available() const { return max_blocks - in_use(); }
  Index blocks_for(Index tokens) const { return (tokens + block_tokens - 1) / block_tokens; }
  // New blocks appending n tokens to layer l of s takes.
  Index need(const Seq& s, int l, Index n) const {
    return std::max<Index>(
        0, blocks_for(static_cast<Index>(s.tokens[l].size()) + n) - s.table);
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
  std::size_t used = 0;
  std::set<std::int32_t> blocks;
  for (const auto& [id, s] : m.seqs) {
    CHECK(cache.contains(id));
    const auto& table = cache.block_table(id);
    CHECK(static_cast<Index>(table.size()) == s.table);
    for (auto b : table) CHECK(blocks.insert(b).second);  // no block in two tables
    for (int l = 0; l < kLayers; ++l) {
      const Index len = static_cast<Index>(s.tokens[l].size());
      CHECK(cache.length(id, l) == len);
      CHECK(cache.view(id, l).n_tokens == len);
      used += static_cast<std::size_t>(len) * cache.bytes_per_token(l);
      for (Index t = 0; t < len; ++t)
        CHECK(same_bits(read_token(cache, id, l, t), s.tokens[l][static_cast<std::size_t>(t)]));
    }
  }
  CHECK(cache.bytes_used() == used);
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

// A sequence id: usually a live one, sometimes a dead or out-of-range one.
SeqId pick_seq(FuzzedDataProvider& in, const Model& m) {
  if (!m.seqs.empty() && in.ConsumeIntegralInRange<int>(0, 7) != 0) {
    auto it = m.seqs.begin();
    std::advance(it, in.ConsumeIntegralInRange<std::size_t>(0, m.seqs.size() - 1));
    return it->first;
  }
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
  auto& toks = m.seqs[seq].tokens[layer];
  const Index start = static_cast<Index>(toks.size());
  for (Index t = start; t < start + n; ++t) {
    toks.push_back(read_token(cache, seq, layer, t));
    for (float v : toks.back()) CHECK(std::isfinite(v));  // finite inputs, finite projections
  }
  m.seqs[seq].table = std::max(m.seqs[seq].table, m.blocks_for(start + n));
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
    switch (in.ConsumeIntegralInRange<int>(0, 7)) {
      case 0: {  // add_sequence: a handle no live sequence has
        const SeqId id = cache.add_sequence();
        CHECK(m.seqs.count(id) == 0);
        m.seqs[id];
        break;
      }
      case 1: {  // free_sequence
        const SeqId id = pick_seq(in, m);
        if (run(cache, m, m.seqs.count(id) == 1, [&] { cache.free_sequence(id); }))
          m.seqs.erase(id);
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
                        m.need(m.seqs[id], l, n) <= m.available();
        if (run(cache, m, ok, [&] { cache.append(id, l, n, rows.data()); })) {
          auto& s = m.seqs[id];
          for (Index i = 0; i < n; ++i)
            s.tokens[l].emplace_back(src.begin() + i * static_cast<Index>(m.elems),
                                     src.begin() + (i + 1) * static_cast<Index>(m.elems));
          s.table = std::max(s.table, m.blocks_for(static_cast<Index>(s.tokens[l].size())));
        }
        break;
      }
      case 3: {  // reserve_tokens
        const SeqId id = pick_seq(in, m);
        const Index tokens = in.ConsumeIntegralInRange<Index>(-1, 4 * m.block_tokens);
        const bool ok = m.seqs.count(id) && tokens >= 0 &&
                        std::max<Index>(0, m.blocks_for(tokens) - m.seqs[id].table) <=
                            m.available();
        if (run(cache, m, ok, [&] { cache.reserve_tokens(id, tokens); }))
          m.seqs[id].table = std::max(m.seqs[id].table, m.blocks_for(tokens));
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
               m.need(s, l, n) <= m.available();
        }
        if (run(cache, m, ok, [&] { layer.forward(ctx, x, y, cache, l, id); }))
          record_new_tokens(cache, m, id, l, n);
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
          ok = static_cast<Index>(s.tokens[l].size()) + 1 <= kMaxPositions;
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
