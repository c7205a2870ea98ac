// Cache sizes and decode / prefill speeds of all attention kinds, side by side, against the
// machine's own roofline and against attention written plainly with Eigen.
//
// Benchmarks, in the order they run (each name is a filterable path):
//   probe/read_bw/threads:T         streaming read of a 1 GiB buffer (2 MiB pages), the
//                                   roofline's bandwidth                    -> read_GBps_best
//   probe/read_bw_4k_pages/threads:T  the same over 4 KiB pages (reported only)
//   probe/fma_peak/threads:T        register-blocked FP32 FMA loop          -> GFLOPS_best
//   cache_size/SHAPE/KIND/STORAGE   elements and bytes per token per layer, whole-model cache
//                                   bytes at contexts 1K … 128K and 1M (from cache_layout() and
//                                   KVCache::bytes_per_token())
//   decode_eigen/SHAPE/KIND/ctx:L/batch:B/threads:T
//                                   baseline: plain Eigen products over materialised K and V
//   decode/SHAPE/KIND/ctx:L/batch:B/threads:T
//                                   one layer's decode call (projections, append, attention,
//                                   output projection) for B sequences holding L tokens, in
//                                   layer 0 of a cache whose blocks are ≥ 2 MiB like a whole
//                                   model's (see cache_layers())
//   decode_bf16/..., decode_f16/..., decode_int8/...
//                                   the same with a bfloat16 / half / int8 (tpa::q8) cache (batch 1,
//                                   2 threads)
//   prefill/SHAPE/KIND/tokens:N/threads:T
//                                   one layer's call on an N-token prompt (empty sequence)
//   mixed/SHAPE/KIND/ragged|separate/threads:T
//                                   one continuous-batching step of one layer: 16 sequences of
//                                   1K … 16K tokens, 3 taking a 256-token prompt chunk, 13 a
//                                   decode token, as one ragged call or as separate calls
//                                   (forward per chunk + one decode)  -> tokens_per_s,
//                                   speedup_vs_separate
//   fork_memory/SHAPE/KIND          bytes_used of 16 forks of a 4096-token prompt (64 own tokens
//                                   each) against 16 independent sequences -> saving_x
//   probe_end/...                   the roofline probes again, last
//
// Counters (the byte and FLOP model of each kind is in bench_common.hpp):
//   bytes_per_token   cache bytes one token occupies in one layer
//   cache_bytes       decode: mean cache bytes read per step (all sequences)
//   weight_bytes      weight bytes one call reads
//   us_per_step       decode: wall time of one step, µs
//   tokens_per_s      tokens produced (decode: B per step) or consumed (prefill) per second
//   pct_roofline      100 · roofline time / measured time, roofline time = max(bytes / read
//                     bandwidth, FLOPs / FMA peak), against the probes taken right before and
//                     right after the case (read_GBps_now, GFLOPS_now: best of 2 passes of each,
//                     both sides), never the run's first probes alone
//   model_bytes, model_flops
//                     the byte and FLOP model of the call (its roofline inputs), so a report can
//                     recompute the fraction with other probe figures
//   speedup_vs_mha    MHA time / this kind's time, same shape, cache scalar, context, batch and
//                     threads
//   speedup_vs_eigen  Eigen baseline time / library time, same kind and case
//   speedup_vs_f32    16-bit and int8 decode: the f32 cache's time / this one's, same kind and case
//   fixed_us          decode: the same call with one visible key per sequence (projections,
//                     append, overhead), measured once per kind, batch and threads
//   attn_us, attn_pct_roofline
//                     decode: us_per_step − fixed_us, and the roofline of the cache read alone
//                     (cache bytes, attention FLOPs) over it — how close the attention kernel is;
//                     only when that difference is ≥ 20 % of the step (below, it is mostly the
//                     noise of two separately timed runs: "140 %" was seen for TPA at 4K)
//
// Decode caches are filled by appending random factor rows straight into the KVCache (no
// prefill compute); each step then appends one token per sequence, and once a sequence has
// grown by ctx/32 tokens (at least 16) it is refilled outside the timed region, so the measured
// context is L … L + L/32. Before every timed step (and every step of fixed_us) the
// last-level cache is evicted, outside the timed region (LlcEvictor), so that each step reads
// its weights and cache from memory as one layer of a whole model would. Cases whose cache
// would exceed TPA_BENCH_MAX_GIB (default 6) GiB are
// not registered (listed on stderr).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "bench_common.hpp"

