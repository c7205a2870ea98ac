// Every backend the build enables, and the Kernels trait over them.
#pragma once

#include "tpa/backend/kernels.hpp"
#include "tpa/backend/reference.hpp"
#include "tpa/backend/tags.hpp"
#include "tpa/backend/portable.hpp"
#include "tpa/backend/avx2.hpp"    // empty unless TPA_HAVE_AVX2
#include "tpa/backend/avx512.hpp"  // empty unless TPA_HAVE_AVX512
