// Backend tag types and tpa::Native, the best backend the compiler flags enable.
#pragma once

#include <cstddef>

namespace tpa {

/// Scalar loops with double accumulation: the oracle every other backend is tested against.
struct Reference {
  static constexpr const char* name = "reference";
  static constexpr std::size_t lanes = 1;
  static constexpr std::size_t alignment = alignof(float);
};

/// Eigen expressions and Eigen packet math; runs on any CPU. Falls back to Reference for a
/// kernel it does not specialise.
struct Portable : Reference {
  using Parent = Reference;
  static constexpr const char* name = "portable";
};

#if defined(__AVX2__) && defined(__FMA__)
#define TPA_HAVE_AVX2 1
/// AVX2 + FMA (+ F16C) intrinsics. Compiled only when the flags enable AVX2 and FMA.
struct Avx2 : Portable {
  using Parent = Portable;
  static constexpr const char* name = "avx2";
  static constexpr std::size_t lanes = 8;
  static constexpr std::size_t alignment = 32;
};
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(TPA_HAVE_AVX2)
#define TPA_HAVE_AVX512 1
/// AVX-512F/BW/VL intrinsics. Compiled only when enabled. AVX512-BF16's dot product (vdpbf16ps)
/// is not used: it rounds the f32 query to bf16 (score error 7.5e-4 of Σ|q·k|, against 5e-8 in
/// f32), and its measured gain on bf16 keys came from whole-line reads, which the f32 kernels get
/// too; nor is AMX (README, "Decode kernels against the roofline").
struct Avx512 : Avx2 {
  using Parent = Avx2;
  static constexpr const char* name = "avx512";
  static constexpr std::size_t lanes = 16;
  static constexpr std::size_t alignment = 64;
};
#endif

#if defined(TPA_HAVE_AVX512)
using Native = Avx512;
#elif defined(TPA_HAVE_AVX2)
using Native = Avx2;
#else
using Native = Portable;
#endif

}  // namespace tpa
