// t6_model: a small T6-style decoder (examples/t6_model.hpp) with any of tpa's attention kinds.
// Seeds the weights at random or loads them from a safetensors checkpoint, prefills a prompt of
// token ids (or of text: its bytes), generates greedily or by seeded sampling, and prints the new
// tokens, the prefill and decode speed, and what the KV cache holds.
//
//   t6_model --kind tpa --layers 4 --d-model 512 --heads 8 --prompt 1,2,3,4 --tokens 32
//   t6_model --kind gqa --save model.safetensors          # write the seeded weights
//   t6_model --kind gqa --weights model.safetensors       # and run them again
//
// A checkpoint of the paper's own model/T6.py with its config in the safetensors metadata (e.g.
// tests/data/t6_tiny.safetensors, a byte-level model) runs with --model; the size flags are then
// not used:
//
//   t6_model --model tests/data/t6_tiny.safetensors --text "The best" --tokens 64
//   t6_model --model tests/data/t6_tiny.safetensors --text "Love is" --tokens 64 --temperature 0.8
//            --top-k 40 --top-p 0.95 --seed 7          (one command line)
//
// Run with --help for all flags.
#include "t6_model.hpp"

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <map>
#include <random>
#include <string>
#include <vector>

namespace {

using tpa::Index;

struct Options {
  std::string kind = "tpa";
  Index layers = 2, d_model = 256, heads = 4, head_dim = 0, kv_heads = 0, vocab = 512;
  Index q_rank = 6, rank = 2;                      // TPA
  Index q_lora = -1, kv_lora = -1, rope_dim = -1;  // MLA (-1 = derived from the head dims)
  Index mlp_hidden = 0, tokens = 16, prompt_len = 0;
  std::vector<t6::Token> prompt = {1, 2, 3, 4, 5, 6, 7, 8};
  int threads = 1;
  bool untied = false;
  std::uint64_t seed = 1;
  std::string weights, save, dtype = "f32";
  std::string model, cache = "f32";  // --model: a model/T6.py checkpoint, config in its metadata
  bool text = false;                 // the prompt came from --text (bytes); print text too
  t6::Sampling sampling;
};

const char* kUsage =
    "usage: t6_model [flags]\n"
    "  --kind mha|gqa|mqa|mla|tpa|tpa-kv  attention kind (default tpa)\n"
    "  --layers L        blocks (2)\n"
    "  --d-model D       hidden size (256)\n"
    "  --heads H         query heads (4)\n"
    "  --head-dim d      head size (D / H)\n"
    "  --kv-heads G      GQA key/value heads (H / 2)\n"
    "  --q-rank R        TPA query rank (6)\n"
    "  --rank R          TPA key/value rank (2)\n"
    "  --q-lora N        MLA query latent (D / 2; 0 = plain q_proj)\n"
    "  --kv-lora N       MLA key/value latent (2 d)\n"
    "  --rope-dim N      MLA rotary head dim (d / 2)\n"
    "  --mlp-hidden F    MLP hidden size (floor(8 D / 3))\n"
    "  --vocab V         vocabulary (512)\n"
    "  --untied          separate lm_head.weight (default: tied to the embedding)\n"
    "  --prompt a,b,...  prompt token ids (1,2,...,8)\n"
    "  --prompt-len N    use N seeded random prompt ids instead\n"
    "  --text STRING     prompt of the string's bytes (token id = byte value); prints text\n"
    "  --tokens N        tokens to generate (16)\n"
    "  --temperature T   sample from softmax(logits / T) (0 = greedy, the default)\n"
    "  --top-k K         sample among the K most likely tokens only (0 = all)\n"
    "  --top-p P         sample among the fewest most likely tokens of probability >= P (1)\n"
    "  --threads T       threads (1)\n"
    "  --seed S          seed of the random weights, prompt and sampling (1)\n"
    "  --weights PATH    load the weights from a safetensors file (model/T6.py names)\n"
    "  --model PATH      run a model/T6.py checkpoint whose __metadata__ holds its config\n"
    "                    (n_layer, n_embd, n_head, head_dim, rank, q_rank, vocab_size,\n"
    "                    block_size); --kind and the size flags are not used\n"
    "  --cache f32|bf16|f16|int8  KV cache element type with --model (f32)\n"
    "  --save PATH       write the model's weights to a safetensors file\n"
    "  --dtype f32|bf16|f16  element type of --save (f32)\n";

[[noreturn]] void usage_error(const std::string& msg) {
  std::fprintf(stderr, "t6_model: %s\n%s", msg.c_str(), kUsage);
  std::exit(2);
}

double to_double(const std::string& flag, const std::string& v) {
  try {
    std::size_t end = 0;
    const double x = std::stod(v, &end);
    if (end == v.size()) return x;
  } catch (const std::exception&) {
  }
  usage_error(flag + " expects a number, got '" + v + "'");
}

long long to_int(const std::string& flag, const std::string& v) {
  try {
    std::size_t end = 0;
    const long long x = std::stoll(v, &end);
    if (end == v.size()) return x;
  } catch (const std::exception&) {
  }
  usage_error(flag + " expects an integer, got '" + v + "'");
}

Options parse(int argc, char** argv) {
  Options o;
  std::map<std::string, Index*> ints = {
      {"--layers", &o.layers},     {"--d-model", &o.d_model},
      {"--heads", &o.heads},       {"--head-dim", &o.head_dim},
      {"--kv-heads", &o.kv_heads}, {"--vocab", &o.vocab},
      {"--q-rank", &o.q_rank},     {"--rank", &o.rank},
      {"--q-lora", &o.q_lora},     {"--kv-lora", &o.kv_lora},
      {"--rope-dim", &o.rope_dim}, {"--mlp-hidden", &o.mlp_hidden},
      {"--tokens", &o.tokens},     {"--prompt-len", &o.prompt_len}};
  std::map<std::string, std::string*> strings = {{"--kind", &o.kind},   {"--weights", &o.weights},
                                                 {"--save", &o.save},   {"--dtype", &o.dtype},
                                                 {"--model", &o.model}, {"--cache", &o.cache}};
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    if (flag == "--help" || flag == "-h") {
      std::printf("%s", kUsage);
      std::exit(0);
    }
    if (flag == "--untied") {
      o.untied = true;
      continue;
    }
    if (i + 1 >= argc) usage_error("missing value after " + flag);
    const std::string v = argv[++i];
    if (ints.count(flag)) {
      *ints[flag] = static_cast<Index>(to_int(flag, v));
    } else if (strings.count(flag)) {
      *strings[flag] = v;
    } else if (flag == "--threads") {
      o.threads = static_cast<int>(to_int(flag, v));
    } else if (flag == "--seed") {
      o.seed = static_cast<std::uint64_t>(to_int(flag, v));
    } else if (flag == "--temperature") {
      o.sampling.temperature = static_cast<float>(to_double(flag, v));
    } else if (flag == "--top-k") {
      o.sampling.top_k = static_cast<Index>(to_int(flag, v));
    } else if (flag == "--top-p") {
      o.sampling.top_p = static_cast<float>(to_double(flag, v));
    } else if (flag == "--text") {
      o.prompt.clear();
      for (char c : v) o.prompt.push_back(static_cast<t6::Token>(static_cast<unsigned char>(c)));
      o.text = true;
      if (o.prompt.empty()) usage_error("--text must not be empty");
    } else if (flag == "--prompt") {
      o.prompt.clear();
      std::size_t start = 0;
      while (start <= v.size()) {
        const std::size_t comma = std::min(v.find(',', start), v.size());
        o.prompt.push_back(static_cast<t6::Token>(to_int(flag, v.substr(start, comma - start))));
        start = comma + 1;
      }
    } else {
      usage_error("unknown flag " + flag);
    }
  }
  if (o.heads < 1 || o.d_model < 1) usage_error("--heads and --d-model must be >= 1");
  if (o.head_dim == 0) o.head_dim = o.d_model / o.heads;
  if (o.prompt_len > 0) {
    std::mt19937_64 rng(o.seed ^ 0x9e3779b97f4a7c15ull);
    std::uniform_int_distribution<t6::Token> u(0, static_cast<t6::Token>(o.vocab - 1));
    o.prompt.assign(static_cast<std::size_t>(o.prompt_len), 0);
    for (auto& t : o.prompt) t = u(rng);
  }
  if (o.tokens < 1) usage_error("--tokens must be >= 1");
  o.sampling.seed = o.seed;
  return o;
}

