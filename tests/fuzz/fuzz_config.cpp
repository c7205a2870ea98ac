// libFuzzer target: RopeConfig, GqaConfig, MlaConfig, TpaConfig, CacheLayout and KVCache built
// from fuzzed fields (small values, boundary values and arbitrary bit patterns alike). validate()
// and every constructor must either succeed or throw tpa::Error. When a config validates and its
// sizes are small, a layer is built from random weights (for that config, or for a mutated one,
// whose shapes may not match) and run: a forward without cache, then a prefill and a decode
// through a KVCache. Anything else (a crash, a sanitizer report, another exception type, a
// validated config whose layer cannot be built) is a bug. Every config flows end to end: one
// that does not validate must make Weights::random and the layer constructor throw tpa::Error
// too, before allocating (issue 27: huge or negative sizes reached Eigen and the RoPE table);
// one that validates with small sizes is built and run, with caches whose max_blocks may be as
// large as 2^31 − 1 (a bound, not a reservation). Sizes that would allocate more than a few MiB
// are only validated, never built. Reproducers of past bugs are in tests/fuzz/corpus/fuzz_config
// (scripts/fuzz.sh seeds the corpus from there); build with -DTPA_FUZZ_TRACE to print, per
// input, which config was made and why it was rejected.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdio>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <limits>
#include <memory>
#include <string>
#include <tpa/tpa.hpp>
#include <vector>

namespace {

using tpa::Index;

#define CHECK(cond)               \
  do {                            \
    if (!(cond)) __builtin_trap(); \
  } while (0)

// An Index field: mostly small (including 0 and negatives), sometimes a boundary value or any
// 64-bit value.
Index index_field(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0:
      return in.ConsumeIntegral<Index>();
    case 1: {
      constexpr Index kSpecial[] = {0,
                                    -1,
                                    std::numeric_limits<std::int32_t>::max(),
                                    Index(1) << 31,
                                    Index(1) << 62,
                                    std::numeric_limits<Index>::max(),
                                    std::numeric_limits<Index>::min()};
      return kSpecial[in.ConsumeIntegralInRange<std::size_t>(0, std::size(kSpecial) - 1)];
    }
    default:
      return in.ConsumeIntegralInRange<Index>(-1, 12);
  }
}

// A float field: mostly ordinary, sometimes special (±0, ±Inf, NaN, denormal, huge) or any bits.
float float_field(FuzzedDataProvider& in, float typical) {
  switch (in.ConsumeIntegralInRange<int>(0, 5)) {
    case 0: {
      const std::uint32_t bits = in.ConsumeIntegral<std::uint32_t>();
      float f;
      std::memcpy(&f, &bits, sizeof f);
      return f;
    }
    case 1: {
      constexpr float kSpecial[] = {0.f,
                                    -0.f,
                                    std::numeric_limits<float>::infinity(),
                                    -std::numeric_limits<float>::infinity(),
                                    std::numeric_limits<float>::quiet_NaN(),
                                    std::numeric_limits<float>::denorm_min(),
                                    std::numeric_limits<float>::max(),
                                    -1.f};
      return kSpecial[in.ConsumeIntegralInRange<std::size_t>(0, std::size(kSpecial) - 1)];
    }
    default:
      return in.ConsumeBool() ? 0.f : typical;
  }
}

tpa::RopeConfig rope_field(FuzzedDataProvider& in) {
  tpa::RopeConfig r;
  r.style = static_cast<tpa::RopeStyle>(in.ConsumeIntegralInRange<int>(-1, 4));
  r.base = in.ConsumeBool() ? 10000.0 : static_cast<double>(float_field(in, 500.f));
  r.rotary_dim = index_field(in);
  r.max_positions = index_field(in);
  r.decay_base = in.ConsumeBool() ? 1.0 : static_cast<double>(float_field(in, 0.9f));
  return r;
}

bool small(Index v, Index hi = 12) { return v >= 0 && v <= hi; }
bool small_rope(const tpa::RopeConfig& r) { return small(r.max_positions, 32); }

