// The tiled FlashTPA kernel shared by the SIMD backends (Portable, Avx2, Avx512): causal Tensor
// Product Attention straight over the cached factors A_K, B_K, A_V, B_V, never building a
// per-head key or value. The algorithm lives here once; each backend supplies its `Ops` policy
// of vector primitives (the contract is GroupedTiled's, grouped_tiled.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <type_traits>

#include "tpa/core/quant.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/kernels/grouped_tiled.hpp"
#include "tpa/kernels/lane_reduce.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/register_block.hpp"
#include "tpa/kernels/score_variant.hpp"
#include "tpa/kernels/workspace.hpp"

namespace tpa {

/// \brief The piece of one TpaAttentionParams call that one worker computes: queries [i0, i1)
/// over keys [k0, k1), all heads. Query i still sees only keys ≤ q_pos0 + i.
struct TpaPart {
  Index i0 = 0, i1 = 0;
  Index k0 = 0, k1 = 0;

  /// The whole call.
  template <class S>
  static TpaPart whole(const TpaAttentionParams<S>& p) {
    return TpaPart{0, p.n_q, 0, p.q_pos0 + p.n_q};
  }
};

/// \brief Where a TPA part writes its unnormalised online-softmax states (for a later exact
/// merge, SoftmaxState::merge): row r = (i − i0)·n_heads + h holds query i, head h: m[r], l[r]
/// and acc + r·acc_stride [head_dim], acc already multiplied by v_scale(). A row that saw no key
/// has l = 0.
using TpaStates = GroupedStates;

namespace detail {

/// \brief The FlashTPA kernel over one TpaPart, for storage scalar S, built from the vector
/// primitives of `Ops` (kWidth = W lanes, kTile = T tokens per key tile, kQkRows and
/// kPvRows × kPvCols register blocks, load/store/fmadd/exp/…, load_widen<S>, transpose_block<S>).
///
/// A pass holds the rows (query, head) of up to kRowCap / H queries (decode: one query, H rows)
/// and walks the key tiles (≤ T tokens inside one cache block; tiles past the causal diagonal of
/// the pass's last query are never visited). Softmax runs with heads in lanes (H rounded up to
/// whole vectors, H_pad), one token at a time, so the cached A_K and A_V rows ([H, R] per token,
/// heads interleaved with ranks) are read in place, de-interleaved by load_strided, and no
/// statistic needs a horizontal reduction. Per tile and query that sees it:
///  1. scores S [T, H_pad], in rank space:
///     factored query: C [R_K·R_Q, T] with C[s·R_Q + r][t] = B_Q[r] · B_K(t)[s] — the
///       [R_Q × d]·[d × (T·R_K)] product, R_Q·R_K·d multiply-adds per token — read straight
///       from the cache rows: blocks of W/2 tokens × 2 ranks accumulate W dot products in W
///       vector registers over d, then one shuffle tree (lane_reduce) turns them into one vector
///       of W results (bf16 B_K with Ops::bf16_pairs: 2W elements widened as even and odd
///       halves, one op per W, against a B_Q copied in that order per pass); then per token S(t) = Σ_s A_K(t)[:, s] ⊙ Σ_r C[s·R_Q + r][t]·A_Qᵀ[r]
///       (broadcast C, H·R_K·(R_Q+1) multiply-adds per token, A_Qᵀ [R_Q, H_pad] built per pass);
///     full query (K/V-only), one query per pass (decode): the tile's T·R_K B_K rows
///       (contiguous) times qᵀ [d, H_pad] (built once per pass) with heads in lanes, each B_K
///       element broadcast from its row (lane_scores; no transpose of the tile), then
///       S(t) = Σ_s A_K(t)[:, s] ⊙ (q · B_K(t)[s]) with A_K de-interleaved by load_strided;
///     full query, several queries per pass (prefill): A_K and B_K are transposed into akt
///       [H·R_K, T] and bkt [R_K·d, T] (tokens in lanes), S[h] = Σ_s akt[h,s] ⊙ (q_h · bkt_s)
///       is the [rows × d]·[d × T] product per s with the A_K mix folded into its epilogue, and
///       one register transpose per W × W block turns it into heads in lanes;
///     qk_scale() is folded into A_Q (or q);
///  2. online softmax: the tile's maximum per head (vector max over tokens), one rescale
///     factor per head and tile (applied in 3), one vector exp per token and head vector, and
///     the value weights W [T, R_V, H_pad] = P ⊙ A_V(t)[:, s];
///  3. acc [H, d] = acc·alpha + Wᵀ [H × (T·R_V)] · B_V [(T·R_V) × d], B_V rows read in place
///     from the cache (16-bit or int8 storage, or d not a multiple of W: widened once per
///     element into workspace, in decode by the first row block of each column block as it
///     multiplies, in prefill by a pass before the tile's queries): a register-blocked
///     kPvRows × kPvCols product, B_V column blocks outer so they stay in L1. int8 B_V where
///     Ops has VNNI (pv_q8, d a multiple of 2W): each head's tile weights are rounded to int16
///     against their maximum (relative error ≤ 2⁻¹⁶ of that maximum), vpdpwssd sums pairs of
///     weight rows × B_V rows exactly in int32 (2W products per instruction, 2× an FMA's), and
///     one scale multiply per tile and head (de-interleaving the pairs) adds them to acc.
///     Tokens past a query's causal limit (diagonal tiles of prefill) are never read.
/// Everything accumulates in f32. While a tile computes, the next tile's factors are prefetched
/// into L2 a few lines per micro-kernel call (RowPrefetch). A software prefetch that misses the
/// second-level TLB is dropped, so on 4 KiB pages (KVCache blocks under 2 MiB) most of a tile's
/// prefetches would be lost: the first line of each page of the tile after next is prefetched
/// when a tile starts and loaded once it is done (touch_pages), so its pages are in the TLB
/// before their prefetches run. On 2 MiB pages (SeqView::huge_pages) there is nothing to warm
/// and the touches are skipped: their loads still waited on lines not yet arrived (perf: 80 % of
/// pass()'s samples); skipping them, steps alternated in one process (Zen 4, 16K, 2 threads,
/// 5 runs): int8 TPA 1.02–1.03×, TPA-KV 1.01–1.02×, f32, bf16 and f16 0.97–1.03× (noise).
///
/// Roofline of one decode step (one query, L cached tokens, storage scalar of b bytes):
///   bytes  = L·(R_K + R_V)·(H + d)·b   (each factor element read once, for all heads)
///   FLOPs  ≈ L·(2·R_Q·R_K·d            B_Q·B_K
///             + 2·H·R_K·(R_Q + 1)       rank-space mixing with A_Q and A_K
///             + 2·H·R_V                 P ⊙ A_V
///             + 2·H·R_V·d               (P·A_V)·B_V, the [H × T·R_V]·[T·R_V × d] micro-GEMM
///             + ~10·H)                  online softmax (one vector exp per score vector)
///   time   ≥ max(bytes / read bandwidth, FLOPs / FMA peak).
/// T6-like shape (H = 32, d = 128, R_Q = 6, R_K = R_V = 2, f32): 2560 B and ≈ 20.7 KFLOP per
/// token; at 16K tokens 41.9 MB and 0.34 GFLOP, i.e. 1.32 ms at 31.8 GB/s against 0.72 ms at
/// 470 GFLOP/s (2-core Xeon, AVX-512): memory-bound, but only by 1.8×, so the cores must run FMAs
/// at more than half their peak while the cache streams in. On a 2-core Zen 4 (AVX-512, one
/// 512-bit FMA per cycle, ≈ 117 GFLOP/s per core, ≈ 61 GB/s) the step is compute-bound instead:
/// 0.69 ms of bytes against 1.43 ms of FMAs at 16K.
/// The multiply-adds executed match the model for this shape: B_Q·B_K once per token for all
/// heads (never per head), no padded heads or dims (H and d multiples of W), the ranks in the
/// broadcast and reduction dimensions (never in lanes). What the model leaves out is the work
/// beside the FMAs: a shuffle tree per 16 dots of B_Q·B_K (lane_reduce: 30 shuffles, 15 adds
/// per 128 FMAs), one vector exp per token and 16 heads, the de-interleaving loads of A_K, A_V.
/// Stage split measured with rdtsc around each stage (Zen 4, one core, factors in L2, best of
/// 300 steps of 384 tokens, 2026-12-06; f32 at 71% of the FMA peak, 243–248 ns per token):
/// value micro-GEMM 61% of the time (at ≈ 92% of the peak), B_Q·B_K 18% (≈ 58%), rank mixing
/// 7% (≈ 47%), softmax 11%, page touches, prologue and epilogue 2.5%. bf16 (B_V widened in the
/// value product, 227–233 ns per token): value product 68% (incl. the widening), B_Q·B_K 18%,
/// mixing 6%, softmax 7%. Streaming 16K tokens from DRAM on 2 MiB pages adds ≈ 9% per token on
/// one core (bench_decode threads:1, 58.6% of the peak against 63.8% in L2): memory overlaps
/// mostly; the rest of the gap to the peak is the non-FMA work above. Without the software
/// prefetches the streaming step was 25–33% slower on a Zen 5 (and the L2-resident one 5–9%
/// faster): they are spread evenly over the previous tile (bursts and longer distances measured
/// slower).
/// The int8 and bf16 paths above (VNNI value product, bf16_pairs), same one-core L2 setup, 384
/// tokens, best of 400 steps (2026-12-06): TPA int8 236 → 171–173 ns per token (bf16 231 →
/// 226–228, f32 241 unchanged), TPA-KV int8 395 → 335 (bf16 ≈ 396, f32 403): int8 is now the
/// fastest, the value product at 2× the MACs per instruction.
/// Rows (queries × heads) per pass of TpaTiled (TpaTiled::kRowCap); see kGroupedRowCap.
constexpr Index kTpaRowCap = 128;

/// Whether Ops has the int8 value-product primitives (kHasQ8Pairs: q8_pairs, dot_pairs,
/// store_pairs16, q8_unpair; Avx512Ops with VNNI).
template <class O, class = void>
struct HasQ8Pairs : std::false_type {};
template <class O>
struct HasQ8Pairs<O, std::enable_if_t<O::kHasQ8Pairs>> : std::true_type {};
/// Whether Ops widens 2·kWidth bf16 in one op per kWidth (kBf16Split: bf16_pairs; Avx512Ops).
template <class O, class = void>
struct HasBf16Pairs : std::false_type {};
template <class O>
struct HasBf16Pairs<O, std::enable_if_t<O::kBf16Split>> : std::true_type {};

template <class Ops, class S>
class TpaTiled {
 public:
  using P = TpaAttentionParams<S>;
  using V = typename Ops::V;
  static constexpr Index kW = Ops::kWidth;
  static constexpr Index kT = Ops::kTile;
  static constexpr Index kNV = kT / kW;
  static_assert(kT % kW == 0 && kW % 2 == 0, "TpaTiled: kTile must be a multiple of kWidth");
  /// Rows (queries × heads) per pass, unless one query has more heads.
  static constexpr Index kRowCap = kTpaRowCap;
  /// Value micro-kernel: rows × vectors of accumulators (24 of the 32 registers with AVX-512).
  static constexpr Index kPvRows = Ops::kPvRows;
  static constexpr Index kPvCols = Ops::kPvCols;
  /// int8 B_V by integer products (pv_q8) where Ops has them.
  static constexpr bool kQ8Pairs = is_quantized_v<S> && HasQ8Pairs<Ops>::value;
  /// bf16 B_K rows widened as even/odd halves (bf16_pairs) against a B_Q in that order (bqp).
  static constexpr bool kBf16Pairs = std::is_same<S, bfloat16>::value && HasBf16Pairs<Ops>::value;
  /// pv_q8's limits: d a multiple of 32 (whole pairs of vectors), R_V ≤ 16 (int32 sums of a
  /// tile: kT·R_V/2 pairs of ≤ 2·32767·128 each stay below 2³¹).
  static constexpr Index kQ8PairsMaxRank = 16;
  /// pv_q8's register block: kQ8Rows heads × kQ8Groups·32 dims, 2·kQ8Groups int32 accumulators
  /// per head (16 in all: more spill with GCC, since vpdpwssd overwrites its accumulator).
  static constexpr Index kQ8Rows = 4, kQ8Groups = 2;

