// The decode kernels alone (tpa::grouped_attention, tpa::tpa_attention; Native backend) in
// long-context decode, f32 and half-width (bfloat16, half) caches, against this run's machine
// roofline (bench_common.hpp probes). Complements bench_attention, which times whole layer calls.
//
// Benchmarks: decode_kernel/KIND/cache:C/ctx:L/pages:P/threads:T, one decode step (batch 1) over
// a context of L tokens (16K; TPA and TPA-KV also 64K), LLaMA shape (H = 32 query heads, d = 128):
//   MHA  G = 32        GQA8  G = 8        GQA4  G = 4 (8 query heads per KV head)
//   MQA  G = 1
//   MLA  G = 1, keys 512 + 64 (c_kv, k_pe), value = the 512-part (absorbed decode)
//   TPA  R_Q = 6, R_K = R_V = 2 (the T6 ranks): factors A_K, B_K, A_V, B_V (FlashTPA kernel)
//   TPA-KV  the same factors, full query (R_Q = 0: the K/V-only variant)
// cache:f32|bf16|int8|f16  storage scalar of the cache; the kernels widen 16-bit and 8-bit
//              elements to f32 in registers as they read them (int8: tpa::q8, scaled per row;
//              bytes read per step halve or quarter, arithmetic stays f32).
//              f32 runs at 2 and 1 threads, bf16/int8/f16 at 2 threads.
// pages:cache  the sequence lives in a KVCache (block allocations on default pages);
// pages:huge   the same block layout in one arena advised to 2 MiB pages (what the memory system
//              delivers without TLB misses; the probe's roofline uses such pages too).
// pages:l2     a context short enough (≈ 1 MiB of cache per thread) that one copy stays in
//              the cores' L2 between steps: the kernel's arithmetic ceiling without the memory
//              stream (compare pct_flops with the streaming rows to see what the stream costs).
// Each case keeps enough copies of the sequence (one per "layer") that a step's data is never in
// the 480 MB L3 from the previous step; steps cycle through them (pages:l2 keeps one).
//
// Counters:
//   cache_bytes    bytes read per step (every cached element once; MLA's value is inside the
//                  key), sizeof(storage scalar) each, plus int8's f32 scales
//   flops          grouped: 2 · H · L · (d_qk + d_v); TPA: 2 · L · (R_Q·R_K·d + H·R_K·(R_Q+1)
//                  + H·R_V·(d+1)) (FlashTPA: B_Q·B_K, rank mixing, (p·A_V)·B_V)
//   GBps           cache_bytes / time
//   pct_bw         100 · GBps / read bandwidth (probe, same threads)
//   pct_flops      100 · flops / time / FMA peak (same threads)
//   pct_roofline   100 · max(bytes / bandwidth, flops / FMA peak) / time
//   read_GBps      the run's read bandwidth (best of the first probe's 5 passes)
//   read_GBps_now, GFLOPs_now
//                  the bandwidth and FMA rate this case had: best of 2 probe passes of each right
//                  before and 2 right after its timed loop (NowProbes; on a shared host both
//                  drift by up to 2× within minutes)
//   pct_bw_now, pct_roofline_now   pct_bw and pct_roofline against those "now" probes
//
// Benchmarks: decode_pair/KIND_vs_MHA/cache:f32/ctx:16384/pages:huge/threads:2, the speed-up of
// KIND over MHA with both measured in the same moments: each iteration times one MHA step and
// one KIND step back to back (alternating which goes first), so drift of the shared host's
// bandwidth (2× within minutes seen here) moves both alike. Counters: MHA_ms and KIND_ms (median
// step times), speedup (MHA_ms / KIND_ms) and speedup_lo, speedup_hi (the first and third
// quartile of the per-iteration ratios).
//
// Benchmarks: decode_quant/KIND/bf16_vs_int8/ctx:L/pages:huge/threads:2 (L 16K and 64K), the same
// case with a bf16 and an int8 (tpa::q8) cache, steps alternated as in decode_pair. Counters:
// bf16_ms, int8_ms (median step times), speedup (bf16_ms / int8_ms; issue 26's target is ≥ 1.8
// for the bandwidth-bound MHA, GQA8, TPA, TPA-KV), speedup_lo, speedup_hi, and the bytes each
// step reads (bf16_bytes, int8_bytes: values and scales).
//
// Benchmarks: decode_narrow/KIND/f32_vs_bf16/ctx:16384/pages:huge/threads:2, an f32 and a bf16
// cache alternated the same way. Counters: f32_ms, bf16_ms, speedup (f32_ms / bf16_ms; issue 23's
// target is ≥ 1.82, i.e. bf16 ≤ 0.55× the f32 time, where the step is bound by its bytes, and
// ≥ 1 where it is bound by its FLOPs), speedup_lo, speedup_hi, f32_bytes, bf16_bytes.
//
// Benchmarks: decode_order/KIND/cache:C/ctx:16384/pages:huge/threads:2 (MHA, GQA8, GQA4; f32,
// bf16, f16, int8),
// the same case with its K and V placed token-major (all KV heads' rows of a token together: one
// head's tile is block_tokens rows G·d elements apart) and head-major (one head's tile is one
// contiguous run), steps alternated as in decode_pair. Counters: token_ms, head_ms (median step
// times), speedup (token_ms / head_ms), speedup_lo and speedup_hi (quartiles of the
// per-iteration ratios). The other benchmarks place K/V as the layers do (tpa::kv_tile_order:
// head-major in int8, and up to 1 and from 2 query heads per KV head and byte of a cached
// element: MHA, GQA8 and GQA4 in every scalar).
//
// Benchmarks: decode_variant/KIND/VARIANT/cache:f32/ctx:16384/pages:huge/threads:2, the cost of an
// attention variant (README, "Attention variants"): each iteration times one plain step and one
// step of the same sequences with the variant on, back to back (alternating which goes first).
// VARIANT: softcap (c = 30), alibi (standard slopes), sinks, all3 (the three together),
// window_full (W = the context: the windowed code path with nothing to skip) and window_4096 (a
// step that reads 4096 of the 16384 tokens). Counters: VARIANT_ms, plain_ms (median step times)
// and speedup = VARIANT_ms / plain_ms, i.e. the variant's relative cost (1.10 = 10 % slower),
// with its quartiles speedup_lo, speedup_hi.
// Benchmarks: prefill_kernel/KIND/cache:f32/tokens:N/threads:2, the attention of a causal
// prefill of N tokens (N queries, query i over keys 0..i; one call of the same kernels, f32
// cache in one 2 MiB-page arena): counters flops (the decode FLOP model above per (query, key)
// pair, N·(N + 1)/2 pairs), GFLOPs, GFLOPs_now (the FMA probe right around the case) and
// pct_flops_now (issue 23's prefill target: ≥ 60 % for MHA, GQA and TPA at 2K tokens).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iterator>
#include <memory>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "bench_common.hpp"