tpa::io::DType dtype_of(const std::string& s) {
  if (s == "f32") return tpa::io::DType::kF32;
  if (s == "bf16") return tpa::io::DType::kBF16;
  if (s == "f16") return tpa::io::DType::kF16;
  usage_error("--dtype must be f32, bf16 or f16");
}

void print_ids(const char* what, const std::vector<t6::Token>& ids) {
  std::printf("%s (%zu):", what, ids.size());
  for (t6::Token t : ids) std::printf(" %d", static_cast<int>(t));
  std::printf("\n");
}

/// Tokens as a C string literal: bytes, printable ASCII as is, \n \t \" \\ escaped, any other
/// byte (or id past 255) as \xNN (\u{N}).
std::string quoted(const std::vector<t6::Token>& ids) {
  std::string s = "\"";
  for (t6::Token t : ids) {
    char buf[16];
    if (t == '\n') {
      s += "\\n";
    } else if (t == '\t') {
      s += "\\t";
    } else if (t == '"' || t == '\\') {
      s += '\\';
      s += static_cast<char>(t);
    } else if (t >= 0x20 && t < 0x7f) {
      s += static_cast<char>(t);
    } else {
      if (t >= 0 && t < 256) {
        std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(t));
      } else {
        std::snprintf(buf, sizeof buf, "\\u{%d}", static_cast<int>(t));
      }
      s += buf;
    }
  }
  return s + "\"";
}

