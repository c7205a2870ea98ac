// t6_kl: how far a KV cache of a narrower element type moves a T6 model's next-token
// distributions away from those of the f32 cache. The model (a model/T6.py checkpoint with its
// config in the metadata, as t6_model --model runs it) reads each text one token at a time
// (teacher forcing, every token through the decode path, so every cached token is stored in the
// cache type); at every position whose next token is in the text it compares the distribution P
// of the f32 cache with Q of the other cache:
//
//   KL(P || Q) = Σ_v P(v) (log P(v) − log Q(v))   nats; mean and max over the positions
//   top-1 agreement                               argmax Q = argmax P (lowest id on ties)
//   NLL                                           −log Q(next token), mean (nats per token)
//
// The texts are the prompts + reference continuations of a file like
// tests/data/t6_tiny_generate.safetensors (promptK.ids, promptK.generated), and/or --text strings
// (their bytes).
//
//   t6_kl --model tests/data/t6_tiny.safetensors --texts tests/data/t6_tiny_generate.safetensors
//
// A cache type is one line of kCaches below; "sim" lines are formats simulated in an f32 cache
// (teacher_forced: after each step the token's factors are replaced by what the format stores;
// the step itself read them unrounded). --factor-stats first prints, per cached factor, the
// int8 and 4-bit rounding error of what the model stores next to that of N(0, 1) factors.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "t6_model.hpp"