  /// Floats of workspace run() needs for `part` (64-byte aligned storage). Depends on the
  /// shapes and on min(n_q, kRowCap / H) only, not on the number of keys.
  static Index workspace_floats(const P& p, const TpaPart& part) {
    return layout(shape(p, part), nullptr).total;
  }

  /// Computes `part` of the call `p`. With `out` null, writes the normalised outputs of the
  /// part's queries to p.o (the part must then cover all keys they see: k0 = 0 and
  /// k1 ≥ q_pos0 + i1); otherwise writes their unnormalised states to *out (TpaStates).
  /// `ws` holds workspace_floats(p, part) floats, 64-byte aligned. p must pass p.check().
  static void run(const P& p, const TpaPart& part, float* ws, const TpaStates* out) {
    const Shape sh = shape(p, part);
    const Buffers b = layout(sh, ws);
    for (Index ib = part.i0; ib < part.i1; ib += sh.ni)
      pass(p, part, sh, b, ib, std::min(part.i1, ib + sh.ni), out);
  }

  /// The whole call on the calling thread, with a workspace allocated for it.
  /// \throws Error if p is inconsistent (TpaAttentionParams::check; `who` prefixes the message).
  static void run_whole(const P& p, const char* who) {
    p.check(who);
    if (p.n_q == 0) return;
    const TpaPart part = TpaPart::whole(p);
    with_workspace(workspace_floats(p, part), [&](float* ws) { run(p, part, ws, nullptr); });
  }

 private:
  struct Shape {
    Index H = 0, d = 0, d_pad = 0;  // heads, head dim, head dim rounded up to kW
    Index RQ = 0, RK = 0, RV = 0;   // ranks (RQ = 0: full query)
    Index H_pad = 0;                // heads rounded up to kW (heads in lanes)
    Index ni = 0;                   // queries per pass
    bool pack_v = false;            // B_V is widened/padded into workspace
    bool q8_pairs = false;          // int8 B_V by integer products (pv_q8)
  };

  // Per-query arrays (st, w, m, l, alpha, aq) hold query i − ib at + (i − ib)·(their size).
  struct Buffers {
    float* aq;     // factored: [ni][RQ, H_pad] A_Qᵀ · qk_scale (padded heads 0)
    float* q;      // full: [ni·H, d] q · qk_scale
    float* akt;    // full: [H·RK, kT] A_K tile transposed
    float* bkt;    // full: [RK·d, kT] B_K tile transposed
    float* qt;     // full, one-query passes: [d, H_pad] (q · qk_scale)ᵀ, padded heads 0
    float* ck;     // full, one-query passes: [kT·RK, H_pad] q_h · B_K(t)[s], row t·RK + s
    float* c;      // factored: [RK·RQ, kT] B_Q·B_Kᵀ of one query, row s·RQ + r
    float* sp;     // full: [ni·H, kT] scores, tokens in lanes
    float* st;     // [ni][kT, H_pad] scores, heads in lanes
    float* w;      // [ni][kT, RV, H_pad] value weights P ⊙ A_V
    float* m;      // [ni][H_pad] running max (−FLT_MAX once a tile was seen, −inf before)
    float* l;      // [ni][H_pad] running sum
    float* alpha;  // [ni][H_pad] rescale factor of the current tile
    float* acc;    // [ni·H, d_pad]
    float* bvp;    // [kT·RV, d_pad] widened B_V tile (pack_v only)
    float* bqp;    // kBf16Pairs, factored: [ni][RQ, d] B_Q, each whole 2·kW chunk even then odd
    float* wq;     // q8_pairs: [kT·RV/2 + 1, H_pad] int16 weight pairs (store_pairs16)
    float* sw;     // q8_pairs: [H_pad] their scale per head
    Index total;   // floats
  };

  static Index round_up(Index n, Index m) { return (n + m - 1) / m * m; }

  static Shape shape(const P& p, const TpaPart& part) {
    Shape sh;
    sh.H = p.n_heads;
    sh.d = p.head_dim;
    sh.d_pad = round_up(p.head_dim, kW);
    sh.RQ = p.q_rank;
    sh.RK = p.k_rank;
    sh.RV = p.v_rank;
    sh.H_pad = round_up(sh.H, kW);
    sh.ni = std::max<Index>(1, std::min(part.i1 - part.i0, kRowCap / sh.H));
    sh.q8_pairs = kQ8Pairs && sh.d % (2 * kW) == 0 && sh.RV <= kQ8PairsMaxRank;
    sh.pack_v = !sh.q8_pairs && (!std::is_same<S, float>::value || sh.d % kW != 0);
    return sh;
  }