namespace tpa_bench {
namespace {

using tpa::GroupedAttentionParams;
using tpa::Index;

struct DecodeCase {
  const char* name;
  Index H, G, d_k0, d_k1, d_v;
  bool v_in_key;
  Index r_q = 0, r_k = 0, r_v = 0;  // TPA (r_k > 0): head_dim = d_k0, H = H
  bool tpa() const { return r_k > 0; }
};
const DecodeCase kCases[] = {{"MHA", 32, 32, 128, 0, 128, false},
                             {"GQA8", 32, 8, 128, 0, 128, false},
                             {"GQA4", 32, 4, 128, 0, 128, false},
                             {"MQA", 32, 1, 128, 0, 128, false},
                             {"MLA", 32, 1, 512, 64, 512, true},
                             {"TPA", 32, 0, 128, 0, 128, false, 6, 2, 2},
                             {"TPA-KV", 32, 0, 128, 0, 128, false, 0, 2, 2}};
const Index kContexts[] = {16384};
// decode_quant: bf16 against int8 caches at these contexts (the bandwidth-bound kinds).
const Index kQuantContexts[] = {16384, 65536};
// prefill_kernel: prompt lengths.
const Index kPrefillTokens[] = {2048};
constexpr Index kBlock = 64;
constexpr double kWorkingSetBytes = 1.2e9;  // > 2 × L3

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Where GroupedQueryAttention places a case's K and V in a cache of S (tpa::kv_tile_order).
template <class S>
tpa::TileOrder layer_order(const DecodeCase& c) {
  return c.G > 0 ? tpa::kv_tile_order<S>(c.H / c.G) : tpa::TileOrder::kTokenMajor;
}

// The per-token factors of a case: one key part or two, then the value unless it is in the key,
// placed in `order` (GroupedQueryAttention's cache_layout() places them per tpa::kv_tile_order;
// with one KV head both orders place alike); TPA's A_K, B_K, A_V, B_V, token-major (as the
// layer's).
std::vector<tpa::FactorSpec> factors(const DecodeCase& c, tpa::TileOrder order) {
  if (c.tpa())
    return {{"A_K", c.H, c.r_k, false},
            {"B_K", c.r_k, c.d_k0, true},
            {"A_V", c.H, c.r_v, false},
            {"B_V", c.r_v, c.d_k0, false}};
  std::vector<tpa::FactorSpec> f = {{"K0", c.G, c.d_k0, true, order}};
  if (c.d_k1 > 0) f.push_back({"K1", c.G, c.d_k1, true, order});
  if (!c.v_in_key) f.push_back({"V", c.G, c.d_v, false, order});
  return f;
}

struct SequencesBase {
  virtual ~SequencesBase() = default;
};

// `copies` sequences of `len` tokens of one case, either in KVCaches or in huge-page arenas with
// the same block layout, storage scalar S, and the query/output buffers of a step.
template <class S>
class Sequences final : public SequencesBase {
 public:
  Sequences(const DecodeCase& c, Index len, bool huge, bool hot, tpa::TileOrder order,
            Index n_q = 1)
      : c_(c), len_(len), n_q_(n_q) {
    const auto f = factors(c, order);
    const tpa::CacheLayout layout(c.name, f);
    constexpr Index es = sizeof(S);
    // Scalars per token (int8: values and scales) and per block region (as KVCache places them).
    const Index ept = tpa::KVCache<S>::token_units(layout);
    const Index region = tpa::KVCache<S>::place_layer(layout, kBlock, &places_);
    const double bytes = static_cast<double>(len) * static_cast<double>(ept) * es;
    copies_ = hot ? 1 : std::max<Index>(2, static_cast<Index>(kWorkingSetBytes / bytes) + 1);
    // One random sequence, copied into every slot (values do not matter, distinct memory does).
    std::vector<std::vector<float>> src(f.size());
    for (std::size_t i = 0; i < f.size(); ++i) {
      src[i].resize(static_cast<std::size_t>(len * f[i].elements()));
      randomize(src[i].data(), static_cast<Index>(src[i].size()), 11 + i);
    }
    const Index n_blocks = (len + kBlock - 1) / kBlock;
    for (Index b = 0; b < n_blocks; ++b) table_.push_back(static_cast<std::int32_t>(b));
    for (Index k = 0; k < copies_; ++k) {
      if (!huge) {
        caches_.push_back(std::make_unique<tpa::KVCache<S>>(
            std::vector<tpa::CacheLayout>{layout}, kBlock, n_blocks));
        const tpa::SeqId s = caches_.back()->add_sequence();
        std::vector<tpa::FactorRows> rows;
        for (std::size_t i = 0; i < f.size(); ++i) rows.push_back({src[i].data(), f[i].elements()});
        caches_.back()->append(s, 0, len, rows.data());
        views_.push_back(caches_.back()->view(s, 0));
      } else {
        const std::size_t block_bytes = static_cast<std::size_t>(region * es);
        const std::size_t total =
            (block_bytes * n_blocks + (2u << 20) - 1) / (2u << 20) * (2u << 20);
        auto* p = static_cast<S*>(std::aligned_alloc(2u << 20, total));
        if (p == nullptr) throw std::bad_alloc();
        arenas_.emplace_back(p);
#if defined(MADV_HUGEPAGE)
        madvise(p, total, MADV_HUGEPAGE);
#endif
        bases_.emplace_back();
        for (Index b = 0; b < n_blocks; ++b) bases_.back().push_back(p + b * region);
        for (Index t = 0; t < len; ++t)  // placed as KVCache::append places them
          for (std::size_t i = 0; i < f.size(); ++i)
            tpa::detail::store_factor(places_[i], p + (t / kBlock) * region, t % kBlock, kBlock,
                                      src[i].data() + t * f[i].elements());
      }
    }
    if (huge) {
      for (Index k = 0; k < copies_; ++k) {
        tpa::SeqView<S> v;
        v.block_base = bases_[static_cast<std::size_t>(k)].data();
        v.table = table_.data();
        v.places = places_.data();
        v.n_tokens = len;
        v.block_tokens = kBlock;
        v.huge_pages = true;
        views_.push_back(v);
      }
    }
    // The last n_q tokens' queries. Grouped: q [n_q, H, d_qk]. TPA: A_Q [n_q, H, R_Q] then
    // B_Q [n_q, R_Q, d].
    q_.resize(static_cast<std::size_t>(n_q * (c.tpa() && c.r_q > 0 ? c.r_q * (c.H + c.d_k0)
                                                                   : c.H * (c.d_k0 + c.d_k1))));
    randomize(q_.data(), static_cast<Index>(q_.size()), 7);
    o_.resize(static_cast<std::size_t>(n_q * c.H * c.d_v));
    bytes_ = bytes;
    // (query, key) pairs: n_q causal queries ending at the last token.
    const double pairs = static_cast<double>(n_q) * static_cast<double>(len - n_q) +
                         0.5 * static_cast<double>(n_q) * static_cast<double>(n_q + 1);
    flops_ = pairs / static_cast<double>(len) * (c.tpa() && c.r_q == 0  // full query: H·R_K·d for the scores
                 ? 2.0 * static_cast<double>(len * (c.H * c.r_k * (c.d_k0 + 1) +
                                                    c.H * c.r_v * (c.d_k0 + 1)))
             : c.tpa() ? 2.0 * static_cast<double>(len * (c.r_q * c.r_k * c.d_k0 +
                                                          c.H * c.r_k * (c.r_q + 1) +
                                                          c.H * c.r_v * (c.d_k0 + 1)))
                     : 2.0 * static_cast<double>(c.H * len * (c.d_k0 + c.d_k1 + c.d_v)));
  }

