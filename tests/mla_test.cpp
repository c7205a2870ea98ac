// MultiHeadLatentAttention against a naive double-precision implementation written here from
// SPEC.md ("MLA", "RoPE"), plus the cache contract: absorbed == explicit, incremental decode ==
// full forward, chunked prefill, ragged batches, cache size, and errors that change nothing.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tpa/tpa.hpp>
#include <vector>

namespace mla_test {

using tpa::Index;
using tpa::MlaConfig;
using tpa::MlaForm;
using tpa::MlaWeights;

// ---------------------------------------------------------------------------------------------
// Naive MLA in double, straight from SPEC.md. Uses no library math (only the weight storage).
// ---------------------------------------------------------------------------------------------

using Vec = std::vector<double>;

// y = W x for a [out, in] weight.
Vec matvec(const tpa::Matrix<float>& w, const Vec& x) {
  Vec y(static_cast<std::size_t>(w.rows()), 0.0);
  for (Index o = 0; o < w.rows(); ++o) {
    double s = 0;
    for (Index i = 0; i < w.cols(); ++i)
      s += static_cast<double>(w(o, i)) * x[static_cast<std::size_t>(i)];
    y[static_cast<std::size_t>(o)] = s;
  }
  return y;
}

// RMSNorm(z) = z / sqrt(mean(z²) + eps) · weight.
Vec rms_norm(const Vec& z, const Eigen::VectorXf& w, double eps) {
  double ss = 0;
  for (double v : z) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / static_cast<double>(z.size()) + eps);
  Vec out(z.size());
  for (std::size_t i = 0; i < z.size(); ++i)
    out[i] = z[i] * inv * static_cast<double>(w[static_cast<Index>(i)]);
  return out;
}

// Rotates v[off … off+dim) to position p (SPEC.md, RoPE), in place.
void naive_rope(Vec& v, std::size_t off, Index dim, Index p, const tpa::RopeConfig& rc) {
  const Index r = rc.rotary_dim == 0 ? dim : rc.rotary_dim;
  const Index half = r / 2;
  const double s = rc.style == tpa::RopeStyle::kHalfSplitReversed ? -1.0 : 1.0;
  for (Index i = 0; i < half; ++i) {
    const double theta = std::pow(rc.base, -2.0 * static_cast<double>(i) / static_cast<double>(r));
    const double phi = s * static_cast<double>(p) * theta;
    std::size_t ia, ib;
    if (rc.style == tpa::RopeStyle::kInterleaved) {
      ia = off + static_cast<std::size_t>(2 * i);
      ib = ia + 1;
    } else {
      ia = off + static_cast<std::size_t>(i);
      ib = off + static_cast<std::size_t>(i + half);
    }
    const double a = v[ia], b = v[ib];
    v[ia] = a * std::cos(phi) - b * std::sin(phi);
    v[ib] = a * std::sin(phi) + b * std::cos(phi);
  }
}

struct NaiveResult {
  std::vector<Vec> y;     // [T][D]
  std::vector<Vec> c_kv;  // [T][d_c]  normalised latent
  std::vector<Vec> k_pe;  // [T][d_R]  rotated
};

