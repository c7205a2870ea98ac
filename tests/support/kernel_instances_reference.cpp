// The Reference backend's kernel instantiations declared in kernel_instances.hpp.
#include "kernel_instances.hpp"

TPA_TEST_KERNELS(, tpa::Reference)
