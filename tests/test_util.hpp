// Helpers shared by the tests: random inputs, error measures, snapshots of a cache's state for
// checking that a throwing call changed nothing, every layer kind behind one interface, and the
// backend list and helpers of the kernel tests.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include <tpa/dispatch/split.hpp>
#include <tpa/tpa.hpp>

namespace tpa_test {

using tpa::Index;

/// [rows, cols] tensor of U(-1, 1) values from a seeded generator.
inline tpa::Tensor<float, 2> random_tensor(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  tpa::Tensor<float, 2> t(rows, cols);
  for (Index i = 0; i < t.size(); ++i) t.data()[i] = u(rng);
  return t;
}

/// Rows [r0, r0 + n) of a [rows, cols] tensor.
inline tpa::Tensor<float, 2> rows(const tpa::Tensor<float, 2>& t, Index r0, Index n) {
  tpa::Tensor<float, 2> out(n, t.dimension(1));
  std::copy(t.data() + r0 * t.dimension(1), t.data() + (r0 + n) * t.dimension(1), out.data());
  return out;
}

/// max |a − b| / max(1e-30, max |b|): error relative to the reference's scale.
template <class A, class B>
double rel_err(const A& a, const B& b, Index n) {
  double num = 0, den = 0;
  for (Index i = 0; i < n; ++i) {
    num = std::max(num, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
    den = std::max(den, std::abs(static_cast<double>(b[i])));
  }
  return num / std::max(den, 1e-30);
}

/// Everything observable about a cache: per sequence its lengths, block table and contents.
template <class S>
struct CacheSnapshot {
  std::vector<std::vector<Index>> lengths;
  std::vector<std::vector<std::int32_t>> tables;
  std::vector<std::vector<float>> contents;
  std::size_t used = 0, reserved = 0;
  Index sequences = 0;

  bool operator==(const CacheSnapshot& o) const {
    return lengths == o.lengths && tables == o.tables && contents == o.contents &&
           used == o.used && reserved == o.reserved && sequences == o.sequences;
  }
};

/// Snapshot of the listed sequences of `cache`.
template <class S>
CacheSnapshot<S> snapshot(const tpa::KVCache<S>& cache, const std::vector<tpa::SeqId>& seqs) {
  CacheSnapshot<S> s;
  s.used = cache.bytes_used();
  s.reserved = cache.bytes_reserved();
  s.sequences = cache.num_sequences();
  for (auto id : seqs) {
    std::vector<Index> len;
    std::vector<float> data;
    for (int l = 0; l < cache.num_layers(); ++l) {
      len.push_back(cache.length(id, l));
      const auto view = cache.view(id, l);
      for (std::size_t f = 0; f < cache.layout(l).num_factors(); ++f)
        for (Index t = 0; t < view.n_tokens; ++t)
          for (Index e = 0; e < view.elements(f); ++e)
            data.push_back(view.value(f, t, e / view.cols(f), e % view.cols(f)));
    }
    s.lengths.push_back(len);
    s.tables.push_back(cache.block_table(id));
    s.contents.push_back(data);
  }
  return s;
}

/// Hand-written double-precision RoPE of SPEC.md (independent of tpa::RopeTable): rotates the
/// first r dims of v (size dim) to position p.
inline void rope_ref(double* v, Index r, Index p, tpa::RopeStyle style, double base) {
  const Index half = r / 2;
  const double s = style == tpa::RopeStyle::kHalfSplitReversed ? -1.0 : 1.0;
  for (Index i = 0; i < half; ++i) {
    const double phi = s * static_cast<double>(p) * std::pow(base, -2.0 * i / static_cast<double>(r));
    const Index ia = style == tpa::RopeStyle::kInterleaved ? 2 * i : i;
    const Index ib = style == tpa::RopeStyle::kInterleaved ? 2 * i + 1 : i + half;
    const double a = v[ia], b = v[ib];
    v[ia] = a * std::cos(phi) - b * std::sin(phi);
    v[ib] = a * std::sin(phi) + b * std::cos(phi);
  }
}

// ---- every layer kind behind one interface -----------------------------------------------------

/// A layer of any kind behind one interface, so that one table of cases runs on every kind.
struct AnyLayer {
  using Tensor2 = tpa::Tensor<float, 2>;
  std::string name;
  tpa::CacheLayout layout;
  /// forward(ctx, x, y): without a cache.
  std::function<void(tpa::Context&, const Tensor2&, Tensor2&)> forward;
  /// forward_cached(ctx, x, y, cache, layer, seq): the rows of x are seq's next tokens.
  std::function<void(tpa::Context&, const Tensor2&, Tensor2&, tpa::KVCache<float>&, int,
                     tpa::SeqId)>
      forward_cached;
  /// decode(ctx, x, y, cache, layer, seqs): row i of x is the next token of seqs[i].
  std::function<void(tpa::Context&, const Tensor2&, Tensor2&, tpa::KVCache<float>&, int,
                     const std::vector<tpa::SeqId>&)>
      decode;
  /// ragged(ctx, x, y, cache, layer, chunks): the ragged call.
  std::function<void(tpa::Context&, const Tensor2&, Tensor2&, tpa::KVCache<float>&, int,
                     const std::vector<tpa::Chunk>&)>
      ragged;
};

/// `l` behind the AnyLayer interface, named `name`.
template <class L>
AnyLayer wrap(std::string name, std::shared_ptr<const L> l) {
  using Tensor2 = AnyLayer::Tensor2;
  AnyLayer a;
  a.name = std::move(name);
  a.layout = l->cache_layout();
  a.forward = [l](tpa::Context& ctx, const Tensor2& x, Tensor2& y) { l->forward(ctx, x, y); };
  a.forward_cached = [l](tpa::Context& ctx, const Tensor2& x, Tensor2& y, tpa::KVCache<float>& c,
                         int layer, tpa::SeqId s) { l->forward(ctx, x, y, c, layer, s); };
  a.decode = [l](tpa::Context& ctx, const Tensor2& x, Tensor2& y, tpa::KVCache<float>& c, int layer,
                 const std::vector<tpa::SeqId>& seqs) { l->decode(ctx, x, y, c, layer, seqs); };
  a.ragged = [l](tpa::Context& ctx, const Tensor2& x, Tensor2& y, tpa::KVCache<float>& c, int layer,
                 const std::vector<tpa::Chunk>& chunks) { l->forward(ctx, x, y, c, layer, chunks); };
  return a;
}

/// Every kind, with random weights (seeds 1–6): GQA (g as given), MHA (g with n_kv_heads =
/// n_heads), MQA (n_kv_heads = 1), TPA (t), TPA-KV (t with kv_only), and MLA (m) in the absorbed
/// and the explicit form.
inline std::vector<AnyLayer> all_kinds(tpa::GqaConfig g, tpa::TpaConfig t, tpa::MlaConfig m) {
  std::vector<AnyLayer> v;
  v.push_back(wrap("GQA", std::make_shared<const tpa::GroupedQueryAttention<>>(
                              g, tpa::GqaWeights::random(g, 1))));
  g.n_kv_heads = g.n_heads;
  v.push_back(wrap(
      "MHA", std::make_shared<const tpa::MultiHeadAttention<>>(g, tpa::GqaWeights::random(g, 2))));
  g.n_kv_heads = 1;
  v.push_back(wrap(
      "MQA", std::make_shared<const tpa::MultiQueryAttention<>>(g, tpa::GqaWeights::random(g, 3))));
  v.push_back(wrap("TPA", std::make_shared<const tpa::TensorProductAttention<>>(
                              t, tpa::TpaWeights::random(t, 4))));
  t.kv_only = true;
  v.push_back(wrap("TPA-KV", std::make_shared<const tpa::TensorProductAttention<>>(
                                 t, tpa::TpaWeights::random(t, 5))));
  for (auto form : {tpa::MlaForm::kAbsorbed, tpa::MlaForm::kExplicit}) {
    m.form = form;
    v.push_back(wrap(
        form == tpa::MlaForm::kAbsorbed ? "MLA-absorbed" : "MLA-explicit",
        std::make_shared<const tpa::MultiHeadLatentAttention<>>(m, tpa::MlaWeights::random(m, 6))));
  }
  return v;
}

// ---- kernel tests ------------------------------------------------------------------------------

/// Unit roundoff of f32 (2⁻²⁴), the u of the kernel tests' error bounds.
constexpr double kU = 1.0 / (1 << 24);

/// Every backend compiled in (Reference aside, which the kernel tests compare against).
using Backends = ::testing::Types<tpa::Portable
#if defined(TPA_HAVE_AVX2)
                                  ,
                                  tpa::Avx2
#endif
#if defined(TPA_HAVE_AVX512)
                                  ,
                                  tpa::Avx512
#endif
                                  >;
/// Every backend compiled in, the double-precision Reference included (tests of whole layers
/// and models, where Reference is one more backend under test).
using AllBackends = ::testing::Types<tpa::Reference, tpa::Portable
#if defined(TPA_HAVE_AVX2)
                                     ,
                                     tpa::Avx2
#endif
#if defined(TPA_HAVE_AVX512)
                                     ,
                                     tpa::Avx512
#endif
                                     >;
/// Names the typed tests after the backend.
struct BackendName {
  template <class B>
  static std::string GetName(int) {
    return B::name;
  }
};

/// The body of a kernel suite's CompiledBackends test: skips, naming the missing backend, unless
/// every SIMD backend is compiled (so a run on a machine or with flags lacking one says so).
inline void check_compiled_backends() {
#if !defined(TPA_HAVE_AVX2)
  GTEST_SKIP() << "Avx2 backend not compiled: the compiler flags do not enable AVX2 and FMA";
#elif !defined(TPA_HAVE_AVX512)
  GTEST_SKIP() << "Avx512 backend not compiled: the compiler flags do not enable AVX-512F/BW/VL";
#else
  SUCCEED() << "Portable, Avx2 and Avx512 are all tested";
#endif
}

/// Appends n_tokens tokens to layer 0 of `seq`: for each factor of `f` in turn, n_tokens rows of
/// values from draw(); appended in uneven chunks of 1–23 tokens, so blocks fill across calls and
/// the last one is partial.
template <class S, class Draw>
void append_random_tokens(tpa::KVCache<S>& cache, tpa::SeqId seq,
                          const std::vector<tpa::FactorSpec>& f, Index n_tokens, Draw&& draw) {
  std::vector<std::vector<float>> data(f.size());
  for (std::size_t i = 0; i < f.size(); ++i) {
    data[i].resize(static_cast<std::size_t>(n_tokens * f[i].elements()));
    for (auto& x : data[i]) x = draw();
  }
  for (Index t = 0; t < n_tokens;) {
    const Index n = std::min<Index>(n_tokens - t, 1 + (t * 7 + 5) % 23);
    std::vector<tpa::FactorRows> rows;
    for (std::size_t i = 0; i < f.size(); ++i)
      rows.push_back({data[i].data() + t * f[i].elements(), f[i].elements()});
    cache.append(seq, 0, n, rows.data());
    t += n;
  }
}

/// max_k |o_k − ref_k| / tol_k over the elements of `o` (ref and tol at least as long): ≤ 1 is
/// within tolerance; ∞ on NaN.
template <class Ref>
double tol_ratio(const std::vector<float>& o, const Ref& ref, const std::vector<double>& tol) {
  double e = 0;
  for (std::size_t k = 0; k < o.size(); ++k) {
    const double d = std::abs(static_cast<double>(o[k]) - static_cast<double>(ref[k]));
    if (!(d == d)) return std::numeric_limits<double>::infinity();
    e = std::max(e, d / tol[k]);
  }
  return e;
}

/// Split against unsplit, for a kernel test's problem `pr` (error(o): error over tolerance;
/// tol: per-element tolerance): run(threads, workers) → the output with the work cut into
/// `workers` pieces. The unsplit output (1, 1) and each split into 2, 3 and 7 pieces on 1 and 2
/// threads must be within tolerance, the splits also of the unsplit output (both are f32
/// evaluations of the same quantity).
template <class Problem, class Run>
void expect_splits_equal_unsplit(const Problem& pr, const Run& run) {
  const std::vector<float> whole = run(1, 1);
  EXPECT_LE(pr.error(whole), 1.0);
  for (int workers : {2, 3, 7}) {
    for (int threads : {1, 2}) {
      const std::vector<float> o = run(threads, workers);
      EXPECT_LE(tol_ratio(o, whole, pr.tol), 1.0)
          << workers << " pieces, " << threads << " threads";
      EXPECT_LE(pr.error(o), 1.0) << workers << " pieces, " << threads << " threads";
    }
  }
}

/// A split into exactly `workers` pieces, however small the work (the kernel tests force splits
/// of small problems).
inline tpa::GroupedSplit forced_split(int workers) {
  tpa::GroupedSplit split;
  split.max_workers = workers;
  split.min_work_per_worker = 0;
  split.min_work_per_piece = 0;  // decode calls in as many key pieces as allowed
  return split;
}

}  // namespace tpa_test