// Causal MLA over tokens x[0 … T−1] at positions 0 … T−1 (explicit form, SPEC.md).
NaiveResult naive_mla(const MlaConfig& c, const MlaWeights& w, const std::vector<float>& x,
                      Index T) {
  const Index D = c.d_model, H = c.n_heads, d_c = c.kv_lora_rank, d_n = c.qk_nope_head_dim;
  const Index d_R = c.qk_rope_head_dim, d_v = c.v_head_dim, d_qk = d_n + d_R;
  const double eps = static_cast<double>(c.norm_eps);
  const double scale = c.softmax_scale != 0.f ? static_cast<double>(c.softmax_scale)
                                              : 1.0 / std::sqrt(static_cast<double>(d_qk));
  NaiveResult r;
  std::vector<Vec> q(static_cast<std::size_t>(T)), kv(static_cast<std::size_t>(T));
  for (Index t = 0; t < T; ++t) {
    Vec xt(x.begin() + t * D, x.begin() + (t + 1) * D);
    Vec qt = c.q_lora_rank > 0
                 ? matvec(w.q_b_proj, rms_norm(matvec(w.q_a_proj, xt), w.q_a_layernorm, eps))
                 : matvec(w.q_proj, xt);
    for (Index h = 0; h < H; ++h)
      naive_rope(qt, static_cast<std::size_t>(h * d_qk + d_n), d_R, t, c.rope);
    Vec a = matvec(w.kv_a_proj_with_mqa, xt);
    Vec ckv(a.begin(), a.begin() + d_c);
    Vec kpe(a.begin() + d_c, a.end());
    ckv = rms_norm(ckv, w.kv_a_layernorm, eps);
    naive_rope(kpe, 0, d_R, t, c.rope);
    kv[static_cast<std::size_t>(t)] = matvec(w.kv_b_proj, ckv);  // per head: k_nope | v
    q[static_cast<std::size_t>(t)] = qt;
    r.c_kv.push_back(ckv);
    r.k_pe.push_back(kpe);
  }
  for (Index t = 0; t < T; ++t) {
    Vec o(static_cast<std::size_t>(H * d_v), 0.0);
    for (Index h = 0; h < H; ++h) {
      const Vec& qt = q[static_cast<std::size_t>(t)];
      Vec score(static_cast<std::size_t>(t + 1));
      double mx = -std::numeric_limits<double>::infinity();
      for (Index s = 0; s <= t; ++s) {
        const Vec& kvs = kv[static_cast<std::size_t>(s)];
        double dot = 0;
        for (Index j = 0; j < d_n; ++j)
          dot += qt[static_cast<std::size_t>(h * d_qk + j)] *
                 kvs[static_cast<std::size_t>(h * (d_n + d_v) + j)];
        for (Index j = 0; j < d_R; ++j)
          dot += qt[static_cast<std::size_t>(h * d_qk + d_n + j)] *
                 r.k_pe[static_cast<std::size_t>(s)][static_cast<std::size_t>(j)];
        score[static_cast<std::size_t>(s)] = dot * scale;
        mx = std::max(mx, dot * scale);
      }
      double sum = 0;
      for (double& e : score) sum += (e = std::exp(e - mx));
      for (Index s = 0; s <= t; ++s) {
        const Vec& kvs = kv[static_cast<std::size_t>(s)];
        const double p = score[static_cast<std::size_t>(s)] / sum;
        for (Index j = 0; j < d_v; ++j)
          o[static_cast<std::size_t>(h * d_v + j)] +=
              p * kvs[static_cast<std::size_t>(h * (d_n + d_v) + d_n + j)];
      }
    }
    r.y.push_back(matvec(w.c_proj, o));
  }
  return r;
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

struct Case {
  std::string name;
  MlaConfig cfg;
};

MlaConfig make_cfg(Index D, Index H, Index q_lora, Index d_c, Index d_n, Index d_R, Index d_v) {
  MlaConfig c;
  c.d_model = D;
  c.n_heads = H;
  c.q_lora_rank = q_lora;
  c.kv_lora_rank = d_c;
  c.qk_nope_head_dim = d_n;
  c.qk_rope_head_dim = d_R;
  c.v_head_dim = d_v;
  c.rope.max_positions = 64;
  return c;
}

// Shapes covering q_lora 0 and > 0, partial rotary on d_R, d_v ≠ d_n, all RoPE styles, an
// explicit softmax scale, and all four fold combinations of the absorbed form.
std::vector<Case> cases() {
  std::vector<Case> v;
  {
    MlaConfig c = make_cfg(48, 3, 24, 20, 8, 6, 12);  // folds neither
    v.push_back({"qlora24_reversed_full_rotary", c});
  }
  {
    MlaConfig c = make_cfg(32, 4, 0, 8, 16, 8, 10);  // q_proj; folds both
    c.rope.style = tpa::RopeStyle::kHalfSplit;
    c.rope.rotary_dim = 4;
    v.push_back({"qproj_halfsplit_partial_rotary", c});
  }
  {
    MlaConfig c = make_cfg(40, 2, 16, 12, 6, 4, 20);  // folds the output only
    c.rope.style = tpa::RopeStyle::kInterleaved;
    c.rope.base = 500000.0;
    c.softmax_scale = 0.3f;
    v.push_back({"qlora16_interleaved_scale", c});
  }
  {
    MlaConfig c = make_cfg(24, 2, 0, 6, 10, 4, 4);  // folds the query only
    c.rope.rotary_dim = 2;
    v.push_back({"qproj_reversed_partial_rotary", c});
  }
  return v;
}

std::vector<float> random_input(Index T, Index D, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  std::vector<float> x(static_cast<std::size_t>(T * D));
  for (float& e : x) e = u(rng);
  return x;
}

// max |a − b| / max |b| over all elements (b: the expected values).
double rel_err(const float* a, const float* b, std::size_t n) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < n; ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return num / den;
}
double rel_err(const std::vector<float>& a, const std::vector<Vec>& b) {
  double num = 0, den = 0;
  std::size_t k = 0;
  for (const Vec& row : b) {
    for (double e : row) {
      num = std::max(num, std::abs(static_cast<double>(a[k++]) - e));
      den = std::max(den, std::abs(e));
    }
  }
  EXPECT_EQ(k, a.size());
  return num / den;
}

tpa::ConstTensorView<float, 2> rows(const std::vector<float>& x, Index r0, Index n, Index D) {
  return tpa::ConstTensorView<float, 2>(x.data() + r0 * D, n, D);
}
tpa::TensorView<float, 2> out_rows(std::vector<float>& y, Index r0, Index n, Index D) {
  return tpa::TensorView<float, 2>(y.data() + r0 * D, n, D);
}

MlaConfig with_form(MlaConfig c, MlaForm f) {
  c.form = f;
  return c;
}

