// The Portable backend: Eigen packet math (whatever SIMD Eigen uses for float on this target,
// or scalars), so it runs on any CPU. Kernels it does not specialise fall back to Reference's.
#pragma once

#include <Eigen/Core>
#include <algorithm>
#include <type_traits>

#include "tpa/backend/kernels.hpp"
#include "tpa/backend/reference.hpp"
#include "tpa/backend/tags.hpp"
#include "tpa/backend/tiled_kernels.hpp"
#include "tpa/core/quant.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/tpa_tiled.hpp"

namespace tpa {
namespace detail {

/// Vector primitives of the Portable backend for GroupedTiled, on Eigen's native float packet
/// (Packet16f/8f/4f, or float without SIMD).
struct EigenOps {
  using V = Eigen::internal::packet_traits<float>::type;
  static constexpr Index kWidth = Eigen::internal::packet_traits<float>::size;
  static constexpr const char* kTpaWho = "Kernels<Portable>::tpa_attention";
  static constexpr Index kTile = std::max<Index>(16, kWidth);
  static constexpr Index kQkRows = std::max<Index>(1, 8 * kWidth / kTile);
  static constexpr Index kLaneTokens = 4;
  static constexpr Index kLaneVecs = kWidth >= 8 ? 2 : 1;
  static constexpr Index kLaneRowsMin = std::max<Index>(1, kWidth / 2);
  static constexpr Index kPvRows = 2;
  static constexpr Index kPvCols = 4;
  static constexpr Index kPv1Cols = 4;
  static constexpr Index kPvtDims = 4;

  static V zero() { return Eigen::internal::pset1<V>(0.f); }
  static V set1(float x) { return Eigen::internal::pset1<V>(x); }
  static V load(const float* p) { return Eigen::internal::pload<V>(p); }
  static V loadu(const float* p) { return Eigen::internal::ploadu<V>(p); }
  static void store(float* p, const V& v) { Eigen::internal::pstore(p, v); }
  static V add(const V& a, const V& b) { return Eigen::internal::padd(a, b); }
  static V sub(const V& a, const V& b) { return Eigen::internal::psub(a, b); }
  static V mul(const V& a, const V& b) { return Eigen::internal::pmul(a, b); }
  static V div(const V& a, const V& b) { return Eigen::internal::pdiv(a, b); }  // soft-cap
  static V max(const V& a, const V& b) { return Eigen::internal::pmax(a, b); }
  static V fmadd(const V& a, const V& b, const V& c) { return Eigen::internal::pmadd(a, b, c); }
  static float reduce_max(const V& v) { return Eigen::internal::predux_max(v); }
  static float reduce_add(const V& v) { return Eigen::internal::predux(v); }

  /// e^x as Avx512Ops::exp (Cody–Waite reduction, Cephes' polynomial, pldexp), in Eigen packet
  /// ops: ≤ 2 ulp for x ≤ 88, exactly 0 for x < −87.3 (no denormals), NaN stays NaN. (Eigen's
  /// own pexp is up to ~4.5 ulp here.)
  static V exp(const V& x) {
    using namespace Eigen::internal;
    const V flush = pcmp_lt(x, set1(-87.3f));
    const V xc = pmax<Eigen::PropagateNaN>(pmin<Eigen::PropagateNaN>(x, set1(88.3f)), set1(-87.3f));
    const V n = pfloor(pmadd(xc, set1(1.44269504088896341f), set1(0.5f)));
    V r = psub(xc, pmul(n, set1(0.693359375f)));
    r = psub(r, pmul(n, set1(-2.12194440e-4f)));
    V p = set1(1.9875691500e-4f);
    p = pmadd(p, r, set1(1.3981999507e-3f));
    p = pmadd(p, r, set1(8.3334519073e-3f));
    p = pmadd(p, r, set1(4.1665795894e-2f));
    p = pmadd(p, r, set1(1.6666665459e-1f));
    p = pmadd(p, r, set1(5.0000001201e-1f));
    p = padd(pmadd(p, pmul(r, r), r), set1(1.f));
    return pselect(flush, zero(), pldexp(p, n));
  }

  template <class S>
  static V load_widen(const S* p, Index n) {
    if constexpr (std::is_same<S, float>::value) {
      if (n == kWidth) return loadu(p);
    }
    alignas(64) float buf[kWidth] = {};
    for (Index i = 0; i < n; ++i) buf[i] = widen_raw(p[i]);
    return load(buf);
  }

  /// Lanes i < n: p[i·stride] as f32; lanes ≥ n: 0.
  template <class S>
  static V load_strided(const S* p, Index stride, Index n) {
    if (stride == 1) return load_widen<S>(p, n);
    alignas(64) float buf[kWidth] = {};
    for (Index i = 0; i < n; ++i) buf[i] = widen_raw(p[i * stride]);
    return load(buf);
  }

  template <class S>
  static void transpose_block(const S* src, Index ld, Index rows, Index cols, float* dst,
                              Index dst_ld) {
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wignored-attributes"  // PacketBlock<__m512, 16>, as in Eigen
#endif
    Eigen::internal::PacketBlock<V, static_cast<int>(kWidth)> b;
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif
    for (Index i = 0; i < kWidth; ++i)
      b.packet[i] = i < rows ? load_widen<S>(src + i * ld, cols) : zero();
    Eigen::internal::ptranspose(b);
    for (Index c = 0; c < cols; ++c) store(dst + c * dst_ld, b.packet[c]);
  }
};

}  // namespace detail

/// Portable kernels: the tiled grouped and FlashTPA kernels on Eigen packet math.
template <>
struct Kernels<Portable> : detail::TiledKernels<detail::EigenOps, Reference> {};

}  // namespace tpa