namespace tpa_bench {
namespace {

constexpr Index kBlockTokens = 64;
const std::vector<Index> kDecodeContexts = {1024, 4096, 16384, 65536};
const std::vector<Index> kDecodeBatches = {1, 8};
const std::vector<Index> kPrefillTokens = {512, 1024, 2048, 4096, 8192};
const std::vector<int> kThreads = {2, 1};

double max_cache_bytes() {
  const char* env = std::getenv("TPA_BENCH_MAX_GIB");
  const double gib = env != nullptr ? std::atof(env) : 6.0;
  return gib * static_cast<double>(1ull << 30);
}

Index decode_slack(Index ctx) { return std::max<Index>(16, ctx / 32); }

/// Layers of the decode benchmarks' cache. A model's KVCache block holds all its layers (at the
/// LLaMA shape, 64 tokens × 32 layers is ≥ 2 MiB for every kind), so KVCache puts it on huge
/// pages; a one-layer cache with 64-token blocks would give every kind but MHA blocks of
/// 64–512 KB on 4 KiB pages, which decode streams measurably slower (TLB misses, dropped
/// prefetches). The decode cache therefore gets idle layers, never appended to, until a block
/// reaches 2 MiB (at most the model's 32); layer 0, the one measured, then sits in memory like
/// one layer of the model's cache.
Index cache_layers(double bytes_per_token_layer) {
  const double block = static_cast<double>(kBlockTokens) * bytes_per_token_layer;
  return std::min<Index>(32, std::max<Index>(1, static_cast<Index>(std::ceil((2 << 20) / block))));
}

// ---------------------------------------------------------------------------------------------
// Fixtures, kept between benchmarks that share them (thread counts of one case, and the runs
// Google Benchmark makes of one benchmark); one alive at a time to bound memory.
// ---------------------------------------------------------------------------------------------

class Fixture {
 public:
  virtual ~Fixture() = default;
};

template <class F, class Make>
F& fixture(const std::string& key, const Make& make) {
  static std::string current;
  static std::unique_ptr<Fixture> slot;
  if (!slot || current != key) {
    slot.reset();  // free the old one before building the new one
    slot = make();
    current = key;
  }
  return static_cast<F&>(*slot);
}

/// B sequences of `ctx` tokens in layer 0 of a KVCache<S> (with cache_layers() layers), and
/// the decode inputs.
template <class S>
class LibDecode final : public Fixture {
 public:
  LibDecode(const AnyLayer& layer, Index ctx, Index batch)
      : layer_(layer),
        ctx_(ctx),
        slack_(decode_slack(ctx)),
        layers_(cache_layers(static_cast<double>(sizeof(S)) *
                             static_cast<double>(layer.cache_layout().elements_per_token()))),
        cache_(std::vector<tpa::CacheLayout>(static_cast<std::size_t>(layers_),
                                             layer.template layout_for<S>()),
               kBlockTokens,
               batch * ((ctx + slack_ + 1 + kBlockTokens - 1) / kBlockTokens)),
        src_(layer.template layout_for<S>(), 256, 7),
        x_(batch, layer.d_model()),
        y_(batch, layer.d_model()) {
    cache_.reserve_blocks(cache_.max_blocks());
    for (Index b = 0; b < batch; ++b) seqs_.push_back(cache_.add_sequence());
    refill();
    randomize(x_.data(), x_.size(), 11);
  }

  /// True once the sequences have grown by the slack: refill before the next step.
  bool full() const { return cache_.length(seqs_[0]) >= ctx_ + slack_; }
  /// Before a step (untimed): refills the sequences once they are full.
  void prepare() {
    if (full()) refill();
  }
  void refill() {
    for (auto s : seqs_) cache_.free_sequence(s);
    for (auto& s : seqs_) {
      s = cache_.add_sequence();
      fill_sequence(cache_, s, ctx_, src_);
    }
  }
  void step(tpa::Context& ctx) { layer_.decode(ctx, x_, y_, cache_, seqs_); }

  /// Cache bytes of one token in one layer.
  std::size_t bytes_per_token() const {
    return cache_.bytes_per_token() / static_cast<std::size_t>(layers_);
  }
  /// Mean keys a step's query sees (lengths run from ctx to ctx + slack − 1, plus the new token).
  double mean_keys() const { return static_cast<double>(ctx_) + (slack_ - 1) / 2.0 + 1; }
  Index batch() const { return static_cast<Index>(seqs_.size()); }

 private:
  const AnyLayer& layer_;
  Index ctx_, slack_, layers_;
  tpa::KVCache<S> cache_;
  RandomFactors src_;
  std::vector<tpa::SeqId> seqs_;
  tpa::Tensor<float, 2> x_, y_;
};

/// The Eigen baseline's state: per sequence, materialised K [rows, kv_heads·d_qk] and
/// V [rows, kv_heads·d_v] (contiguous, as a hand-written layer keeps them), and the step inputs.
class EigenDecode final : public Fixture {
 public:
  EigenDecode(const AnyLayer& layer, Index ctx, Index batch)
      : layer_(layer), dims_(layer.baseline_dims()), ctx_(ctx), slack_(decode_slack(ctx)) {
    const Index rows = ctx + slack_ + 1, H = layer.n_heads();
    tpa::Matrix<float> src_k(256, dims_.kv_heads * dims_.d_qk),
        src_v(256, dims_.kv_heads * dims_.d_v);
    randomize(src_k.data(), src_k.size(), 7);
    randomize(src_v.data(), src_v.size(), 8);
    for (Index b = 0; b < batch; ++b) {
      k_.emplace_back(rows, src_k.cols());
      v_.emplace_back(rows, src_v.cols());
      for (Index r = 0; r < rows; r += 256) {
        const Index n = std::min<Index>(256, rows - r);
        k_.back().middleRows(r, n) = src_k.topRows(n);
        v_.back().middleRows(r, n) = src_v.topRows(n);
      }
      len_.push_back(ctx);
    }
    x_.resize(batch, layer.d_model());
    randomize(x_.data(), x_.size(), 11);
    y_.resize(batch, layer.d_model());
    q_.resize(batch, H * dims_.d_qk);
    kn_.resize(batch, src_k.cols());
    vn_.resize(batch, src_v.cols());
    o_.resize(batch, H * dims_.d_v);
    scores_.resize(batch * H, rows);
  }