const MlaForm kForms[] = {MlaForm::kAuto, MlaForm::kAbsorbed, MlaForm::kExplicit};
const char* form_name(MlaForm f) {
  return f == MlaForm::kAuto ? "auto" : f == MlaForm::kAbsorbed ? "absorbed" : "explicit";
}

// Everything a sequence holds in the cache, as floats (for "unchanged" checks).
template <class S>
std::vector<float> snapshot(const tpa::KVCache<S>& cache, tpa::SeqId seq, int layer) {
  std::vector<float> out;
  const tpa::SeqView<S> v = cache.view(seq, layer);
  for (Index t = 0; t < v.n_tokens; ++t)
    for (std::size_t f = 0; f < 2; ++f)
      for (Index j = 0; j < v.elements(f); ++j) out.push_back(static_cast<float>(v.at(f, t, j)));
  return out;
}

constexpr double kTol = 1e-5;  // relative to the largest |expected value|

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

TEST(MlaTest, CasesCoverEveryFoldCombination) {
  bool seen[2][2] = {{false, false}, {false, false}};
  for (const Case& c : cases()) {
    tpa::MultiHeadLatentAttention<> layer(c.cfg, MlaWeights::random(c.cfg, 1));
    seen[layer.folds_query()][layer.folds_output()] = true;
  }
  EXPECT_TRUE(seen[0][0] && seen[0][1] && seen[1][0] && seen[1][1]);
}

TEST(MlaTest, ForwardMatchesNaiveDouble) {
  const Index T = 11;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    const MlaWeights w = MlaWeights::random(c.cfg, 7);
    const std::vector<float> x = random_input(T, c.cfg.d_model, 11);
    const NaiveResult ref = naive_mla(c.cfg, w, x, T);
    for (MlaForm f : kForms) {
      SCOPED_TRACE(c.name + " / " + form_name(f));
      tpa::MultiHeadLatentAttention<> layer(with_form(c.cfg, f), w);
      std::vector<float> y(x.size(), 0.f);
      layer.forward(ctx, rows(x, 0, T, c.cfg.d_model), out_rows(y, 0, T, c.cfg.d_model));
      EXPECT_LE(rel_err(y, ref.y), kTol);
    }
  }
}

TEST(MlaTest, CachedPrefillMatchesNaiveAndCachesLatents) {
  const Index T = 9;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    const MlaWeights w = MlaWeights::random(c.cfg, 8);
    const std::vector<float> x = random_input(T, c.cfg.d_model, 12);
    const NaiveResult ref = naive_mla(c.cfg, w, x, T);
    for (MlaForm f : kForms) {
      SCOPED_TRACE(c.name + " / " + form_name(f));
      tpa::MultiHeadLatentAttention<> layer(with_form(c.cfg, f), w);
      tpa::KVCache<float> cache({layer.cache_layout()}, 4, 16);
      const tpa::SeqId s = cache.add_sequence();
      std::vector<float> y(x.size(), 0.f);
      layer.forward(ctx, rows(x, 0, T, c.cfg.d_model), out_rows(y, 0, T, c.cfg.d_model), cache, 0,
                    s);
      EXPECT_LE(rel_err(y, ref.y), kTol);
      ASSERT_EQ(cache.length(s, 0), T);
      // The cache holds exactly c_kv' and the rotated k_pe of each token.
      const tpa::SeqView<float> v = cache.view(s, 0);
      std::vector<float> ckv, kpe;
      for (Index t = 0; t < T; ++t) {
        ckv.insert(ckv.end(), v.row_at(0, t, 0), v.row_at(0, t, 0) + c.cfg.kv_lora_rank);
        kpe.insert(kpe.end(), v.row_at(1, t, 0), v.row_at(1, t, 0) + c.cfg.qk_rope_head_dim);
      }
      EXPECT_LE(rel_err(ckv, ref.c_kv), kTol);
      EXPECT_LE(rel_err(kpe, ref.k_pe), kTol);
    }
  }
}

TEST(MlaTest, AbsorbedEqualsExplicit) {
  const Index T = 14;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const MlaWeights w = MlaWeights::random(c.cfg, 9);
    const std::vector<float> x = random_input(T, c.cfg.d_model, 13);
    const Index D = c.cfg.d_model;
    tpa::MultiHeadLatentAttention<> absorbed(with_form(c.cfg, MlaForm::kAbsorbed), w);
    tpa::MultiHeadLatentAttention<> expl(with_form(c.cfg, MlaForm::kExplicit), w);
    std::vector<float> ya(x.size()), ye(x.size());
    absorbed.forward(ctx, rows(x, 0, T, D), out_rows(ya, 0, T, D));
    expl.forward(ctx, rows(x, 0, T, D), out_rows(ye, 0, T, D));
    EXPECT_LE(rel_err(ya.data(), ye.data(), ya.size()), kTol);
    // Token-by-token through a cache: every decode step agrees as well.
    tpa::KVCache<float> ca({absorbed.cache_layout()}, 3, 16), ce({expl.cache_layout()}, 3, 16);
    const tpa::SeqId sa = ca.add_sequence(), se = ce.add_sequence();
    for (Index t = 0; t < T; ++t) {
      absorbed.forward(ctx, rows(x, t, 1, D), out_rows(ya, t, 1, D), ca, 0, sa);
      expl.forward(ctx, rows(x, t, 1, D), out_rows(ye, t, 1, D), ce, 0, se);
    }
    EXPECT_LE(rel_err(ya.data(), ye.data(), ya.size()), kTol);
  }
}

