// Every backend the build enables, and the Kernels trait over them.
#pragma once

#include "tpa/backend/kernels.hpp"
#include "tpa/backend/reference.hpp"
#include "tpa/backend/tags.hpp"
