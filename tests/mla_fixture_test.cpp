// MultiHeadLatentAttention against the reference PyTorch module (`model/llama-mla.py`, run in
// float64 on seeded weights): tests/data/mla_c1.safetensors (see ../shared/fixtures/README.md).
// Outputs must match within 1e-5 absolute, for the full forward, for prefill followed by
// token-by-token decode, and for what the cache holds (c_kv' and the rotated k_pe).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tpa/io/checkpoint.hpp>
#include <tpa/io/safetensors.hpp>
#include <tpa/tpa.hpp>
#include <vector>

#ifndef TPA_TEST_DATA_DIR
#error "TPA_TEST_DATA_DIR must be defined to the tests/data directory"
#endif

namespace mla_fixture_test {

using tpa::Index;
using tpa::MlaForm;
using tpa::io::SafetensorsFile;

constexpr double kAbsTol = 1e-5;

Index meta_index(const SafetensorsFile& f, const std::string& key) {
  return static_cast<Index>(std::stoll(f.metadata_value(key)));
}

struct MlaFixture {
  SafetensorsFile file;
  tpa::MlaConfig cfg;
  tpa::MlaWeights weights;
  Index B = 0, T = 0, D = 0;
  std::vector<float> x, y;  // [B, T, D]

  static MlaFixture load() {
    MlaFixture fx{SafetensorsFile::open(std::string(TPA_TEST_DATA_DIR) + "/mla_c1.safetensors"),
                  {},
                  {},
                  0,
                  0,
                  0,
                  {},
                  {}};
    const SafetensorsFile& f = fx.file;
    tpa::MlaConfig& c = fx.cfg;
    c.d_model = meta_index(f, "n_embd");
    c.n_heads = meta_index(f, "n_head");
    c.q_lora_rank = meta_index(f, "q_lora_rank");
    c.kv_lora_rank = meta_index(f, "kv_lora_rank");
    c.qk_nope_head_dim = meta_index(f, "qk_nope_head_dim");
    c.qk_rope_head_dim = meta_index(f, "qk_rope_head_dim");
    c.v_head_dim = meta_index(f, "v_head_dim");
    // "half_split, rotation by -theta: …" over the whole rope part, base from the file.
    const std::string style = f.metadata_value("rope_style");
    EXPECT_EQ(style.rfind("half_split", 0), 0u) << style;
    EXPECT_NE(style.find("-theta"), std::string::npos) << style;
    c.rope.style = tpa::RopeStyle::kHalfSplitReversed;
    c.rope.base = std::stod(f.metadata_value("rope_base"));
    EXPECT_EQ(meta_index(f, "rope_dim"), c.qk_rope_head_dim);
    c.rope.max_positions = 64;
    // The file's softmax scale is the default 1/sqrt(d_n + d_R).
    const std::string scale = f.metadata_value("softmax_scale");
    EXPECT_NEAR(c.scale(), std::stod(scale.substr(scale.find('=') + 1)), 1e-7);

    // The weights by their llama-mla.py names; the file also holds inputs and intermediates.
    tpa::io::LoadOptions opt;
    opt.allow_unused = true;
    fx.weights = tpa::io::load_mla_weights(f, "", c, opt);

    fx.B = meta_index(f, "batch");
    fx.T = meta_index(f, "seq_len");
    fx.D = c.d_model;
    fx.x = f.read_f32("x");
    fx.y = f.read_f32("y");
    EXPECT_EQ(static_cast<Index>(fx.x.size()), fx.B * fx.T * fx.D);
    EXPECT_EQ(fx.y.size(), fx.x.size());
    return fx;
  }

