// The tiled grouped-attention kernel shared by the SIMD backends (Portable, Avx2, Avx512). The
// algorithm lives here once; each backend supplies an `Ops` policy with its vector primitives
// (see the Ops contract below) and its block sizes.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>

#include "tpa/core/quant.hpp"
#include "tpa/core/tensor.hpp"
#include "tpa/kernels/lane_reduce.hpp"
#include "tpa/kernels/params.hpp"
#include "tpa/kernels/register_block.hpp"
#include "tpa/kernels/score_variant.hpp"
#include "tpa/kernels/softmax.hpp"
#include "tpa/kernels/workspace.hpp"

namespace tpa {

/// \brief The piece of one GroupedAttentionParams call that one worker computes: KV heads
/// [g0, g1) (with all their query heads), queries [i0, i1), keys [k0, k1). Query i still sees
/// only keys ≤ q_pos0 + i.
struct GroupedPart {
  Index g0 = 0, g1 = 0;
  Index i0 = 0, i1 = 0;
  Index k0 = 0, k1 = 0;

  /// The whole call.
  template <class S>
  static GroupedPart whole(const GroupedAttentionParams<S>& p) {
    return GroupedPart{0, p.n_kv_heads, 0, p.n_q, 0, p.q_pos0 + p.n_q};
  }
};

/// \brief Where a part writes unnormalised online-softmax states (SoftmaxState's m, l, acc)
/// instead of outputs, for a later merge. Row r = (i − i0)·(g1 − g0)·group + (h − g0·group)
/// holds query i, head h: m[r], l[r], and acc + r·acc_stride [d_v].
struct GroupedStates {
  float* m = nullptr;
  float* l = nullptr;
  float* acc = nullptr;
  Index acc_stride = 0;
};

namespace detail {

/// Software prefetch (into L2) of the cache rows of the next step, issued a few lines at a
/// time while the current step computes: in a token-major factor the rows of one KV head are
/// page-strided, which the hardware prefetchers follow poorly; a head-major tile is one run,
/// but each step starts a new stream (another KV head, another block).
class RowPrefetch {
 public:
  /// Adds `rows` rows of `bytes` bytes, row r at base + r·stride bytes (rows that touch each
  /// other become one).
  void add(const void* base, Index stride, Index bytes, Index rows) {
    if (n_ == kMaxRanges || rows <= 0 || bytes <= 0) return;
    if (stride == bytes) {
      bytes *= rows;
      rows = 1;
    }
    const auto a = reinterpret_cast<std::uintptr_t>(base);
    // Lines from the first row's aligned start; other rows may start at another offset inside
    // their first line, so one more line covers them.
    const Index lines = (static_cast<Index>(a & 63) + bytes + 63) / 64 + (stride % 64 != 0);
    ranges_[n_++] =
        Range{reinterpret_cast<const char*>(a & ~std::uintptr_t{63}), stride, lines, rows};
    total_ += lines * rows;
  }
  /// Cache lines still to prefetch.
  Index pending() const { return total_; }
  /// Prefetches up to `count` more lines.
  void issue(Index count) {
#if defined(__GNUC__)
    count = std::min(count, total_);
    total_ -= count;
    while (count > 0) {
      const Range& r = ranges_[cur_];
      const char* row = r.base + row_ * r.stride;
      const Index k = std::min(count, r.lines - line_);
      for (Index i = line_; i < line_ + k; ++i) __builtin_prefetch(row + i * 64, 0, 2);
      count -= k;
      line_ += k;
      if (line_ == r.lines) {
        line_ = 0;
        if (++row_ == r.rows) {
          row_ = 0;
          ++cur_;
        }
      }
    }
#else
    total_ -= std::min(count, total_);
#endif
  }

 private:
  struct Range {
    const char* base;  // 64-byte aligned
    Index stride, lines, rows;
  };
  static constexpr int kMaxRanges = 10;  // two steps of: K's two parts, V, int8 scales of K, V
  Range ranges_[kMaxRanges] = {};
  int n_ = 0, cur_ = 0;
  Index row_ = 0, line_ = 0, total_ = 0;
};

/// Optional Ops primitives of the token-lane score kernels, false when Ops lacks them:
/// kBf16Split (bf16_even / bf16_odd: 2·kWidth bf16 widened as their even and odd elements, one
/// op each) and kDotI16 (VI, izero, load_i16, widen_i8, dot_i16, lane_reduce_i32: int16 × int8
/// dot products into int32 lanes).
template <class Ops, class = void>
struct OpsBf16Split : std::false_type {};
template <class Ops>
struct OpsBf16Split<Ops, std::void_t<decltype(Ops::kBf16Split)>>
    : std::bool_constant<Ops::kBf16Split> {};
/// kDotBf16 (dot_bf16, split_bf16: f32 × bf16 pairs by vdpbf16ps, Avx512Ops with AVX512-BF16).
template <class Ops, class = void>
struct OpsDotBf16 : std::false_type {};
template <class Ops>
struct OpsDotBf16<Ops, std::void_t<decltype(Ops::kDotBf16)>> : std::bool_constant<Ops::kDotBf16> {};
template <class Ops, class = void>
struct OpsDotI16 : std::false_type {};
template <class Ops>
struct OpsDotI16<Ops, std::void_t<decltype(Ops::kDotI16)>> : std::bool_constant<Ops::kDotI16> {};
// The value micro-kernel's block for more than kPvRows rows: Ops::kPvRowsWide ×
// Ops::kPvColsWide if Ops declares them, else kPvRows × kPvCols (no wider block).
template <class Ops, class = void>
struct OpsPvWide {
  static constexpr Index kRows = Ops::kPvRows, kCols = Ops::kPvCols;
};
template <class Ops>
struct OpsPvWide<Ops, std::void_t<decltype(Ops::kPvRowsWide)>> {
  static constexpr Index kRows = Ops::kPvRowsWide, kCols = Ops::kPvColsWide;
};

/// \brief The grouped-attention kernel over one GroupedPart, for storage scalar S, built from
/// the vector primitives of `Ops`.
///
/// Ops contract (V is the vector type, W = kWidth lanes of f32):
///   kWidth; kTile (tokens per key tile, a multiple of kWidth and of kLaneTokens);
///   kLaneTokens × kLaneVecs (tokens × row vectors of the row-lane score micro-kernel);
///   kLaneRowsMin (rows per KV head from which the row-lane form is used); kPvRows × kPvCols
///   (rows × vectors of the value micro-kernel); kPv1Cols (its vectors for a single row, MHA
///   decode); optionally kPvRowsWide × kPvColsWide (its block for kPvRows < rows ≤ kPvRowsWide,
///   so that one call covers all rows of a KV head, e.g. GQA with 8 query heads per KV head);
///   kPvtDims (value dims × kLaneVecs row vectors of the transposed one, row-lane decode);
///   kQkRows (rows of a transposed-K score micro-kernel: not used here, by other tiled kernels);
///   zero(), set1(x), load(p) (p aligned to W floats), loadu(p), store(p, v) (aligned),
///   add, sub, mul, div (score variants only), max, fmadd(a, b, c) = a·b + c, reduce_max(v),
///   reduce_add(v);
///   exp(v): e^x for x ≤ 0 with ≤ 2 ulp error, exactly 0 for x < −87.3 (and −inf), NaN kept;
///   load_widen<S>(p, n): n ∈ [1, W] elements of S widened to f32, lanes ≥ n zero, reads only n;
///   transpose_block<S>(src, ld, rows, cols, dst, dst_ld): dst[c·dst_ld + r] = src[r·ld + c]
///   for c < cols ≤ W and r < W, with 0 for r ≥ rows (rows ∈ [0, W]); dst aligned.
/// Optional (PairValues): kPairValues<S> true makes token-lane passes of ≤ kPvRowsMax rows per KV
///   head read V in blocks of 2·W dims (pv_pair), with pair_order<S>(a) (a block of acc back in
///   dim order), and for bf16 bf16_pairs(p, even, odd), for q8 VI, izero(), to_float(VI),
///   q8_pairs(a, b, lo, hi), dot_pairs(acc, x, w), quantize_probs(p, sc, n, q).
///
/// A pass holds a set of rows (query heads × queries of some KV heads: at most kRowCap, unless
/// one KV head has more query heads) and walks the key tiles (≤ kTile tokens inside one cache
/// block); per tile and KV head g, with R rows of g:
///  - scores S = Q·Kᵀ [R × tile] as a register-blocked product, so each K element is read from
///    memory once per step whatever the group size, in one of two forms:
///    token lanes (R < kLaneRowsMin, e.g. MHA, GQA-8): per row, W token accumulators fed by
///      vector loads of W dims at a time, then one transposing reduction tree (lane_reduce)
///      turns them into the row's W token scores; one row (MHA) reads the K rows in place;
///      several (GQA) too, in groups of RB rows × W / RB tokens of accumulators, each K vector
///      widened once in a register and multiplied into all RB rows (qk_group);
///    row lanes (R ≥ kLaneRowsMin, e.g. MQA, MLA, prefill): Qᵀ is packed once per pass; vectors
///      run over rows, each K element is broadcast straight from the cache row, no transpose,
///      and the softmax below is all vertical (no horizontal reductions); 16-bit and int8 rows
///      are widened into an L1 block first, except bf16 where Ops has kDotBf16 (k_pairs): each
///      pair of K elements is broadcast as one 32-bit word into vdpbf16ps against Qᵀ split into
///      bf16 pairs of its rounded value and remainder (q to about 16 bits), two instructions per
///      pair of dims as f32 takes two FMAs (MQA bf16 1.04×, steps alternated, Zen 4); and int8
///      with kDotI (k_i16, one key part): rows sign-extended to int16 into L1, each pair
///      broadcast into vpdpwssd against Qᵀ rounded to int16 per row (as the token-lane int8
///      scores), exact in int32, one instruction per pair of dims (MQA int8 1.29×);
///  - online softmax: one vector exp per (row, tile) worth of scores, one rescale factor per row
///    and tile (folded into the value micro-kernel);
///  - acc [R × d_v] = acc·alpha + P [R × tile]·V [tile × d_v], the accumulator block in
///    registers across the tile: with row lanes in a one-query pass and d_v ≥ kPvtMinDims
///    (MLA's latent value), accᵀ [d_v × R] (rows in lanes, each
///    V element broadcast straight from the cache row once per step and group of kLaneVecs row
///    vectors, P read as the softmax left it); else rows × vectors of d_v, V column blocks outer
///    so they stay in L1.
/// Everything accumulates in f32. While a step runs, the cache rows of the next step are
/// prefetched into L2 a few lines per micro-kernel call (RowPrefetch).
///
/// Roofline of token-lane decode (MHA, GQA-8: 32 query heads, d 128, 16K context) on a 2-core
/// Zen 4 (AVX-512 ops double-pumped: one 512-bit FMA per cycle and core, ~3.66 GHz, 234
/// GFLOP/s; 55–61 GB/s read with 2 MiB pages):
///   FLOPs 2·32·16384·256 = 268 M for both = 8.4 M 512-bit FMAs: 1.15 ms on 2 cores.
///   Bytes: MHA 537 MB f32, 268 MB bf16/f16, 138 MB int8 (values + f32 scales); GQA-8 a quarter
///   (134, 67, 34.6 MB): at 60 GB/s MHA 9.0 / 4.5 / 2.3 ms, GQA-8 2.2 / 1.1 / 0.58 ms.
///   Widening: bf16 vpmovzxwd + vpslld, int8 vpmovsxbd + vcvtdq2ps (+ nothing for the scale:
///   folded into the score and the probability), f16 vcvtph2ps: 2 ops per 16 elements once
///   per element (qk_group, the in-place value micro-kernel), + G_q FMAs for the G_q query heads
///   sharing it (MHA 1, GQA-8 4). Inner loops (objdump): qk_group<4> per 16 K elements 2 widen +
///   1 q load + 4 FMA; pv_block<4, 4> per 16 V elements 2 widen + 1 broadcast + 4 FMA;
///   dot_rows (MHA) 2 widen + 1 FMA.
///   Score side on Avx512 since (kSplit, kDotI): bf16 K per 32 elements one 512-bit load
///   widened by 2 ops (even elements vpslld, odd vpandd; q's 32-dim blocks stored even/odd), so
///   dot_rows 2 widen + 2 FMA and qk_group<4> 2 widen + 8 FMA per 32 (was 4 + 2, 4 + 8); int8 K
///   with VNNI (q rows rounded to int16, ±32767 up to 516 dims) per 32 elements 1 vpmovsxbw + 1 vpdpwssd per row: MHA 2 ops (was 6),
///   qk_group<4> 5 (was 12). Score-side issue, MHA: 4.2 M K vectors of 16 × 3 ops = 1.7 ms
///   before, bf16 × 2 = 1.15 ms, int8 × 1 = 0.57 ms; GQA-8: 1.05 M × 6 = 0.86 ms before, bf16
///   × 5 = 0.72 ms, int8 × 2.5 = 0.36 ms (the FMAs of the value side unchanged here). The int8
///   epilogue (qk_i16) since: per 16 tokens and RB rows one chunk_transpose, then per row 2
///   vector multiplies and a store, instead of 2 multiplies and a scalar store per score (GQA-8:
///   16 scores per 64 vpdpwssd); GQA-4 int8 1.51 → 1.36 ms at 16K (README, "Int8 scores").
///   Value side on Avx512 (pv_pair, objdump): bf16 per 32 V elements 2 widen (vpslld / vpandd
///   of one 64-byte load: even, odd dims) + 2·G_q FMA, 1 broadcast per row and token
///   (pv_pair_block<4, 2>: 4 widen + 4 broadcast + 16 FMA per token and 64 dims, was 8 + 4 +
///   16); int8 (VNNI) per 2 tokens × 32 dims 2 vpmovsxbw + 2
///   vpunpck[lh]wd + 2·G_q vpdpwssd, 1 broadcast per row and token pair (GQA-8, <4, 2>: 28 +
///   6 register moves per 2 tokens × 64 dims, was 56; MHA, <1, 4>: 25 + 12 moves per 2 tokens ×
///   128 dims, was 50), + per row and tile 2 quantizing vectors, per accumulator a cvt + mul +
///   FMA at the tile's end.
///   Instruction bound at 1 512-bit op per cycle and core: MHA 8.4 M vectors × 3 ops = 3.4 ms
///   (int8 is widen-bound there, above its 2.3 ms of bytes: int8/bf16 ≤ 1.3×; 1.9× if the
///   widening issues beside the FMAs); GQA-8 2.1 M vectors × (2 + 4) ops = 1.7 ms, and its 1.15
///   ms of FMAs alone exceed int8's 0.58 ms of bytes: with f32 arithmetic GQA-8 int8 cannot run
///   1.8× bf16 on this CPU (that needs fewer FMAs, e.g. bf16 dot products).
///   Measured (perf cpu-clock samples, CPU ms of both threads per step in GroupedTiled, 16K,
///   2 MiB pages, host load 6–8 from other builds, so ±20 %): GQA-8 f32 18.4 → 14.7, bf16
///   12.3 → 6.9–8.9, f16 15.7 → 8.5, int8 10.8 → 6.7–7.8 (of which qk_group 4.3, pv_block 2.6,
///   the rest 0.8; the FMA bound is 1.15 each); MHA bf16 19.8 → 17.1, f16 18.9 → 15.3, int8
///   14.4 → 13.0–14.0 (qk_dot 8.3–8.9, pv_block 3.6: the score side stalls on memory), f32
///   unchanged (the dims-blocked copy and the staged V tile before, in registers after).
/// Rows (query heads × queries) per pass of GroupedTiled (GroupedTiled::kRowCap). A query's
/// reduction order depends on the pass it is in, so the schedulers cut a prefill part only at
/// multiples of a pass's queries (split.hpp, CutItem::quantum).
constexpr Index kGroupedRowCap = 64;

/// Whether Ops reads V of storage S with the paired value micro-kernel (GroupedTiled::pv_pair):
/// Ops::kPairValues<S> if Ops declares it, else false.
template <class Ops, class S, class = void>
struct PairValues : std::false_type {};
template <class Ops, class S>
struct PairValues<Ops, S, std::enable_if_t<Ops::template kPairValues<S>>> : std::true_type {};

template <class Ops, class S>
class GroupedTiled {
 public:
  using P = GroupedAttentionParams<S>;
  using V = typename Ops::V;
  static constexpr Index kW = Ops::kWidth;
  static constexpr Index kT = Ops::kTile;
  static constexpr Index kNV = kT / kW;
  static_assert(kT % kW == 0 && kT % Ops::kLaneTokens == 0,
                "GroupedTiled: kTile must be a multiple of kWidth and kLaneTokens");
  /// Rows (query heads × queries) per pass, unless a single KV head has more query heads.
  static constexpr Index kRowCap = kGroupedRowCap;
  /// Key dims per chunk of the row-lane score product (its Qᵀ slice stays in L1).
  static constexpr Index kChunk = 128;
  /// Value dims per call of the transposed value micro-kernel (× kLaneVecs row vectors).
  static constexpr Index kPvtDims = Ops::kPvtDims;
  /// Value dims from which row-lane decode accumulates transposed (see shape()).
  static constexpr Index kPvtMinDims = 256;
  /// Value vectors per call of the value micro-kernel for a single row (MHA decode). With
  /// AVX-512's kPvCols (4) accumulators its FMA chains stalled on latency; 8 took MHA's tile 13%
  /// less time with the cache in L2 (Zen 5).
  static constexpr Index kPv1Cols = Ops::kPv1Cols;
  /// Rows one value micro-kernel call covers at most (kPvRowsWide × kPvColsWide from
  /// kPvRows + 1 rows): a pass of ≤ kPvRowsMax rows per KV head widens each V element once.
  static constexpr Index kPvRowsMax = std::max(Ops::kPvRows, OpsPvWide<Ops>::kRows);
  static constexpr Index kPvColsWide = OpsPvWide<Ops>::kCols;
  static_assert(kPv1Cols >= 1, "GroupedTiled: Ops::kPv1Cols must be at least 1");