  static Buffers layout(const Shape& sh, float* ws) {
    Buffers b{};
    Index off = 0;
    auto take = [&](Index n) {
      float* ptr = ws == nullptr || n == 0 ? nullptr : ws + off;
      off += round_up(n, 16);
      return ptr;
    };
    const Index rows = sh.ni * sh.H;
    const bool factored = sh.RQ > 0;
    b.aq = take(factored ? sh.ni * sh.RQ * sh.H_pad : 0);
    b.q = take(factored ? 0 : rows * sh.d);
    b.akt = take(factored ? 0 : sh.H * sh.RK * kT);
    b.bkt = take(factored ? 0 : sh.RK * sh.d * kT);
    b.qt = take(factored ? 0 : sh.d * sh.H_pad);
    b.ck = take(factored ? 0 : kT * sh.RK * sh.H_pad);
    b.c = take(factored ? sh.RK * sh.RQ * kT : 0);
    b.sp = take(factored ? 0 : rows * kT);
    b.st = take(sh.ni * kT * sh.H_pad);
    b.w = take(sh.ni * kT * sh.RV * sh.H_pad);
    b.m = take(sh.ni * sh.H_pad);
    b.l = take(sh.ni * sh.H_pad);
    b.alpha = take(sh.ni * sh.H_pad);
    b.acc = take(rows * sh.d_pad);
    b.bvp = take(sh.pack_v ? kT * sh.RV * sh.d_pad : 0);
    b.bqp = take(kBf16Pairs && factored ? sh.ni * sh.RQ * sh.d : 0);
    b.wq = take(sh.q8_pairs ? (kT * sh.RV / 2 + 1) * sh.H_pad : 0);
    b.sw = take(sh.q8_pairs ? sh.H_pad : 0);
    b.total = off;
    return b;
  }

  // Software prefetch (into L2) of one tile's four factor ranges, a few lines at a time while
  // the previous tile computes: a tile's rows are contiguous per factor, but they span several
  // 4 KiB pages, where the hardware prefetchers stop, and each cache block starts new streams.
  struct TilePrefetch {
    RowPrefetch k, v;  // A_K, B_K and A_V; B_V
    void add(const P& p, const Shape& sh, Index blk, Index off, Index n) {
      const Index e[4] = {sh.H * sh.RK, sh.RK * sh.d, sh.H * sh.RV, sh.RV * sh.d};
      const std::size_t f[4] = {p.a_k_factor, p.b_k_factor, p.a_v_factor, p.b_v_factor};
      for (int i = 0; i < 4; ++i) {
        const Index bytes = n * e[i] * Index(sizeof(S));
        (i < 3 ? k : v).add(p.kv.row(f[i], blk, 0) + off * e[i], bytes, bytes, 1);
      }
    }
    Index pending() const { return k.pending() + v.pending(); }
    void issue(Index count) {
      const Index from_k = std::min(count, k.pending());
      k.issue(from_k);
      v.issue(count - from_k);
    }
  };

  // One pass: queries [ib, ie) (all heads), keys [part.k0, part.k1) ∩ causal. Row of (i, h):
  // (i − ib)·H + h.
  static void pass(const P& p, const TpaPart& part, const Shape& sh, const Buffers& b, Index ib,
                   Index ie, const TpaStates* out) {
    const Index H = sh.H, H_pad = sh.H_pad, d = sh.d, RQ = sh.RQ, rows = (ie - ib) * H;
    const float qk_scale = static_cast<float>(p.qk_scale());
    for (Index i = ib; i < ie; ++i) {
      if (RQ > 0) {
        const float* a = p.a_q + i * p.a_q_stride;  // [H, RQ]
        float* dst = b.aq + (i - ib) * RQ * H_pad;  // [RQ, H_pad]
        for (Index r = 0; r < RQ; ++r)
          for (Index h = 0; h < H_pad; ++h)
            dst[r * H_pad + h] = h < H ? a[h * RQ + r] * qk_scale : 0.f;
        if constexpr (kBf16Pairs) {
          for (Index r = 0; r < RQ; ++r) {
            const float* q = p.b_q + i * p.b_q_stride + r * d;
            float* qp = b.bqp + ((i - ib) * RQ + r) * d;
            Index j = 0;
            for (; j + 2 * kW <= d; j += 2 * kW)
              for (Index k = 0; k < kW; ++k) {
                qp[j + k] = q[j + 2 * k];
                qp[j + kW + k] = q[j + 2 * k + 1];
              }
            for (; j < d; ++j) qp[j] = q[j];
          }
        }
      } else {
        const float* q = p.q + i * p.q_stride;
        float* dst = b.q + (i - ib) * H * d;
        for (Index k = 0; k < H * d; ++k) dst[k] = q[k] * qk_scale;
        if (ie - ib == 1)  // heads in lanes for lane_scores: kW × kW register transposes
          for (Index h0 = 0; h0 < H_pad; h0 += kW)
            for (Index j0 = 0; j0 < d; j0 += kW)
              Ops::template transpose_block<float>(dst + h0 * d + j0, d, std::min(kW, H - h0),
                                                   std::min(kW, d - j0), b.qt + j0 * H_pad + h0,
                                                   H_pad);
      }
    }
    const Index stats = (ie - ib) * H_pad;
    std::fill(b.m, b.m + stats, -std::numeric_limits<float>::infinity());
    std::fill(b.l, b.l + stats, 0.f);
    std::fill(b.acc, b.acc + rows * sh.d_pad, 0.f);

    const Index key_end = std::min(part.k1, p.q_pos0 + ie);
    // With a window, keys before the first query's window are never visited (whole tiles).
    const Index key_begin = std::max(part.k0, p.variant.first_key(p.q_pos0 + ib));
    const Index bt = p.kv.block_tokens;
    auto tile_len = [&](Index t) { return std::min(std::min(kT, key_end - t), bt - t % bt); };
    for (Index t = key_begin; t < key_end;) {
      const Index blk = t / bt, off = t - blk * bt;
      const Index n = tile_len(t);
      // Query i sees key t iff t ≤ q_pos0 + i: the rows of earlier queries skip this tile.
      const Index i_first = std::max(ib, t - p.q_pos0);
      TilePrefetch next;  // the next tile's factors, fetched while this one computes
      if (t + n < key_end) next.add(p, sh, (t + n) / bt, (t + n) % bt, tile_len(t + n));
      // The tile after next: on 4 KiB pages its pages enter the TLB while this one computes.
      Index t2 = t + n;
      if (t2 < key_end) t2 += tile_len(t2);
      const bool touch = t2 < key_end && !p.kv.huge_pages;
      if (touch) touch_pages<false>(p, sh, t2 / bt, t2 % bt, tile_len(t2));
      tile(p, sh, b, blk, off, t, n, ib, ie, i_first, next);
      if (touch) touch_pages<true>(p, sh, t2 / bt, t2 % bt, tile_len(t2));
      t += n;
    }

    const float v_scale = static_cast<float>(p.v_scale());
    for (Index i = ib; i < ie; ++i)
      for (Index h = 0; h < H; ++h) {
        const Index r = (i - ib) * H + h, rs = (i - ib) * H_pad + h;
        const float* a = b.acc + r * sh.d_pad;
        if (out == nullptr) {
          const float inv =
              p.variant.sinks != nullptr
                  ? v_scale * sink_normalizer(b.m[rs], b.l[rs], p.variant.sinks[h])
                  : (b.l[rs] > 0.f ? v_scale / b.l[rs] : 0.f);
          float* o = p.o + i * p.o_stride + h * d;
          for (Index j = 0; j < d; ++j) o[j] = a[j] * inv;
        } else {
          const Index ro = (i - part.i0) * H + h;
          out->m[ro] = b.m[rs];
          out->l[ro] = b.l[rs];
          float* o = out->acc + ro * out->acc_stride;
          for (Index j = 0; j < d; ++j) o[j] = a[j] * v_scale;
        }
      }
  }

  // The first byte of each 4 KiB page that a tile's factors (tokens [off, off + n) of block blk)
  // cover, from the first byte of each factor range: prefetched (kLoad false) or loaded, which
  // makes the page's translation cached (a load walks the page table; a prefetch that misses
  // the TLB may be dropped). Reads nothing outside the tile.
  template <bool kLoad>
  static void touch_pages(const P& p, const Shape& sh, Index blk, Index off, Index n) {
    const Index e[4] = {sh.H * sh.RK, sh.RK * sh.d, sh.H * sh.RV, sh.RV * sh.d};
    const std::size_t f[4] = {p.a_k_factor, p.b_k_factor, p.a_v_factor, p.b_v_factor};
    for (int i = 0; i < 4; ++i) {
      const S* first = p.kv.row(f[i], blk, 0) + off * e[i];
      auto a = reinterpret_cast<std::uintptr_t>(first);
      const std::uintptr_t end = a + static_cast<std::uintptr_t>(n * e[i]) * sizeof(S);
      for (; a < end; a = (a + 4096) & ~std::uintptr_t{4095}) {
        const char* byte = reinterpret_cast<const char*>(a);
        if constexpr (kLoad) {
#if defined(__GNUC__)
          asm volatile("" ::"r"(*reinterpret_cast<const volatile char*>(byte)));
#else
          (void)*reinterpret_cast<const volatile char*>(byte);
#endif
        } else {
#if defined(__GNUC__)
          __builtin_prefetch(byte, 0, 2);
#endif
        }
      }
    }
  }