  tpa::ConstTensorView<float, 2> x_rows(Index b, Index t0, Index n) const {
    return tpa::ConstTensorView<float, 2>(x.data() + (b * T + t0) * D, n, D);
  }
};

tpa::MlaConfig with_form(tpa::MlaConfig c, MlaForm f) {
  c.form = f;
  return c;
}

const MlaForm kForms[] = {MlaForm::kAuto, MlaForm::kAbsorbed, MlaForm::kExplicit};
const char* form_name(MlaForm f) {
  return f == MlaForm::kAuto ? "auto" : f == MlaForm::kAbsorbed ? "absorbed" : "explicit";
}

double max_abs_diff(const float* a, const float* b, Index n) {
  double m = 0;
  for (Index i = 0; i < n; ++i) m = std::max(m, std::abs(static_cast<double>(a[i]) - b[i]));
  return m;
}

TEST(MlaFixtureTest, RopeTableMatchesTheStoredTables) {
  const MlaFixture fx = MlaFixture::load();
  tpa::MultiHeadLatentAttention<> layer(fx.cfg, fx.weights);
  const std::vector<float> cos = fx.file.read_f32("rope_cos"), sin = fx.file.read_f32("rope_sin");
  const Index half = fx.cfg.qk_rope_head_dim / 2;
  ASSERT_EQ(static_cast<Index>(cos.size()), fx.T * half);
  for (Index t = 0; t < fx.T; ++t) {
    EXPECT_LE(max_abs_diff(layer.rope().cos_row(t), cos.data() + t * half, half), 1e-7);
    EXPECT_LE(max_abs_diff(layer.rope().sin_row(t), sin.data() + t * half, half), 1e-7);
  }
}

TEST(MlaFixtureTest, FullForwardReproducesY) {
  const MlaFixture fx = MlaFixture::load();
  tpa::Context ctx(1);
  for (MlaForm f : kForms) {
    SCOPED_TRACE(form_name(f));
    tpa::MultiHeadLatentAttention<> layer(with_form(fx.cfg, f), fx.weights);
    for (Index b = 0; b < fx.B; ++b) {
      std::vector<float> y(static_cast<std::size_t>(fx.T * fx.D));
      layer.forward(ctx, fx.x_rows(b, 0, fx.T), tpa::TensorView<float, 2>(y.data(), fx.T, fx.D));
      EXPECT_LE(max_abs_diff(y.data(), fx.y.data() + b * fx.T * fx.D, fx.T * fx.D), kAbsTol)
          << "batch " << b;
    }
  }
}

// Prefill `prompt` tokens of both sequences, then decode the rest one token per step: either
// both sequences in one batched decode() call or each through forward() on its own.
void prefill_then_decode(const MlaFixture& fx, MlaForm f, Index prompt, bool batched) {
  tpa::Context ctx(1);
  tpa::MultiHeadLatentAttention<> layer(with_form(fx.cfg, f), fx.weights);
  tpa::KVCache<float> cache({layer.cache_layout()}, /*block_tokens=*/4, /*max_blocks=*/16);
  std::vector<tpa::SeqId> seqs;
  std::vector<float> y(fx.y.size());
  for (Index b = 0; b < fx.B; ++b) {
    seqs.push_back(cache.add_sequence());
    layer.forward(ctx, fx.x_rows(b, 0, prompt),
                  tpa::TensorView<float, 2>(y.data() + b * fx.T * fx.D, prompt, fx.D), cache, 0,
                  seqs.back());
  }
  for (Index t = prompt; t < fx.T; ++t) {
    if (batched) {
      std::vector<float> xb(static_cast<std::size_t>(fx.B * fx.D)), yb(xb.size());
      for (Index b = 0; b < fx.B; ++b)
        std::copy_n(fx.x.data() + (b * fx.T + t) * fx.D, fx.D, xb.data() + b * fx.D);
      layer.decode(ctx, tpa::ConstTensorView<float, 2>(xb.data(), fx.B, fx.D),
                   tpa::TensorView<float, 2>(yb.data(), fx.B, fx.D), cache, 0, seqs);
      for (Index b = 0; b < fx.B; ++b)
        std::copy_n(yb.data() + b * fx.D, fx.D, y.data() + (b * fx.T + t) * fx.D);
    } else {
      for (Index b = 0; b < fx.B; ++b)
        layer.forward(ctx, fx.x_rows(b, t, 1),
                      tpa::TensorView<float, 2>(y.data() + (b * fx.T + t) * fx.D, 1, fx.D), cache,
                      0, seqs[static_cast<std::size_t>(b)]);
    }
  }
  for (Index b = 0; b < fx.B; ++b) {
    for (Index t = 0; t < fx.T; ++t) {
      const Index at = (b * fx.T + t) * fx.D;
      EXPECT_LE(max_abs_diff(y.data() + at, fx.y.data() + at, fx.D), kAbsTol)
          << "batch " << b << " token " << t;
    }
  }
  // The cache holds the reference's compressed_kv_normed [B,T,d_c] and rotated k_pe [B,T,d_R].
  const std::vector<float> ckv = fx.file.read_f32("compressed_kv_normed");
  const std::vector<float> kpe = fx.file.read_f32("k_pe");
  const Index d_c = fx.cfg.kv_lora_rank, d_R = fx.cfg.qk_rope_head_dim;
  for (Index b = 0; b < fx.B; ++b) {
    const tpa::SeqView<float> v = cache.view(seqs[static_cast<std::size_t>(b)], 0);
    ASSERT_EQ(v.n_tokens, fx.T);
    for (Index t = 0; t < fx.T; ++t) {
      EXPECT_LE(max_abs_diff(v.row_at(0, t, 0), ckv.data() + (b * fx.T + t) * d_c, d_c), kAbsTol)
          << "c_kv' of batch " << b << " token " << t;
      EXPECT_LE(max_abs_diff(v.row_at(1, t, 0), kpe.data() + (b * fx.T + t) * d_R, d_R), kAbsTol)
          << "k_pe of batch " << b << " token " << t;
    }
  }
}

TEST(MlaFixtureTest, PrefillThenBatchedDecodeReproducesYAndTheCachedLatents) {
  const MlaFixture fx = MlaFixture::load();
  for (MlaForm f : kForms) {
    SCOPED_TRACE(form_name(f));
    prefill_then_decode(fx, f, /*prompt=*/10, /*batched=*/true);
  }
}

TEST(MlaFixtureTest, PrefillThenTokenByTokenForwardReproducesY) {
  const MlaFixture fx = MlaFixture::load();
  for (MlaForm f : kForms) {
    SCOPED_TRACE(form_name(f));
    prefill_then_decode(fx, f, /*prompt=*/5, /*batched=*/false);
    prefill_then_decode(fx, f, /*prompt=*/1, /*batched=*/false);
  }
}

}  // namespace mla_fixture_test