  /// Floats of workspace that run() needs for `part` (64-byte aligned storage).
  static Index workspace_floats(const P& p, const GroupedPart& part) {
    const Shape sh = shape(p, part);
    return layout(sh, nullptr).total;
  }

  /// Computes `part` of the call `p`. With `out` null, writes the normalised outputs of the
  /// part's rows to p.o (the part must then cover all keys its queries see: k0 = 0 and
  /// k1 ≥ q_pos0 + i1); otherwise writes their unnormalised states to *out.
  /// `ws` holds workspace_floats(p, part) floats, 64-byte aligned.
  static void run(const P& p, const GroupedPart& part, float* ws, const GroupedStates* out) {
    const Shape sh = shape(p, part);
    Buffers b = layout(sh, ws);
    for (Index ib = part.i0; ib < part.i1; ib += sh.ni)
      for (Index gb = part.g0; gb < part.g1; gb += sh.ng)
        pass(p, part, sh, b, gb, std::min(part.g1, gb + sh.ng), ib, std::min(part.i1, ib + sh.ni),
             out);
  }

  /// The whole call on the calling thread, with a workspace allocated for it.
  static void run_whole(const P& p) {
    const GroupedPart part = GroupedPart::whole(p);
    with_workspace(workspace_floats(p, part), [&](float* ws) { run(p, part, ws, nullptr); });
  }

 private:
  struct Shape {
    Index gs = 0;         // query heads per KV head
    Index d_qk = 0;       // key size (both parts)
    Index dq_pad = 0;     // key size with each part rounded up to kW (token-lane q rows)
    Index d_v = 0;        // value size
    Index d_v_pad = 0;    // d_v rounded up to kW (accumulator rows)
    Index ng = 0;         // KV heads per pass
    Index ni = 0;         // queries per pass
    Index rp = 0;         // row pitch per KV head: rows of one KV head, rounded up to kW
    bool pack_v = false;  // V is widened/padded into workspace (not read in place)
    bool k_pairs = false;  // row lanes score bf16 K pairs in place against q2 (kDotBf16)
    bool k_i16 = false;    // row lanes score int8 K against int16 pairs of q in q2 (kDotI)
    bool pack_k = false;  // token-lane keys in two scaled parts (int8 MLA, see qk_dot)
    bool acc_t = false;   // accumulators transposed: per KV head accᵀ [d_v_pad, rp]
    bool q_i16 = false;   // token-lane q rows as int16 for int8 keys (kDotI, see qk_i16)
  };

  struct Buffers {
    float* q;      // per KV head: token lanes [R, dq_pad] scaled q, each key part zero-padded
                   // to kW; row lanes [d_qk, rp] qᵀ
    float* sp;     // scores, then probabilities: token lanes [rows, kT]; row lanes [kT, rp]
    float* m;      // [ng·rp] running max
    float* l;      // [ng·rp] running sum
    float* alpha;  // [ng·rp] rescale factor of the current tile
    float* acc;    // [ng·rp, d_v_pad]; acc_t: per KV head [d_v_pad, rp]
    float* vp;     // [kT, d_v_pad] widened V tile (pack_v only)
    float* kp;     // [dq_pad / kW, kT, kW] K tile, widened, padded like q (pack_k only)
    float* qs;     // [ng·rp] scale of each int16 token-lane q row (q_i16 only)
    float* q2;     // k_pairs, per KV head: [d_qk / 2][2][rp] qᵀ as bf16 pairs (dims 2i, 2i + 1
                   // in one 32-bit lane), the rounded value's pair, then its remainder's;
                   // k_i16: [d_qk / 2][rp] qᵀ as int16 pairs, row r times 1 / qs[r]
    Index total;   // floats
  };

  // Where the rows of one KV head g of the current pass live.
  struct Rows {
    Index base = 0;  // row index of g's first row (rows base … base + n of the buffers)
    Index n = 0;     // rows of g in the pass (queries × query heads)
    Index skip = 0;  // leading rows whose queries see no key of the tile
    bool lanes = false;
    bool pair_v = false;  // the pass's acc in pv_pair's order (restored as it leaves, pair_order)
  };

  static Index round_up(Index n, Index m) { return (n + m - 1) / m * m; }

  static Shape shape(const P& p, const GroupedPart& part) {
    Shape sh;
    sh.gs = p.group_size();
    sh.d_qk = p.d_qk();
    sh.dq_pad = round_up(p.k_dims[0], kW) + round_up(p.k_dims[1], kW);
    sh.d_v = p.d_v;
    sh.d_v_pad = round_up(p.d_v, kW);
    const Index per_g = std::max<Index>(1, kRowCap / sh.gs);
    if (part.i1 - part.i0 <= 1) {  // decode: several KV heads per pass
      sh.ni = 1;
      sh.ng = std::max<Index>(1, std::min(part.g1 - part.g0, per_g));
    } else {  // prefill: several queries of one KV head per pass
      sh.ng = 1;
      sh.ni = std::max<Index>(1, std::min(part.i1 - part.i0, per_g));
    }
    sh.rp = round_up(sh.ni * sh.gs, kW);
    // One-query passes (decode; prefill too when a KV head fills a pass) in row lanes, where
    // the pass stops at its query's last key so every row sees every key of every tile, with
    // long value rows: the row-major kernel reads each V column block once per kPvRows rows,
    // and MLA's 2 KiB c_kv rows map a block's tokens to few L1 sets, so it comes from L2 every
    // time; the transposed one reads each V element once. Measured (steps alternated in one
    // process): MLA d_v 512 3-9 % faster, MQA d_v 128 3-8 % slower, so only from kPvtMinDims.
    sh.acc_t = sh.ni == 1 && sh.gs >= Ops::kLaneRowsMin && sh.d_v >= kPvtMinDims;
    sh.pack_v = !std::is_same<S, float>::value || p.d_v % kW != 0;
    sh.pack_k = sh.gs < Ops::kLaneRowsMin && two_scaled_parts(p);
    // Only where a pass can score in row lanes (rows_g ≤ ni·gs); MLA's latent (V = key part 0)
    // is widened into vp by the score product anyway.
    const bool row_lanes = sh.ni * sh.gs >= Ops::kLaneRowsMin;
    sh.k_pairs = kPairsBf16 && row_lanes && p.k_dims[0] % 2 == 0 && p.k_dims[1] % 2 == 0 &&
                 !(p.v_factor == p.k_factor[0] && p.k_dims[0] == p.d_v);
    sh.k_i16 = kDotI && row_lanes && p.k_dims[1] == 0 && p.k_dims[0] % 2 == 0 &&
               p.k_dims[0] <= kI16MaxDims && p.v_factor != p.k_factor[0];
    sh.q_i16 = kDotI && sh.gs < Ops::kLaneRowsMin && p.k_dims[1] == 0 &&
               p.k_dims[0] <= kI16MaxDims;
    return sh;
  }

  static Buffers layout(const Shape& sh, float* ws) {
    Buffers b{};
    Index off = 0;
    auto take = [&](Index n) {
      float* ptr = ws == nullptr ? nullptr : ws + off;
      off += round_up(std::max<Index>(n, 1), 16);
      return ptr;
    };
    const Index rows = sh.ng * sh.rp;
    b.q = take(rows * sh.dq_pad);
    b.sp = take(rows * kT);
    b.m = take(rows);
    b.l = take(rows);
    b.alpha = take(rows);
    b.acc = take(rows * sh.d_v_pad);
    b.vp = sh.pack_v ? take(kT * sh.d_v_pad) : nullptr;
    b.kp = sh.pack_k ? take(kT * sh.dq_pad) : nullptr;
    b.qs = sh.q_i16 || sh.k_i16 ? take(rows) : nullptr;
    b.q2 = sh.k_pairs || sh.k_i16 ? take(rows * sh.d_qk) : nullptr;
    b.total = off;
    return b;
  }