// Runs f; it may throw tpa::Error. Returns whether it succeeded.
template <class F>
bool may_throw(F&& f) {
  try {
    f();
    return true;
  } catch (const tpa::Error& e) {
#ifdef TPA_FUZZ_TRACE
    std::fprintf(stderr, "  tpa::Error: %s\n", e.what());
#else
    (void)e;
#endif
    return false;
  }
}

// A config that does not validate makes Weights::random and the layer constructor throw
// tpa::Error as well (never std::bad_alloc, an Eigen assertion or a crash). Returns whether it
// validates.
template <class Layer, class Config>
bool validates_end_to_end(const char* kind, const Config& c) {
#ifdef TPA_FUZZ_TRACE
  std::fprintf(stderr, "%s: d_model %lld n_heads %lld rope.max_positions %lld norm_eps %g\n",
               kind, static_cast<long long>(c.d_model), static_cast<long long>(c.n_heads),
               static_cast<long long>(c.rope.max_positions), static_cast<double>(c.norm_eps));
#else
  (void)kind;
#endif
  if (may_throw([&] { c.validate(); })) return true;
  CHECK(!may_throw([&] { (void)Layer::Weights::random(c, 1); }));
  CHECK(!may_throw([&] { const Layer layer(c, Layer::Weights::random(c, 1)); }));
  return false;
}

tpa::Tensor<float, 2> input(FuzzedDataProvider& in, Index n, Index d) {
  tpa::Tensor<float, 2> x(n, d);
  for (Index i = 0; i < x.size(); ++i)
    x.data()[i] = static_cast<float>(in.ConsumeIntegralInRange<int>(-32, 32)) / 32.f;
  return x;
}

// A forward without cache, then a prefill and a one-token decode through a cache. Positions past
// the RoPE table throw tpa::Error; nothing else may fail.
template <class Layer>
void exercise(const Layer& layer, FuzzedDataProvider& in, Index d_model) {
  tpa::Context ctx(1);
  const Index n = in.ConsumeIntegralInRange<Index>(1, 3);
  const tpa::Tensor<float, 2> x = input(in, n, d_model);
  tpa::Tensor<float, 2> y(n, d_model);
  may_throw([&] { layer.forward(ctx, x, y); });
  const Index block_tokens = in.ConsumeIntegralInRange<Index>(1, 4);
  const Index max_blocks = in.ConsumeBool() ? 8 : std::numeric_limits<std::int32_t>::max();
  tpa::KVCache<float> cache({layer.cache_layout()}, block_tokens, max_blocks);
  const tpa::SeqId seq = cache.add_sequence();
  may_throw([&] { layer.forward(ctx, x, y, cache, 0, seq); });
  tpa::Tensor<float, 2> x1 = input(in, 1, d_model), y1(1, d_model);
  may_throw([&] { layer.decode(ctx, x1, y1, cache, 0, {seq}); });
  // Queries of any sequence and layer, live or not.
  const auto other = static_cast<tpa::SeqId>(in.ConsumeIntegralInRange<int>(-1, 2));
  const int layer_index = in.ConsumeIntegralInRange<int>(-1, 1);
  may_throw([&] { CHECK(cache.blocks_needed(other, layer_index, 1) >= 0); });
  may_throw([&] { (void)cache.length(other, layer_index); });
}

// Builds Layer from cfg and weights made for `wcfg` (cfg itself, or a mutation of it).
template <class Layer, class Config>
void build_and_run(FuzzedDataProvider& in, const Config& cfg, const Config& wcfg) {
  auto w = Layer::Weights::random(wcfg, in.ConsumeIntegral<std::uint32_t>());
  bool built = false;
  may_throw([&] {
    const Layer layer(cfg, std::move(w));
    built = true;
    exercise(layer, in, cfg.d_model);
  });
  // A config that validates, with weights made for it, always builds.
  if (&cfg == &wcfg) CHECK(built);
}

void fuzz_rope(FuzzedDataProvider& in) {
  const tpa::RopeConfig r = rope_field(in);
  const Index dim = index_field(in);
  const bool valid = may_throw([&] { r.validate("fuzz", dim); });
  if (!valid || !small(dim, 64) || !small_rope(r)) return;
  const tpa::RopeTable table(r, dim);
  const Index first = index_field(in), count = index_field(in);
  if (may_throw([&] { table.check_positions("fuzz", first, count); }) && count >= 1) {
    std::vector<float> v(static_cast<std::size_t>(dim) + 1, 0.5f);
    table.rotate(v.data(), first + count - 1);
  }
}

