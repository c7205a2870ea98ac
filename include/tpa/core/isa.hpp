// Which SIMD instruction sets the compiler flags enable: TPA_HAVE_AVX2 (AVX2 + FMA) and
// TPA_HAVE_AVX512 (AVX-512F/BW/VL, with AVX2 + FMA). The backend tags (tpa/backend/tags.hpp) and
// the micro-kernels' intrinsic paths (tpa/kernels/) both read them. TPA_HAVE_AVX512VNNI: AVX-512
// VNNI (vpdpwssd) on top of TPA_HAVE_AVX512.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#define TPA_HAVE_AVX2 1
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(TPA_HAVE_AVX2)
#define TPA_HAVE_AVX512 1
#endif
#if defined(TPA_HAVE_AVX512) && defined(__AVX512VNNI__)
#define TPA_HAVE_AVX512VNNI 1
#endif