  // One pass: KV heads [gb, ge) × queries [ib, ie), keys [part.k0, part.k1) ∩ causal.
  // Row of (g, i, h): (g − gb)·rp + (i − ib)·gs + (h − g·gs); a KV head's rows are contiguous,
  // query-major.
  static void pass(const P& p, const GroupedPart& part, const Shape& sh, const Buffers& b, Index gb,
                   Index ge, Index ib, Index ie, const GroupedStates* out) {
    const Index gs = sh.gs, d_qk = sh.d_qk, rows_g = (ie - ib) * gs, rp = sh.rp;
    const bool lanes = rows_g >= Ops::kLaneRowsMin;
    const Index rows = (ge - gb) * rp;
    // V read in place by pv_pair on every tile of the pass (it holds ≤ kPvRowsMax rows per KV
    // head), whose acc leaves in another order: restored at the end of the pass.
    const bool pair_v = PairValues<Ops, S>::value && !lanes && !sh.acc_t &&
                        sh.d_v % (2 * kW) == 0 && rows_g <= kPvRowsMax;
    for (Index g = gb; g < ge; ++g) {
      auto q_row = [&](Index rl) {  // query row rl (query ib + rl / gs) of KV head g
        return p.q + (ib + rl / gs) * p.q_stride + (g * gs + rl % gs) * d_qk;
      };
      if (lanes) {
        // qᵀ [d_qk, rp] of this KV head, scaled. Each block of kW rows lies in one query (its
        // heads are contiguous, d_qk apart): register transposes of kW × kW blocks, which fill
        // the padding rows with zeros. (One scalar store per element, to d_qk different lines,
        // took MLA's 576 × 32 35 µs, the time of about 60 cached tokens.)
        float* qt = b.q + (g - gb) * rp * d_qk;
        if (ie - ib == 1 || gs % kW == 0) {
          for (Index r0 = 0; r0 < rows_g; r0 += kW)
            for (Index j0 = 0; j0 < d_qk; j0 += kW)
              Ops::template transpose_block<float>(q_row(r0) + j0, d_qk, std::min(kW, rows_g - r0),
                                                   std::min(kW, d_qk - j0), qt + j0 * rp + r0, rp);
        } else {
          std::fill(qt, qt + rp * d_qk, 0.f);
          for (Index j0 = 0; j0 < d_qk; j0 += kW) {  // kW key dims at a time: rows stay in L1
            const Index j1 = std::min(d_qk, j0 + kW);
            for (Index rl = 0; rl < rows_g; ++rl) {
              const float* q = q_row(rl);
              for (Index j = j0; j < j1; ++j) qt[j * rp + rl] = q[j];
            }
          }
        }
        for (Index k = 0; k < rp * d_qk; ++k) qt[k] *= p.scale;
        if constexpr (kDotI) {
          if (sh.k_i16) quantize_qt(qt, d_qk, rp, b.q2 + (g - gb) * rp * d_qk, b.qs + (g - gb) * rp);
        }
        if constexpr (kPairsBf16) {
          if (sh.k_pairs) {
            float* q2 = b.q2 + (g - gb) * rp * d_qk;
            for (Index j = 0; j < d_qk; j += 2)
              for (Index r = 0; r < rp; r += kW)
                Ops::split_bf16(qt + j * rp + r, qt + (j + 1) * rp + r, q2 + j * rp + r,
                                q2 + (j + 1) * rp + r);
          }
        }
      } else {  // scaled q rows, each key part padded to kW
        const Index pad0 = round_up(p.k_dims[0], kW);
        float* q_g = b.q + (g - gb) * rp * sh.dq_pad;
        std::fill(q_g, q_g + rp * sh.dq_pad, 0.f);
        for (Index rl = 0; rl < rows_g; ++rl) {
          const float* q = q_row(rl);
          float* dst = q_g + rl * sh.dq_pad;
          for (Index j = 0; j < d_qk; ++j)
            dst[j < p.k_dims[0] ? j : pad0 + j - p.k_dims[0]] = q[j] * p.scale;
          if constexpr (kSplit) {
            split_q(dst, p.k_dims[0]);
            split_q(dst + pad0, p.k_dims[1]);
          }
          if (sh.q_i16) b.qs[(g - gb) * rp + rl] = quantize_q(dst, p.k_dims[0]);
        }
      }
    }
    std::fill(b.m, b.m + rows, -std::numeric_limits<float>::infinity());
    std::fill(b.l, b.l + rows, 0.f);
    std::fill(b.acc, b.acc + rows * sh.d_v_pad, 0.f);

    const Index key_end = std::min(part.k1, p.q_pos0 + ie);
    // With a window, keys before the first query's window are never visited (whole tiles).
    const Index key_begin = std::max(part.k0, p.variant.first_key(p.q_pos0 + ib));
    const Index bt = p.kv.block_tokens;
    auto tile_len = [&](Index t) { return std::min(std::min(kT, key_end - t), bt - t % bt); };
    // Keys go in spans: all KV heads run over a span before the next span starts. Where K is
    // head-major a span is the rest of a block, so each head reads its run of the block front to
    // back; token-major, a span is one tile (a head's rows of a tile lie G·d elements apart
    // either way). Tiles outer, heads inner over head-major runs read G runs a tile at a time,
    // which the hardware prefetchers followed at about half the speed (a stand-alone replica of
    // MHA f32 decode, 64-token blocks, 2 threads, Zen 4: 35 against 58–64 GB/s; a plain
    // streaming read 63); over token-major rows, whole-block spans were 13 % slower (GQA-8 f32
    // decode). Each head's tiles keep their order: every row sees the same updates either way.
    const bool block_spans =
        !p.kv.place(p.k_dims[0] > 0 ? p.k_factor[0] : p.k_factor[1]).token_contiguous();
    auto span_end_of = [&](Index t) {
      return block_spans ? std::min(key_end, (t / bt + 1) * bt) : t + tile_len(t);
    };
    // The step after KV head g's tile at key u of the span [t, se): this head's next tile of the
    // span, else the next head's first one, else the first head's first tile of the next span.
    // Moves (g, u, t, se) there; false after the last step.
    auto next_step = [&](Index& g, Index& u, Index& t, Index& se) {
      if (u + tile_len(u) < se) {
        u += tile_len(u);
      } else if (g + 1 < ge) {
        ++g;
        u = t;
      } else if (se < key_end) {
        g = gb;
        t = u = se;
        se = span_end_of(se);
      } else {
        return false;
      }
      return true;
    };
    // Steps prefetched ahead: where a KV head has at most one row in the pass per byte of a
    // cached element (MHA decode; GQA-8 f32 decode) a step is mostly its reads, and one step of
    // lead left the stream short: the next two steps' rows are prefetched (the next one again, a
    // hit in L2 unless its first prefetch was dropped). Over head-major K/V that ran MHA decode
    // 1.07-1.21x faster in f32 and 16-bit (int8 0.95-1.10x) and GQA-8 f32 1.08-1.11x (steps of
    // both alternated, 16K, 2 threads, Zen 4); only the step after next, 0.92-1.00x. With more
    // rows per byte it cost GQA-8's 16-bit and int8 steps 11 %, GQA-4 f32's 7 %.
    const int ahead = rows_g <= static_cast<Index>(sizeof(S)) ? 2 : 1;
    for (Index t = key_begin; t < key_end;) {
      const Index blk = t / bt;
      const Index span_end = span_end_of(t);
      for (Index g = gb; g < ge; ++g)
        for (Index u = t; u < span_end;) {
          const Index off = u - blk * bt, n = tile_len(u);
          // Query i sees key u iff u ≤ q_pos0 + i: the rows of earlier queries skip this tile.
          const Index i_first = std::max(ib, u - p.q_pos0);
          // With a window, token-lane rows of queries whose window starts past the tile are left
          // out (row lanes mask them instead).
          const Index rows_t =
              p.variant.window > 0 && !lanes
                  ? (std::min(ie, u + n - 1 + p.variant.window - p.q_pos0) - ib) * gs
                  : rows_g;
          RowPrefetch next;
          Index gn = g, un = u, tn = t, sn = span_end;
          for (int k = 0; k < ahead && next_step(gn, un, tn, sn); ++k)
            add_rows(p, sh, gn, un / bt, un % bt, tile_len(un), next);
          Rows rw;
          rw.base = (g - gb) * rp;
          rw.n = rows_t;
          rw.skip = (i_first - ib) * gs;
          rw.lanes = lanes;
          rw.pair_v = pair_v;
          tile(p, sh, b, g, blk, off, u, n, rw, ib, next);
          u += n;
        }
      t = span_end;
    }

    // Row rl of KV head g: its output (normalised) or state (m, l, unnormalised acc).
    auto dest = [&](Index g, Index rl, float* scale) {
      const Index r = (g - gb) * rp + rl, i = ib + rl / gs, h = g * gs + rl % gs;
      if (out == nullptr) {
        *scale = p.variant.sinks != nullptr ? sink_normalizer(b.m[r], b.l[r], p.variant.sinks[h])
                 : b.l[r] > 0.f             ? 1.f / b.l[r]
                                            : 0.f;
        return p.o + i * p.o_stride + h * sh.d_v;
      }
      const Index ro = (i - part.i0) * (part.g1 - part.g0) * gs + (h - part.g0 * gs);
      out->m[ro] = b.m[r];
      out->l[ro] = b.l[r];
      *scale = 1.f;
      return out->acc + ro * out->acc_stride;
    };
    for (Index g = gb; g < ge; ++g) {
      const float* acc_g = b.acc + (g - gb) * rp * sh.d_v_pad;
      if (sh.acc_t) {  // accᵀ [d_v_pad, rp] back to rows, kW × kW blocks at a time
        alignas(64) float blk[kW * kW];
        for (Index r0 = 0; r0 < rows_g; r0 += kW) {
          const Index nr = std::min(kW, rows_g - r0);
          float* o[kW];
          float scale[kW];
          for (Index c = 0; c < nr; ++c) o[c] = dest(g, r0 + c, &scale[c]);
          for (Index j0 = 0; j0 < sh.d_v; j0 += kW) {
            const Index nj = std::min(kW, sh.d_v - j0);
            Ops::template transpose_block<float>(acc_g + j0 * rp + r0, rp, nj, nr, blk, kW);
            for (Index c = 0; c < nr; ++c)
              for (Index j = 0; j < nj; ++j) o[c][j0 + j] = blk[c * kW + j] * scale[c];
          }
        }
      } else {
        for (Index rl = 0; rl < rows_g; ++rl) {
          float scale;
          float* o = dest(g, rl, &scale);
          float* a = b.acc + ((g - gb) * rp + rl) * sh.d_v_pad;
          if (pair_v)
            for (Index j = 0; j < sh.d_v; j += 2 * kW) pair_order(a + j);
          for (Index j = 0; j < sh.d_v; ++j) o[j] = a[j] * scale;
        }
      }
    }
  }

  // The cache rows step (g, tokens [off, off + n) of block blk) reads: each key part, and the
  // value unless it lies inside the first key part (MLA).
  static void add_rows(const P& p, const Shape& sh, Index g, Index blk, Index off, Index n,
                       RowPrefetch& pf) {
    for (int part = 0; part < 2; ++part) {
      const Index dim = p.k_dims[part];
      if (dim == 0) continue;
      const std::size_t f = p.k_factor[part];
      const Index ld = p.kv.token_stride(f);
      pf.add(p.kv.row(f, blk, g) + off * ld, ld * Index(sizeof(S)), dim * Index(sizeof(S)), n);
    }
    const bool v_own = !(p.v_factor == p.k_factor[0] && sh.d_v <= p.k_dims[0]);
    if (v_own) {
      const Index ld = p.kv.token_stride(p.v_factor);
      pf.add(p.kv.row(p.v_factor, blk, g) + off * ld, ld * Index(sizeof(S)),
             sh.d_v * Index(sizeof(S)), n);
    }
    if constexpr (is_quantized_v<S>) {  // the tokens' f32 scales: one run per factor
      const Index bytes = n * Index(sizeof(float));
      pf.add(row_scales(p, p.k_factor[0], blk, g, off), bytes, bytes, 1);
      if (v_own) pf.add(row_scales(p, p.v_factor, blk, g, off), bytes, bytes, 1);
    }
  }