tpa::GqaConfig gqa_field(FuzzedDataProvider& in) {
  tpa::GqaConfig c;
  c.d_model = index_field(in);
  c.n_heads = index_field(in);
  c.n_kv_heads = index_field(in);
  c.head_dim = index_field(in);
  c.rope = rope_field(in);
  c.softmax_scale = float_field(in, 0.25f);
  c.head_norm = in.ConsumeBool();
  c.norm_eps = float_field(in, 1e-5f);
  return c;
}

void fuzz_gqa(FuzzedDataProvider& in) {
  const tpa::GqaConfig c = gqa_field(in);
  if (!validates_end_to_end<tpa::GroupedQueryAttention<>>("gqa", c)) return;
  if (!(small(c.d_model, 32) && small(c.n_heads, 4) && small(c.n_kv_heads, 4) &&
        small(c.head_dim, 16) && small_rope(c.rope)))
    return;
  build_and_run<tpa::GroupedQueryAttention<>>(in, c, c);
  tpa::GqaConfig m = c;  // weights for another shape
  m.n_kv_heads = in.ConsumeIntegralInRange<Index>(0, 4);
  m.head_norm = in.ConsumeBool();
  if (may_throw([&] { m.validate(); })) build_and_run<tpa::GroupedQueryAttention<>>(in, c, m);
}

void fuzz_mla(FuzzedDataProvider& in) {
  tpa::MlaConfig c;
  c.d_model = index_field(in);
  c.n_heads = index_field(in);
  c.q_lora_rank = index_field(in);
  c.kv_lora_rank = index_field(in);
  c.qk_nope_head_dim = index_field(in);
  c.qk_rope_head_dim = index_field(in);
  c.v_head_dim = index_field(in);
  c.rope = rope_field(in);
  c.softmax_scale = float_field(in, 0.25f);
  c.norm_eps = float_field(in, 1e-6f);
  c.form = static_cast<tpa::MlaForm>(in.ConsumeIntegralInRange<int>(-1, 3));
  if (!validates_end_to_end<tpa::MultiHeadLatentAttention<>>("mla", c)) return;
  if (!(small(c.d_model, 32) && small(c.n_heads, 4) && small(c.q_lora_rank, 16) &&
        small(c.kv_lora_rank, 16) && small(c.qk_nope_head_dim, 8) &&
        small(c.qk_rope_head_dim, 8) && small(c.v_head_dim, 8) && small_rope(c.rope)))
    return;
  build_and_run<tpa::MultiHeadLatentAttention<>>(in, c, c);
  tpa::MlaConfig m = c;
  m.q_lora_rank = in.ConsumeIntegralInRange<Index>(0, 4);
  m.v_head_dim = in.ConsumeIntegralInRange<Index>(1, 8);
  if (may_throw([&] { m.validate(); }))
    build_and_run<tpa::MultiHeadLatentAttention<>>(in, c, m);
}

void fuzz_tpa(FuzzedDataProvider& in) {
  tpa::TpaConfig c;
  c.d_model = index_field(in);
  c.n_heads = index_field(in);
  c.head_dim = index_field(in);
  c.q_rank = index_field(in);
  c.k_rank = index_field(in);
  c.v_rank = index_field(in);
  c.kv_only = in.ConsumeBool();
  c.rope = rope_field(in);
  c.softmax_scale = float_field(in, 0.25f);
  c.head_norm = in.ConsumeBool();
  c.norm_eps = float_field(in, 1e-5f);
  if (!validates_end_to_end<tpa::TensorProductAttention<>>("tpa", c)) return;
  if (!(small(c.d_model, 32) && small(c.n_heads, 4) && small(c.head_dim, 16) &&
        small(c.q_rank, 6) && small(c.k_rank, 4) && small(c.v_rank, 4) && small_rope(c.rope)))
    return;
  (void)c.cache_elements_per_token();
  build_and_run<tpa::TensorProductAttention<>>(in, c, c);
  tpa::TpaConfig m = c;
  m.kv_only = in.ConsumeBool();
  m.q_rank = in.ConsumeIntegralInRange<Index>(0, 4);
  if (may_throw([&] { m.validate(); })) build_and_run<tpa::TensorProductAttention<>>(in, c, m);
}

