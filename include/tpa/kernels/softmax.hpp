// Online softmax: the running state of one query row over a subset of keys, and the exact
// log-sum-exp merge of two such states (split-K decode, shared-prefix merges).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>

#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief Online-softmax state of one query row over a subset K of the keys it sees:
///   m   = max_{t∈K} s_t                      (−inf while K is empty)
///   l   = Σ_{t∈K} exp(s_t − m)
///   acc = Σ_{t∈K} exp(s_t − m) · v_t          (dim floats, not normalised)
/// so softmax(s)·V over K is acc / l, and log Σ exp(s_t) is m + log l.
///
/// m and l are held by value; acc points at caller storage of `dim` floats (scratch, so that
/// many states cost no allocation). Copying a state copies the pointer, not the accumulator.
/// All arithmetic is f32. Scores s_t are already scaled (softmax scale applied).
struct SoftmaxState {
  float m = -std::numeric_limits<float>::infinity();
  float l = 0.f;
  float* acc = nullptr;  ///< [dim]
  Index dim = 0;

  SoftmaxState() = default;
  /// The state of the empty key set over `acc` [dim], which it zeroes.
  SoftmaxState(float* acc_, Index dim_) : acc(acc_), dim(dim_) { std::fill(acc, acc + dim, 0.f); }

  bool empty() const { return l == 0.f; }

  /// Adds one key with score s and value v [dim] (the scalar form of what the tiled kernels do
  /// a tile at a time).
  void add(float s, const float* v) {
    if (s == -std::numeric_limits<float>::infinity()) return;
    const float m_new = std::max(m, s);
    const float alpha = std::exp(m - m_new);  // 0 when the state was empty
    const float w = std::exp(s - m_new);
    for (Index j = 0; j < dim; ++j) acc[j] = acc[j] * alpha + w * v[j];
    l = l * alpha + w;
    m = m_new;
  }

  /// this ← this ⊕ other: the state over the union of both key sets (which must be disjoint).
  /// Exact up to f32 rounding: with M = max(m, m'), l = l·e^(m−M) + l'·e^(m'−M) and likewise
  /// for acc. Either side may be empty. other.dim must equal dim.
  void merge(const SoftmaxState& other) {
    if (other.empty()) return;
    if (empty()) {
      m = other.m;
      l = other.l;
      std::copy(other.acc, other.acc + dim, acc);
      return;
    }
    const float m_new = std::max(m, other.m);
    const float a = std::exp(m - m_new), b = std::exp(other.m - m_new);
    for (Index j = 0; j < dim; ++j) acc[j] = acc[j] * a + other.acc[j] * b;
    l = l * a + other.l * b;
    m = m_new;
  }

  /// log Σ_{t∈K} exp(s_t); −inf for the empty set.
  float lse() const { return empty() ? -std::numeric_limits<float>::infinity() : m + std::log(l); }

  /// out[dim] = acc / l, the attention output over K (zeros for the empty set).
  void normalize(float* out) const {
    const float inv = empty() ? 0.f : 1.f / l;
    for (Index j = 0; j < dim; ++j) out[j] = acc[j] * inv;
  }
};

}  // namespace tpa