  // Tokens [t0, t0 + n) (inside block blk, from offset off) for KV head g and its rows rw of
  // the pass whose first query is ib.
  static void tile(const P& p, const Shape& sh, const Buffers& b, Index g, Index blk, Index off,
                   Index t0, Index n, const Rows& rw, Index ib, RowPrefetch& next) {
    const Index d_qk = sh.d_qk, d_v = sh.d_v, gs = sh.gs, rp = sh.rp;
    const Index nr = rw.n - rw.skip;  // rows that see a key of this tile (≥ 1)
    // The next step's rows are prefetched a few lines at each micro-kernel call of this step.
    const Index qk_points =
        rw.lanes ? ((p.k_dims[0] + kChunk - 1) / kChunk + (p.k_dims[1] + kChunk - 1) / kChunk) *
                       (rp / kW) * (kT / Ops::kLaneTokens)
                 : nr == 1 || two_scaled_parts(p)
                     ? (n + kW - 1) / kW * nr
                     : (nr + group_rows(nr) - 1) / group_rows(nr) *
                           ((n + kW / group_rows(nr) - 1) / (kW / group_rows(nr)));
    // 16-bit and int8 values are read in place by the row-major value micro-kernel, widened in
    // registers, when each of its calls covers all rows of the tile (MHA and GQA decode: each
    // element widened once per step), int8's per-token scales folded into the probabilities;
    // otherwise widened and scaled into vp.
    const bool v_in_place = !std::is_same<S, float>::value && !sh.acc_t && d_v % kW == 0 &&
                            nr <= kPvRowsMax;
    const Index pv_points = sh.acc_t ? (rp / kW + Ops::kLaneVecs - 1) / Ops::kLaneVecs *
                                           ((d_v + kPvtDims - 1) / kPvtDims)
                            : v_in_place ? pv_calls<S>(sh, nr, rw.pair_v)
                                         : pv_calls<float>(sh, nr, false);
    const Index per_call = (next.pending() + qk_points + pv_points - 1) / (qk_points + pv_points);
    const ScoreVariant& var = p.variant;
    const bool varies = var.transforms_scores() || var.window > 0;

    const Index v_src_ld = p.kv.token_stride(p.v_factor);
    const S* v_src = p.kv.row(p.v_factor, blk, g) + off * v_src_ld;
    // MLA's latent is both V and key part 0: a 16-bit or int8 tile is widened (and scaled) into
    // vp once, by the score product as it first reads each chunk, and both products read it
    // there.
    const bool v_is_k0 = sh.pack_v && rw.lanes && p.v_factor == p.k_factor[0] &&
                         p.k_dims[0] == d_v;

    // Scores of the rows that see the tile: token lanes sp[r][t], row lanes sp[t][r].
    float* sp;
    Index p_rs, p_ts;  // strides of (row, token) in sp
    if (rw.lanes) {
      sp = b.sp;
      p_rs = 1;
      p_ts = rp;
      qk_lanes(p, g, blk, off, n, b.q + rw.base * d_qk,
               sh.k_pairs || sh.k_i16 ? b.q2 + rw.base * d_qk : nullptr,
               sh.k_i16 ? b.qs + rw.base : nullptr, rp, sp, next, per_call,
               v_is_k0 ? b.vp : nullptr, sh.d_v_pad);
      if (varies) vary_lanes(p, sh, g, t0, n, ib, rw.n, sp);
      // Rows whose query sees only a prefix of the tile (prefill, diagonal tiles).
      if (t0 + n - 1 > p.q_pos0 + ib) {
        for (Index rl = 0; rl < rw.n; ++rl) {
          const Index i = ib + rl / gs;
          const Index count = std::max<Index>(0, std::min(n, p.q_pos0 + i - t0 + 1));
          for (Index t = count; t < n; ++t)
            sp[t * rp + rl] = -std::numeric_limits<float>::infinity();
        }
      }
      softmax_lanes(sp, rp, n, b.m + rw.base, b.l + rw.base, b.alpha + rw.base);
      sp += rw.skip;
    } else {
      sp = b.sp + (rw.base + rw.skip) * kT;
      p_rs = kT;
      p_ts = 1;
      qk_dot(p, sh, g, blk, off, n, b.q + (rw.base + rw.skip) * sh.dq_pad,
             sh.q_i16 ? b.qs + rw.base + rw.skip : nullptr, nr, sp,
             two_scaled_parts(p) ? b.kp : nullptr, next, per_call);
      for (Index rr = 0; rr < nr; ++rr) {
        const Index r = rw.base + rw.skip + rr;
        const Index i = ib + (rw.skip + rr) / gs;
        const Index count = std::min(n, p.q_pos0 + i - t0 + 1);  // ≥ 1 by the row skip
        if (varies)
          vary_row(p, sp + rr * kT, g * gs + (rw.skip + rr) % gs, p.q_pos0 + i, t0, count);
        softmax_row(sp + rr * kT, count, b.m[r], b.l[r], b.alpha[r]);
      }
    }

    // V tile: in place when it is f32 with whole vectors, else widened into vp. (Copying
    // tiles whose power-of-two row stride crowds L1 sets, e.g. MLA's 2 KiB c_kv rows, gained
    // nothing measurable: the copy costs what the conflicts do.)
    const float* v = nullptr;
    Index v_ld = 0;
    if constexpr (std::is_same<S, float>::value) {
      v = v_src;
      v_ld = v_src_ld;
    }
    // acc += P·V over the tile: every row sees the whole tile, or (diagonal tiles of prefill, a
    // window's boundary tile) each query's rows read only the tokens it sees, [lo, count): a
    // masked token's weight is 0, but 0 · a NaN or Inf value would still reach the other
    // queries. v_sc: per-token scales folded into the probabilities (int8 in place), or null.
    const Index r0 = rw.base + rw.skip;
    const bool whole_tile =
        t0 + n - 1 <= p.q_pos0 + ib + rw.skip / gs &&
        !(var.window > 0 && var.first_key(p.q_pos0 + ib + (rw.n - 1) / gs) > t0);
    auto value_product = [&](const auto* vv, Index ld, const float* v_sc) {
      if (whole_tile) {
        pv(sp, p_rs, p_ts, b.alpha + r0, vv, ld, v_sc, n, b.acc + r0 * sh.d_v_pad, sh.d_v_pad, nr,
           next, per_call, rw.pair_v);
        return;
      }
      for (Index rr = 0; rr < nr;) {
        const Index q = (rw.skip + rr) / gs;  // query ib + q
        const Index end = std::min(nr, (q + 1) * gs - rw.skip);
        const Index count = std::max<Index>(0, std::min(n, p.q_pos0 + ib + q - t0 + 1));
        const Index lo =
            var.window > 0 ? std::clamp<Index>(var.first_key(p.q_pos0 + ib + q) - t0, 0, count) : 0;
        pv(sp + rr * p_rs + lo * p_ts, p_rs, p_ts, b.alpha + r0 + rr, vv + lo * ld, ld,
           v_sc == nullptr ? nullptr : v_sc + lo, count - lo, b.acc + (r0 + rr) * sh.d_v_pad,
           sh.d_v_pad, end - rr, next, per_call, rw.pair_v);
        rr = end;
      }
    };
    if (v_in_place) {
      value_product(v_src, v_src_ld, row_scales(p, p.v_factor, blk, g, off));
      next.issue(next.pending());
      return;
    }
    if (sh.pack_v) {
      if (!v_is_k0) pack_v_tile(p, sh, b, g, blk, off, n, v_src, v_src_ld);
      v = b.vp;
      v_ld = sh.d_v_pad;
    }
    if (sh.acc_t)
      pv_t(sp, rp, b.alpha + rw.base, v, v_ld, n, d_v, b.acc + rw.base * sh.d_v_pad, next,
           per_call);
    else
      value_product(v, v_ld, nullptr);
    next.issue(next.pending());
  }

  // vp [n, d_v_pad] = the V tile v_src [n, d_v] (rows v_ld apart) widened to f32, int8 rows
  // times their scales, each row padded with zeros to d_v_pad.
  static void pack_v_tile(const P& p, const Shape& sh, const Buffers& b, Index g, Index blk,
                          Index off, Index n, const S* v_src, Index v_ld) {
    const float* v_sc = row_scales(p, p.v_factor, blk, g, off);
    float* const vp = b.vp;
    const Index d_v = sh.d_v, ld = sh.d_v_pad;
    for (Index t = 0; t < n; ++t) {
      const V sc = Ops::set1(v_sc != nullptr ? v_sc[t] : 1.f);
      widen_row<Ops>(v_src + t * v_ld, d_v, vp + t * ld, v_sc != nullptr ? &sc : nullptr);
    }
  }

  // ---- score variants (ScoreVariant; only when one is on) ----------------------------------

  // Row lanes: scores s [n, rp] of the first nrows rows of KV head g (row rl: query ib + rl / gs,
  // head g·gs + rl % gs) over keys [t0, t0 + n): soft-cap, ALiBi, then −inf before each row's
  // window.
  static void vary_lanes(const P& p, const Shape& sh, Index g, Index t0, Index n, Index ib,
                         Index nrows, float* s) {
    const ScoreVariant& var = p.variant;
    const Index rp = sh.rp, gs = sh.gs;
    if (var.softcap > 0.f) softcap_scores<Ops>(s, n * rp, var.softcap);
    if (var.alibi != nullptr) {  // row q·gs + j: query ib + q, head g·gs + j (contiguous in j)
      const float* m = var.alibi + g * gs;
      for (Index t = 0; t < n; ++t)
        for (Index q = 0; q < nrows / gs; ++q) {
          const float dist = static_cast<float>(t0 + t - (p.q_pos0 + ib + q));  // key − query
          float* row = s + t * rp + q * gs;
          for (Index j = 0; j < gs; ++j) row[j] += m[j] * dist;
        }
    }
    if (var.window > 0)
      for (Index rl = 0; rl < nrows; ++rl) {
        const Index lo = std::min(n, var.first_key(p.q_pos0 + ib + rl / gs) - t0);
        for (Index t = 0; t < lo; ++t) s[t * rp + rl] = -std::numeric_limits<float>::infinity();
      }
  }

  // Token lanes: scores s [count] (of kT) of head h, query position pos, over keys t0 …:
  // soft-cap, ALiBi, then −inf before the window (which starts before t0 + count).
  static void vary_row(const P& p, float* s, Index h, Index pos, Index t0, Index count) {
    const ScoreVariant& var = p.variant;
    if (var.softcap > 0.f) softcap_scores<Ops>(s, round_up(count, kW), var.softcap);
    if (var.alibi != nullptr) {
      const float m = var.alibi[h];
      for (Index t = 0; t < count; ++t) s[t] += m * static_cast<float>(t0 + t - pos);
    }
    if (var.window > 0) {
      const Index lo = std::min(count, var.first_key(pos) - t0);
      for (Index t = 0; t < lo; ++t) s[t] = -std::numeric_limits<float>::infinity();
    }
  }

  // ---- token lanes ------------------------------------------------------------------------

  // Masks tokens ≥ count, then the online-softmax update of one row over one tile: new max,
  // alpha = e^(m_old − m_new), p = e^(s − m_new) written back over s, l = l·alpha + Σ p.
  static void softmax_row(float* s, Index count, float& m, float& l, float& alpha) {
    for (Index t = count; t < kT; ++t) s[t] = -std::numeric_limits<float>::infinity();
    V mx = Ops::load(s);
    TPA_UNROLL
    for (Index v = 1; v < kNV; ++v) mx = Ops::max(mx, Ops::load(s + v * kW));
    const float m_new = std::max(m, Ops::reduce_max(mx));
    alpha = std::exp(m - m_new);
    const V mv = Ops::set1(m_new);
    V sum = Ops::zero();
    TPA_UNROLL
    for (Index v = 0; v < kNV; ++v) {
      const V e = Ops::exp(Ops::sub(Ops::load(s + v * kW), mv));
      Ops::store(s + v * kW, e);
      sum = Ops::add(sum, e);
    }
    l = l * alpha + Ops::reduce_add(sum);
    m = m_new;
  }

  // Key part `part` of KV head g at token `t` of block blk: its first element, with its size
  // and row stride (elements) in *dim and *ld; null if the key has no such part.
  static const S* key_part(const P& p, int part, Index g, Index blk, Index t, Index* dim,
                           Index* ld) {
    *dim = p.k_dims[part];
    if (*dim == 0) return nullptr;
    *ld = p.kv.token_stride(p.k_factor[part]);
    return p.kv.row(p.k_factor[part], blk, g) + t * *ld;
  }

  // Quantized S (tpa::q8): the scales of row g of factor f for tokens off … of block blk;
  // null otherwise.
  static const float* row_scales(const P& p, std::size_t f, Index blk, Index g, Index off) {
    if constexpr (is_quantized_v<S>) {
      return p.kv.scales(f, blk, g) + off;
    } else {
      (void)p, (void)f, (void)blk, (void)g, (void)off;
      return nullptr;
    }
  }
  // A widened row vector times its scale (quantized S); the vector itself otherwise.
  TPA_ALWAYS_INLINE static V dequant(V x, V scale) {
    if constexpr (is_quantized_v<S>) {
      return Ops::mul(x, scale);
    } else {
      (void)scale;
      return x;
    }
  }
  // Quantized keys in two parts (MLA: c_kv and k_pe, each with its own scales) are scored from
  // the dequantized kp copy, never in place (the in-place product scales whole scores).
  static bool two_scaled_parts(const P& p) { return is_quantized_v<S> && p.k_dims[1] > 0; }

