// Explicit instantiation declarations of the attention kernels' entry points, grouped_attention
// and tpa_attention, for every compiled backend and cache scalar. tests/CMakeLists.txt includes
// this header first in every test translation unit (-include), so the kernels, which are most of
// the code a test file instantiates, are compiled once per build (kernel_instances_*.cpp, one
// per backend, in parallel) instead of once per translation unit: half the compile time of the
// heavier test files (half_cache_test: 108 -> 54 CPU seconds at -O3).
#pragma once

#include <tpa/tpa.hpp>

// TPA_TEST_KERNELS(EXTERN, B): the instantiations of backend B for float, bfloat16, half and q8;
// EXTERN is `extern` for the declarations and empty for the definitions.
#define TPA_TEST_KERNELS_S(EXTERN, B, S)                                                      \
  EXTERN template void tpa::grouped_attention<B, S>(                                         \
      tpa::Context&, const tpa::GroupedAttentionParams<S>*, tpa::Index, const tpa::GroupedSplit&); \
  EXTERN template void tpa::tpa_attention<B, S>(tpa::Context&, const tpa::TpaAttentionParams<S>*, \
                                                tpa::Index, const tpa::TpaSplit&);
#define TPA_TEST_KERNELS(EXTERN, B)                                              \
  TPA_TEST_KERNELS_S(EXTERN, B, float)                                           \
  TPA_TEST_KERNELS_S(EXTERN, B, tpa::bfloat16)                                   \
  TPA_TEST_KERNELS_S(EXTERN, B, tpa::half)                                      \
  TPA_TEST_KERNELS_S(EXTERN, B, tpa::q8)

TPA_TEST_KERNELS(extern, tpa::Reference)
TPA_TEST_KERNELS(extern, tpa::Portable)
#if defined(TPA_HAVE_AVX2)
TPA_TEST_KERNELS(extern, tpa::Avx2)
#endif
#if defined(TPA_HAVE_AVX512)
TPA_TEST_KERNELS(extern, tpa::Avx512)
#endif