  Index copies() const { return copies_; }
  double bytes() const { return bytes_; }
  double flops() const { return flops_; }

  tpa::TpaAttentionParams<S> tpa_params(Index copy) {
    tpa::TpaAttentionParams<S> p;
    p.q_rank = c_.r_q;
    if (c_.r_q > 0) {
      p.a_q = q_.data();
      p.a_q_stride = c_.H * c_.r_q;
      p.b_q = q_.data() + n_q_ * c_.H * c_.r_q;
      p.b_q_stride = c_.r_q * c_.d_k0;
    } else {  // TPA-KV: the full query
      p.q = q_.data();
      p.q_stride = c_.H * c_.d_k0;
    }
    p.o = o_.data();
    p.o_stride = c_.H * c_.d_k0;
    p.n_q = n_q_;
    p.q_pos0 = len_ - n_q_;
    p.n_heads = c_.H;
    p.head_dim = c_.d_k0;
    p.k_rank = c_.r_k;
    p.v_rank = c_.r_v;
    p.scale = 1.f / std::sqrt(static_cast<float>(c_.d_k0));
    p.kv = views_[static_cast<std::size_t>(copy)];
    return p;
  }

  GroupedAttentionParams<S> params(Index copy) {
    GroupedAttentionParams<S> p;
    p.q = q_.data();
    p.q_stride = c_.H * (c_.d_k0 + c_.d_k1);
    p.o = o_.data();
    p.o_stride = c_.H * c_.d_v;
    p.n_q = n_q_;
    p.q_pos0 = len_ - n_q_;
    p.n_heads = c_.H;
    p.n_kv_heads = c_.G;
    p.k_factor[0] = 0;
    p.k_dims[0] = c_.d_k0;
    p.k_factor[1] = 1;
    p.k_dims[1] = c_.d_k1;
    p.v_factor = c_.v_in_key ? 0 : (c_.d_k1 > 0 ? 2 : 1);
    p.d_v = c_.d_v;
    p.scale = 1.f / std::sqrt(static_cast<float>(c_.d_k0 + c_.d_k1));
    p.kv = views_[static_cast<std::size_t>(copy)];
    return p;
  }

