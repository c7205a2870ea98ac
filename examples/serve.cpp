// serve: a continuous-batching server loop over the example T6 model (examples/t6_model.hpp),
// with simulated requests. Example code, not part of the library.
//
// Requests with prompts of different lengths arrive over time (one every --gap steps). A shared
// system prompt is prefilled once; each request forks it (KVCache::fork: the prompt's blocks are
// shared, not copied) and appends its own prompt. Every step builds ONE ragged call per layer
// (t6::Model::forward over tpa::Chunk): the next token of every decoding request, then prompt
// chunks of the requests still prefilling under a per-step token budget (chunked prefill). A
// request whose last prompt chunk went in gets its first token from that step's logits; it then
// decodes greedily until it has --new tokens, and its sequence is freed. Prints per-request time
// to first token and mean inter-token time, the throughput, and the memory the forks saved.
//
//   serve --requests 16 --budget 256 --threads 2
//   serve --model tests/data/t6_tiny.safetensors --requests 8
//
// Run with --help for all flags.
#include "t6_model.hpp"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <vector>

namespace {

using tpa::Index;
using Attn = tpa::TensorProductAttention<>;
using Clock = std::chrono::steady_clock;

struct Options {
  Index requests = 16, budget = 256, gap = 2, max_active = 8;
  Index system_len = 200, prompt_min = 20, prompt_max = 400, new_tokens = 32;
  Index layers = 2, d_model = 256, heads = 4, vocab = 512;
  int threads = 1;
  std::uint64_t seed = 1;
  std::string model;
};

const char* kUsage =
    "usage: serve [flags]\n"
    "  --requests N     requests to serve (16)\n"
    "  --gap S          a request arrives every S steps (2)\n"
    "  --max-active N   requests in the batch at once; later arrivals queue (8)\n"
    "  --budget T       prompt tokens per step, over all prefilling requests (256)\n"
    "  --system N       tokens of the shared system prompt (200)\n"
    "  --prompt-min N   shortest request prompt (20)\n"
    "  --prompt-max N   longest request prompt (400)\n"
    "  --new N          tokens each request generates (32)\n"
    "  --layers L, --d-model D, --heads H, --vocab V   seeded model (2, 256, 4, 512)\n"
    "  --model PATH     a model/T6.py checkpoint instead (config from its metadata)\n"
    "  --threads T      threads (1)\n"
    "  --seed S         seed of weights, prompts (1)\n";

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    }
    TPA_CHECK(i + 1 < argc, "serve: flag ", a, " needs a value (see --help)");
    const std::string v = argv[++i];
    auto num = [&](Index lo) {
      char* end = nullptr;
      const long long x = std::strtoll(v.c_str(), &end, 10);
      TPA_CHECK(end != v.c_str() && *end == '\0' && x >= lo, "serve: ", a, " ", v,
                " must be an integer >= ", lo);
      return static_cast<Index>(x);
    };
    if (a == "--requests") o.requests = num(1);
    else if (a == "--gap") o.gap = num(0);
    else if (a == "--max-active") o.max_active = num(1);
    else if (a == "--budget") o.budget = num(1);
    else if (a == "--system") o.system_len = num(1);
    else if (a == "--prompt-min") o.prompt_min = num(1);
    else if (a == "--prompt-max") o.prompt_max = num(1);
    else if (a == "--new") o.new_tokens = num(1);
    else if (a == "--layers") o.layers = num(1);
    else if (a == "--d-model") o.d_model = num(1);
    else if (a == "--heads") o.heads = num(1);
    else if (a == "--vocab") o.vocab = num(2);
    else if (a == "--threads") o.threads = static_cast<int>(num(1));
    else if (a == "--seed") o.seed = static_cast<std::uint64_t>(num(0));
    else if (a == "--model") o.model = v;
    else TPA_CHECK(false, "serve: unknown flag ", a, " (see --help)");
  }
  TPA_CHECK(o.prompt_min <= o.prompt_max, "serve: --prompt-min (", o.prompt_min,
            ") must be <= --prompt-max (", o.prompt_max, ")");
  return o;
}

struct Request {
  std::vector<t6::Token> prompt;
  Index arrive_step = 0;
  tpa::SeqId seq = -1;
  Index prefilled = 0;              // prompt tokens in the cache
  std::vector<t6::Token> out;       // generated tokens
  Clock::time_point arrived, first; // arrival (the step it could join), first token
  std::vector<double> token_times;  // seconds since arrival of each generated token
  bool done = false;
};