  // Tokens [t0, t0 + n) (inside block blk, from offset off) for the pass of queries [ib, ie),
  // of which [i_first, ie) see at least the tile's first key. Prefetches `next` on the way.
  static void tile(const P& p, const Shape& sh, const Buffers& b, Index blk, Index off, Index t0,
                   Index n, Index ib, Index ie, Index i_first, TilePrefetch& next) {
    const Index H = sh.H, H_pad = sh.H_pad, d = sh.d, RQ = sh.RQ, RK = sh.RK, RV = sh.RV;
    const Index ld_ak = H * RK, ld_bk = RK * d, ld_av = H * RV, ld_bv = RV * d;
    const S* ak = p.kv.row(p.a_k_factor, blk, 0) + off * ld_ak;
    const S* bk = p.kv.row(p.b_k_factor, blk, 0) + off * ld_bk;
    const S* av = p.kv.row(p.a_v_factor, blk, 0) + off * ld_av;
    const S* bv = p.kv.row(p.b_v_factor, blk, 0) + off * ld_bv;

    const Index rows = (ie - ib) * H, skip = (i_first - ib) * H, nr = rows - skip;
    const Index nq = ie - i_first;
    // The next tile is prefetched a few lines at each step of the loops below.
    const Index per_token =
        (H_pad / kW + kChunkVecs - 1) / kChunkVecs + (H_pad / kW + kScoreVecs - 1) / kScoreVecs;
    // Full queries, one query in the pass (decode): scores with heads in lanes (lane_scores).
    const bool lane_qk = RQ == 0 && ie - ib == 1;
    const Index points =
        (RQ > 0    ? nq * RK * ((n + kW / 2 - 1) / (kW / 2))
         : lane_qk ? (n * RK + kLaneTok - 1) / kLaneTok * ((H_pad / kW + kLaneVecs - 1) / kLaneVecs) *
                         ((d + kLaneDims - 1) / kLaneDims)
                   : RK * ((nr + Ops::kQkRows - 1) / Ops::kQkRows)) +
        nq * (per_token * ((n + kTokGroup - 1) / kTokGroup) +
              (sh.q8_pairs
                   ? (H + kQ8Rows - 1) / kQ8Rows *
                         ((sh.d / kW + 2 * kQ8Groups - 1) / (2 * kQ8Groups))
                   : (H + kPvRows - 1) / kPvRows * ((sh.d_pad / kW + kPvCols - 1) / kPvCols)));
    const Index per_call = (next.pending() + points - 1) / points;

    if (RQ == 0 && !lane_qk) {  // scores of all rows that see the tile, tokens in lanes
      transpose_tile(ak, ld_ak, n, b.akt);
      transpose_tile(bk, ld_bk, n, b.bkt);
      if constexpr (is_quantized_v<S>) {
        // Both key scales go onto the transposed A_K tile (tokens in lanes; H·R_K rows, fewer
        // than B_K's R_K·d): row (h, s) times A_K's scale of (t, h) and B_K's of (t, s).
        for (Index s = 0; s < RK; ++s)
          for (Index h = 0; h < H; ++h)
            scale_lanes(b.akt + (h * RK + s) * kT, 1, p.kv.scales(p.a_k_factor, blk, h) + off, n,
                        p.kv.scales(p.b_k_factor, blk, s) + off);
      }
      constexpr Index NR = Ops::kQkRows;
      const float* mul[NR];
      for (Index s = 0; s < RK; ++s)
        for (Index r = skip; r < rows; r += NR) {
          const Index nb = std::min(NR, rows - r);
          for (Index k = 0; k < nb; ++k) mul[k] = b.akt + (((r + k) % H) * RK + s) * kT;
          next.issue(per_call);
          rows_dispatch<static_cast<int>(NR), true>(nb, b.q + r * d, d, b.bkt + s * d * kT, d,
                                                    b.sp + r * kT, mul, s == 0);
        }
    }

    // B_V tile: in place when it is f32 with whole vectors, else widened into bvp.
    const float* vt = nullptr;
    Index v_ld = 0, v_sd = 0;  // strides of token and rank
    if constexpr (std::is_same<S, float>::value) {
      vt = bv;
      v_ld = ld_bv;
      v_sd = d;
    }
    // One query reads the tile (decode): its value product widens B_V as it goes (pv(), VSource).
    const bool fuse_pack = sh.pack_v && ie - i_first == 1;
    if (sh.pack_v && !fuse_pack) {
      for (Index t = 0; t < n; ++t)
        for (Index s = 0; s < RV; ++s)
          for (Index c = 0; c < sh.d_pad; c += kW)
            Ops::store(
                b.bvp + (t * RV + s) * sh.d_pad + c,
                Ops::template load_widen<S>(bv + t * ld_bv + s * d + c, std::min(kW, d - c)));
    }
    if (sh.pack_v) {
      vt = b.bvp;
      v_ld = RV * sh.d_pad;
      v_sd = sh.d_pad;
    }

    const ScoreVariant& var = p.variant;
    const bool varies = var.transforms_scores() || var.window > 0;
    for (Index i = i_first; i < ie; ++i) {
      const Index qi = i - ib;
      // Keys of the tile query i sees (all of them but in diagonal tiles of prefill). The value
      // product reads no B_V row past them: 0 · a NaN or Inf value would still be NaN.
      const Index count = std::min(n, p.q_pos0 + i - t0 + 1);  // ≥ 1
      // With a window, the query sees tokens [lo, count) of the tile (none: it skips the tile).
      const Index lo = var.window > 0 ? std::max<Index>(0, var.first_key(p.q_pos0 + i) - t0) : 0;
      if (lo >= count) continue;
      float* st = b.st + qi * kT * H_pad;
      if (RQ > 0 || lane_qk) {
        if (RQ > 0) {
          const float* bq = kBf16Pairs ? b.bqp + qi * RQ * d : p.b_q + i * p.b_q_stride;
          factor_dots(bq, RQ, d, bk, ld_bk, RK, count, b.c, next, per_call);
          if constexpr (is_quantized_v<S>) {  // B_Q·B_K(t)[s] times B_K's scale of (t, s)
            for (Index s = 0; s < RK; ++s)
              for (Index r = 0; r < RQ; ++r)
                scale_lanes(b.c + (s * RQ + r) * kT, 1, p.kv.scales(p.b_k_factor, blk, s) + off,
                            count);
          }
          for_chunks<kScoreVecs>(H_pad / kW, [&](Index v0, auto nv) {
            scores<decltype(nv)::value>(b.aq + qi * RQ * H_pad + v0 * kW, sh, b.c, ak, v0 * kW,
                                        count, st + v0 * kW, next, per_call);
          });
        } else {
          lane_scores(p, sh, b, blk, off, ak, bk, count, st, next, per_call);
        }
        if constexpr (is_quantized_v<S>) {  // times A_K's scale of token t (and head)
          const HeadScales sa(p, p.a_k_factor, blk, off);
          for (Index t = 0; t < count; ++t)
            for (Index h = 0; h < H_pad; h += kW)
              Ops::store(st + t * H_pad + h,
                         Ops::mul(Ops::load(st + t * H_pad + h), sa.at(t, h, H)));
        }
      } else {
        for (Index hb = 0; hb < H; hb += kW)
          for (Index tb = 0; tb < count; tb += kW)
            Ops::template transpose_block<float>(b.sp + (qi * H + hb) * kT + tb, kT,
                                                 std::min(kW, H - hb), std::min(kW, count - tb),
                                                 st + tb * H_pad + hb, H_pad);
      }
      float* w = b.w + qi * kT * RV * H_pad;
      float* alpha = b.alpha + qi * H_pad;
      if (varies) {  // score variants, then softmax and values over tokens [lo, count) only
        vary_scores(p, sh, st, p.q_pos0 + i, t0, lo, count);
        st += lo * H_pad;
        w += lo * RV * H_pad;
      }
      const S* av_q = av + lo * ld_av;
      for_chunks(H_pad / kW, [&](Index v0, auto nv) {
        const Index h0 = v0 * kW;
        softmax<decltype(nv)::value>(sh, av_q, h0, count - lo, st + h0, w + h0,
                                     b.m + qi * H_pad + h0, b.l + qi * H_pad + h0, alpha + h0,
                                     next, per_call);
      });
      if constexpr (is_quantized_v<S>) {
        // Value scales folded into the weights: w(t, s) ·= A_V's scale of t · B_V's of (t, s)
        // for the tokens [lo, count) the weights hold; B_V was widened unscaled above.
        const HeadScales sa(p, p.a_v_factor, blk, off);
        for (Index s = 0; s < RV; ++s) {
          const float* sb = p.kv.scales(p.b_v_factor, blk, s) + off;
          for (Index t = lo; t < count; ++t) {
            const V b_scale = Ops::set1(sb[t]);
            float* wt = w + ((t - lo) * RV + s) * H_pad;
            for (Index h = 0; h < H_pad; h += kW)
              Ops::store(wt + h, Ops::mul(Ops::load(wt + h), Ops::mul(sa.at(t, h, H), b_scale)));
          }
        }
      }
      if constexpr (kQ8Pairs) {
        if (sh.q8_pairs) {
          pv_q8(sh, b, w, (count - lo) * RV, alpha, bv + lo * ld_bv, b.acc + qi * H * sh.d_pad,
                next, per_call);
          continue;
        }
      }
      VSource vs;
      if (fuse_pack) vs = VSource{bv + lo * ld_bv, ld_bv, d, d, b.bvp + lo * v_ld};
      pv(w, 1, H_pad, RV * H_pad, alpha, vt + lo * v_ld, v_ld, v_sd, count - lo, RV,
         b.acc + qi * H * sh.d_pad, sh.d_pad, H, next, per_call, vs);
    }
    next.issue(next.pending());
  }

