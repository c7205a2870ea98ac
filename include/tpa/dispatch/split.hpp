// The work-split arithmetic the attention schedulers (grouped_attention, tpa_attention) share:
// how many workers, where to cut the weighted line of work, the pieces each worker runs, and the
// exact merge of key-split pieces.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "tpa/core/tensor.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/score_variant.hpp"
#include "tpa/kernels/softmax.hpp"
#include "tpa/runtime/context.hpp"

namespace tpa {

/// How tpa::grouped_attention and tpa::tpa_attention spread their work. The defaults suit
/// decode and prefill; tests use the fields to force a split.
struct GroupedSplit {
  /// At most this many workers (pieces of work; more than ctx.threads() is allowed: a thread
  /// then runs several); 0 = ctx.threads().
  int max_workers = 0;
  /// Multiply-adds each worker must get (fewer workers are used for less work, because waking a
  /// thread costs microseconds); 0 = always use max_workers.
  double min_work_per_worker = 2.0e6;
  /// A decode call (one query) is cut along its keys into pieces of at least this many
  /// multiply-adds (at most kMaxKeyPieces, on tile boundaries; 0 = as many as allowed), merged
  /// exactly in key order. The cut depends on the call alone — never on the thread count, the
  /// workers or the other calls — so its output bits do not either.
  double min_work_per_piece = 1.0e6;
  /// Most key pieces of one decode call (12 shares evenly over 2, 3, 4 or 6 threads).
  static constexpr Index kMaxKeyPieces = 12;
};

namespace detail {

/// Workers for `total` multiply-adds: `max_w` (what scratch is sized for, whatever the lengths,
/// so a steady decode never grows the arena) and `used` ≤ max_w.
struct WorkerCount {
  Index max_w = 1, used = 1;
};
inline WorkerCount worker_count(const GroupedSplit& split, int threads, double total) {
  WorkerCount w;
  w.max_w = split.max_workers > 0 ? split.max_workers : threads;
  w.used = w.max_w;
  if (split.min_work_per_worker > 0)
    w.used = std::max<Index>(
        1, std::min<Index>(w.used, static_cast<Index>(total / split.min_work_per_worker)));
  return w;
}

/// Key pieces of a decode call over `keys` tokens (`pair_cost` multiply-adds per key): `count`
/// pieces of whole `align`-token tiles (the call's `tiles` of them, the last possibly short),
/// tiles dealt as evenly as whole tiles allow (piece k starts at tile ⌊k·tiles/count⌋), so that
/// whichever whole pieces a worker gets, the workers' keys differ by at most a tile per piece.
/// (Pieces of one fixed length left the last one short: 16K keys in 12 pieces of 1408 gave two
/// workers 8448 and 7936 keys.) A function of the call and `split` only.
struct KeyPieces {
  Index count = 1, tiles = 1, align = 1;
  /// First key of piece k (0 ≤ k ≤ count), counted from the call's first key; begin(count) ≥
  /// keys.
  Index begin(Index k) const { return align * (k * tiles / count); }
};
inline KeyPieces key_pieces(const GroupedSplit& split, Index keys, double pair_cost, Index align) {
  Index want = GroupedSplit::kMaxKeyPieces;
  if (split.min_work_per_piece > 0)
    want = static_cast<Index>(std::min<double>(
        static_cast<double>(want),
        static_cast<double>(keys) * pair_cost / split.min_work_per_piece));
  KeyPieces k;
  k.align = align;
  k.tiles = std::max<Index>(1, (keys + align - 1) / align);
  k.count = std::min(std::max<Index>(want, 1), k.tiles);
  return k;
}

/// What cut_line needs of one item of the line: its call's queries (n_q at q_pos0 …) and the
/// multiply-adds of one (query, key) pair of it. A decode item (n_q = 1) is one key piece of
/// q_pos0 + 1 keys, never cut further.
struct CutItem {
  Index n_q = 0, q_pos0 = 0;
  double pair_cost = 1;
  /// Queries per pass of the kernel: a prefill item is cut only at multiples of it, never
  /// leaving a one-query part (the kernel runs that with a decode-shaped pass), so each query's
  /// pass — and its reduction order — is the same however the item is cut.
  Index quantum = 1;
  /// Sliding window of a prefill item's call (ScoreVariant::window; 0: none): query i sees
  /// keys(i) keys.
  Index window = 0;
  /// Positions along the cut dimension: keys (decode, n_q = 1) or queries (prefill).
  Index size() const { return n_q == 1 ? q_pos0 + 1 : n_q; }
  /// Keys query i of a prefill item sees.
  Index keys(Index i) const {
    return window > 0 ? std::min(window, q_pos0 + i + 1) : q_pos0 + i + 1;
  }
};

/// A cut of the line: item, and position inside it (< the item's size).
struct LineCut {
  Index item = 0, pos = 0;
  bool before(const LineCut& o) const { return item < o.item || (item == o.item && pos < o.pos); }
};

/// Cuts the line of n_items items (cum[i] = multiply-adds of the items before i, cum[n_items]
/// the total) into `workers` pieces of about equal cost: cuts[0 … workers], non-decreasing. A
/// decode item is not cut (the cut moves to its nearer end); a prefill item is cut at the query
/// boundary where the causal prefix of (query, key) pairs reaches the cost. item(i) → CutItem.
/// Where the cuts fall changes which worker computes what, never a result.
template <class ItemOf>
void cut_line(const double* cum, Index n_items, Index workers, const ItemOf& item,
              LineCut* cuts) {
  const double total = cum[n_items];
  cuts[0] = LineCut{0, 0};
  cuts[workers] = LineCut{n_items, 0};
  for (Index w = 1; w < workers; ++w) {
    const double x = total * static_cast<double>(w) / static_cast<double>(workers);
    Index it = static_cast<Index>(std::upper_bound(cum, cum + n_items + 1, x) - cum) - 1;
    it = std::min(std::max<Index>(it, 0), n_items - 1);
    const CutItem c = item(it);
    const double off = (x - cum[it]) / c.pair_cost;  // (query, key) pairs into the item
    Index pos;
    if (c.n_q == 1) {
      pos = 2 * off < static_cast<double>(c.size()) ? 0 : c.size();
    } else {
      // First query boundary whose prefix Σ_{i'<i} c.keys(i') reaches off.
      double acc = 0;
      pos = 0;
      while (pos < c.n_q && acc < off) acc += static_cast<double>(c.keys(pos++));
      pos = pos / c.quantum * c.quantum;
      if (c.quantum > 1 && c.n_q - pos == 1) pos = c.n_q;
    }
    pos = std::min(std::max<Index>(pos, 0), c.size());
    cuts[w] = pos == c.size() ? LineCut{it + 1, 0} : LineCut{it, pos};
    if (cuts[w].before(cuts[w - 1])) cuts[w] = cuts[w - 1];
  }
}

/// One worker's piece of one call: `part` (GroupedPart, TpaPart) of calls[call]; `slot` ≥ 0: a
/// key-split piece whose partial states go to slots[slot].
template <class Part>
struct SplitUnit {
  Index call = 0;
  Part part;
  Index slot = -1;
};

/// Walks worker w's segment [cuts[w], cuts[w + 1]) of the line (cut by cut_line with the same
/// item(i) → CutItem): piece(it, pos0, pos1, whole) for each item `it` the segment touches, in
/// line order, where [pos0, pos1) are the item's positions in the segment and `whole` says they
/// are all of the item's.
template <class ItemOf, class Piece>
void for_each_piece(const LineCut* cuts, Index w, const ItemOf& item, const Piece& piece) {
  LineCut at = cuts[w];
  const LineCut end = cuts[w + 1];
  while (at.before(end)) {
    const Index size = item(at.item).size();
    const Index stop = at.item == end.item ? end.pos : size;
    piece(at.item, at.pos, stop, at.pos == 0 && stop == size);
    at = LineCut{at.item + 1, 0};
  }
}

/// Runs `workers` workers on ctx's threads; worker w runs its units units[first_unit[w] …
/// first_unit[w + 1]) in order through run(unit, ws[w], states), states = &slots[unit.slot] for
/// a key-split piece, else nullptr.
template <class Unit, class Run>
void run_units(Context& ctx, Index workers, const Index* first_unit, const Unit* units,
               float* const* ws, GroupedStates* slots, const Run& run) {
  ctx.parallel_for(workers, [&](Index w) {
    for (Index u = first_unit[w]; u < first_unit[w + 1]; ++u)
      run(units[u], ws[w], units[u].slot >= 0 ? &slots[units[u].slot] : nullptr);
  });
}

/// Merges the partial states of the `pieces` key-split pieces slots[0 … pieces) of one query
/// (in key order; `rows` rows of `dim`) exactly, and writes row r normalised to out + r·dim.
/// With `sinks` non-null, sinks[r] (the sink logit of row r's head) joins the denominator of
/// row r once, after the merge.
inline void merge_pieces(const GroupedStates* slots, Index pieces, Index rows, Index dim,
                         float* out, const float* sinks = nullptr) {
  for (Index r = 0; r < rows; ++r) {
    SoftmaxState sa;
    sa.m = slots[0].m[r];
    sa.l = slots[0].l[r];
    sa.acc = slots[0].acc + r * slots[0].acc_stride;
    sa.dim = dim;
    for (Index x = 1; x < pieces; ++x) {
      SoftmaxState sb;
      sb.m = slots[x].m[r];
      sb.l = slots[x].l[r];
      sb.acc = slots[x].acc + r * slots[x].acc_stride;
      sb.dim = dim;
      sa.merge(sb);
    }
    if (sinks == nullptr) {
      sa.normalize(out + r * dim);
    } else {
      const float inv = sink_normalizer(sa.m, sa.l, sinks[r]);
      for (Index j = 0; j < dim; ++j) out[r * dim + j] = sa.acc[j] * inv;
    }
  }
}

/// Gap between two workers' workspaces (each also starts on a 4 KiB boundary). Measured on a
/// 2-core Zen 5 with the workspaces back to back: the worker whose workspace came second ran its
/// half of a FlashTPA decode step 30–40 % slower than the other (whichever thread it was, with
/// the cache in L2 or streaming from DRAM); 8 KiB apart it was still ≈ 15 % slower, 64 KiB apart
/// not measurably — presumably a core's hardware prefetchers running from its own workspace into
/// its neighbour's, so that the two cores trade those lines.
constexpr std::size_t kWorkspaceGapBytes = std::size_t{64} << 10;

/// n_slots slots of partial states (m, l: `rows`; acc: rows × dim) and max_w workspaces of
/// ws_floats (4 KiB aligned, kWorkspaceGapBytes apart), from `scratch`.
inline void take_split_buffers(Scratch& scratch, Index n_slots, Index max_w, Index rows, Index dim,
                               Index ws_floats, GroupedStates** slots, float*** ws) {
  *slots = static_cast<GroupedStates*>(scratch.bytes(sizeof(GroupedStates) * (n_slots + 1)));
  for (Index i = 0; i < n_slots; ++i) {
    (*slots)[i].m = scratch.floats(rows);
    (*slots)[i].l = scratch.floats(rows);
    (*slots)[i].acc = scratch.floats(rows * dim);
    (*slots)[i].acc_stride = dim;
  }
  *ws = static_cast<float**>(scratch.bytes(sizeof(float*) * max_w));
  const std::size_t ws_bytes =
      (static_cast<std::size_t>(ws_floats) * sizeof(float) + 4095) / 4096 * 4096;
  for (Index w = 0; w < max_w; ++w) {
    const auto at =
        reinterpret_cast<std::uintptr_t>(scratch.bytes(kWorkspaceGapBytes + ws_bytes + 4096 - 64));
    (*ws)[w] = reinterpret_cast<float*>(((at + kWorkspaceGapBytes + 4095) & ~std::uintptr_t{4095}));
  }
}

}  // namespace detail
}  // namespace tpa