t6::Token argmax(const Eigen::Ref<const Eigen::RowVectorXf>& logits) {
  Index best = 0;
  for (Index i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<t6::Token>(best);
}

double percentile(std::vector<double> v, double p) {
  std::sort(v.begin(), v.end());
  return v[static_cast<std::size_t>(p * static_cast<double>(v.size() - 1) + 0.5)];
}

int run(const Options& o) {
  using Model = t6::Model<Attn>;
  std::unique_ptr<Model> model;
  if (!o.model.empty()) {
    const auto file = tpa::io::SafetensorsFile::open(o.model);
    const auto cfg = t6::checkpoint_config<Attn>(file);
    model = std::make_unique<Model>(cfg, Model::load_weights(file, cfg));
  } else {
    Model::Config cfg;
    cfg.attn.d_model = o.d_model;
    cfg.attn.n_heads = o.heads;
    cfg.attn.head_dim = o.d_model / o.heads;
    cfg.attn.q_rank = 6;
    cfg.attn.k_rank = cfg.attn.v_rank = 2;
    cfg.attn.rope.max_positions = 4096;
    cfg.vocab = o.vocab;
    cfg.n_layers = o.layers;
    model = std::make_unique<Model>(cfg, Model::random_weights(cfg, o.seed));
  }
  const auto& cfg = model->config();
  const Index max_len = o.system_len + o.prompt_max + o.new_tokens;
  TPA_CHECK(max_len <= cfg.attn.rope.max_positions, "serve: system + prompt + new tokens (",
            max_len, ") exceed the model's context (", cfg.attn.rope.max_positions, ")");

  // Requests: seeded prompts of random lengths.
  std::mt19937_64 rng(o.seed);
  std::uniform_int_distribution<Index> len(o.prompt_min, o.prompt_max);
  std::uniform_int_distribution<t6::Token> tok(0, static_cast<t6::Token>(cfg.vocab - 1));
  std::vector<t6::Token> system(static_cast<std::size_t>(o.system_len));
  for (auto& t : system) t = tok(rng);
  std::vector<Request> reqs(static_cast<std::size_t>(o.requests));
  for (Index i = 0; i < o.requests; ++i) {
    Request& r = reqs[static_cast<std::size_t>(i)];
    r.prompt.resize(static_cast<std::size_t>(len(rng)));
    for (auto& t : r.prompt) t = tok(rng);
    r.arrive_step = i * o.gap;
  }

  // One pool for all layers, big enough for the system prompt and max_active requests.
  const Index bt = 16;
  const Index per_seq = (max_len + bt - 1) / bt + 2;
  Model::Cache cache(model->cache_layouts(), bt, cfg.n_layers * per_seq * (o.max_active + 1));
  tpa::Context ctx(o.threads);

  // The shared system prompt, prefilled once (its logits are not used).
  const tpa::SeqId sys = cache.add_sequence();
  model->forward(ctx, system, cache, sys);

  const auto start = Clock::now();
  Index step = 0, finished = 0, prompt_tokens = 0, generated = 0, next = 0;
  std::size_t peak_used = 0, peak_unshared = 0;
  std::vector<Request*> active;
  std::vector<tpa::Chunk> chunks;
  std::vector<t6::Token> tokens;
  std::vector<Request*> owner;  // request of each chunk
  while (finished < o.requests) {
    // Admit the requests that have arrived, while there is room in the batch.
    while (next < o.requests && reqs[static_cast<std::size_t>(next)].arrive_step <= step &&
           static_cast<Index>(active.size()) < o.max_active) {
      Request& r = reqs[static_cast<std::size_t>(next++)];
      r.arrived = Clock::now();
      r.seq = cache.fork(sys);
      active.push_back(&r);
    }
    // One ragged step: decode tokens first, then prompt chunks under the budget.
    chunks.clear();
    tokens.clear();
    owner.clear();
    Index budget = o.budget;
    for (Request* r : active) {
      if (r->prefilled < static_cast<Index>(r->prompt.size())) continue;
      chunks.push_back({r->seq, 1});
      tokens.push_back(r->out.back());
      owner.push_back(r);
    }
    for (Request* r : active) {
      const Index left = static_cast<Index>(r->prompt.size()) - r->prefilled;
      if (left == 0 || budget == 0) continue;
      const Index n = std::min(left, budget);
      budget -= n;
      chunks.push_back({r->seq, n});
      tokens.insert(tokens.end(), r->prompt.begin() + r->prefilled,
                    r->prompt.begin() + r->prefilled + n);
      owner.push_back(r);
    }
    if (!chunks.empty()) {
      const tpa::Matrix<float> logits = model->forward(ctx, tokens, chunks.data(),
                                           static_cast<Index>(chunks.size()), cache);
      const auto now = Clock::now();
      for (std::size_t i = 0; i < chunks.size(); ++i) {
        Request* r = owner[i];
        const bool prefill = r->prefilled < static_cast<Index>(r->prompt.size());
        if (prefill) {
          r->prefilled += chunks[i].tokens;
          prompt_tokens += chunks[i].tokens;
          if (r->prefilled < static_cast<Index>(r->prompt.size())) continue;  // more to come
          r->first = now;
        }
        r->out.push_back(argmax(logits.row(static_cast<Index>(i))));
        r->token_times.push_back(std::chrono::duration<double>(now - r->arrived).count());
        ++generated;
        if (static_cast<Index>(r->out.size()) == o.new_tokens) r->done = true;
      }
      peak_used = std::max(peak_used, cache.bytes_used());
      // What the same sequences would hold without sharing the system prompt.
      std::size_t unshared = static_cast<std::size_t>(o.system_len) * cache.bytes_per_token();
      for (Request* r : active) unshared += static_cast<std::size_t>(cache.length(r->seq)) * cache.bytes_per_token();
      peak_unshared = std::max(peak_unshared, unshared);
    }
    // Finished requests free their sequences.
    for (std::size_t i = 0; i < active.size();) {
      if (active[i]->done) {
        cache.free_sequence(active[i]->seq);
        ++finished;
        active.erase(active.begin() + static_cast<std::ptrdiff_t>(i));
      } else {
        ++i;
      }
    }
    ++step;
  }
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();

  std::printf("model: T6 (TPA), %lld layers, d_model %lld, vocab %lld; %d thread(s)\n",
              static_cast<long long>(cfg.n_layers), static_cast<long long>(cfg.d_model()),
              static_cast<long long>(cfg.vocab), o.threads);
  std::printf("requests %lld (one every %lld steps, at most %lld at once), system prompt %lld "
              "tokens (forked), prompts %lld-%lld, %lld new tokens each, budget %lld prompt "
              "tokens/step\n",
              static_cast<long long>(o.requests), static_cast<long long>(o.gap),
              static_cast<long long>(o.max_active), static_cast<long long>(o.system_len),
              static_cast<long long>(o.prompt_min), static_cast<long long>(o.prompt_max),
              static_cast<long long>(o.new_tokens), static_cast<long long>(o.budget));
  std::printf("\n  req  prompt  ttft_ms  itl_ms\n");
  std::vector<double> ttft, itl;
  for (Index i = 0; i < o.requests; ++i) {
    const Request& r = reqs[static_cast<std::size_t>(i)];
    const double t0 = r.token_times.front();
    const double gaps = r.token_times.size() > 1
                            ? (r.token_times.back() - t0) / static_cast<double>(r.token_times.size() - 1)
                            : 0.0;
    ttft.push_back(t0 * 1e3);
    itl.push_back(gaps * 1e3);
    std::printf("  %3lld  %6zu  %7.1f  %6.2f\n", static_cast<long long>(i), r.prompt.size(),
                t0 * 1e3, gaps * 1e3);
  }
  std::printf("\nsteps %lld, wall %.3f s\n", static_cast<long long>(step), wall);
  std::printf("throughput: %.1f generated tokens/s, %.1f tokens/s with prompts (%lld prompt + "
              "%lld generated)\n",
              static_cast<double>(generated) / wall,
              static_cast<double>(generated + prompt_tokens) / wall,
              static_cast<long long>(prompt_tokens), static_cast<long long>(generated));
  std::printf("time to first token: mean %.1f ms, p50 %.1f, p90 %.1f\n",
              [&] { double s = 0; for (double x : ttft) s += x; return s / static_cast<double>(ttft.size()); }(),
              percentile(ttft, 0.5), percentile(ttft, 0.9));
  std::printf("inter-token time: mean %.2f ms, p50 %.2f, p90 %.2f\n",
              [&] { double s = 0; for (double x : itl) s += x; return s / static_cast<double>(itl.size()); }(),
              percentile(itl, 0.5), percentile(itl, 0.9));
  std::printf("KV cache at its peak: %.2f MiB used (system prompt shared by the forks), %.2f MiB "
              "without sharing\n",
              static_cast<double>(peak_used) / (1 << 20),
              static_cast<double>(peak_unshared) / (1 << 20));
  std::printf("all %lld requests finished; live sequences now %lld (the system prompt)\n",
              static_cast<long long>(finished), static_cast<long long>(cache.num_sequences()));
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const std::exception& e) {
    std::fprintf(stderr, "serve: %s\n", e.what());
    return 1;
  }
}
