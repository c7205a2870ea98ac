// The Avx512 backend: AVX-512F/BW/VL intrinsics. Compiled only when the compiler flags enable
// them (TPA_HAVE_AVX512); kernels it does not specialise fall back to Avx2's.
#pragma once

#include "tpa/backend/avx2.hpp"
#include "tpa/backend/kernels.hpp"
#include "tpa/backend/tags.hpp"
#include "tpa/backend/tiled_kernels.hpp"

#if defined(TPA_HAVE_AVX512)

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/tpa_tiled.hpp"

namespace tpa {
namespace detail {

/// Vector primitives of the Avx512 backend for GroupedTiled (16 f32 lanes, 32-token tiles).
struct Avx512Ops {
  using V = __m512;
  static constexpr Index kWidth = 16;
  static constexpr const char* kTpaWho = "Kernels<Avx512>::tpa_attention";
  static constexpr Index kTile = 32;
  static constexpr Index kQkRows = 8;      // 8 rows × 2 token vectors = 16 accumulators
  static constexpr Index kLaneTokens = 8;  // 8 tokens × 2 row vectors = 16 accumulators
  static constexpr Index kLaneVecs = 2;
  // Up to 8 rows (GQA with 8 query heads per KV head) in token lanes: row lanes would leave
  // half of each 16-lane vector empty.
  static constexpr Index kLaneRowsMin = 9;
  static constexpr Index kPvRows = 6;  // 6 rows × 4 vectors = 24 accumulators
  static constexpr Index kPvCols = 4;
  static constexpr Index kPvRowsWide = 8;  // 7–8 rows (GQA with 8 query heads per KV head):
  static constexpr Index kPvColsWide = 3;  // 8 × 3 = 24 accumulators (pv_pair: 8 × 2)
  static constexpr Index kPv1Cols = 8;   // one row: 8 vectors, so its FMA chains hide latency
  static constexpr Index kPvtDims = 12;  // 12 value dims × 2 row vectors = 24 accumulators

  static V zero() { return _mm512_setzero_ps(); }
  static V set1(float x) { return _mm512_set1_ps(x); }
  static V load(const float* p) { return _mm512_load_ps(p); }
  static V loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_store_ps(p, v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }  // score variants (soft-cap)
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
  static float reduce_add(V v) { return _mm512_reduce_add_ps(v); }