  // s [nr, kT] (rows × tokens) = q [nr, dq_pad] · K tile [n, d_qk]ᵀ: per row and block of W
  // tokens, W accumulators over the key dims, then lane_reduce (lane t = token t). Blocks past
  // n are not computed; scores of tokens past n are masked later.
  // One row reads K in place (a short last block repeats its last token); several rows too
  // (qk_group), unless kp is non-null (int8 keys in two scaled parts): the tile is then first
  // copied (dequantized, q's padding) into kp [dq_pad / W][kT][W], tokens past n zero.
  // (All GQA decode went through kp before; widening in registers instead took GQA-8's step
  // 1.8× less CPU time with bf16, 1.6× with int8, 1.25× with f32: see qk_group.)
  // With sh.q_i16, q holds int16 rows and q_sc their scales (qk_i16).
  static void qk_dot(const P& p, const Shape& sh, Index g, Index blk, Index off, Index n,
                     const float* q, const float* q_sc, Index nr, float* s, float* kp,
                     RowPrefetch& pf, Index per_call) {
    if constexpr (kDotI) {
      if (sh.q_i16) {
        const Index rb = nr == 1 ? 1 : group_rows(nr);
        if (rb == 1)
          qk_i16<1>(p, sh, g, blk, off, n, q, q_sc, nr, s, pf, per_call);
        else if (rb == 2)
          qk_i16<2>(p, sh, g, blk, off, n, q, q_sc, nr, s, pf, per_call);
        else if (rb == 4)
          qk_i16<4>(p, sh, g, blk, off, n, q, q_sc, nr, s, pf, per_call);
        else
          qk_i16<kGroupRowsMax>(p, sh, g, blk, off, n, q, q_sc, nr, s, pf, per_call);
        return;
      }
    }
    (void)q_sc;
    if (kW >= 4 && kp == nullptr && nr > 1) {
      const Index rb = group_rows(nr);
      if (rb == 2)
        qk_group<std::min<int>(2, kGroupRowsMax)>(p, sh, g, blk, off, n, q, nr, s, pf, per_call);
      else if (rb == 4)
        qk_group<std::min<int>(4, kGroupRowsMax)>(p, sh, g, blk, off, n, q, nr, s, pf, per_call);
      else
        qk_group<kGroupRowsMax>(p, sh, g, blk, off, n, q, nr, s, pf, per_call);
      return;
    }
    const Index nvec = sh.dq_pad / kW;
    if (kp != nullptr) {
      Index c0 = 0;
      for (int part = 0; part < 2; ++part) {
        Index dim, ld;
        const S* k = key_part(p, part, g, blk, off, &dim, &ld);
        if (k == nullptr) continue;
        const float* k_sc = row_scales(p, p.k_factor[part], blk, g, off);
        for (Index t = 0; t < n; ++t) {
          const V sc = Ops::set1(k_sc != nullptr ? k_sc[t] : 1.f);
          for (Index c = 0; c < dim; c += kW)
            Ops::store(kp + ((c0 + c) / kW * kT + t) * kW,
                       dequant(Ops::template load_widen<S>(k + t * ld + c, std::min(kW, dim - c)),
                               sc));
        }
        c0 += round_up(dim, kW);
      }
      const Index n_pad = std::min(kT, round_up(n, kW));
      for (Index c = 0; c < nvec; ++c)
        for (Index t = n; t < n_pad; ++t) Ops::store(kp + (c * kT + t) * kW, Ops::zero());
    }
    for (Index tb = 0; tb * kW < n; ++tb) {
      const Index nt = std::min(kW, n - tb * kW);
      for (Index r = 0; r < nr; ++r) {
        pf.issue(per_call);
        V acc[kW];
        TPA_UNROLL
        for (Index t = 0; t < kW; ++t) acc[t] = Ops::zero();
        const float* qr = q + r * sh.dq_pad;
        if (kp != nullptr) {
          const float* kb = kp + tb * kW * kW;
          for (Index c = 0; c < nvec; ++c, kb += kT * kW) {
            const V qv = Ops::load(qr + c * kW);
            TPA_UNROLL
            for (Index t = 0; t < kW; ++t) acc[t] = Ops::fmadd(Ops::load(kb + t * kW), qv, acc[t]);
          }
        } else {
          for (int part = 0; part < 2; ++part) {
            Index dim, ld;
            const S* k = key_part(p, part, g, blk, off + tb * kW, &dim, &ld);
            if (k == nullptr) continue;
            dot_block(k, ld, nt, dim, qr, acc);
            qr += round_up(dim, kW);
          }
        }
        V res = lane_reduce<Ops>(acc);
        if constexpr (is_quantized_v<S>) {  // in place: one key part, one scale per token
          if (kp == nullptr)
            res = Ops::mul(res, Ops::template load_widen<float>(
                                    row_scales(p, p.k_factor[0], blk, g, off) + tb * kW, nt));
        }
        Ops::store(s + r * kT + tb * kW, res);
      }
    }
  }

  // acc[t] += k[t][j…]·q[j…] lane-wise over `dim` dims, for W token rows (the first nt real).
  template <class T>
  TPA_ALWAYS_INLINE static void dot_block(const T* k, Index ld, Index nt, Index dim, const float* q,
                                          V* acc) {
    if (nt == kW)
      dot_rows<T, true>(k, ld, nt, dim, q, acc);
    else
      dot_rows<T, false>(k, ld, nt, dim, q, acc);
  }

  // dot_block for full blocks (kFull: plain row addresses; clamping every row index to nt − 1
  // made the whole block 2.5× slower, measured in L1 on Zen 5) or a short last one.
  template <class T, bool kFull>
  TPA_ALWAYS_INLINE static void dot_rows(const T* k, Index ld, Index nt, Index dim, const float* q,
                                         V* acc) {
    auto row = [&](Index t) { return k + (kFull ? t : std::min(t, nt - 1)) * ld; };
    Index j = 0;
    if constexpr (kSplit && std::is_same<T, S>::value) {  // q's block: even dims, odd dims
      for (; j + 2 * kW <= dim; j += 2 * kW) {
        const V qe = Ops::load(q + j), qo = Ops::load(q + j + kW);
        TPA_UNROLL
        for (Index t = 0; t < kW; ++t) {
          acc[t] = Ops::fmadd(Ops::bf16_even(row(t) + j), qe, acc[t]);
          acc[t] = Ops::fmadd(Ops::bf16_odd(row(t) + j), qo, acc[t]);
        }
      }
    }
    for (; j + kW <= dim; j += kW) {
      const V qv = Ops::load(q + j);
      TPA_UNROLL
      for (Index t = 0; t < kW; ++t)
        acc[t] = Ops::fmadd(Ops::template load_widen<T>(row(t) + j, kW), qv, acc[t]);
    }
    if (j < dim) {  // q is zero-padded past dim; K is read only up to it
      const V qv = Ops::load(q + j);
      TPA_UNROLL
      for (Index t = 0; t < kW; ++t)
        acc[t] = Ops::fmadd(Ops::template load_widen<T>(row(t) + j, dim - j), qv, acc[t]);
    }
  }

  // ---- token lanes, several rows (GQA decode) ---------------------------------------------

  // Keeps v in a register. GCC otherwise folds every use of a q vector into its FMA as a memory
  // operand: RB·TB + TB loads per RB·TB FMAs instead of RB + TB, and the loads, not the FMAs,
  // bound the several-row score kernel (int8 GQA-8, perf annotate).
  TPA_ALWAYS_INLINE static V pinned(V v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+v"(v));
#endif
    return v;
  }

  // Rows per group of the several-row score micro-kernel: 2, 4 or kGroupRowsMax (kW / 2).
  static constexpr int kGroupRowsMax = static_cast<int>(kW >= 16 ? 8 : kW >= 4 ? kW / 2 : 1);
  static Index group_rows(Index nr) {
    return nr <= 2 && kGroupRowsMax >= 2 ? 2 : nr <= 4 && kGroupRowsMax >= 4 ? 4 : kGroupRowsMax;
  }

  // qk_dot for nr ≥ 2 rows, K read in place: rows in groups of RB, tokens in blocks of
  // TB = kW / RB; per group and block, RB × TB accumulators over the key dims, each K vector
  // widened once in a register and multiplied into all RB rows (no copy of the tile), then one
  // lane_reduce gives the block's RB × TB scores (lane r·TB + t: row r, token t). A short last
  // block repeats its last token; rows past nr repeat row nr − 1 (their lanes are dropped).
  // Quantized K (one part): each score times its token's scale. (Collecting RB blocks into one
  // vector per row, as qk_i16 does, measured 1–5 % slower here: GQA-4 f32 and 16-bit, Zen 4.)
  template <int RB>
  static void qk_group(const P& p, const Shape& sh, Index g, Index blk, Index off, Index n,
                       const float* q, Index nr, float* s, RowPrefetch& pf, Index per_call) {
    constexpr int TB = static_cast<int>(kW) / RB;
    static_assert(RB >= 1 && RB * TB == kW, "GroupedTiled: RB must divide kWidth");
    for (Index r0 = 0; r0 < nr; r0 += RB) {
      const Index nrg = std::min<Index>(RB, nr - r0);
      const float* qr[RB];
      TPA_UNROLL
      for (int r = 0; r < RB; ++r) qr[r] = q + (r0 + std::min<Index>(r, nrg - 1)) * sh.dq_pad;
      for (Index tb = 0; tb < n; tb += TB) {
        pf.issue(per_call);
        const Index nt = std::min<Index>(TB, n - tb);
        V acc[kW];
        TPA_UNROLL
        for (Index i = 0; i < kW; ++i) acc[i] = Ops::zero();
        Index qoff = 0;
        for (int part = 0; part < 2; ++part) {
          Index dim, ld;
          const S* k = key_part(p, part, g, blk, off + tb, &dim, &ld);
          if (k == nullptr) continue;
          if (nt == TB)
            dot_group<RB, true>(k, ld, nt, dim, qr, qoff, acc);
          else
            dot_group<RB, false>(k, ld, nt, dim, qr, qoff, acc);
          qoff += round_up(dim, kW);
        }
        alignas(64) float res[kW];
        Ops::store(res, lane_reduce<Ops>(acc));
        const float* k_sc = row_scales(p, p.k_factor[0], blk, g, off + tb);
        for (Index r = 0; r < nrg; ++r)
          for (Index t = 0; t < TB; ++t)
            s[(r0 + r) * kT + tb + t] =
                k_sc != nullptr ? res[r * TB + t] * k_sc[std::min(t, nt - 1)] : res[r * TB + t];
      }
    }
  }

  // qk_i16's epilogue for kW tokens from sb: res [RB][kW] holds RB blocks' integer dot products
  // (block b, lane r·TB + t: row r, token b·TB + t), which one chunk_transpose turns into a
  // vector of kW tokens per row; each is multiplied by the tokens' scales k_sc (the first nt
  // read) and its row's q_sc and stored to s + r·kT, for the first nrg rows.
  template <int RB>
  TPA_ALWAYS_INLINE static void store_group_scores(const float* res, const float* k_sc,
                                                   const float* q_sc, Index nt, Index nrg,
                                                   float* s) {
    V v[RB];
    TPA_UNROLL
    for (int b = 0; b < RB; ++b) v[b] = Ops::load(res + b * kW);
    chunk_transpose<Ops, RB>(v);
    const V ksc = Ops::template load_widen<float>(k_sc, nt);
    for (Index r = 0; r < nrg; ++r)
      Ops::store(s + r * kT, Ops::mul(Ops::mul(v[r], Ops::set1(q_sc[r])), ksc));
  }

  // acc[r·TB + t] += k[t][j…]·q_r[qoff + j…] lane-wise over `dim` dims, for TB token rows (the
  // first nt real; kFull: all) and RB rows.
  template <int RB, bool kFull>
  TPA_ALWAYS_INLINE static void dot_group(const S* k, Index ld, Index nt, Index dim,
                                          const float* const* qr, Index qoff, V* acc) {
    constexpr int TB = static_cast<int>(kW) / RB;
    const S* row[TB];
    TPA_UNROLL
    for (int t = 0; t < TB; ++t) row[t] = k + (kFull ? t : std::min<Index>(t, nt - 1)) * ld;
    Index j = 0;
    if constexpr (kSplit) {  // q's block: even dims, then odd dims; K read once per half (L1)
      for (; j + 2 * kW <= dim; j += 2 * kW) {
        split_half<RB, false>(row, j, qr, qoff, acc);
        split_half<RB, true>(row, j, qr, qoff, acc);
      }
    }
    for (; j + kW <= dim; j += kW) {
      V qv[RB];
      TPA_UNROLL
      for (int r = 0; r < RB; ++r) qv[r] = pinned(Ops::load(qr[r] + qoff + j));
      TPA_UNROLL
      for (int t = 0; t < TB; ++t) {
        const V kv = Ops::template load_widen<S>(row[t] + j, kW);
        TPA_UNROLL
        for (int r = 0; r < RB; ++r) acc[r * TB + t] = Ops::fmadd(kv, qv[r], acc[r * TB + t]);
      }
    }
    if (j < dim) {  // q is zero-padded past dim; K is read only up to it
      V qv[RB];
      TPA_UNROLL
      for (int r = 0; r < RB; ++r) qv[r] = Ops::load(qr[r] + qoff + j);
      TPA_UNROLL
      for (int t = 0; t < TB; ++t) {
        const V kv = Ops::template load_widen<S>(row[t] + j, dim - j);
        TPA_UNROLL
        for (int r = 0; r < RB; ++r) acc[r * TB + t] = Ops::fmadd(kv, qv[r], acc[r * TB + t]);
      }
    }
  }

  // dot_group's step over the even (kOdd: odd) elements of dims [j, j + 2·kW) (kSplit).
  template <int RB, bool kOdd>
  TPA_ALWAYS_INLINE static void split_half(const S* const* row, Index j, const float* const* qr,
                                           Index qoff, V* acc) {
    constexpr int TB = static_cast<int>(kW) / RB;
    V qv[RB];
    TPA_UNROLL
    for (int r = 0; r < RB; ++r) qv[r] = pinned(Ops::load(qr[r] + qoff + j + (kOdd ? kW : 0)));
    TPA_UNROLL
    for (int t = 0; t < TB; ++t) {
      const V kv = kOdd ? Ops::bf16_odd(row[t] + j) : Ops::bf16_even(row[t] + j);
      TPA_UNROLL
      for (int r = 0; r < RB; ++r) acc[r * TB + t] = Ops::fmadd(kv, qv[r], acc[r * TB + t]);
    }
  }

