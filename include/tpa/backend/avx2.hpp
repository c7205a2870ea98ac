// The Avx2 backend: AVX2 + FMA (+ F16C where enabled) intrinsics. Compiled only when the
// compiler flags enable AVX2 and FMA (TPA_HAVE_AVX2); kernels it does not specialise fall back
// to Portable's.
#pragma once

#include "tpa/backend/kernels.hpp"
#include "tpa/backend/portable.hpp"
#include "tpa/backend/tags.hpp"
#include "tpa/backend/tiled_kernels.hpp"
#include "tpa/core/quant.hpp"

#if defined(TPA_HAVE_AVX2)

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/tpa_tiled.hpp"

namespace tpa {
namespace detail {

/// Vector primitives of the Avx2 backend for GroupedTiled (8 f32 lanes, 16-token tiles; 16
/// ymm registers, so smaller register blocks than Avx512).
struct Avx2Ops {
  using V = __m256;
  static constexpr Index kWidth = 8;
  static constexpr const char* kTpaWho = "Kernels<Avx2>::tpa_attention";
  static constexpr Index kTile = 16;
  static constexpr Index kQkRows = 4;      // 4 rows × 2 token vectors = 8 accumulators
  static constexpr Index kLaneTokens = 4;  // 4 tokens × 2 row vectors = 8 accumulators
  static constexpr Index kLaneVecs = 2;
  // 4 rows (GQA-8) in token lanes: row lanes would leave half of each 8-lane vector empty.
  static constexpr Index kLaneRowsMin = 5;
  static constexpr Index kPvRows = 2;  // 2 rows × 4 vectors = 8 accumulators
  static constexpr Index kPvCols = 4;
  static constexpr Index kPvRowsWide = 4;  // 3–4 rows: 4 × 2 = 8 accumulators, V widened once
  static constexpr Index kPvColsWide = 2;
  static constexpr Index kPv1Cols = 4;
  static constexpr Index kPvtDims = 4;  // 4 value dims × 2 row vectors = 8 accumulators

  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_store_ps(p, v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }  // score variants (soft-cap)
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static float reduce_max(V v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    x = _mm_max_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }
  static float reduce_add(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    x = _mm_add_ss(x, _mm_movehdup_ps(x));
    return _mm_cvtss_f32(x);
  }

