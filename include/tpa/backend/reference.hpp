// The Reference backend: plain scalar loops with double accumulation, the oracle of the tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "tpa/backend/kernels.hpp"
#include "tpa/kernels/params.hpp"

namespace tpa {

template <>
struct Kernels<Reference> {
  /// Causal grouped attention (see GroupedAttentionParams), exact softmax in double.
  template <class S>
  static void grouped_attention(const GroupedAttentionParams<S>& p) {
    const Index d_qk = p.d_qk();
    const Index group = p.group_size();
    std::vector<double> score(static_cast<std::size_t>(p.q_pos0 + p.n_q));
    std::vector<double> acc(static_cast<std::size_t>(p.d_v));
    for (Index i = 0; i < p.n_q; ++i) {
      const Index n_keys = p.q_pos0 + i + 1;
      for (Index h = 0; h < p.n_heads; ++h) {
        const Index g = h / group;
        const float* q = p.q + i * p.q_stride + h * d_qk;
        double max_s = -std::numeric_limits<double>::infinity();
        for (Index t = 0; t < n_keys; ++t) {
          double s = 0;
          Index qi = 0;
          for (int part = 0; part < 2; ++part) {
            const Index dim = p.k_dims[part];
            if (dim == 0) continue;
            const S* k = p.kv.token(p.k_factor[part], t) + g * dim;
            for (Index j = 0; j < dim; ++j, ++qi)
              s += static_cast<double>(q[qi]) * static_cast<double>(static_cast<float>(k[j]));
          }
          s *= static_cast<double>(p.scale);
          score[static_cast<std::size_t>(t)] = s;
          max_s = std::max(max_s, s);
        }
        double sum = 0;
        for (Index t = 0; t < n_keys; ++t) {
          double& s = score[static_cast<std::size_t>(t)];
          s = std::exp(s - max_s);
          sum += s;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (Index t = 0; t < n_keys; ++t) {
          const S* v = p.kv.token(p.v_factor, t) + g * p.d_v;
          const double w = score[static_cast<std::size_t>(t)];
          for (Index j = 0; j < p.d_v; ++j)
            acc[static_cast<std::size_t>(j)] += w * static_cast<double>(static_cast<float>(v[j]));
        }
        float* o = p.o + i * p.o_stride + h * p.d_v;
        for (Index j = 0; j < p.d_v; ++j)
          o[j] = static_cast<float>(acc[static_cast<std::size_t>(j)] / sum);
      }
    }
  }

  /// Causal Tensor Product Attention over cached factors (see TpaAttentionParams), exact
  /// softmax in double. Straightforward on purpose: per head it materialises k_h(t) and v_h(t)
  /// of every visible token in double, then runs plain softmax attention for each query.
  /// \throws Error if the params are inconsistent (TpaAttentionParams::check).
  template <class S>
  static void tpa_attention(const TpaAttentionParams<S>& p) {
    p.check("Kernels<Reference>::tpa_attention");
    if (p.n_q == 0) return;
    const Index d = p.head_dim, RK = p.k_rank, RV = p.v_rank, RQ = p.q_rank;
    const Index n_keys = p.n_keys(p.n_q - 1);
    auto at = [](const S* x, Index j) { return static_cast<double>(static_cast<float>(x[j])); };
    std::vector<double> k(static_cast<std::size_t>(n_keys * d));  // k_h(t), [n_keys, d]
    std::vector<double> v(static_cast<std::size_t>(n_keys * d));  // v_h(t), [n_keys, d]
    std::vector<double> q(static_cast<std::size_t>(d));
    std::vector<double> score(static_cast<std::size_t>(n_keys));
    std::vector<double> acc(static_cast<std::size_t>(d));
    for (Index h = 0; h < p.n_heads; ++h) {
      for (Index t = 0; t < n_keys; ++t) {
        const S* a_k = p.kv.token(p.a_k_factor, t) + h * RK;
        const S* b_k = p.kv.token(p.b_k_factor, t);
        const S* a_v = p.kv.token(p.a_v_factor, t) + h * RV;
        const S* b_v = p.kv.token(p.b_v_factor, t);
        double* kt = k.data() + t * d;
        double* vt = v.data() + t * d;
        for (Index j = 0; j < d; ++j) {
          double sk = 0, sv = 0;
          for (Index r = 0; r < RK; ++r) sk += at(a_k, r) * at(b_k, r * d + j);
          for (Index r = 0; r < RV; ++r) sv += at(a_v, r) * at(b_v, r * d + j);
          kt[j] = sk / static_cast<double>(RK);
          vt[j] = sv / static_cast<double>(RV);
        }
      }
      for (Index i = 0; i < p.n_q; ++i) {
        if (p.factored_query()) {
          const float* a_q = p.a_q + i * p.a_q_stride + h * RQ;
          const float* b_q = p.b_q + i * p.b_q_stride;
          for (Index j = 0; j < d; ++j) {
            double s = 0;
            for (Index r = 0; r < RQ; ++r)
              s += static_cast<double>(a_q[r]) * static_cast<double>(b_q[r * d + j]);
            q[static_cast<std::size_t>(j)] = s / static_cast<double>(RQ);
          }
        } else {
          const float* qi = p.q + i * p.q_stride + h * d;
          for (Index j = 0; j < d; ++j) q[static_cast<std::size_t>(j)] = qi[j];
        }
        const Index n = p.n_keys(i);
        double max_s = -std::numeric_limits<double>::infinity();
        for (Index t = 0; t < n; ++t) {
          double s = 0;
          for (Index j = 0; j < d; ++j)
            s += q[static_cast<std::size_t>(j)] * k[static_cast<std::size_t>(t * d + j)];
          s *= static_cast<double>(p.scale);
          score[static_cast<std::size_t>(t)] = s;
          max_s = std::max(max_s, s);
        }
        double sum = 0;
        for (Index t = 0; t < n; ++t) {
          double& s = score[static_cast<std::size_t>(t)];
          s = std::exp(s - max_s);
          sum += s;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (Index t = 0; t < n; ++t) {
          const double w = score[static_cast<std::size_t>(t)];
          for (Index j = 0; j < d; ++j)
            acc[static_cast<std::size_t>(j)] += w * v[static_cast<std::size_t>(t * d + j)];
        }
        float* o = p.o + i * p.o_stride + h * d;
        for (Index j = 0; j < d; ++j)
          o[j] = static_cast<float>(acc[static_cast<std::size_t>(j)] / sum);
      }
    }
  }
};

}  // namespace tpa
