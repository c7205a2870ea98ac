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
};

}  // namespace tpa
