// Register blocks of the value micro-kernels (GroupedTiled, TpaTiled): NR accumulator rows of
// NC vectors each, held in registers across a tile — loaded with the rows' online-softmax
// rescale, updated one token at a time, stored back.
#pragma once

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

}  // namespace detail
}  // namespace tpa