  /// e^x: Cody–Waite reduction x = n·ln2 + r, |r| ≤ ln2/2, Cephes' degree-7 polynomial for
  /// e^r, then scalef by 2^n. ≤ 2 ulp for x ≤ 88; exactly 0 for x < −87.3 (no denormals reach
  /// the accumulators); NaN stays NaN.
  static V exp(V x) {
    const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_NLT_UQ);
    x = _mm512_min_ps(_mm512_set1_ps(88.3f), x);
    const V n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    V r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    V p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.f));
    return _mm512_maskz_scalef_ps(keep, p, n);
  }

  static __mmask16 first(Index n) { return static_cast<__mmask16>((1u << n) - 1u); }

  template <class S>
  static V load_widen(const S* p, Index n) {
    if constexpr (std::is_same<S, float>::value) {
      return n == kWidth ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(first(n), p);
    } else if constexpr (is_quantized_v<S>) {  // q8: the integers, sign-extended (no scale)
      const __m128i b = n == kWidth ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p))
                                    : _mm_maskz_loadu_epi8(first(n), p);
      return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    } else {
      static_assert(sizeof(S) == 2, "Avx512Ops: 16-bit storage scalar expected");
      return widen<S>(n == kWidth ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                  : _mm256_maskz_loadu_epi16(first(n), p));
    }
  }

  // ---- GroupedTiled's token-lane scores: split bf16 widening, int16 × int8 dot products ----

  /// bf16 keys widened one op per 16 elements: of the 32 bf16 at p (unaligned), the even
  /// elements p[0], p[2], …, p[30] (bf16_even: the low halves of the 32-bit words, shifted up)
  /// or the odd ones (bf16_odd: the high halves, masked), exact, as 16 f32 lanes.
  static constexpr bool kBf16Split = true;
  static V bf16_even(const bfloat16* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_loadu_si512(p), 16));
  }
  static V bf16_odd(const bfloat16* p) {
    return _mm512_castsi512_ps(
        _mm512_and_si512(_mm512_loadu_si512(p), _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }
  /// Both halves from one load: even = p[0], p[2], …, p[30], odd = p[1], p[3], …, p[31].
  static void bf16_pairs(const bfloat16* p, V& even, V& odd) {
    const __m512i x = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
    odd =
        _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

#if defined(__AVX512BF16__)
  /// bf16 keys scored in row lanes by vdpbf16ps (GroupedTiled's k_pairs): lane i of an f32 q
  /// vector split into bf16 pairs (split_bf16) times one broadcast pair of K elements.
  static constexpr bool kDotBf16 = true;
  /// The 32-bit word p[0], p[1] (a pair of bf16, p[0] in the low half) in every lane.
  TPA_ALWAYS_INLINE static __m512i pair_bf16(const bfloat16* p) {
    std::int32_t w;
    std::memcpy(&w, p, sizeof w);
    return _mm512_set1_epi32(w);
  }
  /// acc + q[2i]·k[0] + q[2i+1]·k[1] per lane i (q: 16 bf16 pairs held in an f32 vector's
  /// bits; products exact, sums rounded to f32; bf16 denormals count as 0).
  TPA_ALWAYS_INLINE static V dot_bf16(V acc, V q, __m512i k) {
    return _mm512_dpbf16_ps(acc, (__m512bh)q, (__m512bh)k);
  }
  /// even[0, 16) and odd[0, 16) (aligned) as bf16 pairs, lane i = (even[i], odd[i]): hi the
  /// values rounded to bf16 (nearest even), lo the rounding of what that left, so hi + lo holds
  /// each value to about 16 significant bits (a NaN or ±Inf makes lo NaN).
  static void split_bf16(const float* even, const float* odd, float* hi, float* lo) {
    const V a = load(even), b = load(odd);
    auto up = [](__m256bh h) { return _mm512_cvtepu16_epi32((__m256i)h); };
    const __m512i ah = up(_mm512_cvtneps_pbh(a)), bh = up(_mm512_cvtneps_pbh(b));
    const V ar = _mm512_sub_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(ah, 16)));
    const V br = _mm512_sub_ps(b, _mm512_castsi512_ps(_mm512_slli_epi32(bh, 16)));
    const __m512i al = up(_mm512_cvtneps_pbh(ar)), bl = up(_mm512_cvtneps_pbh(br));
    _mm512_store_si512(hi, _mm512_or_si512(ah, _mm512_slli_epi32(bh, 16)));
    _mm512_store_si512(lo, _mm512_or_si512(al, _mm512_slli_epi32(bl, 16)));
  }
#endif

#if defined(TPA_HAVE_AVX512VNNI)
  /// int8 keys scored as int16 q × int8 K in 32-bit integer lanes (vpdpwssd).
  static constexpr bool kDotI16 = true;
  using VI = __m512i;  // 16 int32 accumulator lanes, or 32 int16 operands
  static VI izero() { return _mm512_setzero_si512(); }
  /// 32 int16 at p (64-byte aligned).
  static VI load_i16(const std::int16_t* p) { return _mm512_load_si512(p); }
  /// q8 elements p[0 … n) (n ∈ [1, 32]) sign-extended to int16, lanes ≥ n zero; reads only n.
  TPA_ALWAYS_INLINE static VI widen_i8(const q8* p, Index n) {
    const __m256i b = n == 2 * kWidth ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                                      : _mm256_maskz_loadu_epi8(
                                            static_cast<__mmask32>((1ull << n) - 1u), p);
    return _mm512_cvtepi8_epi16(b);
  }
  /// acc lane i + a[2i]·b[2i] + a[2i+1]·b[2i+1] (int16 operands, int32 lanes, wrapping).
  /// (Inline asm under GCC: its intrinsic form copied every accumulator around each vpdpwssd.)
  TPA_ALWAYS_INLINE static VI dot_i16(VI acc, VI a, VI b) {
#if defined(__GNUC__)
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
#else
    return _mm512_dpwssd_epi32(acc, a, b);
#endif
  }
  /// Like lane_reduce: lane i is the (exact, int32) sum of the lanes of a[i], then as f32.
  TPA_ALWAYS_INLINE static V lane_reduce_i32(const VI* a) {
    // lane_reduce's tree (tpa/kernels/lane_reduce.hpp) with integer adds.
    constexpr int in[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};
    VI b[8], c[4], d[2];
    TPA_UNROLL
    for (int i = 0; i < 8; ++i)
      b[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(a[in[i]], a[in[i + 8]], 0x44),
                              _mm512_shuffle_i32x4(a[in[i]], a[in[i + 8]], 0xEE));
    TPA_UNROLL
    for (int i = 0; i < 4; ++i)
      c[i] = _mm512_add_epi32(_mm512_shuffle_i32x4(b[i], b[i + 4], 0x88),
                              _mm512_shuffle_i32x4(b[i], b[i + 4], 0xDD));
    TPA_UNROLL
    for (int i = 0; i < 2; ++i)
      d[i] = _mm512_add_epi32(shuffle_words<0x44>(c[i], c[i + 2]),
                              shuffle_words<0xEE>(c[i], c[i + 2]));
    return _mm512_cvtepi32_ps(
        _mm512_add_epi32(shuffle_words<0x88>(d[0], d[1]), shuffle_words<0xDD>(d[0], d[1])));
  }
  // vshufps on 32-bit integer lanes.
  template <int I>
  TPA_ALWAYS_INLINE static VI shuffle_words(VI x, VI y) {
    return _mm512_castps_si512(
        _mm512_shuffle_ps(_mm512_castsi512_ps(x), _mm512_castsi512_ps(y), I));
  }
#endif

  /// Lanes i < n: p[i·stride] as f32; lanes ≥ n: 0. Reads only those n elements' range.
  /// Stride 2 (the T6 ranks' interleaved head factors) is two loads and one permute.
  template <class S>
  static V load_strided(const S* p, Index stride, Index n) {
    if (stride == 1) return load_widen<S>(p, n);
    if constexpr (is_quantized_v<S>) {
      if (stride == 2) {  // the even bytes are the low halves of the 16-bit words
        const Index m = 2 * n - 1;  // bytes p[0 … 2n−2]
        const __m256i x = _mm256_maskz_loadu_epi8(static_cast<__mmask32>((1u << m) - 1u), p);
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_cvtepi16_epi8(x)));
      }
      S buf[16] = {};
      for (Index i = 0; i < n; ++i) buf[i] = p[i * stride];
      return load_widen<S>(buf, kWidth);
    }
    if (stride == 2) {
      const Index m = 2 * n - 1;  // elements p[0 … 2n−2]
      if constexpr (std::is_same<S, float>::value) {
        const V lo = load_widen<float>(p, std::min<Index>(m, 16));
        const V hi = m > 16 ? load_widen<float>(p + 16, m - 16) : zero();
        const __m512i even =
            _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        return _mm512_permutex2var_ps(lo, even, hi);
      } else {  // the even 16-bit elements are the low halves of the 32-bit words
        const __m512i x = _mm512_maskz_loadu_epi16(static_cast<__mmask32>((1u << m) - 1u), p);
        return widen<S>(_mm512_cvtepi32_epi16(x));
      }
    }
    if constexpr (std::is_same<S, float>::value) {
      const __m512i idx = _mm512_mullo_epi32(
          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
          _mm512_set1_epi32(static_cast<int>(stride)));
      return _mm512_mask_i32gather_ps(zero(), first(n), idx, p, 4);
    } else {
      alignas(64) float buf[kWidth] = {};
      for (Index i = 0; i < n; ++i) buf[i] = widen_raw(p[i * stride]);
      return load(buf);
    }
  }

  template <class S>
  static V widen(__m256i h) {
    if constexpr (std::is_same<S, half>::value) {
      return _mm512_cvtph_ps(h);
    } else {  // bfloat16: the upper 16 bits of an f32
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }

  // ---- GroupedTiled's paired value micro-kernel (pv_pair): V read in blocks of 32 dims ----
  /// Whether pv_pair reads V of storage S: bf16 (2 widening ops per 32 dims, not 4), and int8
  /// with AVX-512 VNNI (int16 probabilities × int8 V in int32, vpdpwssd; the probabilities'
  /// rounding, ≤ 1.5e-5 of a tile's largest weight, is its only added error).
  /// Each 32-dim block of its accumulators holds two vectors in an order pair_order<S> restores.
  template <class S>
  static constexpr bool kPairValues = std::is_same<S, bfloat16>::value
#if defined(TPA_HAVE_AVX512VNNI)
                                      || is_quantized_v<S>
#endif
      ;

#if defined(TPA_HAVE_AVX512VNNI)
  static V to_float(VI x) { return _mm512_cvtepi32_ps(x); }
  /// Stores x (64 bytes) at p (unaligned).
  static void store_i(void* p, VI x) { _mm512_storeu_si512(p, x); }
  /// Lane i = the pair (rint(a[i]), rint(b[i])) as int16 (a in the low half); |a|, |b| ≤ 32767.
  static VI i16_pairs(V a, V b) {
    return _mm512_or_si512(_mm512_and_si512(_mm512_cvtps_epi32(a), _mm512_set1_epi32(0xFFFF)),
                           _mm512_slli_epi32(_mm512_cvtps_epi32(b), 16));
  }

  /// acc + x·w per 32-bit lane, x and w pairs of int16 (w = w[0], w[1] in every lane; w's
  /// bytes may sit in storage of another type): vpdpwssd.
  TPA_ALWAYS_INLINE static VI dot_pairs(VI acc, VI x, const void* w) {
    std::int32_t w2;
    std::memcpy(&w2, w, sizeof w2);
    return dot_i16(acc, x, _mm512_set1_epi32(w2));
  }

  /// q[t] = round(p[t]·sc[t] / s) as int16 for t < n ≤ kTile, 0 for t ∈ [n, kTile); returns s =
  /// max_t |p[t]·sc[t]| / 32767 (0 if all are 0; NaN, with q all 0, if one is not finite).
  static float quantize_probs(const float* p, const float* sc, Index n, std::int16_t* q) {
    constexpr Index NV = kTile / kWidth;
    V w[NV];
    V mx = zero(), sum = zero();
    TPA_UNROLL
    for (Index v = 0; v < NV; ++v) {
      const __mmask16 k = first(std::clamp<Index>(n - v * kWidth, 0, kWidth));
      w[v] = _mm512_mul_ps(_mm512_maskz_loadu_ps(k, p + v * kWidth),
                           _mm512_maskz_loadu_ps(k, sc + v * kWidth));
      mx = _mm512_max_ps(mx, _mm512_abs_ps(w[v]));
      sum = _mm512_add_ps(sum, w[v]);  // NaN or Inf if one is
    }
    const float m = _mm512_reduce_max_ps(mx);
    const bool finite = std::abs(_mm512_reduce_add_ps(sum)) <= std::numeric_limits<float>::max();
    const V inv = set1(m > 0.f ? 32767.f / m : 0.f);
    TPA_UNROLL
    for (Index v = 0; v < NV; ++v) {
      const V x = finite ? _mm512_mul_ps(w[v], inv) : zero();
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + v * kWidth),
                          _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(x)));
    }
    return finite ? m / 32767.f : std::numeric_limits<float>::quiet_NaN();
  }
