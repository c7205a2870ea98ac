// Backend tag types and tpa::Native, the best backend the compiler flags enable.
#pragma once

#include <cstddef>
#include <type_traits>

#include "tpa/core/isa.hpp"

namespace tpa {

/// Scalar loops with double accumulation: the oracle every other backend is tested against.
struct Reference {
  static constexpr const char* name = "reference";
  static constexpr bool enabled = true;  ///< the compiler flags enable its instructions
  static constexpr std::size_t lanes = 1;
  static constexpr std::size_t alignment = alignof(float);
};

/// Eigen expressions and Eigen packet math; runs on any CPU. Falls back to Reference for a
/// kernel it does not specialise.
struct Portable : Reference {
  using Parent = Reference;
  static constexpr const char* name = "portable";
};

/// AVX2 + FMA (+ F16C) intrinsics. Declared always, usable only when the compiler flags enable
/// AVX2 and FMA (TPA_HAVE_AVX2, `enabled`): a layer or kernel instantiated with it otherwise
/// fails to compile with a static_assert that names the flags.
struct Avx2 : Portable {
  using Parent = Portable;
  static constexpr const char* name = "avx2";
  static constexpr std::size_t lanes = 8;
  static constexpr std::size_t alignment = 32;
#if defined(TPA_HAVE_AVX2)
  static constexpr bool enabled = true;
#else
  static constexpr bool enabled = false;
#endif
};

/// AVX-512F/BW/VL intrinsics. Declared always, usable only when the flags enable them
/// (TPA_HAVE_AVX512, `enabled`; otherwise a static_assert names the flags, as for Avx2).
/// AVX512-BF16's dot product (vdpbf16ps) is not used: it rounds the f32 query to bf16 (score
/// error 7.5e-4 of Σ|q·k|, against 5e-8 in f32), and its measured gain on bf16 keys came from
/// whole-line reads, which the f32 kernels get too; nor is AMX (README, "Decode kernels against
/// the roofline").
struct Avx512 : Avx2 {
  using Parent = Avx2;
  static constexpr const char* name = "avx512";
  static constexpr std::size_t lanes = 16;
  static constexpr std::size_t alignment = 64;
#if defined(TPA_HAVE_AVX512)
  static constexpr bool enabled = true;
#else
  static constexpr bool enabled = false;
#endif
};

#if defined(TPA_HAVE_AVX512)
using Native = Avx512;
#elif defined(TPA_HAVE_AVX2)
using Native = Avx2;
#else
using Native = Portable;
#endif

/// Whether T is a backend tag (Reference or a tag derived from it: Portable, Avx2, Avx512,
/// Native), i.e. a valid Backend argument of the layers and kernels.
template <class T>
struct is_backend : std::is_base_of<Reference, T> {};
template <class T>
inline constexpr bool is_backend_v = is_backend<T>::value;

namespace detail {

/// Instantiated by every layer and by Kernels<Backend>: misuse of the Backend parameter fails
/// with one of these messages instead of deep inside the kernels.
template <class Backend>
struct RequireBackend {
  static_assert(is_backend<Backend>::value,
                "tpa: the Backend template argument must be a backend tag: tpa::Reference, "
                "tpa::Portable, tpa::Avx2, tpa::Avx512 or tpa::Native (tpa/backend/tags.hpp)");
  static_assert(!std::is_same<Backend, Avx2>::value || Avx2::enabled,
                "tpa::Avx2 needs -mavx2 -mfma (or -march=native on such a CPU)");
  static_assert(!std::is_same<Backend, Avx512>::value || Avx512::enabled,
                "tpa::Avx512 needs -mavx512f -mavx512bw -mavx512vl, with -mavx2 -mfma (or "
                "-march=native on such a CPU)");
  static constexpr bool value = true;
};

/// Backend::Parent for a backend tag; Reference for anything else (so that Kernels<T> of a
/// non-tag reaches RequireBackend's message, not an error about T::Parent).
template <class Backend, bool = is_backend<Backend>::value>
struct ParentOf {
  using type = typename Backend::Parent;
};
template <class Backend>
struct ParentOf<Backend, false> {
  using type = Reference;
};

}  // namespace detail

}  // namespace tpa