  // ---- token lanes, split bf16 and int16 q (Avx512 with VNNI) -----------------------------

  // bf16 keys (Ops::kBf16Split): each whole 2·kW-dim block of a key part is widened as its
  // even and its odd elements (one op per kW each, exact), so q's block is stored as its even
  // dims, then its odd ones; a part's last dim % 2·kW dims keep the kW-wide form. Only the
  // summation order changes.
  static constexpr bool kSplit = std::is_same<S, bfloat16>::value && OpsBf16Split<Ops>::value;
  // int8 keys in one part of ≤ kI16MaxDims dims (Ops::kDotI16): token-lane q rows quantized to
  // int16 (see quantize_q), dot products with the int8 keys exact in int32, the score
  // q_scale·k_scale[t]·dot in f32 (qk_i16). 1032 · 127 · 16383 < 2³¹.
  static constexpr bool kDotI = is_quantized_v<S> && OpsDotI16<Ops>::value;
  // bf16 K scored by bf16 pair dot products in row lanes (Ops::kDotBf16).
  static constexpr bool kPairsBf16 = std::is_same<S, bfloat16>::value && OpsDotBf16<Ops>::value;
  static constexpr Index kI16MaxDims = 1032;
  // The int16 range of a q row of `dim` dims: ±32767 up to 516 dims, else as large as keeps
  // dim · 127 · range < 2³¹ (≥ 16383).
  static double i16_range(Index dim) {
    return static_cast<double>(
        std::min<Index>(32767, (Index{1} << 31) / (127 * std::max<Index>(dim, 1)) - 1));
  }

  // Reorders each whole 2·kW block of row [dim] to its even elements, then its odd ones.
  static void split_q(float* row, Index dim) {
    for (Index b = 0; b + 2 * kW <= dim; b += 2 * kW) {
      float tmp[2 * kW];
      std::copy(row + b, row + b + 2 * kW, tmp);
      for (Index i = 0; i < kW; ++i) {
        row[b + i] = tmp[2 * i];
        row[b + kW + i] = tmp[2 * i + 1];
      }
    }
  }

  // Quantizes the scaled f32 q row [dim] in place to int16: round_up(dim, 2·kW) values
  // rint(q_j / s), zero past dim, s = max|q| / i16_range(dim) returned (0 for a zero row; NaN
  // for a row with a NaN or ±Inf, whose scores are then NaN as in f32). The row's dq_pad floats
  // hold them.
  static float quantize_q(float* row, Index dim) {
    static_assert(!kDotI || kW == 16, "GroupedTiled: int16 q rows assume 16 f32 lanes");
    std::int16_t qi[kI16MaxDims + 32] = {};
    float amax = 0.f;
    bool finite = true;
    for (Index j = 0; j < dim; ++j) {
      finite = finite && std::isfinite(row[j]);
      amax = std::max(amax, std::abs(row[j]));
    }
    float sc = 0.f;
    if (!finite) {
      sc = std::numeric_limits<float>::quiet_NaN();
    } else if (amax > 0.f) {
      const double range = i16_range(dim);
      sc = static_cast<float>(static_cast<double>(amax) / range);
      const double inv = range / static_cast<double>(amax);
      for (Index j = 0; j < dim; ++j)
        qi[j] = static_cast<std::int16_t>(std::lrint(static_cast<double>(row[j]) * inv));
    }
    std::memcpy(row, qi, static_cast<std::size_t>(round_up(dim, 32)) * sizeof(std::int16_t));
    return sc;
  }

  // Keeps an integer vector in a register (see pinned).
  template <class X>
  TPA_ALWAYS_INLINE static X pinned_i(X v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+v"(v));
#endif
    return v;
  }

  // qk_dot for int16 q rows (sh.q_i16, one key part): as qk_group, rows in groups of RB (1:
  // MHA), tokens in blocks of TB = kW / RB, RB × TB int32 accumulators, each K vector of 32
  // int8 sign-extended once to int16 and multiplied into all RB rows by one vpdpwssd each; one
  // integer lane_reduce gives the block's exact dot products, which store_group_scores scales
  // (score = q_sc[r]·k_sc[t]·dot) and stores as one vector of kW tokens per row.
  template <int RB>
  static void qk_i16(const P& p, const Shape& sh, Index g, Index blk, Index off, Index n,
                     const float* q, const float* q_sc, Index nr, float* s, RowPrefetch& pf,
                     Index per_call) {
    if constexpr (kDotI) {
      using VI = typename Ops::VI;
      constexpr int TB = static_cast<int>(kW) / RB;
      static_assert(RB >= 1 && RB * TB == kW, "GroupedTiled: RB must divide kWidth");
      Index dim, ld;
      const S* k = key_part(p, 0, g, blk, off, &dim, &ld);
      const float* k_sc = row_scales(p, p.k_factor[0], blk, g, off);
      for (Index r0 = 0; r0 < nr; r0 += RB) {
        const Index nrg = std::min<Index>(RB, nr - r0);
        const std::int16_t* qr[RB];
        TPA_UNROLL
        for (int r = 0; r < RB; ++r)
          qr[r] = reinterpret_cast<const std::int16_t*>(q + (r0 + std::min<Index>(r, nrg - 1)) *
                                                                sh.dq_pad);
        for (Index sb = 0; sb < n; sb += kW) {
          alignas(64) float res[RB * kW];
          for (int b = 0; b < RB; ++b) {
            const Index tb = sb + b * TB;
            if (tb >= n) {
              Ops::store(res + b * kW, Ops::zero());
              continue;
            }
            pf.issue(per_call);
            const Index nt = std::min<Index>(TB, n - tb);
            VI acc[kW];
            TPA_UNROLL
            for (Index i = 0; i < kW; ++i) acc[i] = Ops::izero();
            if (nt == TB)
              dot_i16<RB, true>(k + tb * ld, ld, nt, dim, qr, acc);
            else
              dot_i16<RB, false>(k + tb * ld, ld, nt, dim, qr, acc);
            Ops::store(res + b * kW, Ops::lane_reduce_i32(acc));
          }
          store_group_scores<RB>(res, k_sc + sb, q_sc + r0, std::min(kW, n - sb), nrg,
                                 s + r0 * kT + sb);
        }
      }
    } else {
      (void)p, (void)sh, (void)g, (void)blk, (void)off, (void)n, (void)q, (void)q_sc, (void)nr,
          (void)s, (void)pf, (void)per_call;
    }
  }

  // acc[r·TB + t] += Σ k[t][j…]·q_r[j…] in int32 lanes over `dim` dims, 2·kW at a time, for TB
  // token rows (the first nt real; kFull: all) and RB int16 q rows (zero past dim).
  template <int RB, bool kFull, class VI>
  TPA_ALWAYS_INLINE static void dot_i16(const S* k, Index ld, Index nt, Index dim,
                                        const std::int16_t* const* qr, VI* acc) {
    constexpr int TB = static_cast<int>(kW) / RB;
    constexpr Index D = 2 * kW;
    const S* row[TB];
    TPA_UNROLL
    for (int t = 0; t < TB; ++t) row[t] = k + (kFull ? t : std::min<Index>(t, nt - 1)) * ld;
    Index j = 0;
    for (; j + D <= dim; j += D) {
      VI qv[RB];
      TPA_UNROLL
      for (int r = 0; r < RB; ++r) qv[r] = pinned_i(Ops::load_i16(qr[r] + j));
      TPA_UNROLL
      for (int t = 0; t < TB; ++t) {
        const VI kv = Ops::widen_i8(row[t] + j, D);
        TPA_UNROLL
        for (int r = 0; r < RB; ++r) acc[r * TB + t] = Ops::dot_i16(acc[r * TB + t], kv, qv[r]);
      }
    }
    if (j < dim) {  // q is zero past dim; K is read only up to it
      VI qv[RB];
      TPA_UNROLL
      for (int r = 0; r < RB; ++r) qv[r] = Ops::load_i16(qr[r] + j);
      TPA_UNROLL
      for (int t = 0; t < TB; ++t) {
        const VI kv = Ops::widen_i8(row[t] + j, dim - j);
        TPA_UNROLL
        for (int r = 0; r < RB; ++r) acc[r * TB + t] = Ops::dot_i16(acc[r * TB + t], kv, qv[r]);
      }
    }
  }

  // ---- row lanes --------------------------------------------------------------------------

  // s [n, rp] (tokens × rows) = K tile [n, d_qk] · qt [d_qk, rp], K read in place from the
  // cache. With k0 non-null (MLA's latent, which is also V, in 16-bit or int8 storage), part 0
  // is widened and scaled into k0 [n, k0_ld] by the first group of row vectors, which reads it
  // from the cache, and read there by the others and by the value product. Dims in chunks of
  // kChunk (the qᵀ slice stays in L1), row vectors in groups of kLaneVecs, tokens in blocks of
  // kLaneTokens (a short last block repeats its last token).
  static void qk_lanes(const P& p, Index g, Index blk, Index off, Index n, const float* qt,
                       const float* q2, const float* qs, Index rp, float* s, RowPrefetch& pf,
                       Index per_call, float* k0 = nullptr, Index k0_ld = 0) {
    constexpr Index VB = Ops::kLaneVecs, NT = Ops::kLaneTokens;
    const Index nv = rp / kW;
    Index j0 = 0;
    bool first = true;
    for (int part = 0; part < 2; ++part) {
      Index dim, ld;
      const S* k = key_part(p, part, g, blk, off, &dim, &ld);
      if (k == nullptr) continue;
      const bool wide = part == 0 && k0 != nullptr;
      for (Index jc = 0; jc < dim; jc += kChunk) {
        const Index len = std::min(kChunk, dim - jc);
        const float* q = qt + (j0 + jc) * rp;
        for (Index v = 0; v < nv; v += VB) {
          for (Index tb = 0; tb < n; tb += NT) {
            pf.issue(per_call);
            const Index nt = std::min(NT, n - tb);
            float* st = s + tb * rp + v * kW;
            const float* k_sc = row_scales(p, p.k_factor[part], blk, g, off + tb);
            if constexpr (kDotI) {
              if (qs != nullptr) {  // int8 K against int16 pairs of q (one key part)
                const float* q2v = q2 + jc / 2 * rp + v * kW;
                if (v + VB <= nv)
                  qk_i16_block<VB>(k + tb * ld + jc, ld, k_sc, nt, len, q2v, rp, qs + v * kW, st,
                                   rp, first);
                else
                  qk_i16_tail<VB - 1>(nv - v, k + tb * ld + jc, ld, k_sc, nt, len, q2v, rp,
                                      qs + v * kW, st, rp, first);
                continue;
              }
            }
            if constexpr (kPairsBf16) {
              if (q2 != nullptr) {  // bf16 pairs against q2, no widening
                const float* q2v = q2 + (j0 + jc) * rp + v * kW;
                if (v + VB <= nv)
                  qk_pairs_block<VB>(k + tb * ld + jc, ld, nt, len, q2v, rp, st, rp, first);
                else
                  qk_pairs_tail<VB - 1>(nv - v, k + tb * ld + jc, ld, nt, len, q2v, rp, st, rp,
                                        first);
                continue;
              }
            }
            // The first row group widens part 0 into k0 on its way.
            float* stage = wide && v == 0 ? k0 + tb * k0_ld + jc : nullptr;
            if (wide && v > 0) {
              if (v + VB <= nv)
                qk_lane_block<VB>(k0 + tb * k0_ld + jc, k0_ld, nullptr, nt, len, q + v * kW, rp,
                                  st, rp, first);
              else
                qk_lane_tail<VB - 1>(nv - v, k0 + tb * k0_ld + jc, k0_ld, nullptr, nt, len,
                                     q + v * kW, rp, st, rp, first);
              continue;
            }
            if (v + VB <= nv)
              qk_lane_block<VB>(k + tb * ld + jc, ld, k_sc, nt, len, q + v * kW, rp, st, rp,
                                first, stage, k0_ld);
            else
              qk_lane_tail<VB - 1>(nv - v, k + tb * ld + jc, ld, k_sc, nt, len, q + v * kW, rp,
                                   st, rp, first, stage, k0_ld);
          }
        }
        first = false;
      }
      j0 += dim;
    }
  }

  template <int N, class T>
  static void qk_lane_tail(Index nvec, const T* k, Index k_ld, const float* k_sc, Index nt,
                           Index len, const float* q, Index q_ld, float* s, Index s_ld, bool first,
                           float* stage = nullptr, Index stage_ld = 0) {
    if constexpr (N > 0) {
      if (nvec == N)
        qk_lane_block<N>(k, k_ld, k_sc, nt, len, q, q_ld, s, s_ld, first, stage, stage_ld);
      else
        qk_lane_tail<N - 1>(nvec, k, k_ld, k_sc, nt, len, q, q_ld, s, s_ld, first, stage,
                            stage_ld);
    }
  }