namespace {

using tpa::Index;
using Text = std::vector<t6::Token>;

/// The next-token logits at every position of every text, and what the cache used per token.
struct Run {
  std::vector<std::vector<Eigen::VectorXf>> logits;  // [text][position t] predicts token t + 1
  std::size_t bytes_per_token = 0;
};

/// A storage format simulated in an f32 cache: symmetric round to nearest, q in [−qmax, qmax],
/// scale max|x| / qmax per group of `group` consecutive elements of one token's factor (row-major
/// [rows, cols]; 0: tpa::q8's rule, a row when rows hold >= tpa::kQ8MinRowCols elements, else
/// the whole factor).
struct SimFormat {
  int qmax;
  Index group;
};

/// Replaces x[0, n) by the values `fmt` stores for them (quantize, then dequantize).
void simulate(float* x, Index n, Index cols, const SimFormat& fmt) {
  const Index g =
      fmt.group > 0 ? std::min(fmt.group, n) : (cols >= tpa::kQ8MinRowCols ? cols : n);
  for (Index i0 = 0; i0 < n; i0 += g) {
    const Index m = std::min(g, n - i0);
    float amax = 0.f;
    for (Index i = i0; i < i0 + m; ++i) amax = std::max(amax, std::fabs(x[i]));
    if (amax == 0.f || !std::isfinite(amax)) continue;
    const float scale = amax / static_cast<float>(fmt.qmax);
    for (Index i = i0; i < i0 + m; ++i) x[i] = std::nearbyint(x[i] / scale) * scale;
  }
}

/// Calls fn(layer, factor, spec, x) with a copy x of token t's factor (row-major [rows, cols]) for
/// every layer and factor of an f32 cache, and writes x back (the cache owns its blocks
/// non-const; the view only exposes them read-only).
template <class Fn>
void each_factor(tpa::KVCache<float>& cache, const std::vector<tpa::CacheLayout>& layouts,
                 tpa::SeqId seq, Index t, Fn&& fn) {
  std::vector<float> x;
  for (std::size_t l = 0; l < layouts.size(); ++l) {
    const tpa::SeqView<float> v = cache.view(seq, static_cast<int>(l));
    for (std::size_t f = 0; f < layouts[l].num_factors(); ++f) {
      const Index rows = v.rows(f), cols = v.cols(f);
      x.resize(static_cast<std::size_t>(rows * cols));
      for (Index r = 0; r < rows; ++r)
        std::copy_n(v.row_at(f, t, r), cols, x.begin() + r * cols);
      fn(l, f, layouts[l].factor(f), x.data());
      for (Index r = 0; r < rows; ++r)
        std::copy_n(x.begin() + r * cols, cols, const_cast<float*>(v.row_at(f, t, r)));
    }
  }
}

/// Loads the checkpoint as a Model<Attn> (its cache type is Attn::Cache) and feeds every text
/// through it one token at a time. With `sim` (f32 caches only), after each step the token's
/// cached factors of every layer are replaced by what format *sim stores for them: later steps
/// read them in that format (the step itself read its own token's factors in f32).
template <class Attn>
Run teacher_forced(const tpa::io::SafetensorsFile& file, const std::vector<Text>& texts,
                   int threads, const SimFormat* sim = nullptr) {
  t6::ModelConfig<Attn> cfg = t6::checkpoint_config<Attn>(file);
  Index longest = 0;
  for (const Text& t : texts) longest = std::max<Index>(longest, static_cast<Index>(t.size()));
  cfg.attn.rope.max_positions = std::max(cfg.attn.rope.max_positions, longest);
  const t6::Model<Attn> model(cfg, t6::Model<Attn>::load_weights(file, cfg));
  tpa::Context ctx(threads);
  Run run;
  for (const Text& text : texts) {
    const Index block = 16, n = static_cast<Index>(text.size());
    typename Attn::Cache cache(model.cache_layouts(), block, (n + block - 1) / block);
    const tpa::SeqId seq = cache.add_sequence();
    run.logits.emplace_back();
    for (std::size_t t = 0; t + 1 < text.size(); ++t) {
      run.logits.back().push_back(model.forward(ctx, {text[t]}, cache, seq));
      if constexpr (std::is_same<typename Attn::Cache, tpa::KVCache<float>>::value) {
        if (sim != nullptr)
          each_factor(cache, model.cache_layouts(), seq, static_cast<Index>(t),
                      [&](std::size_t, std::size_t, const tpa::FactorSpec& fs, float* x) {
                        simulate(x, fs.elements(), fs.cols, *sim);
                      });
      }
    }
    run.bytes_per_token = cache.bytes_per_token();
    if (sim != nullptr) {  // what the format would store: values and f32 scales
      run.bytes_per_token = 0;
      for (const tpa::CacheLayout& l : model.cache_layouts())
        for (const tpa::FactorSpec& fs : l.factors()) {
          const Index n = fs.elements();
          const Index g = sim->group > 0 ? std::min(sim->group, n)
                                         : (fs.cols >= tpa::kQ8MinRowCols ? fs.cols : n);
          const int bits = sim->qmax > 7 ? 8 : 4;
          run.bytes_per_token += static_cast<std::size_t>(n * bits / 8 + 4 * ((n + g - 1) / g));
        }
    }
  }
  return run;
}

/// Over the factors an f32 run of the model caches for `texts`: per factor (all layers), the
/// relative RMS error ‖x − sim(x)‖₂ / ‖x‖₂ of int8 (tpa::q8's groups) and 4-bit (groups of 32),
/// and the same for N(0, 1) factors of the same shapes, to see whether N(0, 1) data is
/// representative of what the model stores.
void factor_stats(const tpa::io::SafetensorsFile& file, const std::vector<Text>& texts) {
  using Attn = tpa::TensorProductAttention<tpa::Native, float>;
  t6::ModelConfig<Attn> cfg = t6::checkpoint_config<Attn>(file);
  Index longest = 0;
  for (const Text& t : texts) longest = std::max<Index>(longest, static_cast<Index>(t.size()));
  cfg.attn.rope.max_positions = std::max(cfg.attn.rope.max_positions, longest);
  const t6::Model<Attn> model(cfg, t6::Model<Attn>::load_weights(file, cfg));
  const auto layouts = model.cache_layouts();
  const SimFormat formats[2] = {{127, 0}, {7, 32}};
  struct Acc {
    double x2 = 0, e2[2] = {0, 0}, n2 = 0, ne2[2] = {0, 0}, crest = 0, ncrest = 0;
    Index groups = 0;
  };
  std::vector<Acc> acc(layouts[0].num_factors());
  std::uint64_t rng = 0x9E3779B97F4A7C15ull;
  auto normal = [&] {  // Box–Muller over xorshift64*
    auto u = [&] {
      rng ^= rng >> 12, rng ^= rng << 25, rng ^= rng >> 27;
      return (static_cast<double>((rng * 0x2545F4914F6CDD1Dull) >> 11) + 0.5) * 0x1.0p-53;
    };
    return static_cast<float>(std::sqrt(-2 * std::log(u())) * std::cos(6.283185307179586 * u()));
  };
  tpa::Context ctx(1);
  for (const Text& text : texts) {
    const Index block = 16, n = static_cast<Index>(text.size());
    tpa::KVCache<float> cache(layouts, block, (n + block - 1) / block);
    const tpa::SeqId seq = cache.add_sequence();
    for (std::size_t t = 0; t + 1 < text.size(); ++t) {
      model.forward(ctx, {text[t]}, cache, seq);
      each_factor(cache, layouts, seq, static_cast<Index>(t),
                  [&](std::size_t, std::size_t f, const tpa::FactorSpec& fs, float* x) {
                    Acc& a = acc[f];
                    const Index m = fs.elements();
                    std::vector<float> g(x, x + m), y(static_cast<std::size_t>(m));
                    for (float& v : y) v = normal();
                    // crest factor max|x| / rms per int8 scale group
                    const Index gs = fs.cols >= tpa::kQ8MinRowCols ? fs.cols : m;
                    auto crest = [&](const float* z, Index i0) {
                      double s2 = 0, mx = 0;
                      for (Index i = i0; i < i0 + gs; ++i) {
                        s2 += static_cast<double>(z[i]) * z[i];
                        mx = std::max(mx, static_cast<double>(std::fabs(z[i])));
                      }
                      return s2 > 0 ? mx / std::sqrt(s2 / static_cast<double>(gs)) : 0.0;
                    };
                    for (Index i0 = 0; i0 < m; i0 += gs) {
                      a.crest += crest(x, i0);
                      a.ncrest += crest(y.data(), i0);
                      ++a.groups;
                    }
                    for (Index i = 0; i < m; ++i) {
                      a.x2 += static_cast<double>(x[i]) * x[i];
                      a.n2 += static_cast<double>(y[i]) * y[i];
                    }
                    for (int k = 0; k < 2; ++k) {
                      std::vector<float> gx = g, gy = y;
                      simulate(gx.data(), m, fs.cols, formats[k]);
                      simulate(gy.data(), m, fs.cols, formats[k]);
                      for (Index i = 0; i < m; ++i) {
                        a.e2[k] += static_cast<double>(gx[i] - g[i]) * (gx[i] - g[i]);
                        a.ne2[k] += static_cast<double>(gy[i] - y[i]) * (gy[i] - y[i]);
                      }
                    }
                  });
    }
  }
  std::printf("factor stored by the model (all layers) vs N(0,1) of the same shape: relative RMS "
              "error of int8 (q8 groups) and 4-bit (groups of 32); mean max|x|/rms per int8 "
              "group\n");
  std::printf("%-6s %10s %10s %10s %10s %10s %10s\n", "factor", "int8", "int8 N01", "4-bit",
              "4-bit N01", "crest", "crest N01");
  for (std::size_t f = 0; f < acc.size(); ++f) {
    const Acc& a = acc[f];
    std::printf("%-6s %10.2e %10.2e %10.2e %10.2e %10.2f %10.2f\n",
                layouts[0].factor(f).name.c_str(), std::sqrt(a.e2[0] / a.x2),
                std::sqrt(a.ne2[0] / a.n2), std::sqrt(a.e2[1] / a.x2), std::sqrt(a.ne2[1] / a.n2),
                a.crest / static_cast<double>(a.groups), a.ncrest / static_cast<double>(a.groups));
  }
  std::printf("\n");
}

/// A KV cache type to compare with f32: its name and the run of a model with it.
struct CacheType {
  const char* name;
  Run (*run)(const tpa::io::SafetensorsFile&, const std::vector<Text>&, int, const SimFormat*);
  SimFormat sim = {0, 0};  // qmax > 0: a format simulated in an f32 cache
};

template <class CacheScalar>
using Tpa = tpa::TensorProductAttention<tpa::Native, CacheScalar>;

// The baseline, and one line per cache type measured against it.
const CacheType kBaseline = {"f32", &teacher_forced<Tpa<float>>, {0, 0}};
const CacheType kCaches[] = {
    {"bf16", &teacher_forced<Tpa<tpa::bfloat16>>, {0, 0}},
    {"f16", &teacher_forced<Tpa<tpa::half>>, {0, 0}},
    {"int8", &teacher_forced<Tpa<tpa::q8>>, {0, 0}},
    // Simulated in an f32 cache (see teacher_forced): int8 with tpa::q8's groups (to compare
    // with the int8 line above) and a 4-bit format, groups of 32 elements.
    {"int8 sim", &teacher_forced<Tpa<float>>, {127, 0}},
    {"4-bit g32 sim", &teacher_forced<Tpa<float>>, {7, 32}},
};

/// log softmax of v, in double.
std::vector<double> log_softmax(const Eigen::VectorXf& v) {
  const double m = static_cast<double>(v.maxCoeff());
  double sum = 0;
  for (Index i = 0; i < v.size(); ++i) sum += std::exp(static_cast<double>(v[i]) - m);
  const double lse = m + std::log(sum);
  std::vector<double> out(static_cast<std::size_t>(v.size()));
  for (Index i = 0; i < v.size(); ++i) out[static_cast<std::size_t>(i)] = v[i] - lse;
  return out;
}

/// The texts of a reference file: promptK.ids followed by promptK.generated, K = 0, 1, … while
/// promptK.ids exists. \throws tpa::Error naming a tensor that is missing or holds something
/// other than token ids in [0, vocab).
std::vector<Text> reference_texts(const std::string& path, Index vocab) {
  const auto f = tpa::io::SafetensorsFile::open(path);
  std::vector<Text> texts;
  for (int k = 0; f.contains("prompt" + std::to_string(k) + ".ids"); ++k) {
    Text text;
    for (const char* part : {".ids", ".generated"}) {
      const std::string name = "prompt" + std::to_string(k) + part;
      TPA_CHECK(f.contains(name), "t6_kl: ", path, " has no tensor '", name, "'");
      TPA_CHECK(f.info(name).shape.size() == 1, "t6_kl: tensor '", name, "' of ", path,
                " is not a vector");
      for (float v : f.read_f32(name)) {
        TPA_CHECK(v >= 0.f && v < static_cast<float>(vocab) && v == std::floor(v),
                  "t6_kl: tensor '", name, "' of ", path, " holds ", v, ", not a token id in [0, ",
                  vocab, ")");
        text.push_back(static_cast<t6::Token>(v));
      }
    }
    texts.push_back(std::move(text));
  }
  TPA_CHECK(!texts.empty(), "t6_kl: ", path, " has no tensor 'prompt0.ids'");
  return texts;
}

const char* kUsage =
    "usage: t6_kl --model PATH [--texts PATH] [--text STRING]... [--threads T]\n"
    "  --model PATH    model/T6.py checkpoint, config in its __metadata__\n"
    "  --texts PATH    safetensors file of promptK.ids + promptK.generated token ids\n"
    "  --text STRING   a text of the string's bytes (repeatable)\n"
    "  --threads T     threads (1)\n"
    "  --factor-stats  also print the int8 and 4-bit rounding error of the cached factors\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "t6_kl: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

int run(int argc, char** argv) {
  std::string model, texts_path;
  std::vector<std::string> strings;
  int threads = 1;
  bool stats = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      return 0;
    }
    if (flag == "--factor-stats") {
      stats = true;
      continue;
    }
    if (i + 1 >= argc) usage_error("missing value after " + flag);
    const std::string v = argv[++i];
    if (flag == "--model") {
      model = v;
    } else if (flag == "--texts") {
      texts_path = v;
    } else if (flag == "--text") {
      strings.push_back(v);
    } else if (flag == "--threads") {
      threads = std::atoi(v.c_str());
      if (threads < 1) usage_error("--threads expects an integer >= 1, got '" + v + "'");
    } else {
      usage_error("unknown flag " + flag);
    }
  }
  if (model.empty()) usage_error("--model is required");
  if (texts_path.empty() && strings.empty()) usage_error("give --texts and/or --text");

  const auto file = tpa::io::SafetensorsFile::open(model);
  const Index vocab = t6::checkpoint_config<Tpa<float>>(file).vocab;
  std::vector<Text> texts;
  if (!texts_path.empty()) texts = reference_texts(texts_path, vocab);
  for (const std::string& s : strings) {
    Text t;
    for (char c : s) t.push_back(static_cast<t6::Token>(static_cast<unsigned char>(c)));
    TPA_CHECK(t.size() >= 2, "t6_kl: --text '", s, "' has fewer than 2 bytes");
    TPA_CHECK(vocab >= 256, "t6_kl: --text needs a byte vocabulary (vocab_size ", vocab, ")");
    texts.push_back(std::move(t));
  }
  Index positions = 0;
  for (const Text& t : texts) positions += static_cast<Index>(t.size()) - 1;

  if (stats) factor_stats(file, texts);
  const Run base = kBaseline.run(file, texts, threads, nullptr);
  // Mean NLL of the text's next tokens under a run.
  const auto nll = [&](const Run& r) {
    double sum = 0;
    for (std::size_t k = 0; k < texts.size(); ++k)
      for (std::size_t t = 0; t < r.logits[k].size(); ++t)
        sum -= log_softmax(r.logits[k][t])[static_cast<std::size_t>(texts[k][t + 1])];
    return sum / static_cast<double>(positions);
  };
  std::printf("%s: %zu texts, %ld next-token positions, teacher forced, backend %s, %d thread%s\n",
              model.c_str(), texts.size(), static_cast<long>(positions), tpa::Native::name, threads,
              threads == 1 ? "" : "s");
  std::printf("%-13s %9s %12s %12s %14s %12s\n", "cache", "bytes/tok", "mean KL", "max KL",
              "top-1 agree", "NLL/token");
  std::printf("%-13s %9zu %12s %12s %14s %12.6f\n", kBaseline.name, base.bytes_per_token, "-", "-",
              "-", nll(base));
  for (const CacheType& c : kCaches) {
    const Run r = c.run(file, texts, threads, c.sim.qmax > 0 ? &c.sim : nullptr);
    double kl_sum = 0, kl_max = 0;
    Index agree = 0;
    for (std::size_t k = 0; k < texts.size(); ++k) {
      for (std::size_t t = 0; t < r.logits[k].size(); ++t) {
        const std::vector<double> lp = log_softmax(base.logits[k][t]);
        const std::vector<double> lq = log_softmax(r.logits[k][t]);
        double kl = 0;
        for (std::size_t v = 0; v < lp.size(); ++v) kl += std::exp(lp[v]) * (lp[v] - lq[v]);
        kl_sum += kl;
        kl_max = std::max(kl_max, kl);
        agree += t6::Sampler::argmax(base.logits[k][t]) == t6::Sampler::argmax(r.logits[k][t]);
      }
    }
    std::printf("%-13s %9zu %12.3e %12.3e %7ld / %-4ld %12.6f\n", c.name, r.bytes_per_token,
                kl_sum / static_cast<double>(positions), kl_max, static_cast<long>(agree),
                static_cast<long>(positions), nll(r));
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const tpa::Error& e) {
    std::fprintf(stderr, "t6_kl: %s\n", e.what());
    return 1;
  }
}