TEST(MlaTest, IncrementalDecodeMatchesFullForward) {
  const Index T = 13, prompt = 4;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    const MlaWeights w = MlaWeights::random(c.cfg, 10);
    const std::vector<float> x = random_input(T, c.cfg.d_model, 14);
    const Index D = c.cfg.d_model;
    for (MlaForm f : kForms) {
      SCOPED_TRACE(c.name + " / " + form_name(f));
      tpa::MultiHeadLatentAttention<> layer(with_form(c.cfg, f), w);
      std::vector<float> full(x.size()), inc(x.size());
      layer.forward(ctx, rows(x, 0, T, D), out_rows(full, 0, T, D));
      tpa::KVCache<float> cache({layer.cache_layout()}, 3, 16);  // tokens span several blocks
      const tpa::SeqId s = cache.add_sequence();
      layer.forward(ctx, rows(x, 0, prompt, D), out_rows(inc, 0, prompt, D), cache, 0, s);
      for (Index t = prompt; t < T; ++t)
        layer.forward(ctx, rows(x, t, 1, D), out_rows(inc, t, 1, D), cache, 0, s);
      EXPECT_EQ(cache.length(s, 0), T);
      EXPECT_LE(rel_err(inc.data(), full.data(), inc.size()), kTol);
    }
  }
}

TEST(MlaTest, ChunkedPrefillMatchesFullForward) {
  const Index chunks[] = {5, 1, 4, 3, 2};
  const Index T = 15;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    const MlaWeights w = MlaWeights::random(c.cfg, 11);
    const std::vector<float> x = random_input(T, c.cfg.d_model, 15);
    const Index D = c.cfg.d_model;
    for (MlaForm f : kForms) {
      SCOPED_TRACE(c.name + " / " + form_name(f));
      tpa::MultiHeadLatentAttention<> layer(with_form(c.cfg, f), w);
      std::vector<float> full(x.size()), chunked(x.size());
      layer.forward(ctx, rows(x, 0, T, D), out_rows(full, 0, T, D));
      tpa::KVCache<float> cache({layer.cache_layout()}, 4, 16);
      const tpa::SeqId s = cache.add_sequence();
      Index t = 0;
      for (Index n : chunks) {
        layer.forward(ctx, rows(x, t, n, D), out_rows(chunked, t, n, D), cache, 0, s);
        t += n;
      }
      ASSERT_EQ(t, T);
      EXPECT_LE(rel_err(chunked.data(), full.data(), chunked.size()), kTol);
    }
  }
}

TEST(MlaTest, RaggedBatchDecodeMatchesEachSequenceAlone) {
  const std::vector<Index> prompts = {2, 7, 4};
  const std::size_t n_seqs = prompts.size();
  const Index steps = 4;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    const MlaWeights w = MlaWeights::random(c.cfg, 12);
    const Index D = c.cfg.d_model;
    std::vector<std::vector<float>> xs;
    for (std::size_t i = 0; i < n_seqs; ++i)
      xs.push_back(random_input(prompts[i] + steps, D, 100 + i));
    for (MlaForm f : kForms) {
      SCOPED_TRACE(c.name + " / " + form_name(f));
      tpa::MultiHeadLatentAttention<> layer(with_form(c.cfg, f), w);
      // Alone: each sequence in its own cache, token by token after its prompt.
      std::vector<std::vector<float>> alone;
      for (std::size_t i = 0; i < n_seqs; ++i) {
        tpa::KVCache<float> cache({layer.cache_layout()}, 4, 16);
        const tpa::SeqId s = cache.add_sequence();
        const std::vector<float>& x = xs[i];
        std::vector<float> y(x.size());
        layer.forward(ctx, rows(x, 0, prompts[i], D), out_rows(y, 0, prompts[i], D), cache, 0, s);
        for (Index t = prompts[i]; t < prompts[i] + steps; ++t)
          layer.forward(ctx, rows(x, t, 1, D), out_rows(y, t, 1, D), cache, 0, s);
        alone.push_back(y);
      }
      // Together: one shared cache, prompts one by one, then batched decode in a shuffled order.
      tpa::KVCache<float> cache({layer.cache_layout()}, 4, 32);
      std::vector<tpa::SeqId> ids;
      std::vector<std::vector<float>> ys;
      for (std::size_t i = 0; i < n_seqs; ++i) {
        ids.push_back(cache.add_sequence());
        ys.emplace_back(xs[i].size());
        layer.forward(ctx, rows(xs[i], 0, prompts[i], D), out_rows(ys[i], 0, prompts[i], D), cache,
                      0, ids.back());
      }
      const std::size_t order[3] = {2, 0, 1};
      for (Index step = 0; step < steps; ++step) {
        std::vector<float> xb(n_seqs * static_cast<std::size_t>(D)), yb(xb.size());
        std::vector<tpa::SeqId> seqs;
        for (std::size_t b = 0; b < n_seqs; ++b) {
          const std::size_t i = order[b];
          std::copy_n(xs[i].begin() + (prompts[i] + step) * D, D,
                      xb.begin() + static_cast<Index>(b) * D);
          seqs.push_back(ids[i]);
        }
        // Decode is absorbed unless the config forces the explicit form.
        EXPECT_EQ(layer.form_for(1, prompts[order[0]] + step),
                  f == MlaForm::kExplicit ? MlaForm::kExplicit : MlaForm::kAbsorbed);
        layer.decode(ctx, rows(xb, 0, 3, D), out_rows(yb, 0, 3, D), cache, 0, seqs);
        for (std::size_t b = 0; b < n_seqs; ++b) {
          const std::size_t i = order[b];
          std::copy_n(yb.begin() + static_cast<Index>(b) * D, D,
                      ys[i].begin() + (prompts[i] + step) * D);
        }
      }
      for (std::size_t i = 0; i < n_seqs; ++i) {
        EXPECT_EQ(cache.length(ids[i], 0), prompts[i] + steps);
        EXPECT_LE(rel_err(ys[i].data(), alone[i].data(), ys[i].size()), kTol) << "sequence " << i;
      }
    }
  }
}