/// What every run prints after generating: the tokens (and text), the speeds, the cache.
template <class Cache>
void report(const Options& o, const std::vector<t6::Token>& ids, const t6::Timing& time,
            const tpa::CacheLayout& layout, Index layers, const Cache& cache, tpa::SeqId seq) {
  print_ids("prompt", o.prompt);
  print_ids("generated", ids);
  if (o.text) {
    std::printf("prompt text: %s\n", quoted(o.prompt).c_str());
    std::printf("generated text: %s\n", quoted(ids).c_str());
  }
  if (!o.sampling.greedy()) {
    std::printf("sampling: temperature %g, top-k %ld, top-p %g, seed %llu\n",
                static_cast<double>(o.sampling.temperature), static_cast<long>(o.sampling.top_k),
                static_cast<double>(o.sampling.top_p),
                static_cast<unsigned long long>(o.sampling.seed));
  }
  std::printf("prefill: %ld tokens in %.3f ms = %.1f tokens/s\n",
              static_cast<long>(time.prefill_tokens), time.prefill_s * 1e3,
              static_cast<double>(time.prefill_tokens) / time.prefill_s);
  if (time.decode_tokens > 0) {
    std::printf("decode: %ld tokens in %.3f ms = %.1f tokens/s (batch 1, %d thread%s)\n",
                static_cast<long>(time.decode_tokens), time.decode_s * 1e3,
                static_cast<double>(time.decode_tokens) / time.decode_s, o.threads,
                o.threads == 1 ? "" : "s");
  }
  std::printf(
      "cache: %s per layer; bytes_per_token %zu (all %ld layers), bytes_used %zu "
      "(%ld tokens)\n",
      layout.describe().c_str(), cache.bytes_per_token(), static_cast<long>(layers),
      cache.bytes_used(), static_cast<long>(cache.length(seq)));
}