  /// e^x as Avx512Ops::exp, with 2^n built in the exponent bits: ≤ 2 ulp for x ≤ 88, exactly 0
  /// for x < −87.3, NaN stays NaN.
  static V exp(V x) {
    const V keep = _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.3f), x);
    x = _mm256_max_ps(_mm256_set1_ps(-87.3f), x);
    const V n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    V p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
    p = _mm256_add_ps(p, _mm256_set1_ps(1.f));
    const __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), keep);
  }

  template <class S>
  static V load_widen(const S* p, Index n) {
    if constexpr (std::is_same<S, float>::value) {
      if (n == kWidth) return _mm256_loadu_ps(p);
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
      return _mm256_maskload_ps(p, mask);
    } else if constexpr (is_quantized_v<S>) {  // q8: the integers, sign-extended (no scale)
      __m128i b;
      if (n == kWidth) {
        b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      } else {
        std::int64_t buf = 0;
        std::memcpy(&buf, p, static_cast<std::size_t>(n));
        b = _mm_cvtsi64_si128(buf);
      }
      return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    } else {
      static_assert(sizeof(S) == 2, "Avx2Ops: 16-bit storage scalar expected");
      __m128i h;
      if (n == kWidth) {
        h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      } else {
        std::uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        std::memcpy(buf, p, static_cast<std::size_t>(n) * 2);
        h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(buf));
      }
      if constexpr (std::is_same<S, half>::value) {
#if defined(__F16C__)
        return _mm256_cvtph_ps(h);
#else
        alignas(32) float f[8];
        alignas(16) std::uint16_t u[8];
        _mm_store_si128(reinterpret_cast<__m128i*>(u), h);
        for (int i = 0; i < 8; ++i) {
          half x;
          std::memcpy(&x, &u[i], 2);
          f[i] = static_cast<float>(x);
        }
        return _mm256_load_ps(f);
#endif
      } else {  // bfloat16: the upper 16 bits of an f32
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
      }
    }
  }

  /// Lanes i < n: p[i·stride] as f32; lanes ≥ n: 0. Reads only those n elements' range.
  /// Stride 2 (the T6 ranks' interleaved head factors) is two loads and two shuffles.
  template <class S>
  static V load_strided(const S* p, Index stride, Index n) {
    if (stride == 1) return load_widen<S>(p, n);
    if constexpr (std::is_same<S, float>::value) {
      if (stride == 2) {
        const Index m = 2 * n - 1;  // elements p[0 … 2n−2]
        const V lo = load_widen<float>(p, std::min<Index>(m, 8));
        const V hi = m > 8 ? load_widen<float>(p + 8, m - 8) : zero();
        // 128-bit lanes: lo0 lo2 hi0 hi2 | lo4 lo6 hi4 hi6, then the 64-bit pairs reordered.
        const V x = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
        return _mm256_castpd_ps(
            _mm256_permute4x64_pd(_mm256_castps_pd(x), _MM_SHUFFLE(3, 1, 2, 0)));
      }
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), lanes);
      const __m256i idx = _mm256_mullo_epi32(lanes, _mm256_set1_epi32(static_cast<int>(stride)));
      return _mm256_mask_i32gather_ps(zero(), p, idx, _mm256_castsi256_ps(mask), 4);
    } else if constexpr (is_quantized_v<S>) {
      if (stride == 2) {  // bytes p[0 … 2n−2], the even ones gathered by one shuffle
        alignas(16) std::int8_t b[16] = {};
        std::memcpy(b, p, static_cast<std::size_t>(2 * n - 1));
        const __m128i even = _mm_shuffle_epi8(
            _mm_load_si128(reinterpret_cast<const __m128i*>(b)),
            _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(even));
      }
      S buf[8] = {};
      for (Index i = 0; i < n; ++i) buf[i] = p[i * stride];
      return load_widen<S>(buf, kWidth);
    } else {
      alignas(32) std::uint16_t buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (Index i = 0; i < n; ++i) std::memcpy(&buf[i], p + i * stride, 2);
      return load_widen<S>(reinterpret_cast<const S*>(buf), kWidth);
    }
  }

  template <class S>
  static void transpose_block(const S* src, Index ld, Index rows, Index cols, float* dst,
                              Index dst_ld) {
    V r[8];
    TPA_UNROLL
    for (int i = 0; i < 8; ++i) r[i] = i < rows ? load_widen<S>(src + i * ld, cols) : zero();
    V t[8];
    TPA_UNROLL
    for (int i = 0; i < 4; ++i) {
      t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4i + k], 128-bit lane L: column 4L + k of rows 4i … 4i+3.
    TPA_UNROLL
    for (int i = 0; i < 2; ++i) {
      r[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    TPA_UNROLL
    for (int k = 0; k < 4; ++k) {
      t[k] = _mm256_permute2f128_ps(r[k], r[4 + k], 0x20);      // column k
      t[4 + k] = _mm256_permute2f128_ps(r[k], r[4 + k], 0x31);  // column 4 + k
    }
    if (cols == kWidth) {
      TPA_UNROLL
      for (int c = 0; c < 8; ++c) _mm256_store_ps(dst + c * dst_ld, t[c]);
    } else {
      for (int c = 0; c < cols; ++c) _mm256_store_ps(dst + c * dst_ld, t[c]);
    }
  }
};

}  // namespace detail

/// Avx2 kernels: the tiled grouped and FlashTPA kernels on AVX2/FMA intrinsics.
template <>
struct Kernels<Avx2> : detail::TiledKernels<detail::Avx2Ops, Portable> {};

}  // namespace tpa

#endif  // TPA_HAVE_AVX2