TEST(MlaTest, ReferenceBackendAndNativeAgree) {
  const Index T = 10;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const MlaWeights w = MlaWeights::random(c.cfg, 13);
    const std::vector<float> x = random_input(T, c.cfg.d_model, 16);
    const Index D = c.cfg.d_model;
    tpa::MultiHeadLatentAttention<tpa::Reference> ref(c.cfg, w);
    tpa::MultiHeadLatentAttention<tpa::Portable> portable(c.cfg, w);
    tpa::MultiHeadLatentAttention<tpa::Native> native(c.cfg, w);
    std::vector<float> yr(x.size()), yp(x.size()), yn(x.size());
    ref.forward(ctx, rows(x, 0, T, D), out_rows(yr, 0, T, D));
    portable.forward(ctx, rows(x, 0, T, D), out_rows(yp, 0, T, D));
    native.forward(ctx, rows(x, 0, T, D), out_rows(yn, 0, T, D));
    EXPECT_LE(rel_err(yp.data(), yr.data(), yr.size()), kTol);
    EXPECT_LE(rel_err(yn.data(), yr.data(), yr.size()), kTol);
  }
}

template <class S>
void check_low_precision_cache(double tol) {
  const Index T = 12, prompt = 5;
  tpa::Context ctx(1);
  for (const Case& c : cases()) {
    const MlaWeights w = MlaWeights::random(c.cfg, 14);
    const std::vector<float> x = random_input(T, c.cfg.d_model, 17);
    const NaiveResult ref = naive_mla(c.cfg, w, x, T);
    const Index D = c.cfg.d_model;
    for (MlaForm f : kForms) {
      SCOPED_TRACE(c.name + " / " + form_name(f));
      tpa::MultiHeadLatentAttention<tpa::Native, S> layer(with_form(c.cfg, f), w);
      tpa::KVCache<S> cache({layer.cache_layout()}, 4, 16);
      EXPECT_EQ(cache.bytes_per_token(),
                sizeof(S) * static_cast<std::size_t>(c.cfg.kv_lora_rank + c.cfg.qk_rope_head_dim));
      const tpa::SeqId s = cache.add_sequence();
      std::vector<float> y(x.size());
      layer.forward(ctx, rows(x, 0, prompt, D), out_rows(y, 0, prompt, D), cache, 0, s);
      for (Index t = prompt; t < T; ++t)
        layer.forward(ctx, rows(x, t, 1, D), out_rows(y, t, 1, D), cache, 0, s);
      // The prompt's own attention reads the rounded cache too, so every row sees rounding.
      EXPECT_LE(rel_err(y, ref.y), tol);
      EXPECT_GT(rel_err(y, ref.y), 1e-7);  // really rounded
    }
  }
}

TEST(MlaTest, Bfloat16CacheStaysClose) { check_low_precision_cache<tpa::bfloat16>(1e-2); }
TEST(MlaTest, HalfCacheStaysClose) { check_low_precision_cache<tpa::half>(2e-3); }

