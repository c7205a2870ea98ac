// The Avx2 backend's kernel instantiations declared in kernel_instances.hpp.
#include "kernel_instances.hpp"

#if defined(TPA_HAVE_AVX2)
TPA_TEST_KERNELS(, tpa::Avx2)
#endif
