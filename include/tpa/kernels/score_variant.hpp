// Score post-processing of the attention variants (ScoreVariant, params.hpp) shared by the tiled
// kernels: a vector tanh for the soft-cap, ALiBi biases, window masks, and the sink term of the
// softmax denominator. Only called when a variant is on; the plain kernels never reach it.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "tpa/core/tensor.hpp"
#include "tpa/kernels/params.hpp"

namespace tpa {
namespace detail {

/// tanh(x) lane-wise from the vector primitives of Ops (max, mul, fmadd, div, set1, sub, zero):
/// x clamped to ±7.905 (where tanh rounds to ±1 in f32), then the odd rational approximation
/// x·P(x²)/Q(x²) of Eigen's generic_fast_tanh_float (max. error a few ulp; near 0 it is
/// x·(1 − 1.3e-7), so c·tanh(z/c) → z as c → ∞).
template <class Ops>
inline typename Ops::V vtanh(typename Ops::V x) {
  using V = typename Ops::V;
  const V lo = Ops::set1(-7.90531110763549805f);
  // clamp(x, lo, −lo), with min(x, −lo) = −max(−x, lo)
  x = Ops::max(lo, Ops::sub(Ops::zero(), Ops::max(lo, Ops::sub(Ops::zero(), x))));
  const V x2 = Ops::mul(x, x);
  V p = Ops::set1(-2.76076847742355e-16f);
  p = Ops::fmadd(x2, p, Ops::set1(2.00018790482477e-13f));
  p = Ops::fmadd(x2, p, Ops::set1(-8.60467152213735e-11f));
  p = Ops::fmadd(x2, p, Ops::set1(5.12229709037114e-08f));
  p = Ops::fmadd(x2, p, Ops::set1(1.48572235717979e-05f));
  p = Ops::fmadd(x2, p, Ops::set1(6.37261928875436e-04f));
  p = Ops::fmadd(x2, p, Ops::set1(4.89352455891786e-03f));
  p = Ops::mul(x, p);
  V q = Ops::set1(1.19825839466702e-06f);
  q = Ops::fmadd(x2, q, Ops::set1(1.18534705686654e-04f));
  q = Ops::fmadd(x2, q, Ops::set1(2.26843463243900e-03f));
  q = Ops::fmadd(x2, q, Ops::set1(4.89352518554385e-03f));
  return Ops::div(p, q);
}

/// s[0 … n) ← c·tanh(s/c), n a multiple of Ops::kWidth, s aligned to it.
template <class Ops>
inline void softcap_scores(float* s, Index n, float c) {
  const typename Ops::V cv = Ops::set1(c), inv = Ops::set1(1.f / c);
  for (Index j = 0; j < n; j += Ops::kWidth)
    Ops::store(s + j, Ops::mul(cv, vtanh<Ops>(Ops::mul(Ops::load(s + j), inv))));
}

/// 1 / (l + e^(sink − m)): the normaliser of a row whose online-softmax state is (m, l), with
/// the sink logit in the denominator (0 for a row that saw no key). sink = −inf gives 1 / l.
inline float sink_normalizer(float m, float l, float sink) {
  if (!(l > 0.f)) return 0.f;
  return 1.f / (l + std::exp(sink - m));
}

/// Σ_{i<n_q} (keys query i sees): pairs of (query, key) of a call whose queries sit at q_pos0 …
/// q_pos0 + n_q − 1, with a window of `window` keys (0: none). For work splits.
inline double causal_pairs(Index n_q, Index q_pos0, Index window) {
  const double n = static_cast<double>(n_q), a = static_cast<double>(q_pos0) + 1;
  if (window <= 0) return n * (a - 1) + 0.5 * n * (n + 1);
  // Queries i with q_pos0 + i + 1 ≤ W see all their causal keys, the rest W each.
  const Index c1 = std::clamp<Index>(window - q_pos0, 0, n_q);
  const double c = static_cast<double>(c1);
  return c * a + 0.5 * c * (c - 1) + (n - c) * static_cast<double>(window);
}

}  // namespace detail
}  // namespace tpa
