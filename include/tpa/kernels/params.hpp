// Parameter structs of the attention kernels: pointers, strides and sizes of one sequence's
// work, so the same kernel serves prefill, chunked prefill and decode.
#pragma once

#include <cstddef>

#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief Causal attention of one sequence's queries over its cached keys and values, with
/// `n_heads / n_kv_heads` consecutive query heads sharing one KV head (MHA, GQA, MQA, and MLA
/// in its absorbed form).
///
/// The key of KV head g at token t is the concatenation of up to two parts: part j is
/// k_dims[j] elements at kv.token(k_factor[j], t) + g·k_dims[j]. The value is d_v elements at
/// kv.token(v_factor, t) + g·d_v. Query i (0 ≤ i < n_q) sits at position q_pos0 + i and sees
/// keys 0 … q_pos0 + i, all of which must be cached (q_pos0 + n_q ≤ kv.n_tokens).
template <class S>
struct GroupedAttentionParams {
  const float* q = nullptr;  ///< [n_q, n_heads, d_qk], token i at q + i·q_stride
  Index q_stride = 0;
  float* o = nullptr;  ///< [n_q, n_heads, d_v], token i at o + i·o_stride
  Index o_stride = 0;
  Index n_q = 0;
  Index q_pos0 = 0;
  Index n_heads = 0;
  Index n_kv_heads = 0;
  std::size_t k_factor[2] = {0, 0};
  Index k_dims[2] = {0, 0};  ///< k_dims[1] = 0: the key has one part
  std::size_t v_factor = 1;
  Index d_v = 0;
  float scale = 1.f;
  SeqView<S> kv;

  Index d_qk() const { return k_dims[0] + k_dims[1]; }
  Index group_size() const { return n_heads / n_kv_heads; }
};

}  // namespace tpa