TEST(MlaTest, CacheLayoutIsLatentOnly) {
  const Case c = cases()[0];
  tpa::MultiHeadLatentAttention<> layer(c.cfg, MlaWeights::random(c.cfg, 1));
  EXPECT_EQ(layer.kind(), "MLA");
  const tpa::CacheLayout l = layer.cache_layout();
  ASSERT_EQ(l.num_factors(), 2u);
  EXPECT_EQ(l.factor(0), (tpa::FactorSpec{"c_kv", 1, c.cfg.kv_lora_rank, false}));
  EXPECT_EQ(l.factor(1), (tpa::FactorSpec{"k_pe", 1, c.cfg.qk_rope_head_dim, true}));
  EXPECT_EQ(l.elements_per_token(), c.cfg.kv_lora_rank + c.cfg.qk_rope_head_dim);
}

// SPEC.md medium MLA: H 23, D 1024, d_cq 1024, d_c 512, d_n 64, d_R 32, d_v 64 → 544 per token.
TEST(MlaTest, MediumShapeCachesFiveHundredFortyFourElementsPerToken) {
  MlaConfig c = make_cfg(1024, 23, 1024, 512, 64, 32, 64);
  c.rope.max_positions = 2048;
  tpa::MultiHeadLatentAttention<> layer(c, MlaWeights::random(c, 3));
  EXPECT_EQ(layer.cache_layout().elements_per_token(), 544);
  // 24 layers as in the reference model.
  tpa::KVCache<float> cache(std::vector<tpa::CacheLayout>(24, layer.cache_layout()), 16, 8);
  EXPECT_EQ(cache.bytes_per_token(0), 544u * 4u);
  EXPECT_EQ(cache.bytes_per_token(), 24u * 544u * 4u);
  tpa::KVCache<tpa::bfloat16> cache16({layer.cache_layout()}, 16, 8);
  EXPECT_EQ(cache16.bytes_per_token(), 544u * 2u);
  // MHA with the same 23 heads of the 96-dim query/key and 64-dim value would cache
  // 23·(96 + 64) = 3680 elements per token; MLA caches 544.
  // kAuto: absorbed for decode at any length, explicit for a long prompt (fewer multiply-adds).
  EXPECT_FALSE(layer.folds_query());
  EXPECT_FALSE(layer.folds_output());
  EXPECT_EQ(layer.form_for(1, 1), MlaForm::kAbsorbed);
  EXPECT_EQ(layer.form_for(1, 2000), MlaForm::kAbsorbed);
  EXPECT_EQ(layer.form_for(1024, 0), MlaForm::kExplicit);
  // A decode step of the medium shape through the real cache: bytes_used grows by 544·4.
  tpa::Context ctx(1);
  const tpa::SeqId s = cache16.add_sequence();
  const std::vector<float> x = random_input(3, 1024, 5);
  std::vector<float> y(x.size());
  tpa::MultiHeadLatentAttention<tpa::Native, tpa::bfloat16> layer16(c, layer.weights());
  layer16.forward(ctx, rows(x, 0, 2, 1024), out_rows(y, 0, 2, 1024), cache16, 0, s);
  const std::size_t before = cache16.bytes_used();
  layer16.forward(ctx, rows(x, 2, 1, 1024), out_rows(y, 2, 1, 1024), cache16, 0, s);
  EXPECT_EQ(cache16.bytes_used() - before, 544u * 2u);
  for (float v : y) EXPECT_TRUE(std::isfinite(v));
}

// Expects a tpa::Error whose message contains every one of `parts`.
template <class F>
void expect_error(F&& f, std::initializer_list<const char*> parts) {
  try {
    f();
    ADD_FAILURE() << "expected tpa::Error";
  } catch (const tpa::Error& e) {
    const std::string msg = e.what();
    for (const char* p : parts)
      EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
  }
}

TEST(MlaTest, InvalidConfigsThrowNamingValueAndRule) {
  const MlaConfig good = make_cfg(32, 4, 16, 8, 8, 4, 8);
  EXPECT_NO_THROW(good.validate());
  auto bad = [&](auto mutate, std::initializer_list<const char*> parts) {
    MlaConfig c = good;
    mutate(c);
    expect_error([&] { c.validate(); }, parts);
    expect_error([&] { tpa::MultiHeadLatentAttention<> l(c, MlaWeights::random(good, 1)); }, parts);
  };
  bad([](MlaConfig& c) { c.d_model = 0; }, {"MultiHeadLatentAttention", "d_model (0)"});
  bad([](MlaConfig& c) { c.n_heads = 0; }, {"n_heads (0)", ">= 1"});
  bad([](MlaConfig& c) { c.q_lora_rank = -2; }, {"q_lora_rank (-2)", ">= 0"});
  bad([](MlaConfig& c) { c.kv_lora_rank = 0; }, {"kv_lora_rank (0)", ">= 1"});
  bad([](MlaConfig& c) { c.qk_nope_head_dim = 0; }, {"qk_nope_head_dim (0)"});
  bad([](MlaConfig& c) { c.qk_rope_head_dim = 0; }, {"qk_rope_head_dim (0)"});
  bad([](MlaConfig& c) { c.v_head_dim = -1; }, {"v_head_dim (-1)"});
  bad([](MlaConfig& c) { c.softmax_scale = -0.5f; }, {"softmax_scale (-0.5)"});
  bad([](MlaConfig& c) { c.softmax_scale = std::numeric_limits<float>::quiet_NaN(); },
      {"softmax_scale"});
  bad([](MlaConfig& c) { c.norm_eps = 0.f; }, {"norm_eps (0)", "> 0"});
  bad([](MlaConfig& c) { c.form = static_cast<MlaForm>(7); }, {"form (7)"});
  bad([](MlaConfig& c) { c.rope.rotary_dim = 6; }, {"rotary_dim (6)", "larger", "(4)"});
  bad([](MlaConfig& c) { c.rope.rotary_dim = 3; }, {"rotary dim (3)", "even"});
  bad([](MlaConfig& c) { c.qk_rope_head_dim = 5; }, {"rotary dim (5)", "even"});
  bad([](MlaConfig& c) { c.rope.base = 0; }, {"rope.base (0)"});
  bad([](MlaConfig& c) { c.rope.max_positions = 0; }, {"max_positions (0)"});
}