template <class Attn>
int run(const Options& o, typename Attn::Config attn) {
  t6::ModelConfig<Attn> cfg;
  attn.rope.max_positions = static_cast<Index>(o.prompt.size()) + o.tokens;
  cfg.attn = attn;
  cfg.vocab = o.vocab;
  cfg.n_layers = o.layers;
  cfg.mlp_hidden = o.mlp_hidden;
  cfg.tied = !o.untied;

  std::string source;
  typename t6::Model<Attn>::Weights weights;
  if (!o.weights.empty()) {
    const auto file = tpa::io::SafetensorsFile::open(o.weights);
    weights = t6::Model<Attn>::load_weights(file, cfg);
    source = "loaded from " + o.weights;
  } else {
    weights = t6::Model<Attn>::random_weights(cfg, o.seed);
    source = "random (seed " + std::to_string(o.seed) + ")";
  }
  const t6::Model<Attn> model(cfg, std::move(weights));
  std::printf(
      "model: %s attention, %ld layers, d_model %ld, vocab %ld, mlp %ld, %s lm_head, "
      "weights %s\n",
      model.attention(0).kind().c_str(), static_cast<long>(cfg.n_layers),
      static_cast<long>(cfg.d_model()), static_cast<long>(cfg.vocab),
      static_cast<long>(cfg.hidden()), cfg.tied ? "tied" : "separate", source.c_str());
  if (!o.save.empty()) {
    tpa::io::SafetensorsWriter out;
    model.save(out, dtype_of(o.dtype));
    out.write(o.save);
    std::printf("saved: %s (%s)\n", o.save.c_str(), o.dtype.c_str());
  }

  // One cache for all layers; blocks of 16 tokens, enough for the prompt and the new tokens.
  const Index block = 16, total = static_cast<Index>(o.prompt.size()) + o.tokens;
  tpa::KVCache<float> cache(model.cache_layouts(), block, (total + block - 1) / block);
  tpa::Context ctx(o.threads);
  const tpa::SeqId seq = cache.add_sequence();
  t6::Timing time;
  const std::vector<t6::Token> ids =
      model.generate(ctx, o.prompt, o.tokens, cache, seq, &time, o.sampling);
  report(o, ids, time, model.attention(0).cache_layout(), cfg.n_layers, cache, seq);
  return 0;
}

/// --model: a model/T6.py checkpoint, its config from the metadata, KV cache of `CacheScalar`.
template <class CacheScalar>
int run_checkpoint(const Options& o) {
  using Attn = tpa::TensorProductAttention<tpa::Native, CacheScalar>;
  const auto file = tpa::io::SafetensorsFile::open(o.model);
  t6::ModelConfig<Attn> cfg = t6::checkpoint_config<Attn>(file);
  const Index block_size = cfg.attn.rope.max_positions;
  const Index total = static_cast<Index>(o.prompt.size()) + o.tokens;
  if (total > block_size) {
    std::fprintf(stderr,
                 "t6_model: note: %ld tokens are more than the block_size (%ld) the model was "
                 "trained on; positions past it are extrapolated\n",
                 static_cast<long>(total), static_cast<long>(block_size));
    cfg.attn.rope.max_positions = total;
  }
  const t6::Model<Attn> model(cfg, t6::Model<Attn>::load_weights(file, cfg));
  const auto meta = [&](const char* key) {
    const auto it = file.metadata().find(key);
    return it == file.metadata().end() ? std::string("?") : it->second;
  };
  std::printf(
      "model: %s (model/T6.py, config from its metadata): %ld layers, n_embd %ld, %ld heads of "
      "%ld, rank %ld, q_rank %ld, vocab %ld, mlp %ld, tied lm_head, block_size %ld; "
      "val_loss %s nats/byte after %s steps\n",
      o.model.c_str(), static_cast<long>(cfg.n_layers), static_cast<long>(cfg.d_model()),
      static_cast<long>(cfg.attn.n_heads), static_cast<long>(cfg.attn.head_dim),
      static_cast<long>(cfg.attn.k_rank), static_cast<long>(cfg.attn.q_rank),
      static_cast<long>(cfg.vocab), static_cast<long>(cfg.hidden()), static_cast<long>(block_size),
      meta("val_loss_nats_per_byte").c_str(), meta("train_steps").c_str());
  std::printf("backend: %s, KV cache: %s, %d thread%s\n", tpa::Native::name, o.cache.c_str(),
              o.threads, o.threads == 1 ? "" : "s");

  const Index block = 16;
  typename Attn::Cache cache(model.cache_layouts(), block, (total + block - 1) / block);
  tpa::Context ctx(o.threads);
  const tpa::SeqId seq = cache.add_sequence();
  t6::Timing time;
  const std::vector<t6::Token> ids =
      model.generate(ctx, o.prompt, o.tokens, cache, seq, &time, o.sampling);
  report(o, ids, time, model.attention(0).cache_layout(), cfg.n_layers, cache, seq);
  return 0;
}

