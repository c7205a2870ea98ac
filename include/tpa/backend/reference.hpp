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
  /// Score variants of the score s (already scaled) of key t for head h and the query at `pos`
  /// (ScoreVariant): soft-cap, then ALiBi. In double.
  static double vary(const ScoreVariant& var, double s, Index h, Index pos, Index t) {
    if (var.softcap > 0.f) {
      const double c = static_cast<double>(var.softcap);
      s = c * std::tanh(s / c);
    }
    if (var.alibi != nullptr)
      s -= static_cast<double>(var.alibi[h]) * static_cast<double>(pos - t);
    return s;
  }
  /// The sink logit of head h, or −inf without sinks.
  static double sink(const ScoreVariant& var, Index h) {
    return var.sinks != nullptr ? static_cast<double>(var.sinks[h])
                                : -std::numeric_limits<double>::infinity();
  }

  /// Causal grouped attention (see GroupedAttentionParams), exact softmax in double.
  template <class S>
  static void grouped_attention(const GroupedAttentionParams<S>& p) {
    const Index d_qk = p.d_qk();
    const Index group = p.group_size();
    std::vector<double> score(static_cast<std::size_t>(p.q_pos0 + p.n_q));
    std::vector<double> acc(static_cast<std::size_t>(p.d_v));
    const ScoreVariant& var = p.variant;
    for (Index i = 0; i < p.n_q; ++i) {
      const Index n_keys = p.q_pos0 + i + 1;
      const Index k0 = var.first_key(p.q_pos0 + i);  // window: keys k0 … n_keys − 1
      for (Index h = 0; h < p.n_heads; ++h) {
        const Index g = h / group;
        const float* q = p.q + i * p.q_stride + h * d_qk;
        double max_s = -std::numeric_limits<double>::infinity();
        for (Index t = k0; t < n_keys; ++t) {
          double s = 0;
          Index qi = 0;
          for (int part = 0; part < 2; ++part) {
            const Index dim = p.k_dims[part];
            if (dim == 0) continue;
            for (Index j = 0; j < dim; ++j, ++qi)
              s += static_cast<double>(q[qi]) *
                   static_cast<double>(p.kv.value(p.k_factor[part], t, g, j));
          }
          s *= static_cast<double>(p.scale);
          if (var.transforms_scores()) s = vary(var, s, h, p.q_pos0 + i, t);
          score[static_cast<std::size_t>(t)] = s;
          max_s = std::max(max_s, s);
        }
        const double sk = sink(var, h);
        max_s = std::max(max_s, sk);
        double sum = var.sinks != nullptr ? std::exp(sk - max_s) : 0.0;
        for (Index t = k0; t < n_keys; ++t) {
          double& s = score[static_cast<std::size_t>(t)];
          s = std::exp(s - max_s);
          sum += s;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (Index t = k0; t < n_keys; ++t) {
          const double w = score[static_cast<std::size_t>(t)];
          for (Index j = 0; j < p.d_v; ++j)
            acc[static_cast<std::size_t>(j)] +=
                w * static_cast<double>(p.kv.value(p.v_factor, t, g, j));
        }
        float* o = p.o + i * p.o_stride + h * p.d_v;
        for (Index j = 0; j < p.d_v; ++j)
          o[j] = static_cast<float>(acc[static_cast<std::size_t>(j)] / sum);
      }
    }
  }

  /// Causal Tensor Product Attention over cached factors (see TpaAttentionParams), exact
  /// softmax in double. Straightforward on purpose: per head and block of up to 64 queries, a
  /// first walk over the visible tokens forms each k_h(t) (one row of d doubles, from the
  /// factors as stored) and scores it against the block's queries, a second forms each v_h(t)
  /// and accumulates it; no copy of the cache is made in any precision.
  /// \throws Error if the params are inconsistent (TpaAttentionParams::check).
  template <class S>
  static void tpa_attention(const TpaAttentionParams<S>& p) {
    p.check("Kernels<Reference>::tpa_attention");
    if (p.n_q == 0) return;
    constexpr Index kBlock = 64;  // queries per block
    const Index d = p.head_dim, RK = p.k_rank, RV = p.v_rank, RQ = p.q_rank;
    const Index n_keys = p.n_keys(p.n_q - 1);
    const Index nb_max = std::min(kBlock, p.n_q);
    // Element (r, c) of factor f of token t, as stored (dequantized for tpa::q8).
    auto at = [&](std::size_t f, Index t, Index r, Index c) {
      return static_cast<double>(p.kv.value(f, t, r, c));
    };
    auto sz = [](Index n) { return static_cast<std::size_t>(n); };
    std::vector<double> row(sz(d));                // k_h(t), then v_h(t)
    std::vector<double> q(sz(nb_max * d));         // [block, d] query heads
    std::vector<double> score(sz(nb_max * n_keys));  // [block, n_keys] scores, then weights
    std::vector<double> sum(sz(nb_max));
    std::vector<double> acc(sz(nb_max * d));
    const ScoreVariant& var = p.variant;
    // Query i sees keys first_key(i) … n_keys(i) − 1.
    auto first_key = [&](Index i) { return var.first_key(p.q_pos0 + i); };
    auto sees = [&](Index i, Index t) { return t >= first_key(i) && t < p.n_keys(i); };
    for (Index h = 0; h < p.n_heads; ++h) {
      for (Index i0 = 0; i0 < p.n_q; i0 += kBlock) {
        const Index nb = std::min(kBlock, p.n_q - i0);
        const Index keys = p.n_keys(i0 + nb - 1);
        const Index key0 = first_key(i0);
        for (Index b = 0; b < nb; ++b) {
          double* qb = q.data() + b * d;
          const Index i = i0 + b;
          if (p.factored_query()) {
            const float* a_q = p.a_q + i * p.a_q_stride + h * RQ;
            const float* b_q = p.b_q + i * p.b_q_stride;
            for (Index j = 0; j < d; ++j) {
              double s = 0;
              for (Index r = 0; r < RQ; ++r)
                s += static_cast<double>(a_q[r]) * static_cast<double>(b_q[r * d + j]);
              qb[j] = s / static_cast<double>(RQ);
            }
          } else {
            const float* qi = p.q + i * p.q_stride + h * d;
            for (Index j = 0; j < d; ++j) qb[j] = qi[j];
          }
        }
        for (Index t = key0; t < keys; ++t) {
          for (Index j = 0; j < d; ++j) {
            double sk = 0;
            for (Index r = 0; r < RK; ++r)
              sk += at(p.a_k_factor, t, h, r) * at(p.b_k_factor, t, r, j);
            row[sz(j)] = sk / static_cast<double>(RK);
          }
          for (Index b = 0; b < nb; ++b) {
            if (!sees(i0 + b, t)) continue;
            double s = 0;
            for (Index j = 0; j < d; ++j) s += q[sz(b * d + j)] * row[sz(j)];
            s *= static_cast<double>(p.scale);
            if (var.transforms_scores()) s = vary(var, s, h, p.q_pos0 + i0 + b, t);
            score[sz(b * n_keys + t)] = s;
          }
        }
        for (Index b = 0; b < nb; ++b) {
          double* sc = score.data() + b * n_keys;
          const Index n = p.n_keys(i0 + b), k0 = first_key(i0 + b);
          const double sk = sink(var, h);
          double max_s = sk;
          for (Index t = k0; t < n; ++t) max_s = std::max(max_s, sc[t]);
          double total = var.sinks != nullptr ? std::exp(sk - max_s) : 0.0;
          for (Index t = k0; t < n; ++t) {
            sc[t] = std::exp(sc[t] - max_s);
            total += sc[t];
          }
          sum[sz(b)] = total;
        }
        std::fill(acc.begin(), acc.end(), 0.0);
        for (Index t = key0; t < keys; ++t) {
          for (Index j = 0; j < d; ++j) {
            double sv = 0;
            for (Index r = 0; r < RV; ++r)
              sv += at(p.a_v_factor, t, h, r) * at(p.b_v_factor, t, r, j);
            row[sz(j)] = sv / static_cast<double>(RV);
          }
          for (Index b = 0; b < nb; ++b) {
            if (!sees(i0 + b, t)) continue;
            const double w = score[sz(b * n_keys + t)];
            for (Index j = 0; j < d; ++j) acc[sz(b * d + j)] += w * row[sz(j)];
          }
        }
        for (Index b = 0; b < nb; ++b) {
          float* o = p.o + (i0 + b) * p.o_stride + h * d;
          for (Index j = 0; j < d; ++j) o[j] = static_cast<float>(acc[sz(b * d + j)] / sum[sz(b)]);
        }
      }
    }
  }
};

}  // namespace tpa