  // s[t][v] (+)= Σ_j k[t][j] · q[j][v] for kLaneTokens tokens (the first nt real) and VB row
  // vectors, over `len` ≤ kChunk dims. 16-bit K rows (T = S) are first widened with vector
  // loads into a [kLaneTokens, kChunk] f32 block on the stack (L1), or into stage [nt, stage_ld]
  // when non-null, so the broadcasts are plain f32 loads instead of one scalar conversion per
  // element and row vector; int8 rows are dequantized there too (k_sc: their tokens' scales;
  // null unless T is quantized).
  template <int VB, class T>
  static void qk_lane_block(const T* k, Index k_ld, const float* k_sc, Index nt, Index len,
                            const float* q, Index q_ld, float* s, Index s_ld, bool first,
                            float* stage = nullptr, Index stage_ld = 0) {
    constexpr int NT = static_cast<int>(Ops::kLaneTokens);
    static_assert(kChunk % kW == 0, "GroupedTiled: kChunk must be a multiple of kWidth");
    alignas(64) float wide[std::is_same<T, float>::value ? 1 : NT * kChunk];
    if (!std::is_same<T, float>::value && stage == nullptr) {
      stage = wide;
      stage_ld = kChunk;
    }
    const float* rows[NT];
    lane_rows<Ops, NT>(k, k_ld, nt, len, k_sc, stage, stage_ld, rows);
    lane_rows_product<Ops, NT, VB>(rows, len, q, q_ld, s, s_ld, first);
  }

  // qt [d_qk, rp] (row lanes, scaled) as int16 pairs for qk_i16_block: q2 row i (rp 32-bit
  // lanes) = the pairs (dims 2i, 2i + 1) of each row r, rint(q / qs[r]) with qs[r] = max_j
  // |q[j][r]| / i16_range(d_qk) (0 for a zero row, NaN with zero pairs for a row holding a NaN or
  // ±Inf, so its scores are NaN as in f32).
  static void quantize_qt(const float* qt, Index d_qk, Index rp, float* q2, float* qs) {
    if constexpr (kDotI) {
      const float range = static_cast<float>(i16_range(d_qk));
      for (Index r = 0; r < rp; r += kW) {
        V amax = Ops::zero(), bad = Ops::zero();
        for (Index j = 0; j < d_qk; ++j) {
          const V x = Ops::load(qt + j * rp + r);
          amax = Ops::max(amax, Ops::max(x, Ops::sub(Ops::zero(), x)));
          bad = Ops::add(bad, Ops::sub(x, x));  // NaN if x is NaN or ±Inf
        }
        alignas(64) float mx[kW], nan[kW], inv[kW];
        Ops::store(mx, amax);
        Ops::store(nan, bad);
        for (Index i = 0; i < kW; ++i) {
          const bool finite = nan[i] == 0.f;
          qs[r + i] = !finite ? std::numeric_limits<float>::quiet_NaN() : mx[i] / range;
          inv[i] = finite && mx[i] > 0.f ? range / mx[i] : 0.f;
        }
        const V iv = Ops::load(inv);
        for (Index j = 0; j < d_qk; j += 2) {
          const V a = Ops::mul(Ops::load(qt + j * rp + r), iv);
          const V b = Ops::mul(Ops::load(qt + (j + 1) * rp + r), iv);
          Ops::store_i(q2 + j / 2 * rp + r, Ops::i16_pairs(a, b));
        }
      }
    } else {
      (void)qt, (void)d_qk, (void)rp, (void)q2, (void)qs;
    }
  }

  // qk_i16_block<N> for N = nvec ≤ NV given at run time.
  template <int N>
  static void qk_i16_tail(Index nvec, const S* k, Index k_ld, const float* k_sc, Index nt,
                          Index len, const float* q2, Index q_ld, const float* qs, float* s,
                          Index s_ld, bool first) {
    if constexpr (N > 0) {
      if (nvec == N)
        qk_i16_block<N>(k, k_ld, k_sc, nt, len, q2, q_ld, qs, s, s_ld, first);
      else
        qk_i16_tail<N - 1>(nvec, k, k_ld, k_sc, nt, len, q2, q_ld, qs, s, s_ld, first);
    }
  }

  // qk_lane_block for int8 K (k_i16): s[t][v] (+)= k_sc[t]·qs[v]·Σ_j k[t][j]·q2[j][v] over an
  // even `len` dims: each K row sign-extended to int16 into an L1 block (one op per 32 elements,
  // not two widening ops per 16 and a scale), then each pair of K elements broadcast as one
  // 32-bit word into vpdpwssd against q's int16 pairs, exact in int32: one instruction per pair
  // of dims where f32 K takes two FMAs.
  template <int VB>
  static void qk_i16_block(const S* k, Index k_ld, const float* k_sc, Index nt, Index len,
                           const float* q2, Index q_ld, const float* qs, float* s, Index s_ld,
                           bool first) {
    if constexpr (kDotI) {
      constexpr int NT = static_cast<int>(Ops::kLaneTokens);
      using VI = typename Ops::VI;
      alignas(64) std::int16_t w[NT][kChunk];
      for (int t = 0; t < NT && t < nt; ++t)
        for (Index j = 0; j < len; j += 2 * kW)
          Ops::store_i(w[t] + j, Ops::widen_i8(k + t * k_ld + j, std::min(2 * kW, len - j)));
      VI acc[NT][VB];
      TPA_UNROLL
      for (int t = 0; t < NT; ++t) {
        TPA_UNROLL
        for (int v = 0; v < VB; ++v) acc[t][v] = Ops::izero();
      }
      for (Index j = 0; j < len; j += 2) {
        VI qv[VB];
        TPA_UNROLL
        for (int v = 0; v < VB; ++v)
          qv[v] = pinned_i(Ops::load_i16(reinterpret_cast<const std::int16_t*>(q2 + j / 2 * q_ld +
                                                                              v * kW)));
        TPA_UNROLL
        for (int t = 0; t < NT; ++t) {
          const std::int16_t* kp = w[std::min<Index>(t, nt - 1)] + j;
          TPA_UNROLL
          for (int v = 0; v < VB; ++v) acc[t][v] = Ops::dot_pairs(acc[t][v], qv[v], kp);
        }
      }
      TPA_UNROLL
      for (int t = 0; t < NT; ++t) {
        const V ks = Ops::set1(k_sc[std::min<Index>(t, nt - 1)]);
        TPA_UNROLL
        for (int v = 0; v < VB; ++v) {
          const V x = Ops::mul(Ops::mul(Ops::to_float(acc[t][v]), Ops::load(qs + v * kW)), ks);
          float* o = s + t * s_ld + v * kW;
          Ops::store(o, first ? x : Ops::add(Ops::load(o), x));
        }
      }
    } else {
      (void)k, (void)k_ld, (void)k_sc, (void)nt, (void)len, (void)q2, (void)q_ld, (void)qs,
          (void)s, (void)s_ld, (void)first;
    }
  }

  // qk_pairs_block<N> for N = nvec ≤ NV given at run time.
  template <int N>
  static void qk_pairs_tail(Index nvec, const S* k, Index k_ld, Index nt, Index len,
                            const float* q2, Index q_ld, float* s, Index s_ld, bool first) {
    if constexpr (N > 0) {
      if (nvec == N)
        qk_pairs_block<N>(k, k_ld, nt, len, q2, q_ld, s, s_ld, first);
      else
        qk_pairs_tail<N - 1>(nvec, k, k_ld, nt, len, q2, q_ld, s, s_ld, first);
    }
  }

  // qk_lane_block for bf16 K read in place (k_pairs): s[t][v] (+)= Σ_j k[t][j]·q[j][v] over an
  // even `len` dims, each pair of K elements (one 32-bit word) broadcast from its row and
  // multiplied by vdpbf16ps into the pairs of q2 (q's bf16 rounding, then the rounding of what
  // it left: q to about 16 significant bits, products exact, sums in f32), two instructions per
  // pair where f32 K takes two FMAs, and no widening pass.
  template <int VB>
  static void qk_pairs_block(const S* k, Index k_ld, Index nt, Index len, const float* q2,
                             Index q_ld, float* s, Index s_ld, bool first) {
    if constexpr (kPairsBf16) {
      constexpr int NT = static_cast<int>(Ops::kLaneTokens);
      const S* row[NT];
      TPA_UNROLL
      for (int t = 0; t < NT; ++t) row[t] = k + std::min<Index>(t, nt - 1) * k_ld;
      V acc[NT][VB];
      TPA_UNROLL
      for (int t = 0; t < NT; ++t) {
        TPA_UNROLL
        for (int v = 0; v < VB; ++v)
          acc[t][v] = first ? Ops::zero() : Ops::load(s + t * s_ld + v * kW);
      }
      for (Index j = 0; j < len; j += 2) {
        V hi[VB], lo[VB];
        TPA_UNROLL
        for (int v = 0; v < VB; ++v) {
          hi[v] = pinned(Ops::load(q2 + j * q_ld + v * kW));
          lo[v] = pinned(Ops::load(q2 + (j + 1) * q_ld + v * kW));
        }
        TPA_UNROLL
        for (int t = 0; t < NT; ++t) {
          const auto kp = Ops::pair_bf16(row[t] + j);
          TPA_UNROLL
          for (int v = 0; v < VB; ++v)
            acc[t][v] = Ops::dot_bf16(Ops::dot_bf16(acc[t][v], hi[v], kp), lo[v], kp);
        }
      }
      store_block<Ops>(acc, s, s_ld);
    } else {
      (void)k, (void)k_ld, (void)nt, (void)len, (void)q2, (void)q_ld, (void)s, (void)s_ld,
          (void)first;
    }
  }

  // The online-softmax update of the rp rows (lanes) of one KV head over tokens [0, n) of
  // s [n, rp]: all vertical. Rows that have seen no key keep m = −FLT_MAX and l = 0.
  static void softmax_lanes(float* s, Index rp, Index n, float* m, float* l, float* alpha) {
    const V floor = Ops::set1(-std::numeric_limits<float>::max());
    for (Index v = 0; v < rp; v += kW) {
      V mx = Ops::load(s + v);
      for (Index t = 1; t < n; ++t) mx = Ops::max(mx, Ops::load(s + t * rp + v));
      const V m_old = Ops::load(m + v);
      const V m_new = Ops::max(Ops::max(m_old, mx), floor);
      const V a = Ops::exp(Ops::sub(m_old, m_new));
      V sum = Ops::zero();
      for (Index t = 0; t < n; ++t) {
        const V e = Ops::exp(Ops::sub(Ops::load(s + t * rp + v), m_new));
        Ops::store(s + t * rp + v, e);
        sum = Ops::add(sum, e);
      }
      Ops::store(l + v, Ops::fmadd(Ops::load(l + v), a, sum));
      Ops::store(m + v, m_new);
      Ops::store(alpha + v, a);
    }
  }

  // ---- values -----------------------------------------------------------------------------

  // acc [nr, acc_ld] = acc · alpha (per row) + P · v [n, v_ld], P(r, t) = pr[r·p_rs + t·p_ts],
  // over acc_ld / kW vectors per row. Column blocks outer: a V column block stays in L1.
  // T is float, or the quantized S read in place (whole vectors only), P(r, t) then multiplied
  // by token t's scale v_sc[t] (null for float). pair: pv_pair instead (PairValues<Ops, T>).
  template <class T>
  static void pv(const float* pr, Index p_rs, Index p_ts, const float* alpha, const T* v,
                 Index v_ld, const float* v_sc, Index n, float* acc, Index acc_ld, Index nr,
                 RowPrefetch& pf, Index per_call, bool pair) {
    if constexpr (PairValues<Ops, T>::value) {
      if (pair) {
        pv_pair(pr, p_rs, alpha, v, v_ld, v_sc, n, acc, acc_ld, nr, pf, per_call);
        return;
      }
    }
    (void)pair;
    constexpr Index R = Ops::kPvRows, C = Ops::kPvCols;
    const Index nvec = acc_ld / kW;
    if (nr == 1) {  // MHA decode: kPv1Cols vectors of one row at a time
      constexpr Index C1 = kPv1Cols;
      for (Index c = 0; c < nvec; c += C1) {
        pf.issue(per_call);
        pv_dispatch<1, C1>(1, std::min(C1, nvec - c), pr, p_rs, p_ts, alpha, v + c * kW, v_ld,
                           v_sc, n, acc + c * kW, acc_ld);
      }
      return;
    }
    if constexpr (kPvRowsMax > R && !std::is_same<T, float>::value) {
      if (pv_wide<T>(nr)) {
        constexpr Index CW = kPvColsWide;
        for (Index c = 0; c < nvec; c += CW) {
          pf.issue(per_call);
          pv_dispatch<kPvRowsMax, CW>(nr, std::min(CW, nvec - c), pr, p_rs, p_ts, alpha, v + c * kW,
                                      v_ld, v_sc, n, acc + c * kW, acc_ld);
        }
        return;
      }
    }
    for (Index c = 0; c < nvec; c += C) {
      const Index nc = std::min(C, nvec - c);
      for (Index r = 0; r < nr; r += R) {
        pf.issue(per_call);
        pv_dispatch<R, C>(std::min(R, nr - r), nc, pr + r * p_rs, p_rs, p_ts, alpha + r, v + c * kW,
                          v_ld, v_sc, n, acc + r * acc_ld + c * kW, acc_ld);
      }
    }
  }

