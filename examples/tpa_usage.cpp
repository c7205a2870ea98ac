// TensorProductAttention in a few lines: build a T6-medium-like layer, prefill a prompt, decode
// token by token against the paged factor cache, and read the cache's size.
#include <cstdio>
#include <tpa/tpa.hpp>

int main() {
  tpa::TpaConfig cfg;  // one layer of T6-medium: D 1024, 47 heads of 64, R_Q 6, R_K = R_V = 2
  cfg.d_model = 1024;
  cfg.n_heads = 47;
  cfg.head_dim = 64;
  cfg.q_rank = 6;
  cfg.k_rank = 2;
  cfg.v_rank = 2;
  cfg.rope.style = tpa::RopeStyle::kHalfSplitReversed;  // model/T6.py convention
  tpa::TensorProductAttention<> attn(cfg, tpa::TpaWeights::random(cfg, /*seed=*/42));

  tpa::KVCache<float> cache({attn.cache_layout()}, /*block_tokens=*/64, /*max_blocks=*/64);
  tpa::Context ctx(/*threads=*/2);
  const tpa::SeqId seq = cache.add_sequence();

  tpa::Tensor<float, 2> prompt(12, cfg.d_model), y(12, cfg.d_model);
  prompt.setRandom();
  attn.forward(ctx, prompt, y, cache, /*layer=*/0, seq);  // prefill: positions 0 … 11
  tpa::Tensor<float, 2> x1(1, cfg.d_model), y1(1, cfg.d_model);
  for (int step = 0; step < 4; ++step) {  // decode: one token per call, positions 12 … 15
    x1.setRandom();
    attn.forward(ctx, x1, y1, cache, 0, seq);
  }
  std::printf(
      "%s: %zu cached tokens, %zu bytes per token ((R_K+R_V)(H+d) = %ld floats), "
      "%zu bytes used\n",
      attn.kind().c_str(), static_cast<std::size_t>(cache.length(seq)), cache.bytes_per_token(),
      static_cast<long>(cfg.cache_elements_per_token()), cache.bytes_used());
}