int dispatch(const Options& o) {
  o.sampling.validate();
  if (!o.model.empty()) {
    if (!o.weights.empty() || !o.save.empty())
      usage_error("--model is not used with --weights or --save");
    if (o.cache == "f32") return run_checkpoint<float>(o);
    if (o.cache == "bf16") return run_checkpoint<tpa::bfloat16>(o);
    if (o.cache == "f16") return run_checkpoint<tpa::half>(o);
    if (o.cache == "int8") return run_checkpoint<tpa::q8>(o);
    usage_error("--cache must be f32, bf16, f16 or int8 (got '" + o.cache + "')");
  }
  if (o.cache != "f32") usage_error("--cache is used with --model only");
  const Index D = o.d_model, H = o.heads, d = o.head_dim;
  tpa::GqaConfig g;
  g.d_model = D;
  g.n_heads = H;
  g.head_dim = d;
  if (o.kind == "mha") {
    g.n_kv_heads = H;
    return run<tpa::MultiHeadAttention<>>(o, g);
  }
  if (o.kind == "mqa") {
    g.n_kv_heads = 1;
    return run<tpa::MultiQueryAttention<>>(o, g);
  }
  if (o.kind == "gqa") {
    g.n_kv_heads = o.kv_heads > 0 ? o.kv_heads : std::max<Index>(1, H / 2);
    return run<tpa::GroupedQueryAttention<>>(o, g);
  }
  if (o.kind == "tpa" || o.kind == "tpa-kv") {
    tpa::TpaConfig c;
    c.d_model = D;
    c.n_heads = H;
    c.head_dim = d;
    c.kv_only = o.kind == "tpa-kv";
    c.q_rank = c.kv_only ? 0 : o.q_rank;
    c.k_rank = c.v_rank = o.rank;
    return run<tpa::TensorProductAttention<>>(o, c);
  }
  if (o.kind == "mla") {
    tpa::MlaConfig c;
    c.d_model = D;
    c.n_heads = H;
    c.qk_nope_head_dim = d;
    c.v_head_dim = d;
    c.qk_rope_head_dim = o.rope_dim >= 0 ? o.rope_dim : std::max<Index>(2, d / 2 / 2 * 2);
    c.q_lora_rank = o.q_lora >= 0 ? o.q_lora : D / 2;
    c.kv_lora_rank = o.kv_lora >= 0 ? o.kv_lora : 2 * d;
    return run<tpa::MultiHeadLatentAttention<>>(o, c);
  }
  usage_error("--kind must be mha, gqa, mqa, mla, tpa or tpa-kv (got '" + o.kind + "')");
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  try {
    return dispatch(o);
  } catch (const tpa::Error& e) {
    std::fprintf(stderr, "t6_model: %s\n", e.what());
    return 1;
  }
}