  /// One decode step, written as a user would: Eigen projections, append, then per sequence
  /// and head scores = K·q, softmax, o = Vᵀ·p (spread over ctx's threads), output projection.
  void step(tpa::Context& ctx) {
    const Index B = x_.rows(), H = layer_.n_heads(), group = H / dims_.kv_heads;
    const Index d_qk = dims_.d_qk, d_v = dims_.d_v;
    layer_.baseline_project(x_, len_.data(), q_, kn_, vn_);
    for (Index b = 0; b < B; ++b) {
      k_[static_cast<std::size_t>(b)].row(len_[static_cast<std::size_t>(b)]) = kn_.row(b);
      v_[static_cast<std::size_t>(b)].row(len_[static_cast<std::size_t>(b)]) = vn_.row(b);
    }
    const float scale = layer_.softmax_scale();
    ctx.parallel_for(B * H, [&](Index i) {
      const Index b = i / H, h = i % H, g = h / group;
      const auto sb = static_cast<std::size_t>(b);
      const Index n = len_[sb] + 1;
      Eigen::Map<Eigen::VectorXf> s(scores_.row(i).data(), n);
      const Eigen::Map<const Eigen::VectorXf> q(q_.row(b).data() + h * d_qk, d_qk);
      s.noalias() = k_[sb].block(0, g * d_qk, n, d_qk) * q;
      s *= scale;
      const float m = s.maxCoeff();
      s = (s.array() - m).exp().matrix();
      s /= s.sum();
      Eigen::Map<Eigen::VectorXf> o(o_.row(b).data() + h * d_v, d_v);
      o.noalias() = v_[sb].block(0, g * d_v, n, d_v).transpose() * s;
    });
    y_.noalias() = o_ * layer_.out_weight().transpose();
    for (auto& l : len_)
      if (++l >= ctx_ + slack_) l = ctx_;  // the rows past ctx stay filled: no refill needed
  }

  /// Before a step: nothing (step() wraps the lengths itself).
  void prepare() {}

  double mean_keys() const { return static_cast<double>(ctx_) + (slack_ - 1) / 2.0 + 1; }
  /// Materialised cache bytes per token.
  double bytes_per_token() const {
    return 4.0 * static_cast<double>(dims_.kv_heads * (dims_.d_qk + dims_.d_v));
  }
  Index batch() const { return x_.rows(); }

 private:
  const AnyLayer& layer_;
  BaselineDims dims_;
  Index ctx_, slack_;
  std::vector<tpa::Matrix<float>> k_, v_;
  std::vector<Index> len_;
  tpa::Matrix<float> x_, y_, q_, kn_, vn_, o_, scores_;
};

/// A continuous-batching step: kMixedSeqs sequences holding 1K … 16K tokens (sequence i holds
/// 1024·(i + 1)); kMixedPrefills of them (every fifth) take a kMixedChunk-token prompt chunk, the
/// others one decode token each. step_ragged() is one ragged call; step_separate() the same work
/// as a user without it writes it: a forward() per prompt chunk and one decode() of the rest.
/// reset() (untimed) cuts every sequence back to its length before the step.
constexpr Index kMixedSeqs = 16, kMixedChunk = 256, kMixedPrefills = 3;
class Mixed final : public Fixture {
 public:
  explicit Mixed(const AnyLayer& layer)
      : layer_(layer),
        cache_({layer.cache_layout()}, kBlockTokens, blocks()),
        src_(layer.cache_layout(), 256, 7) {
    cache_.reserve_blocks(cache_.max_blocks());
    const Index D = layer.d_model();
    Index rows = 0;
    for (Index i = 0; i < kMixedSeqs; ++i) {
      const tpa::SeqId s = cache_.add_sequence();
      fill_sequence(cache_, s, 1024 * (i + 1), src_);
      seqs_.push_back(s);
      const bool prefill = i % 5 == 0 && i / 5 < kMixedPrefills;
      const Index n = prefill ? kMixedChunk : 1;
      chunks_.push_back({s, n});
      rows += n;
      if (prefill) {
        prefill_seqs_.push_back(s);
        xp_.emplace_back(n, D);
        randomize(xp_.back().data(), xp_.back().size(), 20 + static_cast<std::uint64_t>(i));
      } else {
        decode_seqs_.push_back(s);
      }
    }
    x_ = tpa::Tensor<float, 2>(rows, D);
    y_ = tpa::Tensor<float, 2>(rows, D);
    randomize(x_.data(), x_.size(), 11);
    yp_ = tpa::Tensor<float, 2>(kMixedChunk, D);
    xd_ = tpa::Tensor<float, 2>(static_cast<Index>(decode_seqs_.size()), D);
    yd_ = tpa::Tensor<float, 2>(xd_.dimension(0), D);
    randomize(xd_.data(), xd_.size(), 12);
  }
  static Index blocks() {
    Index b = 0;
    for (Index i = 0; i < kMixedSeqs; ++i)
      b += (1024 * (i + 1) + kMixedChunk + kBlockTokens - 1) / kBlockTokens + 1;
    return b;
  }
  void reset() {
    for (Index i = 0; i < kMixedSeqs; ++i)
      cache_.truncate(seqs_[static_cast<std::size_t>(i)], 1024 * (i + 1));
  }
  void step_ragged(tpa::Context& ctx) { layer_.ragged(ctx, x_, y_, cache_, chunks_); }
  void step_separate(tpa::Context& ctx) {
    for (std::size_t i = 0; i < prefill_seqs_.size(); ++i)
      layer_.forward(ctx, xp_[i], yp_, cache_, prefill_seqs_[i]);
    layer_.decode(ctx, xd_, yd_, cache_, decode_seqs_);
  }
  /// Tokens one step appends (prompt tokens and decode tokens).
  Index tokens() const { return x_.dimension(0); }