TEST(MlaTest, WrongWeightsThrowNamingTheWeight) {
  const MlaConfig c = make_cfg(32, 4, 16, 8, 8, 4, 8);
  auto bad = [&](auto mutate, std::initializer_list<const char*> parts) {
    MlaWeights w = MlaWeights::random(c, 1);
    mutate(w);
    expect_error([&] { tpa::MultiHeadLatentAttention<> l(c, w); }, parts);
  };
  bad([](MlaWeights& w) { w.q_a_proj.resize(15, 32); },
      {"q_a_proj.weight", "[15, 32]", "[16, 32]"});
  bad([](MlaWeights& w) { w.q_a_layernorm.resize(3); }, {"q_a_layernorm.weight", "[3]"});
  bad([](MlaWeights& w) { w.q_b_proj.resize(47, 16); }, {"q_b_proj.weight", "[48, 16]"});
  bad([](MlaWeights& w) { w.q_proj.resize(48, 32); }, {"q_proj.weight", "q_lora_rank (16)"});
  bad([](MlaWeights& w) { w.kv_a_proj_with_mqa.resize(8, 32); },
      {"kv_a_proj_with_mqa.weight", "[12, 32]"});
  bad([](MlaWeights& w) { w.kv_a_layernorm.resize(12); }, {"kv_a_layernorm.weight", "[8]"});
  bad([](MlaWeights& w) { w.kv_b_proj.resize(60, 8); }, {"kv_b_proj.weight", "[64, 8]"});
  bad([](MlaWeights& w) { w.c_proj.resize(32, 64); }, {"c_proj.weight", "[32, 32]"});
  // q_lora_rank 0: the plain q_proj, and the q_a/q_b weights must be absent.
  MlaConfig c0 = c;
  c0.q_lora_rank = 0;
  MlaWeights w0 = MlaWeights::random(c0, 2);
  EXPECT_EQ(w0.q_a_proj.size(), 0);
  EXPECT_EQ(w0.q_proj.rows(), 48);
  EXPECT_NO_THROW({ tpa::MultiHeadLatentAttention<> l(c0, w0); });
  w0.q_b_proj = MlaWeights::random(c, 2).q_b_proj;
  expect_error([&] { tpa::MultiHeadLatentAttention<> l(c0, w0); },
               {"q_proj.weight", "q_lora_rank (0)"});
}

