// The Avx512 backend's kernel instantiations declared in kernel_instances.hpp.
#include "kernel_instances.hpp"

#if defined(TPA_HAVE_AVX512)
TPA_TEST_KERNELS(, tpa::Avx512)
#endif