 private:
  const AnyLayer& layer_;
  tpa::KVCache<float> cache_;
  RandomFactors src_;
  std::vector<tpa::SeqId> seqs_, prefill_seqs_, decode_seqs_;
  std::vector<tpa::Chunk> chunks_;
  std::vector<tpa::Tensor<float, 2>> xp_;
  tpa::Tensor<float, 2> x_, y_, yp_, xd_, yd_;
};

// ---------------------------------------------------------------------------------------------
// Benchmarks
// ---------------------------------------------------------------------------------------------

void probe_read_bw(benchmark::State& state, int threads, Pages pages) {
  tpa::Context ctx(threads);
  const float* buf = probe_buffer(ctx, pages);
  float sink = 0;
  double best = 1e30, total = 0;
  for (auto _ : state) {
    const double s = read_probe_pass(ctx, buf, &sink);
    best = std::min(best, s);
    total += s;
  }
  benchmark::DoNotOptimize(sink);
  const double bytes = static_cast<double>(kProbeBytes);
  if (pages == Pages::kHuge) {
    Machine& m = machines()[threads];
    m.read_bytes_per_s = std::max(m.read_bytes_per_s, bytes / best);
  }
  state.SetBytesProcessed(static_cast<std::int64_t>(kProbeBytes) * state.iterations());
  state.counters["read_GBps_best"] = bytes / best / 1e9;
  state.counters["read_GBps_mean"] = bytes * static_cast<double>(state.iterations()) / total / 1e9;
}

void probe_fma_peak(benchmark::State& state, int threads) {
  tpa::Context ctx(threads);
  float sink = 0;
  double best = 0, flops = 0, total = 0;
  for (auto _ : state) {
    const auto [f, s] = fma_probe_pass(ctx, &sink);
    best = std::max(best, f / s);
    flops += f;
    total += s;
  }
  benchmark::DoNotOptimize(sink);
  Machine& m = machines()[threads];
  m.flops_per_s = std::max(m.flops_per_s, best);
  state.counters["GFLOPS_best"] = best / 1e9;
  state.counters["GFLOPS_mean"] = flops / total / 1e9;
}

template <class S>
void cache_size(benchmark::State& state, std::size_t shape, Kind kind) {
  const tpa::CacheLayout layout = layer(shape, kind).layout_for<S>();
  const int n_layers = shapes()[shape].n_layers;
  const tpa::KVCache<S> one({layout}, kBlockTokens, 1);
  const tpa::KVCache<S> model(
      std::vector<tpa::CacheLayout>(static_cast<std::size_t>(n_layers), layout), kBlockTokens, 1);
  std::size_t model_bpt = 0;
  for (auto _ : state) {
    model_bpt = model.bytes_per_token();
    benchmark::DoNotOptimize(model_bpt);
  }
  auto& c = state.counters;
  c["elements_per_token"] = static_cast<double>(layout.elements_per_token());
  c["bytes_per_token"] = bytes_counter(static_cast<double>(one.bytes_per_token()));
  c["layers"] = n_layers;
  c["model_bytes_per_token"] = bytes_counter(static_cast<double>(model_bpt));
  const std::pair<const char*, double> contexts[] = {
      {"1K", 1024},   {"2K", 2048},   {"4K", 4096},     {"8K", 8192},   {"16K", 16384},
      {"32K", 32768}, {"64K", 65536}, {"128K", 131072}, {"1M", 1048576}};
  for (const auto& [name, tokens] : contexts)
    c[std::string("model_bytes_") + name] = bytes_counter(tokens * static_cast<double>(model_bpt));
}

struct DecodeCase {
  std::size_t shape;
  Kind kind;
  Index ctx;
  Index batch;
  int threads;
};

std::string case_key(const DecodeCase& c, const char* what, Kind kind) {
  return std::string(what) + "/" + shapes()[c.shape].name + "/" + kind_name(kind) +
         "/ctx:" + std::to_string(c.ctx) + "/batch:" + std::to_string(c.batch) +
         "/threads:" + std::to_string(c.threads);
}

// Mean seconds of f.step(ctx) over the benchmark's iterations (LibDecode or EigenDecode).
// Before each step, outside the timed region: f.prepare(), then the last-level cache is evicted
// (each step reads from memory, as one layer of a model does).
template <class F>
double timed_decode_steps(benchmark::State& state, F& f, tpa::Context& ctx) {
  LlcEvictor& evict = LlcEvictor::get();
  StepTimer timer;
  for (auto _ : state) {
    state.PauseTiming();
    f.prepare();
    evict();
    state.ResumeTiming();
    timer.start();
    f.step(ctx);
    timer.stop();
  }
  return timer.total() / static_cast<double>(state.iterations());
}

void decode_eigen(benchmark::State& state, DecodeCase c) {
  release_probe_buffer();
  const AnyLayer& l = layer(c.shape, c.kind);
  const std::string fkey = case_key({c.shape, c.kind, c.ctx, c.batch, 0}, "decode_eigen", c.kind);
  auto& f =
      fixture<EigenDecode>(fkey, [&] { return std::make_unique<EigenDecode>(l, c.ctx, c.batch); });
  tpa::Context ctx(c.threads);
  f.step(ctx);  // warm-up
  NowProbes probes(ctx);
  const double sec = timed_decode_steps(state, f, ctx);
  const Machine m = probes.finish();
  results()[case_key(c, "decode_eigen", c.kind)] = sec;
  const double B = static_cast<double>(f.batch()), keys = f.mean_keys();
  const double weights = l.decode_weights();  // same projections (TPA: + head expansion, small)
  const BaselineDims dims = l.baseline_dims();
  const double H = static_cast<double>(l.n_heads());
  const double cache_bytes = B * keys * f.bytes_per_token();
  const double flops = B * (2 * weights + keys * 2 * H * static_cast<double>(dims.d_qk + dims.d_v));
  auto& cnt = state.counters;
  cnt["bytes_per_token"] = bytes_counter(f.bytes_per_token());
  cnt["cache_bytes"] = bytes_counter(cache_bytes);
  cnt["us_per_step"] = sec * 1e6;
  cnt["tokens_per_s"] = B / sec;
  cnt["pct_roofline"] = 100 * m.roofline_seconds(4 * weights + cache_bytes, flops) / sec;
  cnt["read_GBps_now"] = m.read_bytes_per_s / 1e9;
  cnt["GFLOPS_now"] = m.flops_per_s / 1e9;
  cnt["model_bytes"] = bytes_counter(4 * weights + cache_bytes);
  cnt["model_flops"] = flops;
}

/// Seconds of a decode step whose sequences hold no earlier token (one visible key): the fixed
/// part of a step (projections, RoPE, append, call overhead). Measured once per (shape, kind,
/// cache scalar, batch, threads) on its own small cache, outside any timed region, median of
/// 15 steps.
template <class S>
double fixed_step_seconds(const AnyLayer& l, const DecodeCase& c, tpa::Context& ctx) {
  const std::string key = "decode_fixed/" + shapes()[c.shape].name + "/" + kind_name(c.kind) +
                          "/" + scalar_name<S>() + "/batch:" + std::to_string(c.batch) +
                          "/threads:" + std::to_string(c.threads);
  const auto it = results().find(key);
  if (it != results().end()) return it->second;
  tpa::KVCache<S> cache({l.layout_for<S>()}, kBlockTokens, c.batch);
  std::vector<tpa::SeqId> seqs(static_cast<std::size_t>(c.batch));
  tpa::Tensor<float, 2> x(c.batch, l.d_model()), y(c.batch, l.d_model());
  randomize(x.data(), x.size(), 17);
  std::vector<double> times;
  for (int i = 0; i < 18; ++i) {
    for (auto& s : seqs) s = cache.add_sequence();
    LlcEvictor::get()();
    const auto t0 = std::chrono::steady_clock::now();
    l.decode(ctx, x, y, cache, seqs);
    const auto t1 = std::chrono::steady_clock::now();
    for (auto s : seqs) cache.free_sequence(s);
    if (i >= 3) times.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  return results()[key] = times[times.size() / 2];
}

/// "decode" for an f32 cache, "decode_bf16", "decode_f16" and "decode_int8" for the others.
template <class S>
std::string decode_name() {
  return std::is_same_v<S, float> ? std::string("decode") : std::string("decode_") + scalar_name<S>();
}

template <class S>
void decode(benchmark::State& state, DecodeCase c) {
  const AnyLayer& l = layer(c.shape, c.kind);
  const std::string what = decode_name<S>();
  const std::string fkey = case_key({c.shape, c.kind, c.ctx, c.batch, 0}, what.c_str(), c.kind);
  auto& f = fixture<LibDecode<S>>(
      fkey, [&] { return std::make_unique<LibDecode<S>>(l, c.ctx, c.batch); });
  tpa::Context ctx(c.threads);
  f.prepare();
  f.step(ctx);  // warm-up (scratch arena, thread pool)
  NowProbes probes(ctx);
  const double sec = timed_decode_steps(state, f, ctx);
  const Machine now = probes.finish();
  results()[case_key(c, what.c_str(), c.kind)] = sec;
  const double B = static_cast<double>(f.batch()), keys = f.mean_keys();
  const double bpt = static_cast<double>(f.bytes_per_token());
  const double cache_bytes = B * keys * bpt;
  const double weight_bytes = 4 * l.decode_weights();
  const double flops = B * (2 * l.decode_weights() + keys * l.decode_flops_per_key());
  auto& cnt = state.counters;
  cnt["bytes_per_token"] = bytes_counter(bpt);
  cnt["cache_bytes"] = bytes_counter(cache_bytes);
  cnt["weight_bytes"] = bytes_counter(weight_bytes);
  cnt["us_per_step"] = sec * 1e6;
  cnt["tokens_per_s"] = B / sec;
  cnt["pct_roofline"] = 100 * now.roofline_seconds(weight_bytes + cache_bytes, flops) / sec;
  cnt["read_GBps_now"] = now.read_bytes_per_s / 1e9;
  cnt["GFLOPS_now"] = now.flops_per_s / 1e9;
  cnt["model_bytes"] = bytes_counter(weight_bytes + cache_bytes);
  cnt["model_flops"] = flops;
  // The attention part alone: the step minus its fixed part, against the cache-only roofline.
  const double fixed = fixed_step_seconds<S>(l, c, ctx), attn = sec - fixed;
  cnt["fixed_us"] = fixed * 1e6;
  if (attn >= 0.2 * sec) {
    cnt["attn_us"] = attn * 1e6;
    cnt["attn_pct_roofline"] =
        100 * now.roofline_seconds(cache_bytes, B * keys * l.decode_flops_per_key()) / attn;
  }
  const auto mha = results().find(case_key(c, what.c_str(), Kind::kMHA));
  if (mha != results().end()) cnt["speedup_vs_mha"] = mha->second / sec;
  const auto eig = results().find(case_key(c, "decode_eigen", c.kind));
  if (eig != results().end()) cnt["speedup_vs_eigen"] = eig->second / sec;
  const auto f32 = results().find(case_key(c, "decode", c.kind));
  if (!std::is_same_v<S, float> && f32 != results().end()) cnt["speedup_vs_f32"] = f32->second / sec;
}

/// An empty one-layer cache with room for `tokens`, and a random prompt.
class Prefill final : public Fixture {
 public:
  Prefill(const AnyLayer& layer, Index tokens)
      : layer_(layer),
        cache_({layer.cache_layout()}, kBlockTokens, (tokens + kBlockTokens - 1) / kBlockTokens),
        x_(tokens, layer.d_model()),
        y_(tokens, layer.d_model()) {
    cache_.reserve_blocks(cache_.max_blocks());
    randomize(x_.data(), x_.size(), 13);
  }
  void run(tpa::Context& ctx) {
    const tpa::SeqId s = cache_.add_sequence();
    layer_.forward(ctx, x_, y_, cache_, s);
    cache_.free_sequence(s);
  }
  std::size_t bytes_per_token() const { return cache_.bytes_per_token(); }

 private:
  const AnyLayer& layer_;
  tpa::KVCache<float> cache_;
  tpa::Tensor<float, 2> x_, y_;
};

// "prefill/<shape>/<kind>/tokens:<n>": the key of a prefill fixture (shared by the thread
// counts); + "/threads:<t>", the case's name and its key in results().
std::string prefill_key(std::size_t shape, Kind kind, Index tokens) {
  return "prefill/" + shapes()[shape].name + "/" + kind_name(kind) +
         "/tokens:" + std::to_string(tokens);
}

void prefill(benchmark::State& state, std::size_t shape, Kind kind, Index tokens, int threads) {
  release_probe_buffer();
  const AnyLayer& l = layer(shape, kind);
  auto& f = fixture<Prefill>(prefill_key(shape, kind, tokens),
                             [&] { return std::make_unique<Prefill>(l, tokens); });
  tpa::Context ctx(threads);
  f.run(ctx);  // warm-up
  NowProbes probes(ctx);
  StepTimer timer;
  for (auto _ : state) {
    timer.start();
    f.run(ctx);
    timer.stop();
  }
  const Machine m = probes.finish();
  const double sec = timer.total() / static_cast<double>(state.iterations());
  const auto rkey = [&](Kind k) {
    return prefill_key(shape, k, tokens) + "/threads:" + std::to_string(threads);
  };
  results()[rkey(kind)] = sec;
  const double n = static_cast<double>(tokens);
  const double bytes = 4 * l.prefill_weights(n) + 2 * n * static_cast<double>(f.bytes_per_token());
  const double flops = l.prefill_flops(n);
  auto& cnt = state.counters;
  cnt["bytes_per_token"] = bytes_counter(static_cast<double>(f.bytes_per_token()));
  cnt["tokens_per_s"] = n / sec;
  cnt["GFLOPS"] = flops / sec / 1e9;
  cnt["pct_roofline"] = 100 * m.roofline_seconds(bytes, flops) / sec;
  cnt["read_GBps_now"] = m.read_bytes_per_s / 1e9;
  cnt["GFLOPS_now"] = m.flops_per_s / 1e9;
  cnt["model_bytes"] = bytes_counter(bytes);
  cnt["model_flops"] = flops;
  const auto mha = results().find(rkey(Kind::kMHA));
  if (mha != results().end()) cnt["speedup_vs_mha"] = mha->second / sec;
}

// ---------------------------------------------------------------------------------------------
// Registration
// ---------------------------------------------------------------------------------------------

const std::vector<Kind> kKinds = {Kind::kMHA, Kind::kGQA, Kind::kMQA,
                                  Kind::kMLA, Kind::kTPA, Kind::kTPAKV};

// The roofline probes on t threads, named <prefix>/<probe>/threads:<t>: the roofline's
// bandwidth (2 MiB pages); if `pages_4k`, the same read over 4 KiB pages (reported only: what an
// allocation without huge-page advice gets on this machine); the FMA peak.
// "mixed/<shape>/<kind>/<ragged|separate>/threads:<t>": one continuous-batching step (Mixed),
// as one ragged call or as separate calls. Counters: tokens_per_s (prompt and decode tokens
// appended per second), us_per_step, and for the ragged case speedup_vs_separate.
void mixed(benchmark::State& state, std::size_t shape, Kind kind, bool ragged, int threads) {
  release_probe_buffer();
  const AnyLayer& l = layer(shape, kind);
  const std::string key = "mixed/" + shapes()[shape].name + "/" + kind_name(kind);
  auto& f = fixture<Mixed>(key, [&] { return std::make_unique<Mixed>(l); });
  tpa::Context ctx(threads);
  auto run = [&] { ragged ? f.step_ragged(ctx) : f.step_separate(ctx); };
  f.reset();
  run();  // warm-up
  std::vector<double> times;
  for (auto _ : state) {
    f.reset();
    const auto t0 = std::chrono::steady_clock::now();
    run();
    const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    state.SetIterationTime(sec);
    times.push_back(sec);
  }
  f.reset();
  std::nth_element(times.begin(), times.begin() + times.size() / 2, times.end());
  const double sec = times[times.size() / 2];
  const std::string tkey = key + "/threads:" + std::to_string(threads);
  results()[tkey + (ragged ? "/ragged" : "/separate")] = sec;
  state.counters["us_per_step"] = sec * 1e6;
  state.counters["tokens_per_s"] = static_cast<double>(f.tokens()) / sec;
  const auto sep = results().find(tkey + "/separate");
  if (ragged && sep != results().end()) state.counters["speedup_vs_separate"] = sep->second / sec;
}

// "fork_memory/<shape>/<kind>": a 4096-token prompt forked kForks times, each fork appending
// 64 tokens of its own: bytes_used() of that cache (bytes_forked) against kForks independent
// sequences of 4096 + 64 tokens (bytes_independent), and their ratio (saving_x).
void fork_memory(benchmark::State& state, std::size_t shape, Kind kind) {
  constexpr Index kPrompt = 4096, kOwn = 64, kForks = 16;
  const AnyLayer& l = layer(shape, kind);
  const tpa::CacheLayout layout = l.cache_layout();
  tpa::KVCache<float> cache({layout}, kBlockTokens,
                            kPrompt / kBlockTokens + kForks * (kOwn / kBlockTokens + 2));
  const RandomFactors src(layout, 256, 7);
  const tpa::SeqId p = cache.add_sequence();
  fill_sequence(cache, p, kPrompt, src);
  std::vector<tpa::SeqId> forks;
  for (Index i = 0; i < kForks; ++i) {
    forks.push_back(cache.fork(p));
    fill_sequence(cache, forks.back(), kOwn, src);
  }
  cache.free_sequence(p);  // the forks keep the prompt's blocks alive
  for (auto _ : state) benchmark::DoNotOptimize(cache.bytes_used());
  const double forked = static_cast<double>(cache.bytes_used());
  const double independent = static_cast<double>(kForks * (kPrompt + kOwn)) *
                             static_cast<double>(cache.bytes_per_token());
  state.counters["bytes_forked"] = bytes_counter(forked);
  state.counters["bytes_independent"] = bytes_counter(independent);
  state.counters["saving_x"] = independent / forked;
}

void register_probes(const std::string& prefix, int t, bool pages_4k) {
  const std::string threads = "/threads:" + std::to_string(t);
  benchmark::RegisterBenchmark((prefix + "/read_bw" + threads).c_str(), probe_read_bw, t,
                               Pages::kHuge)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(1.0);  // best of many passes: other processes on a shared machine disturb some
  if (pages_4k)
    benchmark::RegisterBenchmark((prefix + "/read_bw_4k_pages" + threads).c_str(), probe_read_bw, t,
                                 Pages::kDefault)
        ->UseRealTime()
        ->Unit(benchmark::kMillisecond)
        ->MinTime(0.3);
  benchmark::RegisterBenchmark((prefix + "/fma_peak" + threads).c_str(), probe_fma_peak, t)
      ->UseRealTime()
      ->Unit(benchmark::kMillisecond)
      ->MinTime(0.3);
}

void register_all() {
  for (int t : kThreads) register_probes("probe", t, true);

  for (std::size_t s = 0; s < shapes().size(); ++s) {
    for (Kind k : kKinds) {
      const std::string base = "cache_size/" + shapes()[s].name + "/" + kind_name(k);
      benchmark::RegisterBenchmark((base + "/f32").c_str(), cache_size<float>, s, k)->Iterations(1);
      benchmark::RegisterBenchmark((base + "/bf16").c_str(), cache_size<tpa::bfloat16>, s, k)
          ->Iterations(1);
      benchmark::RegisterBenchmark((base + "/f16").c_str(), cache_size<tpa::half>, s, k)
          ->Iterations(1);
      benchmark::RegisterBenchmark((base + "/int8").c_str(), cache_size<tpa::q8>, s, k)
          ->Iterations(1);
    }
  }

  // Cache bytes per token per layer, computed from the layouts (the registration needs them to
  // skip cases over the memory budget; no layer is built for it).
  const auto lib_bytes = [](const KindSpec& k) -> double {
    switch (k.kind) {
      case Kind::kMHA:
      case Kind::kGQA:
      case Kind::kMQA:
        return 8.0 * static_cast<double>(k.gqa.kv_heads() * k.gqa.head_dim);
      case Kind::kMLA:
        return 4.0 * static_cast<double>(k.mla.kv_lora_rank + k.mla.qk_rope_head_dim);
      case Kind::kTPA:
      case Kind::kTPAKV:
        return 4.0 * static_cast<double>(k.tpa.cache_elements_per_token());
    }
    return 0;
  };
  const auto eigen_bytes = [](const KindSpec& k) -> double {
    switch (k.kind) {
      case Kind::kMHA:
      case Kind::kGQA:
      case Kind::kMQA:
        return 8.0 * static_cast<double>(k.gqa.kv_heads() * k.gqa.head_dim);
      case Kind::kMLA:
        return 4.0 * static_cast<double>(k.mla.n_heads * (k.mla.qk_head_dim() + k.mla.v_head_dim));
      case Kind::kTPA:
      case Kind::kTPAKV:
        return 8.0 * static_cast<double>(k.tpa.n_heads * k.tpa.head_dim);
    }
    return 0;
  };

  const double budget = max_cache_bytes();
  std::vector<std::string> skipped;
  for (std::size_t s = 0; s < shapes().size(); ++s) {
    for (Index ctx : kDecodeContexts) {
      for (Index batch : kDecodeBatches) {
        for (Kind k : kKinds) {
          const KindSpec& spec = shapes()[s].kinds[static_cast<std::size_t>(k)];
          const double tokens = static_cast<double>(batch * (ctx + decode_slack(ctx) + 1));
          for (const bool eigen : {true, false}) {
            const double lib = lib_bytes(spec);
            const double bytes =
                tokens * (eigen ? eigen_bytes(spec) : lib * static_cast<double>(cache_layers(lib)));
            for (int t : kThreads) {
              const DecodeCase c{s, k, ctx, batch, t};
              const std::string name = case_key(c, eigen ? "decode_eigen" : "decode", k);
              if (bytes > budget) {
                skipped.push_back(name);
                continue;
              }
              benchmark::RegisterBenchmark(name.c_str(), eigen ? decode_eigen : decode<float>, c)
                  ->UseRealTime()
                  ->Unit(benchmark::kMicrosecond);
              // 16-bit and int8 caches at batch 1 and 2 threads (half and about a quarter of
              // the f32 case's bytes).
              if (eigen || batch != 1 || t != 2) continue;
              benchmark::RegisterBenchmark(case_key(c, "decode_bf16", k).c_str(),
                                           decode<tpa::bfloat16>, c)
                  ->UseRealTime()
                  ->Unit(benchmark::kMicrosecond);
              benchmark::RegisterBenchmark(case_key(c, "decode_f16", k).c_str(),
                                           decode<tpa::half>, c)
                  ->UseRealTime()
                  ->Unit(benchmark::kMicrosecond);
              benchmark::RegisterBenchmark(case_key(c, "decode_int8", k).c_str(),
                                           decode<tpa::q8>, c)
                  ->UseRealTime()
                  ->Unit(benchmark::kMicrosecond);
            }
          }
        }
      }
    }
  }
  for (std::size_t s = 0; s < shapes().size(); ++s) {
    for (Index n : kPrefillTokens) {
      for (Kind k : kKinds) {
        for (int t : kThreads) {
          const std::string name = prefill_key(s, k, n) + "/threads:" + std::to_string(t);
          benchmark::RegisterBenchmark(name.c_str(), prefill, s, k, n, t)
              ->UseRealTime()
              ->Unit(benchmark::kMillisecond);
        }
      }
    }
  }
  // Serving: a mixed batch as one ragged call against separate calls, and fork's memory saving,
  // for the kinds whose 16 sequences of 1K-16K fit in a few GiB.
  for (std::size_t s = 0; s < shapes().size(); ++s) {
    for (Kind k : {Kind::kGQA, Kind::kMLA, Kind::kTPA}) {
      const std::string base = "mixed/" + shapes()[s].name + "/" + kind_name(k);
      for (int t : kThreads) {
        for (const bool ragged : {false, true}) {
          const std::string name =
              base + (ragged ? "/ragged" : "/separate") + "/threads:" + std::to_string(t);
          benchmark::RegisterBenchmark(name.c_str(), mixed, s, k, ragged, t)
              ->UseManualTime()
              ->Unit(benchmark::kMillisecond);
        }
      }
      benchmark::RegisterBenchmark(("fork_memory/" + shapes()[s].name + "/" + kind_name(k)).c_str(),
                                   fork_memory, s, k)
          ->Iterations(1);
    }
  }
  // The roofline probes once more at the end: on a shared machine either run may be disturbed;
  // scripts/bench_report.sh recomputes the roofline fraction from the best of both.
  for (int t : kThreads) register_probes("probe_end", t, false);
  if (!skipped.empty()) {
    std::fprintf(stderr,
                 "bench_attention: %zu cases need more than TPA_BENCH_MAX_GIB = %.1f GiB "
                 "of cache and are not registered, e.g. %s\n",
                 skipped.size(), budget / static_cast<double>(1ull << 30), skipped.front().c_str());
  }
}

}  // namespace
}  // namespace tpa_bench

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::AddCustomContext("tpa_backend", tpa::Native::name);
  tpa_bench::register_all();
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
