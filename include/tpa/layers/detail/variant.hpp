// Attention variants (AttentionVariant) in a layer call: the kernels' ScoreVariant, and the
// check that a call's queries need no key that the cache released (KVCache::drop_before).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/config.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/layers/detail/call.hpp"

namespace tpa {
namespace detail {

/// The kernels' view of a layer's variant: `alibi` holds the resolved slopes
/// (AttentionVariant::resolved_alibi_slopes), `sinks` the layer's sink weights [H]. A soft-cap
/// of +inf is no soft-cap. The pointers stay valid while `alibi` and `sinks` do.
inline ScoreVariant score_variant(const AttentionVariant& v, const std::vector<float>& alibi,
                                  const Eigen::VectorXf& sinks) {
  ScoreVariant s;
  s.window = v.window.value_or(0);
  s.softcap =
      v.logit_softcap.has_value() && std::isfinite(*v.logit_softcap) ? *v.logit_softcap : 0.f;
  s.alibi = v.alibi ? alibi.data() : nullptr;
  s.sinks = v.sinks ? sinks.data() : nullptr;
  return s;
}

/// \throws Error if the queries of a segment (pos0 filled by plan_cache_call) would need keys
/// that the cache released for its sequence (KVCache::drop_before): the first key the segment's
/// first query sees (its window's start, or 0 without a window) must be at least
/// cache.first_token(seq). Changes nothing.
template <class S>
void check_released(const char* who, const KVCache<S>& cache, const AttentionVariant& v,
                    const Segment* segs, Index n_segs) {
  for (Index i = 0; i < n_segs; ++i) {
    const Index first = cache.first_token(segs[i].seq);
    if (first == 0) continue;
    const Index need = v.window.has_value() ? std::max<Index>(0, segs[i].pos0 - *v.window + 1) : 0;
    TPA_CHECK(need >= first, who, ": sequence ", segs[i].seq, " released its tokens before ", first,
              " (KVCache::drop_before), but its query at position ", segs[i].pos0,
              " needs keys from position ", need,
              v.window.has_value() ? " (its window)" : " (the layer has no window)");
  }
}

}  // namespace detail
}  // namespace tpa
