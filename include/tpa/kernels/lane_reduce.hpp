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

/// Transposes RB vectors as an RB × RB matrix of chunks of W / RB lanes: on return, chunk b of
/// v[r] is what chunk r of v[b] was. The several-row score kernels' epilogue: RB blocks of
/// lane_reduce results, lane r·TB + t holding row r and token b·TB + t of block b, become one
/// vector of W consecutive tokens per row (qk_i16, which only AVX-512 with VNNI runs). RB divides
/// W. AVX-512 vectors use 2, 8 or 24 shuffles for RB 2, 4, 8; other widths go through memory.
template <class Ops, int RB>
TPA_ALWAYS_INLINE void chunk_transpose(typename Ops::V* v) {
  constexpr Index W = Ops::kWidth;
  static_assert(RB >= 1 && W % RB == 0, "chunk_transpose: RB must divide the vector width");
  if constexpr (RB == 1) {
    (void)v;
    return;
  } else {
#if defined(TPA_HAVE_AVX512)
    if constexpr (W == 16 && sizeof(typename Ops::V) == sizeof(__m512)) {
      if constexpr (RB == 2) {  // 256-bit halves
        const __m512 a = _mm512_shuffle_f32x4(v[0], v[1], 0x44);
        v[1] = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
        v[0] = a;
        return;
      } else if constexpr (RB == 4) {  // 128-bit quarters
        const __m512 a = _mm512_shuffle_f32x4(v[0], v[1], 0x44);
        const __m512 b = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
        const __m512 c = _mm512_shuffle_f32x4(v[2], v[3], 0x44);
        const __m512 d = _mm512_shuffle_f32x4(v[2], v[3], 0xEE);
        v[0] = _mm512_shuffle_f32x4(a, c, 0x88);
        v[1] = _mm512_shuffle_f32x4(a, c, 0xDD);
        v[2] = _mm512_shuffle_f32x4(b, d, 0x88);
        v[3] = _mm512_shuffle_f32x4(b, d, 0xDD);
        return;
      } else if constexpr (RB == 8) {  // 64-bit eighths: an 8 × 8 transpose of doubles
        __m512d x[8], y[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) x[i] = _mm512_castps_pd(v[i]);
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
          y[2 * i] = _mm512_unpacklo_pd(x[2 * i], x[2 * i + 1]);
          y[2 * i + 1] = _mm512_unpackhi_pd(x[2 * i], x[2 * i + 1]);
        }
        // y[2i + k], 128-bit lane L: chunk 2L + k of rows 2i, 2i + 1.
#pragma GCC unroll 2
        for (int k = 0; k < 2; ++k) {
          x[k] = _mm512_shuffle_f64x2(y[k], y[2 + k], 0x88);      // lanes 0, 2 of rows 0–3
          x[2 + k] = _mm512_shuffle_f64x2(y[k], y[2 + k], 0xDD);  // lanes 1, 3
          x[4 + k] = _mm512_shuffle_f64x2(y[4 + k], y[6 + k], 0x88);
          x[6 + k] = _mm512_shuffle_f64x2(y[4 + k], y[6 + k], 0xDD);
        }
#pragma GCC unroll 2
        for (int k = 0; k < 2; ++k) {
          v[k] = _mm512_castpd_ps(_mm512_shuffle_f64x2(x[k], x[4 + k], 0x88));
          v[4 + k] = _mm512_castpd_ps(_mm512_shuffle_f64x2(x[k], x[4 + k], 0xDD));
          v[2 + k] = _mm512_castpd_ps(_mm512_shuffle_f64x2(x[2 + k], x[6 + k], 0x88));
          v[6 + k] = _mm512_castpd_ps(_mm512_shuffle_f64x2(x[2 + k], x[6 + k], 0xDD));
        }
        return;
      }
    }
#endif
    constexpr Index TB = W / RB;
    alignas(64) float in[RB * W];
    for (Index b = 0; b < RB; ++b) Ops::store(in + b * W, v[b]);
    alignas(64) float out[W];
    for (Index r = 0; r < RB; ++r) {
      for (Index b = 0; b < RB; ++b)
        for (Index t = 0; t < TB; ++t) out[b * TB + t] = in[b * W + r * TB + t];
      v[r] = Ops::load(out);
    }
  }
}

}  // namespace detail
}  // namespace tpa