  // Full-query scores of a one-query pass, heads in lanes, over tokens t < n of the tile (ak,
  // bk: its first A_K and B_K rows): ck[t·RK + s] = B_K(t)[s] · qt (the tile's n·RK B_K rows,
  // contiguous, against the heads in lanes: kLaneTok rows × kLaneVecs head vectors of
  // accumulators, each B_K element broadcast from its row once per head group — 16-bit and
  // int8 rows widened into an L1 block first), then st[t] = Σ_s A_K(t)[:, s] ⊙ ck[t·RK + s]
  // (int8: ck times B_K's scale of (t, s); the caller applies A_K's of t). No transposes of the
  // tile.
  static void lane_scores(const P& p, const Shape& sh, const Buffers& b, Index blk, Index off,
                          const S* ak, const S* bk, Index n, float* st, TilePrefetch& pf,
                          Index per_call) {
    const Index H = sh.H, H_pad = sh.H_pad, d = sh.d, RK = sh.RK, nk = n * RK;
    const Index nv = H_pad / kW;
    alignas(64) float wide[std::is_same<S, float>::value ? 1 : kLaneTok * kLaneDims];
    float* stage = std::is_same<S, float>::value ? nullptr : wide;
    for (Index j0 = 0; j0 < d; j0 += kLaneDims) {
      const Index len = std::min(kLaneDims, d - j0);
      for (Index k = 0; k < nk; k += kLaneTok) {
        const float* rows[kLaneTok];
        lane_rows<Ops, kLaneTok>(bk + k * d + j0, d, std::min(kLaneTok, nk - k), len, nullptr,
                                 stage, kLaneDims, rows);
        for (Index v = 0; v < nv; v += kLaneVecs) {
          pf.issue(per_call);
          lane_dispatch<kLaneVecs>(std::min(kLaneVecs, nv - v), rows, len,
                                   b.qt + j0 * H_pad + v * kW, H_pad, b.ck + k * H_pad + v * kW,
                                   H_pad, j0 == 0);
        }
      }
    }
    if constexpr (is_quantized_v<S>) {  // ck[t·RK + s] times B_K's scale of (t, s)
      for (Index s = 0; s < RK; ++s) {
        const float* sc = p.kv.scales(p.b_k_factor, blk, s) + off;
        for (Index t = 0; t < n; ++t) {
          float* row = b.ck + (t * RK + s) * H_pad;
          const V f = Ops::set1(sc[t]);
          for (Index v = 0; v < nv; ++v)
            Ops::store(row + v * kW, Ops::mul(Ops::load(row + v * kW), f));
        }
      }
    }
    const Index ld = H * RK;
    for (Index t = 0; t < n; ++t) {
      const S* row = ak + t * ld;
      for (Index v = 0; v < nv; ++v) {
        const Index nh = std::min(kW, H - v * kW);
        V sc = Ops::zero();
        for (Index s = 0; s < RK; ++s)
          sc = Ops::fmadd(Ops::template load_strided<S>(row + v * kW * RK + s, RK, nh),
                          Ops::load(b.ck + (t * RK + s) * H_pad + v * kW), sc);
        Ops::store(st + t * H_pad + v * kW, sc);
      }
    }
  }

  // lane_rows_product<kLaneTok, nv'> for nv' ≤ NV given at run time.
  template <int NV>
  static void lane_dispatch(Index nv, const float* const* rows, Index len, const float* q,
                            Index q_ld, float* s, Index s_ld, bool first) {
    if constexpr (NV > 0) {
      if (nv < NV)
        lane_dispatch<NV - 1>(nv, rows, len, q, q_ld, s, s_ld, first);
      else
        lane_rows_product<Ops, static_cast<int>(kLaneTok), NV>(rows, len, q, q_ld, s, s_ld,
                                                                 first);
    }
  }

  // Score variants of one query (position pos) over tokens [lo, count) of the tile starting at
  // key t0, st [kT, H_pad] (heads in lanes): soft-cap, then ALiBi.
  static void vary_scores(const P& p, const Shape& sh, float* st, Index pos, Index t0, Index lo,
                          Index count) {
    const ScoreVariant& var = p.variant;
    const Index H_pad = sh.H_pad;
    if (var.softcap > 0.f)
      softcap_scores<Ops>(st + lo * H_pad, (count - lo) * H_pad, var.softcap);
    if (var.alibi != nullptr)
      for (Index t = lo; t < count; ++t) {
        const float dist = static_cast<float>(t0 + t - pos);  // key − query position
        float* row = st + t * H_pad;
        for (Index h = 0; h < sh.H; ++h) row[h] += var.alibi[h] * dist;
      }
  }

  // Head vectors per chunk of the per-token loops (scores, softmax): their accumulators stay in
  // registers. Tokens between two prefetch issues in those loops.
  static constexpr Index kChunkVecs = 4;
  // lane_scores' register block: kLaneTok B_K rows × kLaneVecs head vectors (Ops' row-lane
  // block), over kLaneDims dims at a time (the qᵀ slice stays in L1).
  static constexpr Index kLaneTok = Ops::kLaneTokens, kLaneVecs = Ops::kLaneVecs;
  static constexpr Index kLaneDims = 128;
  static constexpr Index kTokGroup = 4;

  // f(v0, integral_constant<int, k>) for the chunks [v0, v0 + k) of nvec head vectors, k ≤
  // kMax ≤ kChunkVecs.
  template <Index kMax = kChunkVecs, class F>
  static void for_chunks(Index nvec, F&& f) {
    static_assert(kMax >= 1 && kMax <= kChunkVecs, "TpaTiled::for_chunks: chunk size");
    for (Index v0 = 0; v0 < nvec; v0 += kMax) {
      const Index k = std::min(kMax, nvec - v0);
      if (k == 4)
        f(v0, std::integral_constant<int, 4>{});
      else if (k == 3)
        f(v0, std::integral_constant<int, 3>{});
      else if (k == 2)
        f(v0, std::integral_constant<int, 2>{});
      else
        f(v0, std::integral_constant<int, 1>{});
    }
  }
  static_assert(kChunkVecs == 4, "TpaTiled::for_chunks dispatches chunks of up to 4 vectors");

  // scores() keeps a chunk's A_Qᵀ vectors (ranks × head vectors, up to kScoreRegs of them) in
  // registers over the tile: chunks of kScoreVecs head vectors, half the register file (AVX-512:
  // 32 registers, 2 head vectors × up to 8 ranks; 16 registers: 1 × 8). More ranks reload them
  // per token and rank.
  static constexpr Index kScoreVecs = kW >= 16 ? 2 : 1;
  static constexpr Index kScoreRegs = kW >= 16 ? 16 : 8;

