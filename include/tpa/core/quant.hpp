// 8-bit quantized storage scalar of the KV cache: tpa::q8 (signed 8-bit integers with an f32
// scale per row of each cached factor; README, "Quantized caches").
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <cstdint>
#include <type_traits>

#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief Storage scalar of an int8 KV cache: `KVCache<tpa::q8>`, and the CacheScalar argument
/// of the layers (e.g. `tpa::TensorProductAttention<tpa::Native, tpa::q8>`).
///
/// Each cached value is a signed byte q ∈ [−127, 127]; it stands for q · scale, with one f32
/// scale per scale group, stored in the cache block beside the data (FactorPlace::scale_offset).
/// A scale group is one row of one token's factor when the factor's rows hold at least
/// kQ8MinRowCols elements (K/V [G, d]: per KV head; TPA's B_K/B_V [R, d]: per rank row; MLA's
/// c_kv and k_pe [1, ·]: per token), else the token's whole factor (TPA's A_K/A_V [H, R]: per
/// token — a scale per 2-element row would cost more bytes than the row). Quantization on
/// append is symmetric round to nearest (ties to even): scale = max|x| / 127, q = rint(x /
/// scale); a zero group stores scale 0 and q = 0; a group with a NaN or ±Inf stores a NaN scale
/// and q = 0, so all of it reads as NaN (the non-finite value stays visible, like in a float
/// cache, and stays in its own sequence). Kernels widen q to f32 in registers and apply the
/// scales there (per token to the score for keys, per token to the probability for values,
/// otherwise to the widened rows); no value is ever stored in the cache in another precision.
/// Not an arithmetic type: convert through the scales only.
struct q8 {
  std::int8_t v;
};
static_assert(sizeof(q8) == 1, "tpa::q8 must be one byte");

/// Rows of fewer elements share one scale per token and factor (see q8).
inline constexpr Index kQ8MinRowCols = 16;

/// Whether S is a quantized storage scalar (one with scales beside the data).
template <class S>
struct is_quantized : std::false_type {};
template <>
struct is_quantized<q8> : std::true_type {};
template <class S>
inline constexpr bool is_quantized_v = is_quantized<S>::value;

namespace detail {

/// A stored element as f32 before any scale: the integer of a q8, the value of anything else.
template <class S>
float widen_raw(const S& x) {
  if constexpr (is_quantized_v<S>) {
    return static_cast<float>(x.v);
  } else {
    return static_cast<float>(x);
  }
}

/// Quantizes a group of n values x(i) (i < n) to dst(i) and returns its scale (q8's rules).
template <class Get, class Put>
float quantize_group(Index n, Get&& x, Put&& put) {
  float amax = 0.f;
  bool finite = true;
  for (Index i = 0; i < n; ++i) {
    const float v = x(i);
    if (!std::isfinite(v)) finite = false;
    amax = std::max(amax, std::fabs(v));
  }
  if (!finite) {
    for (Index i = 0; i < n; ++i) put(i, std::int8_t{0});
    return std::numeric_limits<float>::quiet_NaN();
  }
  if (amax == 0.f) {
    for (Index i = 0; i < n; ++i) put(i, std::int8_t{0});
    return 0.f;
  }
  const float scale = amax / 127.f;
  const double inv = 127.0 / static_cast<double>(amax);  // finite for subnormal amax too
  for (Index i = 0; i < n; ++i) {
    const double q = std::nearbyint(static_cast<double>(x(i)) * inv);
    put(i, static_cast<std::int8_t>(std::min(127.0, std::max(-127.0, q))));
  }
  return scale;
}

}  // namespace detail
}  // namespace tpa