 private:
  DecodeCase c_;
  Index len_, n_q_, copies_ = 0;
  double bytes_ = 0, flops_ = 0;
  std::vector<std::unique_ptr<tpa::KVCache<S>>> caches_;
  std::vector<std::unique_ptr<S, FreeDeleter>> arenas_;
  std::vector<std::vector<const S*>> bases_;
  std::vector<std::int32_t> table_;
  std::vector<tpa::FactorPlace> places_;
  std::vector<tpa::SeqView<S>> views_;
  std::vector<float> q_, o_;
};

// The sequences of the case being measured (one case in memory at a time per slot: decode_pair
// keeps MHA's in slot 1 beside the other kind's in slot 0, decode_order the token-major copy in
// slot 1 beside the head-major one in slot 0).
template <class S>
Sequences<S>& sequences(std::size_t c, Index len, bool huge, bool hot, int slot = 0,
                        std::optional<tpa::TileOrder> placement = std::nullopt, Index n_q = 1) {
  const tpa::TileOrder order = placement ? *placement : layer_order<S>(kCases[c]);
  static std::unique_ptr<SequencesBase> slots[2];
  static std::string keys[2];
  std::unique_ptr<SequencesBase>& cur = slots[slot];
  std::string& key = keys[slot];
  const std::string k = std::to_string(c) + "/" + std::to_string(len) + "/" + (huge ? "h" : "c") +
                        (hot ? "/hot/" : "/") + scalar_name<S>() +
                        (order == tpa::TileOrder::kHeadMajor ? "/head" : "/token") + "/q" +
                        std::to_string(n_q);
  if (key != k) {
    cur.reset();
    cur = std::make_unique<Sequences<S>>(kCases[c], len, huge, hot, order, n_q);
    key = k;
  }
  return static_cast<Sequences<S>&>(*cur);
}

template <class S>
void decode_kernel(benchmark::State& state, std::size_t c, Index len, bool huge, bool hot,
                   int threads) {
  const Machine& m = machine(threads);
  Sequences<S>& seqs = sequences<S>(c, len, huge, hot);
  tpa::Context ctx(threads);
  NowProbes probes(ctx);
  Index copy = 0;
  for (auto _ : state) {
    step(ctx, c, seqs, copy);
    copy = (copy + 1) % seqs.copies();
    benchmark::ClobberMemory();
  }
  const Machine now = probes.finish();
  const double n = static_cast<double>(state.iterations());
  state.counters["cache_bytes"] = seqs.bytes();
  state.counters["flops"] = seqs.flops();
  state.counters["GBps"] = benchmark::Counter(seqs.bytes() * n / 1e9, benchmark::Counter::kIsRate);
  state.counters["pct_bw"] = benchmark::Counter(100.0 * seqs.bytes() * n / m.read_bytes_per_s,
                                                benchmark::Counter::kIsRate);
  state.counters["pct_flops"] = benchmark::Counter(100.0 * n * seqs.flops() / m.flops_per_s,
                                                   benchmark::Counter::kIsRate);
  state.counters["pct_roofline"] = benchmark::Counter(
      100.0 * n * m.roofline_seconds(seqs.bytes(), seqs.flops()), benchmark::Counter::kIsRate);
  state.counters["read_GBps"] = m.read_bytes_per_s / 1e9;
  state.counters["peak_GFLOPs"] = m.flops_per_s / 1e9;
  state.counters["read_GBps_now"] = now.read_bytes_per_s / 1e9;
  state.counters["GFLOPs_now"] = now.flops_per_s / 1e9;
  state.counters["pct_bw_now"] = benchmark::Counter(
      100.0 * seqs.bytes() * n / now.read_bytes_per_s, benchmark::Counter::kIsRate);
  state.counters["pct_roofline_now"] = benchmark::Counter(
      100.0 * n * now.roofline_seconds(seqs.bytes(), seqs.flops()), benchmark::Counter::kIsRate);
}

// One decode step of case c over copy `copy` of its sequences, with score variant `v`.
template <class S>
void step(tpa::Context& ctx, std::size_t c, Sequences<S>& seqs, Index copy,
          const tpa::ScoreVariant& v = {}) {
  if (kCases[c].tpa()) {
    auto p = seqs.tpa_params(copy);
    p.variant = v;
    tpa::tpa_attention<tpa::Native>(ctx, &p, 1);
  } else {
    auto p = seqs.params(copy);
    p.variant = v;
    tpa::grouped_attention<tpa::Native>(ctx, &p, 1);
  }
}

// prefill_kernel: the attention of a causal prefill of `len` tokens (every token a query over
// the tokens up to it), one call, against the FMA peak probed right around the case.
void prefill_kernel(benchmark::State& state, std::size_t c, Index len, int threads) {
  Sequences<float>& seqs =
      sequences<float>(c, len, true, true, 0, std::nullopt, len);
  tpa::Context ctx(threads);
  NowProbes probes(ctx);
  for (auto _ : state) {
    step(ctx, c, seqs, 0);
    benchmark::ClobberMemory();
  }
  const Machine now = probes.finish();
  const double n = static_cast<double>(state.iterations());
  state.counters["flops"] = seqs.flops();
  state.counters["GFLOPs"] = benchmark::Counter(seqs.flops() * n / 1e9, benchmark::Counter::kIsRate);
  state.counters["GFLOPs_now"] = now.flops_per_s / 1e9;
  state.counters["pct_flops_now"] = benchmark::Counter(100.0 * n * seqs.flops() / now.flops_per_s,
                                                       benchmark::Counter::kIsRate);
}

// Times step_a() and step_b() back to back in every iteration (alternating which goes first) and
// reports their median times as counters name_a_ms and name_b_ms, the ratio of the medians
// (a / b) as `speedup`, and the first and third quartiles of the per-iteration ratios as
// speedup_lo and speedup_hi.
template <class A, class B>
void alternate(benchmark::State& state, const std::string& name_a, A&& step_a,
               const std::string& name_b, B&& step_b) {
  std::vector<double> t_a, t_b;
  auto timed = [](auto& step) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    benchmark::ClobberMemory();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  for (auto _ : state) {
    double a, b;
    if (t_a.size() % 2 == 0) {
      a = timed(step_a);
      b = timed(step_b);
    } else {
      b = timed(step_b);
      a = timed(step_a);
    }
    state.SetIterationTime(a + b);
    t_a.push_back(a);
    t_b.push_back(b);
  }
  if (t_a.empty()) return;
  std::vector<double> ratio(t_a.size());
  for (std::size_t i = 0; i < ratio.size(); ++i) ratio[i] = t_a[i] / t_b[i];
  auto quantile = [](std::vector<double> v, double q) {
    const auto k = static_cast<std::ptrdiff_t>(q * static_cast<double>(v.size() - 1) + 0.5);
    std::nth_element(v.begin(), v.begin() + k, v.end());
    return v[static_cast<std::size_t>(k)];
  };
  const double a_s = quantile(t_a, 0.5), b_s = quantile(t_b, 0.5);
  state.counters[name_a + "_ms"] = 1e3 * a_s;
  state.counters[name_b + "_ms"] = 1e3 * b_s;
  state.counters["speedup"] = a_s / b_s;
  state.counters["speedup_lo"] = quantile(ratio, 0.25);
  state.counters["speedup_hi"] = quantile(ratio, 0.75);
}

// decode_pair: MHA (case 0) and case c alternated step by step (see the file's header).
void decode_pair(benchmark::State& state, std::size_t c, Index len, int threads) {
  Sequences<float>& mha = sequences<float>(0, len, true, false, 1);
  Sequences<float>& other = sequences<float>(c, len, true, false, 0);
  tpa::Context ctx(threads);
  Index copy_mha = 0, copy_other = 0;
  alternate(
      state, "MHA",
      [&] {
        step(ctx, 0, mha, copy_mha);
        copy_mha = (copy_mha + 1) % mha.copies();
      },
      kCases[c].name,
      [&] {
        step(ctx, c, other, copy_other);
        copy_other = (copy_other + 1) % other.copies();
      });
}

// decode_variant: plain steps of case c and steps with variant `v` (named `name`) alternated, over
// the same sequences (see the file's header).
void decode_variant(benchmark::State& state, std::size_t c, Index len, int threads,
                    const std::string& name, const tpa::ScoreVariant& v) {
  Sequences<float>& seqs = sequences<float>(c, len, true, false, 0);
  tpa::Context ctx(threads);
  Index copy_a = 0, copy_b = seqs.copies() / 2;
  alternate(
      state, name,
      [&] {
        step(ctx, c, seqs, copy_a, v);
        copy_a = (copy_a + 1) % seqs.copies();
      },
      "plain",
      [&] {
        step(ctx, c, seqs, copy_b);
        copy_b = (copy_b + 1) % seqs.copies();
      });
}

// decode_order: case c with its K and V token-major and head-major (TileOrder), steps
// alternated (see the file's header).
template <class S>
void decode_order(benchmark::State& state, std::size_t c, Index len, int threads) {
  Sequences<S>& head = sequences<S>(c, len, true, false, 0, tpa::TileOrder::kHeadMajor);
  Sequences<S>& token = sequences<S>(c, len, true, false, 1, tpa::TileOrder::kTokenMajor);
  tpa::Context ctx(threads);
  Index copy_head = 0, copy_token = 0;
  alternate(
      state, "token",
      [&] {
        step(ctx, c, token, copy_token);
        copy_token = (copy_token + 1) % token.copies();
      },
      "head",
      [&] {
        step(ctx, c, head, copy_head);
        copy_head = (copy_head + 1) % head.copies();
      });
}

// decode_quant, decode_narrow: case c with an SA and an SB cache, steps alternated (see the
// file's header).
template <class SA, class SB>
void decode_vs(benchmark::State& state, std::size_t c, Index len, int threads) {
  Sequences<SA>& a = sequences<SA>(c, len, true, false, 0);
  Sequences<SB>& b = sequences<SB>(c, len, true, false, 0);
  tpa::Context ctx(threads);
  Index copy_a = 0, copy_b = 0;
  alternate(
      state, scalar_name<SA>(),
      [&] {
        step(ctx, c, a, copy_a);
        copy_a = (copy_a + 1) % a.copies();
      },
      scalar_name<SB>(),
      [&] {
        step(ctx, c, b, copy_b);
        copy_b = (copy_b + 1) % b.copies();
      });
  state.counters[std::string(scalar_name<SA>()) + "_bytes"] = a.bytes();
  state.counters[std::string(scalar_name<SB>()) + "_bytes"] = b.bytes();
}

template <class S>
void register_scalar(std::size_t c, Index len, bool huge, int threads, bool hot = false) {
  const std::string name = std::string("decode_kernel/") + kCases[c].name + "/cache:" +
                           scalar_name<S>() + "/ctx:" + std::to_string(len) +
                           "/pages:" + (hot ? "l2" : huge ? "huge" : "cache") +
                           "/threads:" + std::to_string(threads);
  benchmark::RegisterBenchmark(
      name.c_str(), [=](benchmark::State& s) { decode_kernel<S>(s, c, len, huge, hot, threads); })
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(1.0);
}

void register_all() {
  for (std::size_t c = 0; c < std::size(kCases); ++c)
    for (Index len : kContexts)
      for (bool huge : {false, true}) {
        // f32, bf16 and f16 side by side at 2 threads, then f32 at 1 thread.
        register_scalar<float>(c, len, huge, 2);
        register_scalar<tpa::bfloat16>(c, len, huge, 2);
        register_scalar<tpa::q8>(c, len, huge, 2);
        register_scalar<tpa::half>(c, len, huge, 2);
        register_scalar<float>(c, len, huge, 1);
      }
  // Causal prefill attention, f32, 2 threads (issue 23's prefill target: ≥ 60 % of the FMA peak).
  for (std::size_t c = 0; c < std::size(kCases); ++c)
    for (Index len : kPrefillTokens) {
      const std::string name = std::string("prefill_kernel/") + kCases[c].name +
                               "/cache:f32/tokens:" + std::to_string(len) + "/threads:2";
      benchmark::RegisterBenchmark(name.c_str(),
                                   [=](benchmark::State& s) { prefill_kernel(s, c, len, 2); })
          ->UseRealTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(1.0);
    }
  // TPA and TPA-KV also at 64K tokens (2 MiB pages, 2 threads): their compute-bound steps.
  for (std::size_t c = 0; c < std::size(kCases); ++c) {
    if (!kCases[c].tpa()) continue;
    register_scalar<float>(c, 65536, true, 2);
    register_scalar<tpa::bfloat16>(c, 65536, true, 2);
    register_scalar<tpa::q8>(c, 65536, true, 2);
    register_scalar<tpa::half>(c, 65536, true, 2);
  }
  // L2-resident: ≈ 1 MiB of f32 cache per thread, a whole number of blocks; only the kinds with
  // enough FLOPs per cached byte for arithmetic to matter (MQA, MLA, TPA: G ≤ 1).
  for (std::size_t c = 0; c < std::size(kCases); ++c) {
    if (kCases[c].G > 1) continue;
    const tpa::CacheLayout layout(kCases[c].name,
                                  factors(kCases[c], layer_order<float>(kCases[c])));
    const double bpt = 4.0 * static_cast<double>(layout.elements_per_token());
    for (int threads : {2, 1}) {
      const Index len = std::max<Index>(
          kBlock, static_cast<Index>(double(1 << 20) * threads / bpt) / kBlock * kBlock);
      register_scalar<float>(c, len, true, threads, true);
    }
  }
  // Every other kind against MHA, steps alternated: f32, 2 MiB pages, 2 threads.
  for (std::size_t c = 1; c < std::size(kCases); ++c)
    for (Index len : kContexts) {
      const std::string name = std::string("decode_pair/") + kCases[c].name +
                               "_vs_MHA/cache:f32/ctx:" + std::to_string(len) +
                               "/pages:huge/threads:2";
      benchmark::RegisterBenchmark(name.c_str(),
                                   [=](benchmark::State& s) { decode_pair(s, c, len, 2); })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(2.0);
    }
  // bf16 against int8, and f32 against bf16 caches, steps alternated: every kind, 2 MiB pages,
  // 2 threads.
  for (std::size_t c = 0; c < std::size(kCases); ++c)
    for (Index len : kQuantContexts) {
      const std::string name = std::string("decode_quant/") + kCases[c].name +
                               "/bf16_vs_int8/ctx:" + std::to_string(len) + "/pages:huge/threads:2";
      benchmark::RegisterBenchmark(
          name.c_str(),
          [=](benchmark::State& s) { decode_vs<tpa::bfloat16, tpa::q8>(s, c, len, 2); })
          ->UseManualTime()
          ->Unit(benchmark::kMillisecond)
          ->MinTime(2.0);
    }
  for (std::size_t c = 0; c < std::size(kCases); ++c) {
    const std::string name = std::string("decode_narrow/") + kCases[c].name +
                             "/f32_vs_bf16/ctx:16384/pages:huge/threads:2";
    benchmark::RegisterBenchmark(
        name.c_str(), [=](benchmark::State& s) { decode_vs<float, tpa::bfloat16>(s, c, 16384, 2); })
        ->UseManualTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(2.0);
  }
  // Each attention variant against the plain step, alternated: f32, 2 MiB pages, 2 threads.
  static const std::vector<float> slopes = tpa::AttentionVariant::standard_alibi_slopes(32);
  static const std::vector<float> sinks(32, 0.5f);
  for (std::size_t c = 0; c < std::size(kCases); ++c)
    for (Index len : kContexts) {
      tpa::ScoreVariant softcap, alibi, sink, all3, window_full, window_4096;
      softcap.softcap = 30.f;
      alibi.alibi = slopes.data();
      sink.sinks = sinks.data();
      all3 = softcap;
      all3.alibi = slopes.data();
      all3.sinks = sinks.data();
      window_full.window = len;
      window_4096.window = 4096;
      const std::pair<const char*, tpa::ScoreVariant> variants[] = {
          {"softcap", softcap}, {"alibi", alibi},           {"sinks", sink},
          {"all3", all3},       {"window_full", window_full}, {"window_4096", window_4096}};
      for (const auto& [vname, v] : variants) {
        const std::string name = std::string("decode_variant/") + kCases[c].name + "/" + vname +
                                 "/cache:f32/ctx:" + std::to_string(len) + "/pages:huge/threads:2";
        const std::string counter = vname;
        const tpa::ScoreVariant var = v;
        benchmark::RegisterBenchmark(
            name.c_str(),
            [=](benchmark::State& s) { decode_variant(s, c, len, 2, counter, var); })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(2.0);
      }
    }
  // Token-major against head-major K/V (the kinds with several KV heads), steps alternated:
  // f32, bf16, f16 and int8, 2 MiB pages, 2 threads.
  for (std::size_t c = 0; c < std::size(kCases); ++c) {
    if (kCases[c].tpa() || kCases[c].G <= 1) continue;
    for (Index len : kContexts) {
      auto reg = [&](auto scalar) {
        using S = decltype(scalar);
        const std::string name = std::string("decode_order/") + kCases[c].name + "/cache:" +
                                 scalar_name<S>() + "/ctx:" + std::to_string(len) +
                                 "/pages:huge/threads:2";
        benchmark::RegisterBenchmark(name.c_str(),
                                     [=](benchmark::State& s) { decode_order<S>(s, c, len, 2); })
            ->UseManualTime()
            ->Unit(benchmark::kMillisecond)
            ->MinTime(2.0);
      };
      reg(float{});
      reg(tpa::bfloat16{});
      reg(tpa::half{});
      reg(tpa::q8{});
    }
  }
}

}  // namespace
}  // namespace tpa_bench

int main(int argc, char** argv) {
  tpa_bench::register_all();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