  // Heads h0 … h0 + NV·kW − 1 (at least one per vector), tokens t < count of one query:
  // st[t·H_pad + lane] = Σ_s A_K(t)[h, s] · Σ_r c[(s·RQ + r)·kT + t] · aq[r·H_pad + lane]
  // (st, aq at the chunk's first head; ak = the tile's first A_K row). Padded heads get 0.
  // Both forms sum in the same order (r, then s, ascending), so their results are identical.
  template <int NV>
  static void scores(const float* aq, const Shape& sh, const float* c, const S* ak, Index h0,
                     Index count, float* st, TilePrefetch& pf, Index per_call) {
    const Index H = sh.H, H_pad = sh.H_pad, RQ = sh.RQ, RK = sh.RK, ld = H * RK;
    Index nh[NV];
    TPA_UNROLL
    for (int v = 0; v < NV; ++v) nh[v] = std::min(kW, H - h0 - v * kW);
    constexpr int NR = static_cast<int>(kScoreRegs) / NV;
    if (RQ <= NR) {
      V aqr[NR][NV];
      TPA_UNROLL
      for (int r = 0; r < NR; ++r) {
        TPA_UNROLL
        for (int v = 0; v < NV; ++v)
          aqr[r][v] = r < RQ ? Ops::load(aq + r * H_pad + v * kW) : Ops::zero();
      }
      for (Index t = 0; t < count; ++t) {
        if (t % kTokGroup == 0) pf.issue(per_call);
        const S* row = ak + t * ld + h0 * RK;
        V sc[NV];
        TPA_UNROLL
        for (int v = 0; v < NV; ++v) sc[v] = Ops::zero();
        for (Index s = 0; s < RK; ++s) {
          V u[NV];
          TPA_UNROLL
          for (int v = 0; v < NV; ++v) u[v] = Ops::zero();
          const float* cs = c + s * RQ * kT + t;
          TPA_UNROLL
          for (int r = 0; r < NR; ++r) {
            if (r >= RQ) break;
            const V cb = Ops::set1(cs[r * kT]);
            TPA_UNROLL
            for (int v = 0; v < NV; ++v) u[v] = Ops::fmadd(cb, aqr[r][v], u[v]);
          }
          TPA_UNROLL
          for (int v = 0; v < NV; ++v)
            sc[v] = Ops::fmadd(Ops::template load_strided<S>(row + v * kW * RK + s, RK, nh[v]),
                               u[v], sc[v]);
        }
        TPA_UNROLL
        for (int v = 0; v < NV; ++v) Ops::store(st + t * H_pad + v * kW, sc[v]);
      }
      return;
    }
    for (Index t = 0; t < count; ++t) {
      if (t % kTokGroup == 0) pf.issue(per_call);
      const S* row = ak + t * ld + h0 * RK;
      V sc[NV];
      TPA_UNROLL
      for (int v = 0; v < NV; ++v) sc[v] = Ops::zero();
      for (Index s = 0; s < RK; ++s) {
        V u[NV];
        TPA_UNROLL
        for (int v = 0; v < NV; ++v) u[v] = Ops::zero();
        const float* cs = c + s * RQ * kT + t;
        for (Index r = 0; r < RQ; ++r) {
          const V cb = Ops::set1(cs[r * kT]);
          TPA_UNROLL
          for (int v = 0; v < NV; ++v)
            u[v] = Ops::fmadd(cb, Ops::load(aq + r * H_pad + v * kW), u[v]);
        }
        TPA_UNROLL
        for (int v = 0; v < NV; ++v)
          sc[v] = Ops::fmadd(Ops::template load_strided<S>(row + v * kW * RK + s, RK, nh[v]), u[v],
                             sc[v]);
      }
      TPA_UNROLL
      for (int v = 0; v < NV; ++v) Ops::store(st + t * H_pad + v * kW, sc[v]);
    }
  }

  // Online softmax of one query's heads h0 … h0 + NV·kW − 1 over tokens t < count of the tile
  // (st, w, m, l, alpha at the chunk's first head; av = the tile's first A_V row):
  // m ← max(m, max_t st[t]) (floored at −FLT_MAX), alpha = e^(m_old − m), p = e^(st[t] − m),
  // l ← l·alpha + Σ_t p, w[(t·RV + s)·H_pad] = p ⊙ A_V(t)[:, s].
  template <int NV>
  static void softmax(const Shape& sh, const S* av, Index h0, Index count, const float* st,
                      float* w, float* m, float* l, float* alpha, TilePrefetch& pf,
                      Index per_call) {
    const Index H = sh.H, H_pad = sh.H_pad, RV = sh.RV, ld = H * RV;
    const V floor = Ops::set1(-std::numeric_limits<float>::max());
    Index nh[NV];
    V mx[NV], sum[NV];
    TPA_UNROLL
    for (int v = 0; v < NV; ++v) {
      nh[v] = std::min(kW, H - h0 - v * kW);
      mx[v] = Ops::load(st + v * kW);
      sum[v] = Ops::zero();
    }
    for (Index t = 1; t < count; ++t) {
      TPA_UNROLL
      for (int v = 0; v < NV; ++v) mx[v] = Ops::max(mx[v], Ops::load(st + t * H_pad + v * kW));
    }
    TPA_UNROLL
    for (int v = 0; v < NV; ++v) {
      const V m_old = Ops::load(m + v * kW);
      mx[v] = Ops::max(Ops::max(m_old, mx[v]), floor);  // the new maximum
      Ops::store(alpha + v * kW, Ops::exp(Ops::sub(m_old, mx[v])));
      Ops::store(m + v * kW, mx[v]);
    }
    for (Index t = 0; t < count; ++t) {
      if (t % kTokGroup == 0) pf.issue(per_call);
      const S* row = av + t * ld + h0 * RV;
      TPA_UNROLL
      for (int v = 0; v < NV; ++v) {
        const V e = Ops::exp(Ops::sub(Ops::load(st + t * H_pad + v * kW), mx[v]));
        sum[v] = Ops::add(sum[v], e);
        for (Index s = 0; s < RV; ++s)
          Ops::store(w + (t * RV + s) * H_pad + v * kW,
                     Ops::mul(e, Ops::template load_strided<S>(row + v * kW * RV + s, RV, nh[v])));
      }
    }
    TPA_UNROLL
    for (int v = 0; v < NV; ++v)
      Ops::store(l + v * kW, Ops::fmadd(Ops::load(l + v * kW), Ops::load(alpha + v * kW), sum[v]));
  }

  // Rows x[c·kT …] (c < rows) times the per-token scales sc[t] (and sc2[t] unless null; t < n;
  // lanes ≥ n become 0).
  static void scale_lanes(float* x, Index rows, const float* sc, Index n,
                          const float* sc2 = nullptr) {
    V s[kNV];
    TPA_UNROLL
    for (Index v = 0; v < kNV; ++v) {
      const Index m = std::min(kW, n - v * kW);
      s[v] = m > 0 ? Ops::template load_widen<float>(sc + v * kW, m) : Ops::zero();
      if (sc2 != nullptr && m > 0)
        s[v] = Ops::mul(s[v], Ops::template load_widen<float>(sc2 + v * kW, m));
    }
    for (Index c = 0; c < rows; ++c) {
      TPA_UNROLL
      for (Index v = 0; v < kNV; ++v)
        Ops::store(x + c * kT + v * kW, Ops::mul(Ops::load(x + c * kT + v * kW), s[v]));
    }
  }
  // The scales of an A factor (A_K, A_V) in block blk from token slot off: at(t, h, H) holds
  // those of slot off + t for heads h … h + kW − 1 in lanes (past H: unspecified, their weights
  // are 0): one per token, or one per head and token (rows of ≥ kQ8MinRowCols ranks).
  struct HeadScales {
    const float* sc;  // slot off's scale (of head 0)
    Index stride;     // floats between heads' scales (0: one per token)
    HeadScales(const P& p, std::size_t f, Index blk, Index off)
        : sc(p.kv.scales(f, blk, 0) + off),
          stride(p.kv.place(f).scale_rows > 1 ? p.kv.block_tokens : 0) {}
    V at(Index t, Index h, Index H) const {
      if (stride == 0) return Ops::set1(sc[t]);
      return Ops::template load_strided<float>(sc + t + h * stride, stride, std::min(kW, H - h));
    }
  };

  // dst [cols, kT] (row c at dst + c·kT) = src [n, cols]ᵀ (row t at src + t·ld, cols = ld),
  // widened to f32; tokens n … kT−1 are 0.
  static void transpose_tile(const S* src, Index ld, Index n, float* dst) {
    for (Index tb = 0; tb < kNV; ++tb) {
      const Index rows = std::max<Index>(0, std::min(kW, n - tb * kW));
      const S* s = rows > 0 ? src + tb * kW * ld : src;
      for (Index c = 0; c < ld; c += kW)
        Ops::template transpose_block<S>(s + c, ld, rows, std::min(kW, ld - c),
                                         dst + c * kT + tb * kW, kT);
    }
  }