// Layouts with fuzzed factors, then a KVCache over them; blocks are only allocated when one
// block is small.
void fuzz_cache(FuzzedDataProvider& in) {
  std::vector<tpa::CacheLayout> layouts(in.ConsumeIntegralInRange<std::size_t>(0, 3));
  for (auto& l : layouts) {
    std::vector<tpa::FactorSpec> fs(in.ConsumeIntegralInRange<std::size_t>(0, 3));
    for (auto& f : fs) {
      f.name = in.ConsumeRandomLengthString(8);
      f.rows = index_field(in);
      f.cols = index_field(in);
      f.rotated = in.ConsumeBool();
    }
    if (!may_throw([&] { l = tpa::CacheLayout(in.ConsumeRandomLengthString(8), fs); })) return;
    (void)l.elements_per_token();
    (void)l.describe();
  }
  const Index block_tokens = index_field(in);
  // Any max_blocks: it is a bound, nothing is reserved for it (it threw std::bad_alloc for
  // 2^31 − 1 when the bookkeeping was reserved up front).
  const Index max_blocks = index_field(in);
  std::unique_ptr<tpa::KVCache<tpa::bfloat16>> cache;
  if (!may_throw([&] {
        cache = std::make_unique<tpa::KVCache<tpa::bfloat16>>(layouts, block_tokens, max_blocks);
      }))
    return;
  CHECK(cache->num_layers() == static_cast<int>(layouts.size()));
  const std::size_t per_token = cache->bytes_per_token();
  if (per_token == 0 || static_cast<std::size_t>(block_tokens) > (std::size_t(1) << 20) / per_token)
    return;
  const tpa::SeqId seq = cache->add_sequence();
  const int layer = in.ConsumeIntegralInRange<int>(-1, static_cast<int>(layouts.size()));
  const Index n = in.ConsumeIntegralInRange<Index>(-1, 3);
  const Index elems = layer >= 0 && layer < cache->num_layers()
                          ? layouts[static_cast<std::size_t>(layer)].elements_per_token()
                          : 1;
  std::vector<float> src(static_cast<std::size_t>(elems * 4), 1.f);
  std::vector<tpa::FactorRows> rows(4, tpa::FactorRows{src.data(), elems});
  if (may_throw([&] { cache->append(seq, layer, n, rows.data()); })) {
    CHECK(cache->length(seq, layer) == n);
    CHECK(cache->bytes_used() == static_cast<std::size_t>(n) * cache->bytes_per_token(layer));
  }
  // Reservations of more than 64 blocks are only tried where they cannot fit (they throw before
  // allocating): max_blocks may be huge.
  const Index tokens = index_field(in);
  if (tokens < 0 || tokens / block_tokens <= 64 || tokens / block_tokens > cache->max_blocks())
    may_throw([&] { cache->reserve_tokens(seq, tokens); });
  // Members taking a sequence and a layer, on any of them (blocks_needed read out of bounds).
  const auto any_seq = static_cast<tpa::SeqId>(in.ConsumeIntegralInRange<int>(-1, 2));
  const int any_layer = in.ConsumeIntegralInRange<int>(-1, 3);
  const Index any_n = index_field(in);
  may_throw([&] { CHECK(cache->blocks_needed(any_seq, any_layer, any_n) >= 0); });
  may_throw([&] { (void)cache->length(any_seq, any_layer); });
  may_throw([&] { (void)cache->view(any_seq, any_layer); });
  may_throw([&] { (void)cache->bytes_per_token(any_layer); });
  cache->free_sequence(seq);
  CHECK(cache->bytes_used() == 0);
  cache->release_free_blocks();
  CHECK(cache->bytes_reserved() == 0);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  FuzzedDataProvider in(data, size);
  switch (in.ConsumeIntegralInRange<int>(0, 4)) {
    case 0: fuzz_rope(in); break;
    case 1: fuzz_gqa(in); break;
    case 2: fuzz_mla(in); break;
    case 3: fuzz_tpa(in); break;
    default: fuzz_cache(in); break;
  }
  return 0;
}
