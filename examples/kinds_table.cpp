// Builds one layer of each attention kind at the reference repo's medium shapes (SPEC.md:
// D = 1024, head_dim 64, 24 layers), prefills a prompt, decodes a few tokens through the paged
// cache, and prints what each kind's cache holds per token (f32, bf16 and int8 storage).
#include <tpa/tpa.hpp>

#include <cmath>
#include <cstdio>
#include <string>

namespace {

constexpr tpa::Index kDModel = 1024, kHeadDim = 64, kLayers = 24, kPrompt = 32, kDecode = 8;

struct Row {
  std::string kind, factors;
  tpa::Index heads = 0, elements = 0;
  std::size_t bytes = 0;     // f32 cache
  std::size_t bytes_q8 = 0;  // int8 cache (tpa::q8): values and per-row f32 scales
  double checksum = 0;
};

// Prefill kPrompt tokens, then decode kDecode tokens one at a time.
template <class Layer>
Row run(const Layer& layer, tpa::Index heads) {
  tpa::Context ctx(2);
  tpa::KVCache<float> cache({layer.cache_layout()}, /*block_tokens=*/16, /*max_blocks=*/8);
  const tpa::SeqId seq = cache.add_sequence();
  tpa::Tensor<float, 2> x(kPrompt, kDModel), y(kPrompt, kDModel);
  x.setRandom();
  layer.forward(ctx, x, y, cache, 0, seq);
  tpa::Tensor<float, 2> x1(1, kDModel), y1(1, kDModel);
  double checksum = 0;
  for (tpa::Index t = 0; t < kDecode; ++t) {
    x1.setRandom();
    layer.forward(ctx, x1, y1, cache, 0, seq);
    for (tpa::Index j = 0; j < kDModel; ++j) checksum += std::abs(y1(0, j));
  }
  Row r;
  r.kind = layer.kind();
  r.factors = layer.cache_layout().describe();
  r.heads = heads;
  r.elements = layer.cache_layout().elements_per_token();
  r.bytes = cache.bytes_per_token();
  r.bytes_q8 = tpa::KVCache<tpa::q8>({layer.cache_layout()}, 16, 1).bytes_per_token();
  r.checksum = checksum / static_cast<double>(kDecode * kDModel);
  return r;
}

tpa::GqaConfig gqa(tpa::Index heads, tpa::Index kv_heads) {
  tpa::GqaConfig c;
  c.d_model = kDModel;
  c.n_heads = heads;
  c.n_kv_heads = kv_heads;
  c.head_dim = kHeadDim;
  return c;
}

tpa::TpaConfig tpa_config(tpa::Index heads, bool kv_only) {
  tpa::TpaConfig c;
  c.d_model = kDModel;
  c.n_heads = heads;
  c.head_dim = kHeadDim;
  c.q_rank = kv_only ? 0 : 6;
  c.k_rank = c.v_rank = 2;
  c.kv_only = kv_only;
  return c;
}

}  // namespace

int main() {
  tpa::MlaConfig mla;
  mla.d_model = kDModel;
  mla.n_heads = 23;
  mla.q_lora_rank = 1024;
  mla.kv_lora_rank = 512;
  mla.qk_nope_head_dim = kHeadDim;
  mla.qk_rope_head_dim = 32;
  mla.v_head_dim = kHeadDim;

  const auto c_mha = gqa(16, 16), c_gqa = gqa(30, 2), c_mqa = gqa(31, 1);
  const auto c_tpa = tpa_config(47, false), c_kv = tpa_config(29, true);
  const Row rows[] = {
      run(tpa::MultiHeadAttention<>(c_mha, tpa::GqaWeights::random(c_mha, 1)), 16),
      run(tpa::GroupedQueryAttention<>(c_gqa, tpa::GqaWeights::random(c_gqa, 2)), 30),
      run(tpa::MultiQueryAttention<>(c_mqa, tpa::GqaWeights::random(c_mqa, 3)), 31),
      run(tpa::MultiHeadLatentAttention<>(mla, tpa::MlaWeights::random(mla, 4)), 23),
      run(tpa::TensorProductAttention<>(c_tpa, tpa::TpaWeights::random(c_tpa, 5)), 47),
      run(tpa::TensorProductAttention<>(c_kv, tpa::TpaWeights::random(c_kv, 6)), 29),
  };

  std::printf("Cache per token at the reference medium shapes (D %ld, head_dim %ld, %ld layers);\n"
              "each layer prefilled %ld tokens and decoded %ld through the paged cache.\n\n",
              static_cast<long>(kDModel), static_cast<long>(kHeadDim), static_cast<long>(kLayers),
              static_cast<long>(kPrompt), static_cast<long>(kDecode));
  std::printf("%-7s %5s  %-44s %9s %11s %11s %11s %13s %13s %8s\n", "kind", "heads",
              "factors per token", "elem/tok", "bytes f32", "bytes bf16", "bytes int8",
              "model @32K", "int8 @32K", "vs MHA");
  const double mha_elements = static_cast<double>(rows[0].elements);
  for (const Row& r : rows) {
    const double gib = 1024.0 * 1024.0 * 1024.0;
    const double model_32k = static_cast<double>(r.bytes) * kLayers * 32768.0;
    const double q8_32k = static_cast<double>(r.bytes_q8) * kLayers * 32768.0;
    std::printf("%-7s %5ld  %-44s %9ld %11zu %11zu %11zu %10.2f GiB %10.2f GiB %7.2fx\n",
                r.kind.c_str(), static_cast<long>(r.heads), r.factors.c_str(),
                static_cast<long>(r.elements), r.bytes, r.bytes / 2, r.bytes_q8,
                model_32k / gib, q8_32k / gib, mha_elements / static_cast<double>(r.elements));
    if (!std::isfinite(r.checksum)) {
      std::printf("error: %s produced non-finite outputs\n", r.kind.c_str());
      return 1;
    }
  }
  return 0;
}