  // Loads kW elements of a cached row as f32.
  static V load_row(const S* p) {
    if constexpr (std::is_same<S, float>::value) {
      return Ops::loadu(p);
    } else {
      return Ops::template load_widen<S>(p, kW);
    }
  }

  // c[(s·RQ + r)·kT + t] = bq[r·d …] · bk[t·ld_bk + s·d …] for t < n (lanes ≥ n: unspecified,
  // finite), all r < RQ and s < RK: groups of G = W/2 tokens × 2 ranks accumulate W dot
  // products over d in W registers (dots_block); lane_reduce turns them into one vector of W
  // results.
  static void factor_dots(const float* bq, Index RQ, Index d, const S* bk, Index ld_bk, Index RK,
                          Index n, float* c, TilePrefetch& pf, Index per_call) {
    constexpr Index G = kW / 2;
    alignas(64) float res[kW];
    for (Index s = 0; s < RK; ++s)
      for (Index tg = 0; tg < n; tg += G) {
        pf.issue(per_call);
        const S* rows = bk + tg * ld_bk + s * d;
        const Index nv = std::min(G, n - tg);
        for (Index r = 0; r < RQ; r += 2) {
          const Index r1 = std::min(r + 1, RQ - 1);
          Ops::store(res, dots_block(bq + r * d, bq + r1 * d, d, rows, ld_bk, nv));
          std::copy(res, res + G, c + (s * RQ + r) * kT + tg);
          std::copy(res + G, res + kW, c + (s * RQ + r1) * kT + tg);
        }
      }
  }

  // Lane i < G: q0 · row i, lane G + i: q1 · row i, over d; row i at rows + min(i, nv − 1)·ld
  // (rows past nv repeat the last one, so nothing past it is read).
  static V dots_block(const float* q0, const float* q1, Index d, const S* rows, Index ld,
                      Index nv) {
    constexpr Index G = kW / 2;
    const S* row[G];
    TPA_UNROLL
    for (Index i = 0; i < G; ++i) row[i] = rows + std::min(i, nv - 1) * ld;
    V acc[kW];
    TPA_UNROLL
    for (Index i = 0; i < kW; ++i) acc[i] = Ops::zero();
    Index j = 0;
    if constexpr (kBf16Pairs) {  // q0, q1 in bqp's order: each 2·kW chunk even, then odd
      for (; j + 2 * kW <= d; j += 2 * kW) {
        const V a0 = Ops::loadu(q0 + j), a1 = Ops::loadu(q1 + j);
        const V b0 = Ops::loadu(q0 + j + kW), b1 = Ops::loadu(q1 + j + kW);
        TPA_UNROLL
        for (Index i = 0; i < G; ++i) {
          V ke, ko;
          Ops::bf16_pairs(row[i] + j, ke, ko);
          acc[i] = Ops::fmadd(ke, a0, acc[i]);
          acc[G + i] = Ops::fmadd(ke, a1, acc[G + i]);
          acc[i] = Ops::fmadd(ko, b0, acc[i]);
          acc[G + i] = Ops::fmadd(ko, b1, acc[G + i]);
        }
      }
    }
    for (; j + kW <= d; j += kW) {
      const V a0 = Ops::loadu(q0 + j), a1 = Ops::loadu(q1 + j);
      TPA_UNROLL
      for (Index i = 0; i < G; ++i) {
        const V k = load_row(row[i] + j);
        acc[i] = Ops::fmadd(k, a0, acc[i]);
        acc[G + i] = Ops::fmadd(k, a1, acc[G + i]);
      }
    }
    if (j < d) {  // the last, partial vector of each row (zeros past d)
      const V a0 = Ops::template load_widen<float>(q0 + j, d - j);
      const V a1 = Ops::template load_widen<float>(q1 + j, d - j);
      TPA_UNROLL
      for (Index i = 0; i < G; ++i) {
        const V k = Ops::template load_widen<S>(row[i] + j, d - j);
        acc[i] = Ops::fmadd(k, a0, acc[i]);
        acc[G + i] = Ops::fmadd(k, a1, acc[G + i]);
      }
    }
    return lane_reduce<Ops>(acc);
  }

  // rows_block<nr'> for nr' ≤ NR given at run time.
  template <int NR, bool kMix>
  static void rows_dispatch(Index nr, const float* a, Index a_ld, const float* bt, Index k,
                            float* out, const float* const* mul, bool first) {
    if constexpr (NR > 0) {
      if (nr == NR)
        rows_block<NR, kMix>(a, a_ld, bt, k, out, mul, first);
      else
        rows_dispatch<NR - 1, kMix>(nr, a, a_ld, bt, k, out, mul, first);
    }
  }

  // acc [NR, kT] = a [NR, k] (row stride a_ld) · bt [k, kT]; then out row r (stride kT) =
  // acc (kMix false), or out·[!first] + mul[r] ⊙ acc (kMix true).
  template <int NR, bool kMix>
  static void rows_block(const float* a, Index a_ld, const float* bt, Index k, float* out,
                         const float* const* mul, bool first) {
    V acc[NR][kNV];
    TPA_UNROLL
    for (int r = 0; r < NR; ++r) {
      TPA_UNROLL
      for (Index v = 0; v < kNV; ++v) acc[r][v] = Ops::zero();
    }
    for (Index j = 0; j < k; ++j) {
      V x[kNV];
      TPA_UNROLL
      for (Index v = 0; v < kNV; ++v) x[v] = Ops::load(bt + j * kT + v * kW);
      TPA_UNROLL
      for (int r = 0; r < NR; ++r) {
        const V ab = Ops::set1(a[r * a_ld + j]);
        TPA_UNROLL
        for (Index v = 0; v < kNV; ++v) acc[r][v] = Ops::fmadd(ab, x[v], acc[r][v]);
      }
    }
    TPA_UNROLL
    for (int r = 0; r < NR; ++r) {
      TPA_UNROLL
      for (Index v = 0; v < kNV; ++v) {
        float* o = out + r * kT + v * kW;
        if constexpr (kMix) {
          const V prev = first ? Ops::zero() : Ops::load(o);
          Ops::store(o, Ops::fmadd(Ops::load(mul[r] + v * kW), acc[r][v], prev));
        } else {
          Ops::store(o, acc[r][v]);
        }
      }
    }
  }

  // pv() for an int8 B_V (q8_pairs): acc [H, d_pad] = acc · alpha + W · B_V over the K = n·R_V
  // weight rows k = t·R_V + s (w + k·H_pad, heads in lanes, value scales folded in) and the
  // cached B_V rows (bv + k·d, int8, contiguous). Each head's K weights are rounded to int16
  // against their maximum (w ≈ sw_h·q, |q| ≤ 32767: relative error ≤ 2⁻¹⁶ of the tile's
  // largest weight) and paired (k = 2p, 2p + 1); vpdpwssd sums q·B_V exactly in int32 (32
  // products per instruction, against 16 FMAs) and the scale is applied once per tile and head.
  // A non-finite weight makes the head's scale NaN, as it makes the f32 product's sums.
  static void pv_q8(const Shape& sh, const Buffers& b, const float* w, Index K, const float* alpha,
                    const S* bv, float* acc, TilePrefetch& pf, Index per_call) {
    const Index H_pad = sh.H_pad, np = (K + 1) / 2;
    for (Index h = 0; h < H_pad; h += kW) {
      V amax = Ops::zero(), sum = Ops::zero();
      for (Index k = 0; k < K; ++k) {
        const V x = Ops::load(w + k * H_pad + h);
        amax = Ops::max(amax, Ops::max(x, Ops::sub(Ops::zero(), x)));
        sum = Ops::add(sum, x);
      }
      alignas(64) float mx[kW], inv[kW], sc[kW];
      Ops::store(mx, amax);
      Ops::store(sc, Ops::mul(sum, Ops::zero()));  // 0, or NaN after a non-finite weight
      for (Index i = 0; i < kW; ++i) {
        inv[i] = mx[i] > 0.f ? 32767.f / mx[i] : 0.f;
        sc[i] += mx[i] / 32767.f;
      }
      Ops::store(b.sw + h, Ops::load(sc));
      const V iv = Ops::load(inv);
      for (Index p = 0; p < np; ++p) {
        const V w0 = Ops::mul(Ops::load(w + 2 * p * H_pad + h), iv);
        const V w1 =
            2 * p + 1 < K ? Ops::mul(Ops::load(w + (2 * p + 1) * H_pad + h), iv) : Ops::zero();
        Ops::store_pairs16(b.wq + p * H_pad + h, w0, w1);
      }
    }
    constexpr Index R = kQ8Rows, C = 2 * kQ8Groups;
    const Index nvec = sh.d / kW, H = sh.H;
    for (Index c = 0; c < nvec; c += C) {
      const Index ng = std::min(C, nvec - c) / 2;
      for (Index r = 0; r < H; r += R) {
        pf.issue(per_call);
        q8_dispatch<static_cast<int>(R), static_cast<int>(C / 2)>(
            std::min(R, H - r), ng, sh, b.wq + r, b.sw + r, alpha + r, bv + c * kW, np, K,
            acc + r * sh.d_pad + c * kW);
      }
    }
  }

