// Umbrella header: everything a user of tpa needs.
#pragma once

#include "tpa/backend/backends.hpp"
#include "tpa/cache/kv_cache.hpp"
#include "tpa/cache/layout.hpp"
#include "tpa/core/config.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/quant.hpp"
#include "tpa/core/rope.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/layers/chunk.hpp"
#include "tpa/layers/gqa.hpp"
#include "tpa/layers/mla.hpp"
#include "tpa/layers/tpa.hpp"
#include "tpa/runtime/context.hpp"