  // Whether one value micro-kernel call covers all nr rows (the kPvRowsWide × kPvColsWide
  // block, kPvRows < nr ≤ kPvRowsMax): 16-bit and int8 V, so each element is widened once. f32
  // V, which needs no widening, keeps the deeper kPvRows × kPvCols blocks (4 % faster, GQA-4).
  template <class T>
  static constexpr bool pv_wide(Index nr) {
    return kPvRowsMax > Ops::kPvRows && !std::is_same<T, float>::value && nr > Ops::kPvRows &&
           nr <= kPvRowsMax;
  }

  // Value micro-kernel calls of pv() over nr rows of V storage T (pair: of pv_pair), where the
  // next step's prefetch is issued.
  template <class T>
  static Index pv_calls(const Shape& sh, Index nr, bool pair) {
    const Index units = sh.d_v_pad / kW / (pair ? 2 : 1);  // vectors, or pairs of them
    auto blocks = [&](Index cols) { return (units + cols - 1) / cols; };
    if (pv_wide<T>(nr)) return blocks(pair ? std::max<Index>(1, kPvColsWide / 2) : kPvColsWide);
    if (nr == 1) return blocks(pair ? kPv1Cols / 2 : kPv1Cols);
    return (nr + Ops::kPvRows - 1) / Ops::kPvRows *
           blocks(pair ? Ops::kPvCols / 2 : Ops::kPvCols);
  }

  // accᵀ [d_v, rp] = accᵀ · alpha (per row lane) + V [n, d_v]ᵀ · P [n, rp] (rows in lanes, as
  // softmax_lanes left them): kPvtDims value dims × kLaneVecs row vectors of accumulators per
  // call, each V element broadcast from its row (v + t·v_ld).
  static void pv_t(const float* pt, Index rp, const float* alpha, const float* v, Index v_ld,
                   Index n, Index d_v, float* acc, RowPrefetch& pf, Index per_call) {
    constexpr Index VB = Ops::kLaneVecs, DB = kPvtDims;
    const Index nv = rp / kW;
    for (Index w = 0; w < nv; w += VB)
      for (Index j = 0; j < d_v; j += DB) {
        pf.issue(per_call);
        pv_t_dispatch<static_cast<int>(DB), static_cast<int>(VB)>(
            std::min(DB, d_v - j), std::min(VB, nv - w), pt + w * kW, rp, alpha + w * kW, v + j,
            v_ld, n, acc + j * rp + w * kW, rp);
      }
  }

  // pv_t_block<nd', nw'> for nd' ≤ ND, nw' ≤ NW given at run time.
  template <int ND, int NW>
  static void pv_t_dispatch(Index nd, Index nw, const float* pt, Index p_ld, const float* alpha,
                            const float* v, Index v_ld, Index n, float* acc, Index acc_ld) {
    if constexpr (ND > 0 && NW > 0) {
      if (nw < NW)
        pv_t_dispatch<ND, NW - 1>(nd, nw, pt, p_ld, alpha, v, v_ld, n, acc, acc_ld);
      else if (nd < ND)
        pv_t_dispatch<ND - 1, NW>(nd, nw, pt, p_ld, alpha, v, v_ld, n, acc, acc_ld);
      else
        pv_t_block<ND, NW>(pt, p_ld, alpha, v, v_ld, n, acc, acc_ld);
    }
  }

  template <int ND, int NW>
  static void pv_t_block(const float* pt, Index p_ld, const float* alpha, const float* v,
                         Index v_ld, Index n, float* acc, Index acc_ld) {
    V a[ND][NW];
    V al[NW];
    TPA_UNROLL
    for (int w = 0; w < NW; ++w) al[w] = Ops::load(alpha + w * kW);
    TPA_UNROLL
    for (int j = 0; j < ND; ++j) {
      TPA_UNROLL
      for (int w = 0; w < NW; ++w) a[j][w] = Ops::mul(Ops::load(acc + j * acc_ld + w * kW), al[w]);
    }
    for (Index t = 0; t < n; ++t) {
      V x[NW];
      TPA_UNROLL
      for (int w = 0; w < NW; ++w) x[w] = Ops::load(pt + t * p_ld + w * kW);
      TPA_UNROLL
      for (int j = 0; j < ND; ++j) {
        const V vb = Ops::set1(v[t * v_ld + j]);
        TPA_UNROLL
        for (int w = 0; w < NW; ++w) a[j][w] = Ops::fmadd(vb, x[w], a[j][w]);
      }
    }
    store_block<Ops>(a, acc, acc_ld);
  }

  // pv_block<nr', nc'> for nr' ≤ NR, nc' ≤ NC given at run time.
  template <int NR, int NC, class T>
  static void pv_dispatch(Index nr, Index nc, const float* pr, Index p_rs, Index p_ts,
                          const float* alpha, const T* v, Index v_ld, const float* v_sc, Index n,
                          float* acc, Index acc_ld) {
    if constexpr (NR > 0 && NC > 0) {
      if (nr < NR)
        pv_dispatch<NR - 1, NC>(nr, nc, pr, p_rs, p_ts, alpha, v, v_ld, v_sc, n, acc, acc_ld);
      else if (nc < NC)
        pv_dispatch<NR, NC - 1>(nr, nc, pr, p_rs, p_ts, alpha, v, v_ld, v_sc, n, acc, acc_ld);
      else
        pv_block<NR, NC>(pr, p_rs, p_ts, alpha, v, v_ld, v_sc, n, acc, acc_ld);
    }
  }

  template <int NR, int NC, class T>
  static void pv_block(const float* pr, Index p_rs, Index p_ts, const float* alpha, const T* v,
                       Index v_ld, const float* v_sc, Index n, float* acc, Index acc_ld) {
    V a[NR][NC];
    load_rescaled<Ops>(a, acc, acc_ld, alpha);
    for (Index t = 0; t < n; ++t) {
      V x[NC];
      float vs = 1.f;  // the token's value scale, folded into its probabilities (int8)
      (void)v_sc;  // read for int8 only
      if constexpr (std::is_same<T, float>::value) {
        TPA_UNROLL
        for (int c = 0; c < NC; ++c) x[c] = Ops::loadu(v + t * v_ld + c * kW);
      } else {
        if constexpr (is_quantized_v<T>) vs = v_sc[t];
        TPA_UNROLL
        for (int c = 0; c < NC; ++c) x[c] = Ops::template load_widen<T>(v + t * v_ld + c * kW, kW);
      }
      rank1_update<Ops>(a, x, pr + t * p_ts, p_rs, vs);
    }
    store_block<Ops>(a, acc, acc_ld);
  }

  // ---- paired values (PairValues<Ops, T>: bf16, int8 with VNNI) -----------------------------

  // pv for token-lane probabilities (p_ts = 1), nr ≤ kPvRowsMax, acc_ld a multiple of 2·kW: V
  // read in place 2·kW dims at a time; each such block of acc holds its dims in the order
  // Ops::pair_order<T> restores. bf16: each block widened in 2 ops into its even and odd dims.
  // int8: per row, the probabilities times the tokens' scales quantized to int16 (a scale per
  // row and tile, Ops::quantize_probs), two tokens' rows interleaved into int16 pairs, Σ_t in
  // int32 (Ops::dot_pairs), added to acc · alpha once at the end of the tile.
  template <class T>
  static void pv_pair(const float* pr, Index p_rs, const float* alpha, const T* v, Index v_ld,
                      const float* v_sc, Index n, float* acc, Index acc_ld, Index nr,
                      RowPrefetch& pf, Index per_call) {
    constexpr Index R = Ops::kPvRows, C = Ops::kPvCols / 2, C1 = kPv1Cols / 2;
    constexpr Index CW = std::max<Index>(1, kPvColsWide / 2);
    static_assert(C >= 1 && C1 >= 1, "GroupedTiled: pv_pair needs kPvCols, kPv1Cols ≥ 2");
    // int8: 32767 · 128 per token must sum over a tile within int32.
    static_assert(kT * 32767 * 128 < (Index{1} << 31), "GroupedTiled: kTile too long for pv_pair");
    const Index npair = acc_ld / (2 * kW);
    alignas(64) std::int16_t pq[is_quantized_v<T> ? kPvRowsMax * kT : 1];
    float ps[kPvRowsMax];
    if constexpr (is_quantized_v<T>) {
      for (Index r = 0; r < nr; ++r)
        ps[r] = Ops::quantize_probs(pr + r * p_rs, v_sc, n, pq + r * kT);
    } else {
      (void)v_sc;
      (void)ps;
    }
    if constexpr (kPvRowsMax > R) {
      if (pv_wide<T>(nr)) {  // one call covers all rows: V widened once
        for (Index c = 0; c < npair; c += CW) {
          pf.issue(per_call);
          const Index off = c * 2 * kW;
          pv_pair_dispatch<kPvRowsMax, CW>(nr, std::min(CW, npair - c), pr, pq, ps, alpha, v + off,
                                           v_ld, n, acc + off, acc_ld);
        }
        return;
      }
    }
    const Index cb = nr == 1 ? C1 : C;  // MHA decode: kPv1Cols vectors of one row at a time
    for (Index c = 0; c < npair; c += cb)
      for (Index r = 0; r < nr; r += R) {
        pf.issue(per_call);
        const Index np = std::min(cb, npair - c);
        const Index off = c * 2 * kW;
        if (nr == 1)
          pv_pair_dispatch<1, C1>(1, np, pr, pq, ps, alpha, v + off, v_ld, n, acc + off, acc_ld);
        else
          pv_pair_dispatch<R, C>(std::min(R, nr - r), np, pr + r * p_rs, pq + r * kT, ps + r,
                                 alpha + r, v + off, v_ld, n, acc + r * acc_ld + off, acc_ld);
      }
  }

  // pv_pair_block<nr', np'> for nr' ≤ NR, np' ≤ NP given at run time.
  template <int NR, int NP, class T>
  static void pv_pair_dispatch(Index nr, Index np, const float* pr, const std::int16_t* pq,
                               const float* ps, const float* alpha, const T* v, Index v_ld,
                               Index n, float* acc, Index acc_ld) {
    if constexpr (NR > 0 && NP > 0) {
      if (nr < NR)
        pv_pair_dispatch<NR - 1, NP>(nr, np, pr, pq, ps, alpha, v, v_ld, n, acc, acc_ld);
      else if (np < NP)
        pv_pair_dispatch<NR, NP - 1>(nr, np, pr, pq, ps, alpha, v, v_ld, n, acc, acc_ld);
      else
        pv_pair_block<NR, NP>(pr, pq, ps, alpha, v, v_ld, n, acc, acc_ld);
    }
  }

  // NR rows × NP blocks of 2·kW dims. bf16: P(r, t) = pr[r·kT + t]; int8: pq[r·kT + t] · ps[r].
  template <int NR, int NP, class T>
  static void pv_pair_block(const float* pr, const std::int16_t* pq, const float* ps,
                            const float* alpha, const T* v, Index v_ld, Index n, float* acc,
                            Index acc_ld) {
    constexpr int NC = 2 * NP;
    if constexpr (is_quantized_v<T>) {
      (void)pr;
      using VI = typename Ops::VI;
      VI ia[NR][NC];
      TPA_UNROLL
      for (int r = 0; r < NR; ++r) {
        TPA_UNROLL
        for (int c = 0; c < NC; ++c) ia[r][c] = Ops::izero();
      }
      for (Index t = 0; t < n; t += 2) {  // an odd n pairs its last row with itself (q = 0)
        const T* r0 = v + t * v_ld;
        const T* r1 = t + 1 < n ? r0 + v_ld : r0;
        VI x[NC];
        TPA_UNROLL
        for (int c = 0; c < NP; ++c)
          Ops::q8_pairs(r0 + c * 2 * kW, r1 + c * 2 * kW, x[2 * c], x[2 * c + 1]);
        TPA_UNROLL
        for (int r = 0; r < NR; ++r) {
          TPA_UNROLL
          for (int c = 0; c < NC; ++c) ia[r][c] = Ops::dot_pairs(ia[r][c], x[c], pq + r * kT + t);
        }
      }
      TPA_UNROLL
      for (int r = 0; r < NR; ++r) {
        const V al = Ops::set1(alpha[r]), sc = Ops::set1(ps[r]);
        TPA_UNROLL
        for (int c = 0; c < NC; ++c) {
          float* a = acc + r * acc_ld + c * kW;
          Ops::store(a, Ops::fmadd(Ops::to_float(ia[r][c]), sc, Ops::mul(Ops::load(a), al)));
        }
      }
    } else {
      (void)pq;
      (void)ps;
      V a[NR][NC];
      load_rescaled<Ops>(a, acc, acc_ld, alpha);
      for (Index t = 0; t < n; ++t) {
        V x[NC];
        TPA_UNROLL
        for (int c = 0; c < NP; ++c)
          Ops::bf16_pairs(v + t * v_ld + c * 2 * kW, x[2 * c], x[2 * c + 1]);
        rank1_update<Ops>(a, x, pr + t, kT);
      }
      store_block<Ops>(a, acc, acc_ld);
    }
  }

  // One 2·kW-dim block of a pv_pair accumulator row back in dim order.
  static void pair_order(float* a) {
    if constexpr (PairValues<Ops, S>::value)
      Ops::template pair_order<S>(a);
    else
      (void)a;
  }
};

}  // namespace detail
}  // namespace tpa