  // q8_block<nr', ng'> for nr' ≤ NR, ng' ≤ NG given at run time.
  template <int NR, int NG>
  static void q8_dispatch(Index nr, Index ng, const Shape& sh, const float* wq, const float* sw,
                          const float* alpha, const S* bv, Index np, Index K, float* acc) {
    if constexpr (NR > 0 && NG > 0) {
      if (nr < NR)
        q8_dispatch<NR - 1, NG>(nr, ng, sh, wq, sw, alpha, bv, np, K, acc);
      else if (ng < NG)
        q8_dispatch<NR, NG - 1>(nr, ng, sh, wq, sw, alpha, bv, np, K, acc);
      else
        q8_block<NR, NG>(sh, wq, sw, alpha, bv, np, K, acc);
    }
  }

  // One NR heads × NG·32 dims register block of pv_q8 (rows at wq, sw, alpha, acc + r·d_pad;
  // dims from bv, acc).
  template <int NR, int NG>
  static void q8_block(const Shape& sh, const float* wq, const float* sw, const float* alpha,
                       const S* bv, Index np, Index K, float* acc) {
    using VI = typename Ops::VI;
    const Index d = sh.d, H_pad = sh.H_pad;
    VI a[NR][2 * NG];
    TPA_UNROLL
    for (int r = 0; r < NR; ++r) {
      TPA_UNROLL
      for (int j = 0; j < 2 * NG; ++j) a[r][j] = Ops::izero();
    }
    for (Index p = 0; p < np; ++p) {
      const S* r0 = bv + 2 * p * d;
      const S* r1 = 2 * p + 1 < K ? r0 + d : r0;  // odd K: the last pair's weight is 0
      VI x[2 * NG];
      TPA_UNROLL
      for (int g = 0; g < NG; ++g)
        Ops::q8_pairs(r0 + g * 2 * kW, r1 + g * 2 * kW, x[2 * g], x[2 * g + 1]);
      TPA_UNROLL
      for (int r = 0; r < NR; ++r) {
        const float* wp = wq + p * H_pad + r;
        TPA_UNROLL
        for (int j = 0; j < 2 * NG; ++j) a[r][j] = Ops::dot_pairs(a[r][j], x[j], wp);
      }
    }
    TPA_UNROLL
    for (int r = 0; r < NR; ++r) {
      const V al = Ops::set1(alpha[r]), sc = Ops::set1(sw[r]);
      float* o = acc + r * sh.d_pad;
      TPA_UNROLL
      for (int g = 0; g < NG; ++g) {
        V f0, f1;
        Ops::q8_unpair(a[r][2 * g], a[r][2 * g + 1], f0, f1);
        float* og = o + g * 2 * kW;
        Ops::store(og, Ops::fmadd(f0, sc, Ops::mul(Ops::load(og), al)));
        Ops::store(og + kW, Ops::fmadd(f1, sc, Ops::mul(Ops::load(og + kW), al)));
      }
    }
  }

  // B_V rows as cached (storage scalar S), for pv() to widen while it multiplies: row (t, s) at
  // src + t·ld + s·sd, d elements, widened into dst (pv()'s v, writable). src null: the f32 rows
  // pv() reads are ready.
  struct VSource {
    const S* src = nullptr;
    Index ld = 0, sd = 0, d = 0;
    float* dst = nullptr;
  };

  // acc [nr, acc_ld] = acc · alpha (per row) + W · B_V: weight (row r, rank s, token t) at
  // w + r·w_r + s·w_s + t·w_t, B_V row (t, s) at v + t·v_ld + s·v_sd; n tokens, acc_ld / kW
  // vectors per row. Column blocks outer: a B_V column block stays in L1. With vs.src set, v
  // (= vs.dst) is written, not read, by each column block's first row block: it widens the
  // cached rows in registers (once per element) and stores them for the other row blocks.
  static void pv(const float* w, Index w_r, Index w_s, Index w_t, const float* alpha,
                 const float* v, Index v_ld, Index v_sd, Index n, Index RV, float* acc,
                 Index acc_ld, Index nr, TilePrefetch& pf, Index per_call,
                 const VSource& vs = VSource{}) {
    constexpr Index R = kPvRows, C = kPvCols;
    const Index nvec = acc_ld / kW;
    const Strides st{w_r, w_s, w_t, v_ld, v_sd, n, RV, acc_ld};
    for (Index c = 0; c < nvec; c += C) {
      const Index nc = std::min(C, nvec - c);
      for (Index r = 0; r < nr; r += R) {
        pf.issue(per_call);
        if (r == 0 && vs.src != nullptr) {
          VSource part = vs;
          part.src += c * kW;
          part.d -= c * kW;
          part.dst += c * kW;
          pv_dispatch<static_cast<int>(R), static_cast<int>(C), true>(
              std::min(R, nr - r), nc, w + r * w_r, alpha + r, v + c * kW,
              acc + r * acc_ld + c * kW, st, part);
        } else {
          pv_dispatch<static_cast<int>(R), static_cast<int>(C), false>(
              std::min(R, nr - r), nc, w + r * w_r, alpha + r, v + c * kW,
              acc + r * acc_ld + c * kW, st, vs);
        }
      }
    }
  }

  struct Strides {
    Index w_r, w_s, w_t, v_ld, v_sd, n, RV, acc_ld;
  };

  // pv_block<nr', nc', kPack> for nr' ≤ NR, nc' ≤ NC given at run time.
  template <int NR, int NC, bool kPack>
  static void pv_dispatch(Index nr, Index nc, const float* w, const float* alpha, const float* v,
                          float* acc, const Strides& st, const VSource& vs) {
    if constexpr (NR > 0 && NC > 0) {
      if (nr < NR)
        pv_dispatch<NR - 1, NC, kPack>(nr, nc, w, alpha, v, acc, st, vs);
      else if (nc < NC)
        pv_dispatch<NR, NC - 1, kPack>(nr, nc, w, alpha, v, acc, st, vs);
      else
        pv_block<NR, NC, kPack>(w, alpha, v, acc, st, vs);
    }
  }

  // One NR × NC register block of pv(); kPack: B_V's vectors come from vs (widened, masked past
  // vs.d) and are stored to vs.dst (= v) on the way.
  template <int NR, int NC, bool kPack>
  static void pv_block(const float* w, const float* alpha, const float* v, float* acc,
                       const Strides& st, const VSource& vs) {
    const Index w_r = st.w_r, w_t = st.w_t, v_ld = st.v_ld, acc_ld = st.acc_ld;
    V a[NR][NC];
    load_rescaled<Ops>(a, acc, acc_ld, alpha);
    Index cnt[NC];
    TPA_UNROLL
    for (int c = 0; c < NC; ++c) cnt[c] = kPack ? std::min(kW, vs.d - c * kW) : kW;
    for (Index s = 0; s < st.RV; ++s) {
      const float* ws = w + s * st.w_s;
      const float* vv = v + s * st.v_sd;
      for (Index t = 0; t < st.n; ++t) {
        V x[NC];
        if constexpr (kPack) {
          const S* src = vs.src + t * vs.ld + s * vs.sd;
          TPA_UNROLL
          for (int c = 0; c < NC; ++c) {
            x[c] = Ops::template load_widen<S>(src + c * kW, cnt[c]);
            Ops::store(vs.dst + s * st.v_sd + t * v_ld + c * kW, x[c]);
          }
        } else {
          TPA_UNROLL
          for (int c = 0; c < NC; ++c) x[c] = Ops::loadu(vv + t * v_ld + c * kW);
        }
        rank1_update<Ops>(a, x, ws + t * w_t, w_r);
      }
    }
    store_block<Ops>(a, acc, acc_ld);
  }
};

}  // namespace detail
}  // namespace tpa
