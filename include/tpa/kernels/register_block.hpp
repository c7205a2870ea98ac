// Register blocks of the value micro-kernels (GroupedTiled, TpaTiled): NR accumulator rows of
// NC vectors each, held in registers across a tile — loaded with the rows' online-softmax
// rescale, updated one token at a time, stored back.
#pragma once

#include <algorithm>
#include <type_traits>

#include "tpa/core/tensor.hpp"
#include "tpa/kernels/lane_reduce.hpp"

/// Fully unrolls the next loop (its trip count is a small compile-time constant), so that the
/// register-blocked accumulator arrays of the micro-kernels live in registers at -O2 too.
#define TPA_UNROLL _Pragma("GCC unroll 32")

namespace tpa {
namespace detail {

/// a[r][c] = acc[r·ld + c·W, +W) · alpha[r] for r < NR, c < NC (acc rows 64-byte aligned, W =
/// Ops::kWidth): the block's rows rescaled by their online-softmax factors.
template <class Ops, int NR, int NC>
TPA_ALWAYS_INLINE void load_rescaled(typename Ops::V (&a)[NR][NC], const float* acc, Index ld,
                                     const float* alpha) {
  TPA_UNROLL
  for (int r = 0; r < NR; ++r) {
    const typename Ops::V al = Ops::set1(alpha[r]);
    TPA_UNROLL
    for (int c = 0; c < NC; ++c) a[r][c] = Ops::mul(Ops::load(acc + r * ld + c * Ops::kWidth), al);
  }
}

/// a[r][c] += (w[r·w_stride] · mul) · x[c]: one token's rank-1 update of the block (w: its
/// weight in each row, mul: a factor of the token, e.g. its int8 value scale).
template <class Ops, int NR, int NC>
TPA_ALWAYS_INLINE void rank1_update(typename Ops::V (&a)[NR][NC], const typename Ops::V (&x)[NC],
                                    const float* w, Index w_stride, float mul = 1.f) {
  TPA_UNROLL
  for (int r = 0; r < NR; ++r) {
    const typename Ops::V wr = Ops::set1(w[r * w_stride] * mul);
    TPA_UNROLL
    for (int c = 0; c < NC; ++c) a[r][c] = Ops::fmadd(wr, x[c], a[r][c]);
  }
}

/// acc[r·ld + c·W, +W) = a[r][c] for r < NR, c < NC (acc rows 64-byte aligned).
template <class Ops, int NR, int NC>
TPA_ALWAYS_INLINE void store_block(const typename Ops::V (&a)[NR][NC], float* acc, Index ld) {
  TPA_UNROLL
  for (int r = 0; r < NR; ++r) {
    TPA_UNROLL
    for (int c = 0; c < NC; ++c) Ops::store(acc + r * ld + c * Ops::kWidth, a[r][c]);
  }
}

/// dst[0, len) = src[0, len) widened to f32 (times *scale unless scale is null), zero up to the
/// next whole vector: whole vectors first (no per-vector lane mask), then one partial vector.
template <class Ops, class T>
TPA_ALWAYS_INLINE void widen_row(const T* src, Index len, float* dst,
                                 const typename Ops::V* scale) {
  constexpr Index W = Ops::kWidth;
  auto put = [&](Index j, typename Ops::V x) {
    Ops::store(dst + j, scale != nullptr ? Ops::mul(x, *scale) : x);
  };
  Index j = 0;
  for (; j + W <= len; j += W) put(j, Ops::template load_widen<T>(src + j, W));
  if (j < len) put(j, Ops::template load_widen<T>(src + j, len - j));
}

/// Row pointers of a block of NT key rows for lane_rows_product: row t at k + t·k_ld for
/// t < nt (rows past nt repeat row nt − 1, so nothing past it is read), `len` elements each.
/// f32 rows without a stage are used in place; otherwise each row is widened to f32 (times
/// sc[t] if sc is non-null) into stage + t·stage_ld, zero-padded to a whole vector.
template <class Ops, int NT, class T>
TPA_ALWAYS_INLINE void lane_rows(const T* k, Index k_ld, Index nt, Index len, const float* sc,
                                 float* stage, Index stage_ld, const float* (&rows)[NT]) {
  for (int t = 0; t < NT; ++t) {
    const Index tt = std::min<Index>(t, nt - 1);
    const T* src = k + tt * k_ld;
    if constexpr (std::is_same<T, float>::value) {
      if (stage == nullptr) {
        rows[t] = src;
        continue;
      }
    }
    float* w = stage + tt * stage_ld;
    rows[t] = w;
    if (t != tt) continue;
    const typename Ops::V scale = Ops::set1(sc != nullptr ? sc[t] : 1.f);
    widen_row<Ops>(src, len, w, sc != nullptr ? &scale : nullptr);
  }
}

/// s[t·s_ld + v·W, +W) (+)= Σ_j rows[t][j] · q[j·q_ld + v·W, +W) for t < NT, v < VB, j < len:
/// NT key rows against VB vectors of rows in lanes (qᵀ), each key element broadcast from its
/// row; NT × VB accumulators. first: s is written, not added to.
template <class Ops, int NT, int VB>
TPA_ALWAYS_INLINE void lane_rows_product(const float* const* rows, Index len, const float* q,
                                         Index q_ld, float* s, Index s_ld, bool first) {
  using V = typename Ops::V;
  constexpr Index W = Ops::kWidth;
  V acc[NT][VB];
  TPA_UNROLL
  for (int t = 0; t < NT; ++t) {
    TPA_UNROLL
    for (int v = 0; v < VB; ++v) acc[t][v] = first ? Ops::zero() : Ops::load(s + t * s_ld + v * W);
  }
  for (Index j = 0; j < len; ++j) {
    V qv[VB];
    TPA_UNROLL
    for (int v = 0; v < VB; ++v) qv[v] = Ops::load(q + j * q_ld + v * W);
    TPA_UNROLL
    for (int t = 0; t < NT; ++t) {
      const V kb = Ops::set1(rows[t][j]);
      TPA_UNROLL
      for (int v = 0; v < VB; ++v) acc[t][v] = Ops::fmadd(kb, qv[v], acc[t][v]);
    }
  }
  store_block<Ops>(acc, s, s_ld);
}

}  // namespace detail
}  // namespace tpa