#endif

  /// a[0, 32): one 32-dim block of pv_pair's accumulators back in dim order.
  template <class S>
  static void pair_order(float* a) {
    __m512i i0, i1;
    if constexpr (std::is_same<S, bfloat16>::value) {  // even dims, then odd ones
      i0 = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
      i1 = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    } else {  // q8_pairs' lo (dims 0–7, 16–23), hi (8–15, 24–31)
      i0 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
      i1 = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    }
    const V x = _mm512_loadu_ps(a), y = _mm512_loadu_ps(a + kWidth);
    _mm512_storeu_ps(a, _mm512_permutex2var_ps(x, i0, y));
    _mm512_storeu_ps(a + kWidth, _mm512_permutex2var_ps(x, i1, y));
  }

  template <class S>
  static void transpose_block(const S* src, Index ld, Index rows, Index cols, float* dst,
                              Index dst_ld) {
    V r[16];
    TPA_UNROLL
    for (int i = 0; i < 16; ++i) r[i] = i < rows ? load_widen<S>(src + i * ld, cols) : zero();
    transpose16(r);
    if (cols == kWidth) {
      TPA_UNROLL
      for (int c = 0; c < 16; ++c) _mm512_store_ps(dst + c * dst_ld, r[c]);
    } else {
      for (int c = 0; c < cols; ++c) _mm512_store_ps(dst + c * dst_ld, r[c]);
    }
  }

  /// In-register transpose of a 16×16 f32 block: r[i] lane j ↔ r[j] lane i.
  static void transpose16(V* r) {
    V t[16];
    TPA_UNROLL
    for (int i = 0; i < 8; ++i) {
      t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
      t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4i + k], 128-bit lane L: column 4L + k of rows 4i … 4i+3.
    TPA_UNROLL
    for (int i = 0; i < 4; ++i) {
      r[4 * i + 0] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      r[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      r[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    TPA_UNROLL
    for (int k = 0; k < 4; ++k) {
      const V a = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
      const V b = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
      const V c = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
      const V d = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
      t[k] = _mm512_shuffle_f32x4(a, c, 0x88);       // column k
      t[8 + k] = _mm512_shuffle_f32x4(a, c, 0xDD);   // column 8 + k
      t[4 + k] = _mm512_shuffle_f32x4(b, d, 0x88);   // column 4 + k
      t[12 + k] = _mm512_shuffle_f32x4(b, d, 0xDD);  // column 12 + k
    }
    TPA_UNROLL
    for (int i = 0; i < 16; ++i) r[i] = t[i];
  }

#if defined(TPA_HAVE_AVX512VNNI)
  // FlashTPA's int8 value product (TpaTiled::pv_q8): int16 weight pairs × int8 B_V rows on
  // vpdpwssd, exact int32 sums, one scale per row at the end.
  static constexpr bool kHasQ8Pairs = true;
  /// Elements 0–31 of the int8 rows a and b as 16-bit pairs (a_j, b_j) in 32-bit lanes:
  /// lo holds j = 0–7, 16–23, hi j = 8–15, 24–31 (q8_unpair, and pair_order<q8> for pv_pair's
  /// accumulators, restore the order). Also GroupedTiled's pv_pair's two token rows.
  static void q8_pairs(const q8* a, const q8* b, VI& lo, VI& hi) {
    const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b));
    lo = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(x, y));
    hi = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(x, y));
  }
  /// Lane i of p (16 floats' room, 64-byte aligned) = the 16-bit pair (round(w0_i), round(w1_i));
  /// |w0|, |w1| ≤ 32767.
  static void store_pairs16(float* p, V w0, V w1) {
    const __m512i a = _mm512_cvtps_epi32(w0);
    const __m512i b = _mm512_slli_epi32(_mm512_cvtps_epi32(w1), 16);
    _mm512_store_si512(p, _mm512_mask_blend_epi16(0xAAAAAAAAu, a, b));
  }
  /// The int32 sums of q8_pairs' lo and hi lanes as f32 in element order: f0 = 0–15, f1 = 16–31.
  static void q8_unpair(VI lo, VI hi, V& f0, V& f1) {
    const V a = _mm512_cvtepi32_ps(lo), b = _mm512_cvtepi32_ps(hi);
    f0 = _mm512_shuffle_f32x4(a, b, 0x44);
    f1 = _mm512_shuffle_f32x4(a, b, 0xEE);
  }
#endif  // TPA_HAVE_AVX512VNNI
};

}  // namespace detail

/// Avx512 kernels: the tiled grouped and FlashTPA kernels on AVX-512 intrinsics.
template <>
struct Kernels<Avx512> : detail::TiledKernels<detail::Avx512Ops, Avx2> {};

}  // namespace tpa

#endif  // TPA_HAVE_AVX512