TEST(MlaTest, BadCallsThrowAndLeaveTheCacheUnchanged) {
  MlaConfig c = make_cfg(32, 4, 16, 8, 8, 4, 8);
  c.rope.max_positions = 12;
  const MlaWeights w = MlaWeights::random(c, 4);
  const Index D = c.d_model;
  tpa::Context ctx(1);
  for (MlaForm f : kForms) {
    SCOPED_TRACE(form_name(f));
    tpa::MultiHeadLatentAttention<> layer(with_form(c, f), w);
    // block_tokens 4, max_blocks 5: 20 tokens of room for all sequences together.
    tpa::KVCache<float> cache({layer.cache_layout()}, 4, 5);
    const tpa::SeqId a = cache.add_sequence(), b = cache.add_sequence(), e = cache.add_sequence();
    const std::vector<float> x = random_input(16, D, 21);
    std::vector<float> y(x.size());
    layer.forward(ctx, rows(x, 0, 5, D), out_rows(y, 0, 5, D), cache, 0, a);  // 2 blocks
    layer.forward(ctx, rows(x, 5, 2, D), out_rows(y, 5, 2, D), cache, 0, b);  // 1 block
    const std::vector<float> snap_a = snapshot(cache, a, 0), snap_b = snapshot(cache, b, 0);
    const std::size_t used = cache.bytes_used();
    const Index blocks = cache.available_blocks();
    ASSERT_EQ(blocks, 2);
    auto unchanged = [&] {
      EXPECT_EQ(cache.length(a, 0), 5);
      EXPECT_EQ(cache.length(b, 0), 2);
      EXPECT_EQ(cache.length(e, 0), 0);
      EXPECT_EQ(cache.bytes_used(), used);
      EXPECT_EQ(cache.available_blocks(), blocks);
      EXPECT_EQ(snapshot(cache, a, 0), snap_a);
      EXPECT_EQ(snapshot(cache, b, 0), snap_b);
    };
    std::vector<float> wide(static_cast<std::size_t>(2 * (D + 1)));
    std::vector<float> out(static_cast<std::size_t>(4 * D));
    // Wrong shapes.
    expect_error(
        [&] {
          layer.forward(ctx, tpa::ConstTensorView<float, 2>(wide.data(), 2, D + 1),
                        tpa::TensorView<float, 2>(wide.data(), 2, D + 1), cache, 0, a);
        },
        {"d_model (32)"});
    expect_error([&] { layer.forward(ctx, rows(x, 0, 2, D), out_rows(out, 0, 3, D), cache, 0, a); },
                 {"y is [3, 32]"});
    expect_error([&] { layer.forward(ctx, rows(x, 0, 0, D), out_rows(out, 0, 0, D), cache, 0, a); },
                 {"0 tokens"});
    unchanged();
    // Unknown sequence, bad layer, foreign layout.
    expect_error([&] { layer.forward(ctx, rows(x, 0, 1, D), out_rows(out, 0, 1, D), cache, 0, 7); },
                 {"sequence 7"});
    expect_error([&] { layer.forward(ctx, rows(x, 0, 1, D), out_rows(out, 0, 1, D), cache, 1, a); },
                 {"layer (1)"});
    MlaConfig other = c;
    other.kv_lora_rank = 6;
    tpa::MultiHeadLatentAttention<> other_layer(other, MlaWeights::random(other, 1));
    expect_error(
        [&] { other_layer.forward(ctx, rows(x, 0, 1, D), out_rows(out, 0, 1, D), cache, 0, a); },
        {"layout"});
    unchanged();
    // Past the RoPE table (12 positions): a holds 5, 8 more would reach position 12 (the two
    // blocks they need are available).
    expect_error([&] { layer.forward(ctx, rows(x, 0, 8, D), out_rows(y, 0, 8, D), cache, 0, a); },
                 {"position 12", "max_positions = 12"});
    // The pool is full: 12 tokens (inside the RoPE table) on e need 3 blocks, 2 are left.
    expect_error([&] { layer.forward(ctx, rows(x, 0, 12, D), out_rows(y, 0, 12, D), cache, 0, e); },
                 {"cache is full"});
    unchanged();
    // Batched decode: wrong count, a repeated sequence, one unknown sequence among good ones.
    expect_error(
        [&] { layer.decode(ctx, rows(x, 0, 2, D), out_rows(out, 0, 2, D), cache, 0, {a}); },
        {"1 sequences for 2 rows"});
    expect_error(
        [&] {
          layer.decode(ctx, rows(x, 0, 2, D), out_rows(out, 0, 2, D), cache, 0, {a, a});
        },
        {"more than once"});
    expect_error(
        [&] {
          layer.decode(ctx, rows(x, 0, 3, D), out_rows(out, 0, 3, D), cache, 0, {a, b, 9});
        },
        {"sequence 9"});
    unchanged();
    // Still fully usable: the next token gives what an untouched cache gives.
    tpa::KVCache<float> fresh({layer.cache_layout()}, 4, 4);
    const tpa::SeqId fa = fresh.add_sequence();
    std::vector<float> y_fresh(x.size());
    layer.forward(ctx, rows(x, 0, 5, D), out_rows(y_fresh, 0, 5, D), fresh, 0, fa);
    layer.forward(ctx, rows(x, 5, 1, D), out_rows(y_fresh, 5, 1, D), fresh, 0, fa);
    layer.forward(ctx, rows(x, 5, 1, D), out_rows(out, 0, 1, D), cache, 0, a);
    EXPECT_EQ(std::vector<float>(out.begin(), out.begin() + D),
              std::vector<float>(y_fresh.begin() + 5 * D, y_fresh.begin() + 6 * D));
  }
}

TEST(MlaTest, NoCacheForwardChecksItsInputs) {
  MlaConfig c = make_cfg(32, 4, 0, 8, 8, 4, 8);
  c.rope.max_positions = 6;
  tpa::MultiHeadLatentAttention<> layer(c, MlaWeights::random(c, 5));
  tpa::Context ctx(1);
  const std::vector<float> x = random_input(7, 32, 1);
  std::vector<float> y(x.size());
  expect_error([&] { layer.forward(ctx, rows(x, 0, 7, 32), out_rows(y, 0, 7, 32)); },
               {"position 6"});
  expect_error([&] { layer.forward(ctx, rows(x, 0, 2, 32), out_rows(y, 0, 3, 32)); },
               {"y is [3, 32]"});
  EXPECT_NO_THROW(layer.forward(ctx, rows(x, 0, 6, 32), out_rows(y, 0, 6, 32)));
}

}  // namespace mla_test
