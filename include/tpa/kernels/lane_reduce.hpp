// Transposed horizontal reductions: W vectors of W lanes in, one vector of their W sums (or
// maxima) out. The reduction step of register-blocked dot products (many short dot products at
// once) and of row-wise softmax statistics, without one horizontal reduction per row. Shared by
// the tiled kernels.
#pragma once

#include "tpa/core/isa.hpp"
#include "tpa/core/tensor.hpp"

#if defined(TPA_HAVE_AVX2)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
/// Forces inlining of a small helper whose array arguments must stay in registers.
#define TPA_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define TPA_ALWAYS_INLINE inline
#endif

namespace tpa {
namespace detail {

/// Returns the vector whose lane i is the sum (kMax: the maximum) of the lanes of a[i], for
/// i < Ops::kWidth. AVX-512 and AVX2 vectors use a shuffle tree (W − 1 adds and 2W − 2
/// shuffles for W results); other vector types go through Ops::transpose_block. Ops as in
/// GroupedTiled.
template <class Ops, bool kMax = false>
TPA_ALWAYS_INLINE typename Ops::V lane_reduce(const typename Ops::V* a) {
  using V = typename Ops::V;
  constexpr Index W = Ops::kWidth;
#if defined(TPA_HAVE_AVX512)
  if constexpr (W == 16 && sizeof(V) == sizeof(__m512)) {  // __m512 (also Eigen's Packet16f)
    auto op = [](__m512 x, __m512 y) { return kMax ? _mm512_max_ps(x, y) : _mm512_add_ps(x, y); };
    // Four halving steps (256-, 128-, 64-, 32-bit pieces); the inputs are taken in the order
    // that makes the output lanes come out in natural order.
    constexpr int in[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
    __m512 b[8], c[4], d[2];
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i)
      b[i] = op(_mm512_shuffle_f32x4(a[in[i]], a[in[i + 8]], 0x44),
                _mm512_shuffle_f32x4(a[in[i]], a[in[i + 8]], 0xEE));
#pragma GCC unroll 8
    for (int i = 0; i < 4; ++i)
      c[i] = op(_mm512_shuffle_f32x4(b[i], b[i + 4], 0x88),
                _mm512_shuffle_f32x4(b[i], b[i + 4], 0xDD));
#pragma GCC unroll 8
    for (int i = 0; i < 2; ++i)
      d[i] = op(_mm512_shuffle_ps(c[i], c[i + 2], 0x44), _mm512_shuffle_ps(c[i], c[i + 2], 0xEE));
    return op(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  }
#endif
#if defined(TPA_HAVE_AVX2)
  if constexpr (W == 8 && sizeof(V) == sizeof(__m256)) {  // __m256 (also Eigen's Packet8f)
    auto op = [](__m256 x, __m256 y) { return kMax ? _mm256_max_ps(x, y) : _mm256_add_ps(x, y); };
    constexpr int in[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    __m256 b[4], c[2];
#pragma GCC unroll 8
    for (int i = 0; i < 4; ++i)
      b[i] = op(_mm256_permute2f128_ps(a[in[i]], a[in[i + 4]], 0x20),
                _mm256_permute2f128_ps(a[in[i]], a[in[i + 4]], 0x31));
#pragma GCC unroll 8
    for (int i = 0; i < 2; ++i)
      c[i] = op(_mm256_shuffle_ps(b[i], b[i + 2], 0x44), _mm256_shuffle_ps(b[i], b[i + 2], 0xEE));
    return op(_mm256_shuffle_ps(c[0], c[1], 0x88), _mm256_shuffle_ps(c[0], c[1], 0xDD));
  }
#endif
  alignas(64) float rows[W * W];
  alignas(64) float cols[W * W];
  for (Index i = 0; i < W; ++i) Ops::store(rows + i * W, a[i]);
  Ops::template transpose_block<float>(rows, W, W, W, cols, W);
  V s = Ops::load(cols);
  for (Index i = 1; i < W; ++i)
    s = kMax ? Ops::max(s, Ops::load(cols + i * W)) : Ops::add(s, Ops::load(cols + i * W));
  return s;
}

}  // namespace detail
}  // namespace tpa
