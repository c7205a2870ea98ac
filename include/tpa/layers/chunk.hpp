// Chunk: one sequence's share of a ragged layer call.
#pragma once

#include "tpa/cache/kv_cache.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief One sequence's share of a ragged layer call (forward(ctx, x, y, cache, layer, chunks)):
/// the next `tokens` rows of x are the next tokens of sequence `seq`. Chunks take the rows of x
/// in order, so chunk i starts at row Σ_{j<i} chunks[j].tokens. A prefill chunk has many tokens,
/// a decode token one, a speculative draft k; any mix goes in one call.
struct Chunk {
  SeqId seq = -1;   ///< a live sequence of the cache, at most once per call
  Index tokens = 0; ///< rows of x for it, ≥ 1
};

}  // namespace tpa
