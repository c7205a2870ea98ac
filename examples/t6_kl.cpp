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
// A cache type is one line of kCaches below.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
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

/// Loads the checkpoint as a Model<Attn> (its cache type is Attn::Cache) and feeds every text
/// through it one token at a time.
template <class Attn>
Run teacher_forced(const tpa::io::SafetensorsFile& file, const std::vector<Text>& texts,
                   int threads) {
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
    for (std::size_t t = 0; t + 1 < text.size(); ++t)
      run.logits.back().push_back(model.forward(ctx, {text[t]}, cache, seq));
    run.bytes_per_token = cache.bytes_per_token();
  }
  return run;
}

/// A KV cache type to compare with f32: its name and the run of a model with it.
struct CacheType {
  const char* name;
  Run (*run)(const tpa::io::SafetensorsFile&, const std::vector<Text>&, int);
};

template <class CacheScalar>
using Tpa = tpa::TensorProductAttention<tpa::Native, CacheScalar>;

// The baseline, and one line per cache type measured against it.
const CacheType kBaseline = {"f32", &teacher_forced<Tpa<float>>};
const CacheType kCaches[] = {
    {"bf16", &teacher_forced<Tpa<tpa::bfloat16>>},
    {"f16", &teacher_forced<Tpa<tpa::half>>},
    {"int8", &teacher_forced<Tpa<tpa::q8>>},
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
    "  --threads T     threads (1)\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "t6_kl: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

int run(int argc, char** argv) {
  std::string model, texts_path;
  std::vector<std::string> strings;
  int threads = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      return 0;
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

  const Run base = kBaseline.run(file, texts, threads);
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
  std::printf("%-6s %9s %12s %12s %14s %12s\n", "cache", "bytes/tok", "mean KL", "max KL",
              "top-1 agree", "NLL/token");
  std::printf("%-6s %9zu %12s %12s %14s %12.6f\n", kBaseline.name, base.bytes_per_token, "-", "-",
              "-", nll(base));
  for (const CacheType& c : kCaches) {
    const Run r = c.run(file, texts, threads);
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
    std::printf("%-6s %9zu %12.3e %12.3e %7ld / %-4ld %12.6f\n", c.name, r.bytes_per_token,
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
