// The paged, factorized KV cache shared by every attention kind, and the read-only view of one
// sequence that the kernels stream.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif
#if defined(__GLIBC__)
#include <malloc.h>  // malloc_trim
#endif

#include "tpa/cache/layout.hpp"
#include "tpa/core/error.hpp"
#include "tpa/core/quant.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// Handle of a sequence in a KVCache. Opaque: compare handles, store them, pass them back; do
/// not compute with them. (Today the low 32 bits hold the sequence's slot and the bits above
/// them a generation number that free_sequence() advances, so a handle kept after its sequence
/// was freed is recognized as stale — it throws tpa::Error — even once the slot is reused. The
/// first sequence of each slot has generation 0, so its handle equals the slot index. Handles
/// are never negative.)
using SeqId = std::int64_t;

/// \brief Read-only view of the cached tokens of one sequence in one layer, as the kernels read
/// them: tokens live in blocks of `block_tokens`; inside a block, each factor is placed per its
/// FactorPlace (token-major, or head-major: one row's tile contiguous). Read it through row() /
/// row_at() / at(), never by assuming a placement. Holds only pointers into the cache (no
/// allocation); valid until the cache is next modified.
template <class Scalar>
struct SeqView {
  const Scalar* const* block_base = nullptr;  ///< start of each block's region for this layer
  const std::int32_t* table = nullptr;        ///< block ids of the sequence, in token order
  const FactorPlace* places = nullptr;        ///< per factor: its placement inside a block
  Index n_tokens = 0;
  Index block_tokens = 0;
  /// Tokens before it were released (KVCache::drop_before; a multiple of block_tokens): their
  /// blocks are gone, so nothing may read them. 0 unless a sliding-window model dropped them.
  Index first_token = 0;
  /// The blocks are (advised to be) backed by 2 MiB pages. A hint for the kernels, never needed
  /// for correctness: on 4 KiB pages FlashTPA touches each page of a tile before its prefetches
  /// run (a prefetch that misses the TLB is dropped), on 2 MiB pages it skips those loads.
  bool huge_pages = false;

  Index num_blocks() const { return (n_tokens + block_tokens - 1) / block_tokens; }
  /// Tokens held by the i-th block of the sequence.
  Index block_len(Index i) const { return std::min(block_tokens, n_tokens - i * block_tokens); }

  const FactorPlace& place(std::size_t f) const { return places[f]; }
  /// Elements per token of factor f (rows · cols).
  Index elements(std::size_t f) const { return places[f].elements(); }
  Index rows(std::size_t f) const { return places[f].rows; }
  Index cols(std::size_t f) const { return places[f].cols; }
  /// Elements between consecutive rows (e.g. KV heads) of one token's factor f.
  Index row_stride(std::size_t f) const { return places[f].row_stride; }
  /// Elements between consecutive tokens of one row of factor f.
  Index token_stride(std::size_t f) const { return places[f].token_stride; }

  /// Row r of factor f of the first token of the i-th block: block_len(i) rows of cols(f)
  /// elements each, token_stride(f) apart (contiguous when head-major).
  const Scalar* row(std::size_t f, Index i, Index r) const {
    return block_base[table[i]] + places[f].offset + r * places[f].row_stride;
  }
  /// Row r of factor f of token t (0 ≤ t < n_tokens): cols(f) contiguous elements.
  const Scalar* row_at(std::size_t f, Index t, Index r) const {
    return row(f, t / block_tokens, r) + (t % block_tokens) * places[f].token_stride;
  }
  /// Element e (row-major in [rows, cols]) of factor f of token t.
  Scalar at(std::size_t f, Index t, Index e) const {
    const Index c = places[f].cols;
    return row_at(f, t, e / c)[e % c];
  }

  /// Quantized caches (tpa::q8): the f32 scales of row r of factor f for the tokens of the i-th
  /// block, one per token slot (block_len(i) of them valid); the same for every r when the
  /// factor has one scale per token (place(f).scale_rows == 1).
  const float* scales(std::size_t f, Index i, Index r) const {
    const FactorPlace& fp = places[f];
    return reinterpret_cast<const float*>(block_base[table[i]] + fp.scale_offset) +
           (fp.scale_rows > 1 ? r : 0) * block_tokens;
  }
  /// Element c of row r of factor f of token t as f32 (dequantized for tpa::q8).
  float value(std::size_t f, Index t, Index r, Index c) const {
    if constexpr (is_quantized_v<Scalar>) {
      return static_cast<float>(row_at(f, t, r)[c].v) *
             scales(f, t / block_tokens, r)[t % block_tokens];
    } else {
      return static_cast<float>(row_at(f, t, r)[c]);
    }
  }
};

namespace detail {

/// Whether anonymous memory advised with MADV_HUGEPAGE gets 2 MiB pages: Linux with transparent
/// huge pages in mode "always" or "madvise" (/sys/kernel/mm/transparent_hugepage/enabled, read
/// once). False elsewhere or if the file cannot be read.
inline bool transparent_huge_pages() {
#ifdef __linux__
  static const bool on = [] {
    std::FILE* f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (f == nullptr) return false;
    char text[128] = {};
    const std::size_t n = std::fread(text, 1, sizeof text - 1, f);
    std::fclose(f);
    text[n] = '\0';
    return std::strstr(text, "[always]") != nullptr || std::strstr(text, "[madvise]") != nullptr;
  }();
  return on;
#else
  return false;
#endif
}

/// Writes one token's factor (src row-major [rows, cols]) into place `fp` of a block region, as
/// the block's token t (of block_tokens), rounded to Scalar; tpa::q8 quantizes each scale group
/// (a row, or the whole factor when fp.scale_rows is 1) and stores its scale.
template <class Scalar>
void store_factor(const FactorPlace& fp, Scalar* region, Index t, Index block_tokens,
                  const float* src) {
  Scalar* dst = region + fp.offset + t * fp.token_stride;
  if constexpr (is_quantized_v<Scalar>) {
    float* scales = reinterpret_cast<float*>(region + fp.scale_offset);
    const Index rows_per_group = fp.scale_rows == fp.rows ? 1 : fp.rows;
    for (Index g = 0; g < fp.scale_rows; ++g) {
      const Index r0 = g * rows_per_group;
      scales[g * block_tokens + t] = quantize_group(
          rows_per_group * fp.cols, [&](Index i) { return src[r0 * fp.cols + i]; },
          [&](Index i, std::int8_t q) {
            dst[(r0 + i / fp.cols) * fp.row_stride + i % fp.cols].v = q;
          });
    }
  } else {
    auto copy = [](Scalar* d, const float* s, Index n) {
      if constexpr (std::is_same<Scalar, float>::value) {
        std::memcpy(d, s, static_cast<std::size_t>(n) * sizeof(float));
      } else {
        for (Index j = 0; j < n; ++j) d[j] = Scalar(s[j]);
      }
    };
    if (fp.token_contiguous()) {
      copy(dst, src, fp.elements());
    } else {
      for (Index r = 0; r < fp.rows; ++r)
        copy(dst + r * fp.row_stride, src + r * fp.cols, fp.cols);
    }
  }
}

}  // namespace detail

/// Source rows of one factor for an append: token i's factor starts at data + i·stride.
struct FactorRows {
  const float* data = nullptr;
  Index stride = 0;
};

/// \brief Paged KV cache for all layers of a model (DESIGN.md, "Factorized KV cache").
///
/// A pool of blocks of `block_tokens` tokens; each block holds every layer's factors for those
/// tokens, each factor placed per its FactorSpec::order (TileOrder). Each sequence owns a block table shared by all layers and one length per layer, so a
/// model's layers append to the same sequence one after another. Blocks are allocated on first
/// use (or up front with reserve_blocks), returned to a free list when a sequence is freed, and
/// never moved. Values are stored as `Scalar` (float, bfloat16 or half), rounded once on append,
/// or as tpa::q8 (int8 with f32 scales per row beside the values in the block; core/quant.hpp).
///
/// Memory: freeing a sequence keeps its blocks' storage on the free list, so a server that has
/// warmed up takes blocks without allocating (a decode step allocates nothing). Storage is freed
/// only through release_free_blocks(keep), e.g. when load drops: bytes_reserved() is the storage
/// held (blocks in use plus the free list) and shrinks by what it releases. Whether the process's
/// memory (RSS) shrinks too is up to the allocator: blocks are freed with operator delete, and
/// glibc's malloc keeps freed chunks below its mmap threshold (128 KiB at first, adapting up to
/// 32 MiB) in its heap for reuse. On glibc, release_free_blocks() therefore calls malloc_trim(0),
/// which returns the free pages of the heap to the system (measured: 6 MiB of 1 KiB blocks, RSS
/// +6.9 MiB after release_free_blocks without it, +0.4 MiB with it). With other allocators the
/// freed storage may stay with the process, reused by its later allocations.
/// Blocks of 2 MiB or more are 2 MiB aligned and, on Linux, advised to transparent huge pages
/// (madvise MADV_HUGEPAGE; a failure is ignored): fewer TLB misses when decode streams them.
///
/// Serving (README, "Serving"): truncate(seq, n) drops a sequence's tokens past n in every layer
/// (speculative decoding: append k draft tokens, verify, drop the rejected ones; undoing a model
/// step that failed in a later layer). fork(seq) starts a sequence that shares the parent's blocks
/// by reference count; a shared block is copied on the first write into it (copy on write: an
/// append into the parent's partly filled last block, from either side, takes a block from the
/// pool for the copy, and blocks_needed() counts it). A block returns to the free list when no
/// sequence holds it any more. Handles carry a generation number: a handle used after its
/// sequence was freed throws, even once its slot is reused. With set_strict_reservation(true),
/// an append that would take a block from the pool (a new block or a copy) throws instead.
///
/// Every throwing member leaves the cache exactly as it was: contents, block tables, lengths,
/// bytes_used() and bytes_reserved() (on std::bad_alloc too: storage allocated by the failing
/// call is released again).
///
/// Thread safety: const members may run concurrently with each other. append() calls (and layer
/// calls with this cache) for distinct sequences may run concurrently with each other, and with
/// const calls about other sequences, as long as none of them takes a block from the pool
/// (blocks_needed() is 0, e.g. after reserve_tokens()): such an append writes only its own
/// sequence's blocks and length. A copy on write takes a block too: an append into a block the
/// sequence shares with a fork (or its parent) needs exclusive access, but reserve_tokens() makes
/// those copies up front, so appends within a reservation stay safe on forked sequences too.
/// Strict reservation mode (set_strict_reservation) makes an append that would take a block
/// throw instead of racing. bytes_used() reads every sequence. Every other non-const call, and an
/// append that takes blocks, needs exclusive access to the cache.
///
/// \tparam Scalar storage type of the cached factors.
template <class Scalar = float>
class KVCache {
  static_assert(std::is_same<Scalar, float>::value || std::is_same<Scalar, bfloat16>::value ||
                    std::is_same<Scalar, half>::value || std::is_same<Scalar, q8>::value,
                "KVCache: Scalar must be float, tpa::bfloat16, tpa::half or tpa::q8");

 public:
  using scalar_type = Scalar;

  /// \param layers one layout per layer (a layer's `cache_layout()`).
  /// \param block_tokens tokens per block (≥ 1).
  /// \param max_blocks blocks the pool may hold at most (≥ 1, < 2^31); bounds the cache's
  /// memory. Only a bound: storage and bookkeeping grow with the blocks actually allocated.
  /// \throws Error if `layers` is empty, a size is < 1 or one block would exceed 2^57 elements.
  KVCache(std::vector<CacheLayout> layers, Index block_tokens, Index max_blocks)
      : layouts_(std::move(layers)), block_tokens_(block_tokens), max_blocks_(max_blocks) {
    TPA_CHECK(!layouts_.empty(), "KVCache: needs at least one layer layout");
    TPA_CHECK(block_tokens_ >= 1, "KVCache: block_tokens (", block_tokens_, ") must be >= 1");
    TPA_CHECK(max_blocks_ >= 1 && max_blocks_ <= INT32_MAX, "KVCache: max_blocks (", max_blocks_,
              ") must be in [1, 2^31)");
    Index offset = 0;
    for (const auto& l : layouts_) {
      TPA_CHECK(l.num_factors() >= 1, "KVCache: a layer layout has no factors");
      // (elements_per_token ≤ 2^57, so a token's Scalars, ≤ 5·2^57 with scales, cannot overflow)
      TPA_CHECK(token_units(l) <= (kMaxBlockElements - offset) / block_tokens_ -
                                      (is_quantized_v<Scalar> ? 4 : 0),
                "KVCache: a block of ", block_tokens_, " tokens of these layers would hold more "
                "than 2^57 elements");
      LayerInfo info;
      info.block_offset = offset;
      info.token_units = token_units(l);
      offset += place_layer(l, block_tokens_, &info.places);
      layers_.push_back(std::move(info));
    }
    block_elements_ = offset;
    huge_pages_ = block_bytes() >= kHugePage && detail::transparent_huge_pages();
    // Per-block bookkeeping grows with the blocks allocated (reserve_ids), not with max_blocks.
    layer_base_.resize(layers_.size());
  }

  /// Where each factor of layer layout `l` lives in the layer's region of a block of
  /// `block_tokens` tokens (appended to *places, in factor order; with tpa::q8 also where its
  /// scales live: the layer's values first, then each factor's scales, 4-byte aligned), and the
  /// region's size in Scalars. How the constructor places every layer; for code that lays out
  /// blocks of its own (benchmarks).
  static Index place_layer(const CacheLayout& l, Index block_tokens,
                           std::vector<FactorPlace>* places) {
    const std::size_t first = places->size();
    for (std::size_t f = 0; f < l.num_factors(); ++f) places->push_back(l.place(f, block_tokens));
    Index size = block_tokens * l.elements_per_token();
    if constexpr (is_quantized_v<Scalar>) {  // f32 scales: per row, or per token (q8)
      size = (size + 3) / 4 * 4;
      for (std::size_t f = first; f < places->size(); ++f) {
        FactorPlace& fp = (*places)[f];
        fp.scale_rows = fp.cols >= kQ8MinRowCols ? fp.rows : 1;
        fp.scale_offset = size;
        size += 4 * fp.scale_rows * block_tokens;
      }
    }
    return size;
  }
  /// Scalars one token occupies in a layer of layout `l`: its elements, plus 4 per f32 scale
  /// with tpa::q8.
  static Index token_units(const CacheLayout& l) {
    Index n = l.elements_per_token();
    if constexpr (is_quantized_v<Scalar>) {
      for (const auto& f : l.factors()) n += 4 * (f.cols >= kQ8MinRowCols ? f.rows : 1);
    }
    return n;
  }

  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;
  KVCache(KVCache&&) noexcept = default;
  KVCache& operator=(KVCache&&) noexcept = default;

  int num_layers() const { return static_cast<int>(layouts_.size()); }
  const CacheLayout& layout(int layer) const {
    check_layer("KVCache::layout", layer);
    return layouts_[static_cast<std::size_t>(layer)];
  }
  Index block_tokens() const { return block_tokens_; }
  Index max_blocks() const { return max_blocks_; }
  /// Blocks that hold storage (in use or free for reuse).
  Index allocated_blocks() const { return static_cast<Index>(blocks_.size() - empty_.size()); }
  /// Blocks with storage that no sequence holds (the free list).
  Index free_blocks() const { return static_cast<Index>(free_.size()); }
  /// Blocks an append could still take: free ones plus ones not yet allocated.
  Index available_blocks() const {
    return static_cast<Index>(free_.size()) + max_blocks_ - allocated_blocks();
  }

  /// Exact bytes one token occupies in all layers together.
  /// tpa::q8: the int8 values and the f32 scales (KVCache<q8>::scales_per_token), not the at
  /// most 3 bytes of padding per layer and block that align the scales.
  std::size_t bytes_per_token() const {
    std::size_t n = 0;
    for (const auto& l : layers_) n += static_cast<std::size_t>(l.token_units);
    return n * sizeof(Scalar);
  }
  /// Exact bytes one token occupies in `layer` (tpa::q8: values and scales).
  std::size_t bytes_per_token(int layer) const {
    check_layer("KVCache::bytes_per_token", layer);
    return static_cast<std::size_t>(layers_[static_cast<std::size_t>(layer)].token_units) *
           sizeof(Scalar);
  }
  /// f32 scales one token stores in `layer` (0 unless Scalar is quantized, tpa::q8).
  Index scales_per_token(int layer) const {
    check_layer("KVCache::scales_per_token", layer);
    Index n = 0;
    for (const auto& fp : layers_[static_cast<std::size_t>(layer)].places) n += fp.scale_rows;
    return n;
  }
  /// Bytes holding cached tokens, each stored token counted once: Σ over layers of
  /// bytes_per_token(layer) × the number of distinct (block, token slot) pairs that hold a token
  /// of that layer cached by at least one live sequence. Without forks: Σ over sequences and
  /// layers of length × bytes per token. A block shared by forked sequences counts once, with
  /// the most tokens any of its holders has cached in it (their cached tokens in a shared block
  /// are a common prefix of it). Reserved room holds no token and counts nothing.
  std::size_t bytes_used() const {
    std::size_t n = 0;
    for (std::size_t si = 0; si < seqs_.size(); ++si) {
      const Sequence& s = seqs_[si];
      if (!s.active) continue;
      for (std::size_t i = 0; i < s.blocks.size(); ++i) {
        const std::int32_t b = s.blocks[i];
        if (b == kDropped) continue;  // released by drop_before: holds nothing
        const bool shared = refs_[static_cast<std::size_t>(b)] > 1;
        // A shared block sits at the same table index in every holder (fork copies a prefix
        // of the table, a copy on write replaces in place, truncate cuts the end): count it
        // once, with its first holder, taking the most tokens of any holder per layer.
        if (shared && holds(0, si, i, b)) continue;
        for (std::size_t l = 0; l < layers_.size(); ++l) {
          Index t = tokens_in_block(s, i, l);
          if (shared)
            for (std::size_t sj = si + 1; sj < seqs_.size(); ++sj)
              if (holds(sj, sj + 1, i, b)) t = std::max(t, tokens_in_block(seqs_[sj], i, l));
          n += static_cast<std::size_t>(t) * bytes_per_token(static_cast<int>(l));
        }
      }
    }
    return n;
  }
  /// Bytes of block storage held: allocated_blocks() × the bytes of one block (in use or on
  /// the free list). Shrinks only through release_free_blocks().
  std::size_t bytes_reserved() const {
    return static_cast<std::size_t>(allocated_blocks()) *
           static_cast<std::size_t>(block_elements_) * sizeof(Scalar);
  }

  /// Allocates storage for blocks until at least `n` are allocated, so later appends that fit
  /// in them allocate nothing. \throws Error if n > max_blocks; std::bad_alloc. Either way the
  /// cache is unchanged.
  void reserve_blocks(Index n) {
    TPA_CHECK(n <= max_blocks_, "KVCache::reserve_blocks: n (", n, ") exceeds max_blocks (",
              max_blocks_, ")");
    if (allocated_blocks() < n) grow_free_list(free_blocks() + n - allocated_blocks());
  }

  /// Allocates storage until at least `n` blocks are free, so appends that need at most n new
  /// blocks cannot fail. \throws Error if n > available_blocks(); std::bad_alloc. Either way the
  /// cache is unchanged.
  void ensure_free_blocks(Index n) {
    TPA_CHECK(n <= available_blocks(), "KVCache::ensure_free_blocks: n (", n,
              ") exceeds the available blocks (", available_blocks(), ")");
    grow_free_list(n);
  }

  /// Frees the storage of free blocks (ones no sequence holds) until at most `keep` remain on
  /// the free list, then, on glibc, calls malloc_trim(0) so the pages go back to the system (see
  /// "Memory" above); returns how many were released. The most recently freed blocks are the
  /// ones kept. Blocks in use are never touched, and released ids are allocated again on demand
  /// (later appends may then allocate). Needs exclusive access to the cache.
  Index release_free_blocks(Index keep = 0) noexcept {
    const Index n = free_blocks() - std::max<Index>(keep, 0);
    if (n <= 0) return 0;
    for (Index i = 0; i < n; ++i) release_block(free_[static_cast<std::size_t>(i)]);
    free_.erase(free_.begin(), free_.begin() + n);
#if defined(__GLIBC__)
    (void)::malloc_trim(0);  // glibc keeps small freed chunks in its heap (see the class comment)
#endif
    return n;
  }

  /// Starts an empty sequence and returns its handle. Slots of freed sequences are reused, with
  /// the next generation number (a different handle; see SeqId).
  SeqId add_sequence() { return handle(new_slot(0)); }

  /// Starts a sequence holding the same tokens as `seq` in every layer, sharing its blocks (no
  /// token is copied; each shared block's reference count goes up). The first append into a
  /// shared block, by either sequence, copies it (copy on write, one block from the pool); blocks
  /// `seq` reserved beyond its tokens are not shared. Returns the new sequence's handle.
  /// \throws Error if `seq` is not live; std::bad_alloc. Either way the cache is unchanged.
  SeqId fork(SeqId seq) {
    check_seq("KVCache::fork", seq);
    const Index parent_len = max_length(seq_ref(seq));
    const auto shared = static_cast<std::size_t>(blocks_for(parent_len));
    const std::size_t slot = new_slot(shared);  // may throw: nothing changed
    Sequence& p = seq_ref(seq);                 // seqs_ may have grown
    Sequence& c = seqs_[slot];
    c.len = p.len;  // same size: no allocation
    c.dropped = std::min(p.dropped, shared);
    for (std::size_t i = 0; i < shared; ++i) {
      c.blocks.push_back(p.blocks[i]);  // capacity reserved by new_slot
      if (p.blocks[i] != kDropped) ++refs_[static_cast<std::size_t>(p.blocks[i])];
    }
    return handle(slot);
  }

  /// Cuts `seq` back to its first `n_tokens` tokens in every layer; blocks past the last one
  /// still needed (including room reserved with reserve_tokens) leave the sequence's table and
  /// return to the free list unless a fork still holds them. Use: drop rejected draft tokens
  /// (speculative decoding), or undo a model step that failed in a later layer (see README,
  /// "Serving"). Needs exclusive access to the cache.
  /// \throws Error if `seq` is not live, n_tokens < 0 or n_tokens exceeds the sequence's length in
  /// some layer (nothing changes then).
  void truncate(SeqId seq, Index n_tokens) {
    check_seq("KVCache::truncate", seq);
    TPA_CHECK(n_tokens >= 0, "KVCache::truncate: n_tokens (", n_tokens, ") must be >= 0");
    Sequence& s = seq_ref(seq);
    for (std::size_t l = 0; l < layers_.size(); ++l)
      TPA_CHECK(n_tokens <= s.len[l], "KVCache::truncate: n_tokens (", n_tokens,
                ") exceeds the length of sequence ", describe(seq), " in layer ", l, " (",
                s.len[l], ")");
    TPA_CHECK(n_tokens >= first_token_of(s), "KVCache::truncate: n_tokens (", n_tokens,
              ") is before the tokens sequence ", describe(seq), " released with drop_before (",
              first_token_of(s), ")");
    std::fill(s.len.begin(), s.len.end(), n_tokens);
    drop_blocks(s, static_cast<std::size_t>(blocks_for(n_tokens)));
  }

  /// Releases the blocks of `seq` that lie wholly before `position` (tokens 0 … position − 1),
  /// in every layer, for sliding-window layers that will never read them again: each returns to
  /// the free list unless a fork still holds it. Positions stay absolute: the sequence keeps its
  /// length, later tokens keep theirs, and first_token(seq) (a multiple of block_tokens) says
  /// where the readable tokens start; a layer call whose queries would need a released key
  /// throws tpa::Error. Returns the blocks that left the table. Needs exclusive access to the
  /// cache.
  /// \throws Error if `seq` is not live, or position < 0 or past the sequence's length in some
  /// layer (nothing changes then).
  Index drop_before(SeqId seq, Index position) {
    check_seq("KVCache::drop_before", seq);
    Sequence& s = seq_ref(seq);
    const Index shortest = *std::min_element(s.len.begin(), s.len.end());
    TPA_CHECK(position >= 0 && position <= shortest, "KVCache::drop_before: position (",
              position, ") must be in [0, ", shortest, "], the shortest length of sequence ",
              describe(seq), " over the layers");
    const auto end = static_cast<std::size_t>(position / block_tokens_);
    Index n = 0;
    for (std::size_t i = s.dropped; i < end; ++i) {  // end ≤ table size: position ≤ lengths
      const std::int32_t b = s.blocks[i];
      if (--refs_[static_cast<std::size_t>(b)] == 0) free_.push_back(b);
      s.blocks[i] = kDropped;
      ++n;
    }
    s.dropped = std::max(s.dropped, end);
    return n;
  }

  /// First readable token of `seq`: tokens before it were released by drop_before (0 if none).
  /// \throws Error if `seq` is not live.
  Index first_token(SeqId seq) const {
    check_seq("KVCache::first_token", seq);
    return first_token_of(seq_ref(seq));
  }

  /// Strict reservation mode: when on, an append (or layer call) that would take a block from
  /// the pool — a new block, or a copy of a shared one — throws tpa::Error instead, so serving
  /// code that appends concurrently fails loudly rather than racing; reserve_tokens() is then the
  /// only way a sequence gets blocks. Off by default. Needs exclusive access to the cache.
  void set_strict_reservation(bool on) noexcept { strict_ = on; }
  bool strict_reservation() const noexcept { return strict_; }

  /// Takes blocks from the pool into `seq`'s block table until it has room for `tokens` tokens
  /// in every layer, and copies the blocks it shares with forks that appends up to that length
  /// would write into, so such appends take no block (see "Thread safety"). Unused blocks return
  /// to the pool with free_sequence() or truncate().
  /// \throws Error if `seq` is not live, tokens < 0 or the pool lacks the blocks;
  /// std::bad_alloc. Either way the cache is unchanged.
  void reserve_tokens(SeqId seq, Index tokens) {
    check_seq("KVCache::reserve_tokens", seq);
    TPA_CHECK(tokens >= 0, "KVCache::reserve_tokens: tokens (", tokens, ") must be >= 0");
    Sequence& s = seq_ref(seq);
    const Index fresh = std::max<Index>(
        0, blocks_for(tokens) - static_cast<Index>(s.blocks.size()));
    const auto copies_end = std::min(s.blocks.size(), static_cast<std::size_t>(blocks_for(tokens)));
    std::size_t first = copies_end;  // first block an append up to `tokens` writes, any layer
    for (std::size_t l = 0; l < layers_.size(); ++l)
      if (s.len[l] < tokens) first = std::min(first, static_cast<std::size_t>(s.len[l] / block_tokens_));
    const Index copies = shared_in(s, first, copies_end);
    const Index need = fresh + copies;
    TPA_CHECK(need <= available_blocks(), "KVCache::reserve_tokens: room for ", tokens,
              " tokens in sequence ", describe(seq), " needs ", need, " new blocks (", copies,
              " of them copies of shared blocks) but only ", available_blocks(),
              " of max_blocks (", max_blocks_, ") are available");
    s.blocks.reserve(s.blocks.size() + static_cast<std::size_t>(fresh));
    grow_free_list(need);  // strong; nothing below throws
    for (std::size_t i = first; i < copies_end; ++i) (void)copy_if_shared(s, i);
    take_blocks(s, fresh);
  }

  /// Ends a sequence: its blocks return to the free list and its handle becomes invalid.
  /// \throws Error if `seq` is not a live sequence.
  /// Blocks a fork still holds stay with it. A stale handle (its sequence already freed, its
  /// slot perhaps reused) throws and frees nothing.
  void free_sequence(SeqId seq) {
    check_seq("KVCache::free_sequence", seq);
    Sequence& s = seq_ref(seq);
    drop_blocks(s, 0);
    std::fill(s.len.begin(), s.len.end(), 0);
    s.dropped = 0;
    s.active = false;
    s.generation = (s.generation + 1) & kMaxGeneration;
    free_seqs_.push_back(static_cast<std::int32_t>(slot_of(seq)));
  }

  /// Whether `seq` is the handle of a live sequence (false for a freed one, even if its slot
  /// was reused).
  bool contains(SeqId seq) const {
    if (seq < 0 || slot_of(seq) >= seqs_.size()) return false;
    const Sequence& s = seqs_[slot_of(seq)];
    return s.active && s.generation == generation_of(seq);
  }
  /// Live sequences.
  Index num_sequences() const {
    return static_cast<Index>(seqs_.size() - free_seqs_.size());
  }

  /// Tokens of `seq` cached in `layer`. \throws Error on an unknown sequence or layer.
  Index length(SeqId seq, int layer = 0) const {
    check_seq("KVCache::length", seq);
    check_layer("KVCache::length", layer);
    return seq_ref(seq).len[static_cast<std::size_t>(layer)];
  }

  /// New blocks that appending n ≥ 0 tokens to `seq` in `layer` would take (the largest Index
  /// when the length would overflow).
  /// \throws Error on an unknown sequence or layer, or n < 0.
  Index blocks_needed(SeqId seq, int layer, Index n) const {
    check_seq("KVCache::blocks_needed", seq);
    check_layer("KVCache::blocks_needed", layer);
    TPA_CHECK(n >= 0, "KVCache::blocks_needed: n (", n, ") must be >= 0");
    const Sequence& s = seq_ref(seq);
    const Index len = s.len[static_cast<std::size_t>(layer)];
    if (n > std::numeric_limits<Index>::max() - len) return std::numeric_limits<Index>::max();
    return std::max<Index>(0, blocks_for(len + n) - static_cast<Index>(s.blocks.size())) +
           copies_needed(seq, layer, n);
  }

  /// Of blocks_needed(seq, layer, n): the copies of shared blocks (copy on write) the append
  /// would make. \throws Error as blocks_needed.
  Index copies_needed(SeqId seq, int layer, Index n) const {
    check_seq("KVCache::copies_needed", seq);
    check_layer("KVCache::copies_needed", layer);
    TPA_CHECK(n >= 0, "KVCache::copies_needed: n (", n, ") must be >= 0");
    const Sequence& s = seq_ref(seq);
    if (n == 0) return 0;
    const auto r = write_range(s, static_cast<std::size_t>(layer), n);
    return shared_in(s, r.first, r.second);
  }

  /// Sequences holding block `block` (0: on the free list or without storage); for tests and
  /// diagnostics. \throws Error if `block` is not a block id of this cache.
  Index block_refs(std::int32_t block) const {
    TPA_CHECK(block >= 0 && static_cast<std::size_t>(block) < refs_.size(),
              "KVCache::block_refs: block (", block, ") is not in [0, ", refs_.size(), ")");
    return refs_[static_cast<std::size_t>(block)];
  }

  /// \throws Error unless `seq` is live, `layer` exists, `layout` is that layer's layout, n ≥ 0
  /// and n tokens fit in the pool. `who` prefixes the message.
  void check_append(const char* who, SeqId seq, int layer, const CacheLayout& layout,
                    Index n) const {
    check_layer(who, layer);
    check_seq(who, seq);
    check_layout(who, layer, layout);
    TPA_CHECK(n >= 0, who, ": cannot append a negative number of tokens (", n, ")");
    const Index need = blocks_needed(seq, layer, n);
    TPA_CHECK(!strict_ || need == 0, who, ": strict reservation: appending ", n,
              " tokens to sequence ", describe(seq), " in layer ", layer, " needs ", need,
              " blocks from the pool (", copies_needed(seq, layer, n),
              " of them copies of shared blocks) beyond its reservation; reserve them first "
              "with reserve_tokens");
    TPA_CHECK(need <= available_blocks(), who, ": the cache is full: appending ", n,
              " tokens to sequence ", describe(seq), " needs ", need, " new blocks but only ",
              available_blocks(), " of max_blocks (", max_blocks_, ") are available");
  }

  /// \throws Error unless `layout` is the layout of `layer`.
  void check_layout(const char* who, int layer, const CacheLayout& layout) const {
    check_layer(who, layer);
    const CacheLayout& have = layouts_[static_cast<std::size_t>(layer)];
    TPA_CHECK(have == layout, who, ": cache layer ", layer, " holds layout '", have.kind(),
              "' {", have.describe(), "}, not this layer's '", layout.kind(), "' {",
              layout.describe(), "}");
  }

  /// Appends n tokens to `seq` in `layer`: factor f of token i is read from
  /// rows[f].data + i·rows[f].stride (elements of the factor, row-major) and rounded to Scalar,
  /// then placed per the factor's TileOrder. `rows` has one entry per factor of the layer's
  /// layout.
  /// \throws Error as check_append; std::bad_alloc if block storage cannot be allocated. Either
  /// way the cache is unchanged.
  void append(SeqId seq, int layer, Index n, const FactorRows* rows) {
    check_layer("KVCache::append", layer);  // before layouts_[layer] is read
    check_append("KVCache::append", seq, layer, layouts_[static_cast<std::size_t>(layer)], n);
    Sequence& s = seq_ref(seq);
    const auto l = static_cast<std::size_t>(layer);
    // Take blocks first (all or nothing), then copy: nothing below can throw.
    const Index copies = copies_needed(seq, layer, n);
    const Index fresh = blocks_needed(seq, layer, n) - copies;
    s.blocks.reserve(s.blocks.size() + static_cast<std::size_t>(fresh));
    grow_free_list(fresh + copies);
    if (copies > 0) {
      const auto r = write_range(s, l, n);
      for (std::size_t i = r.first; i < r.second; ++i) (void)copy_if_shared(s, i);
    }
    take_blocks(s, fresh);
    const LayerInfo& info = layers_[l];
    const Index start = s.len[l];
    for (Index i = 0; i < n; ++i) {
      const Index t = start + i;
      Scalar* block = blocks_[static_cast<std::size_t>(
                          s.blocks[static_cast<std::size_t>(t / block_tokens_)])].get() +
                      info.block_offset;
      for (std::size_t f = 0; f < info.places.size(); ++f)
        detail::store_factor(info.places[f], block, t % block_tokens_, block_tokens_,
                             rows[f].data + i * rows[f].stride);
    }
    s.len[l] = start + n;
  }

  /// Undoes the appends to `seq` in `layer` of a call that failed part-way: the length becomes
  /// `length` again and the block table its first `table_size` blocks (the later ones return to
  /// the free list, last first, so that the list is as before the appends). For layer calls
  /// (detail::CacheCall), which guarantee that nothing else changed `seq` since. Cannot throw.
  void undo_append(SeqId seq, int layer, Index length, std::size_t table_size) noexcept {
    Sequence& s = seq_ref(seq);
    drop_blocks(s, table_size);
    s.len[static_cast<std::size_t>(layer)] = length;
  }

  /// One copy on write made by unshare(): table index and the shared block it replaced.
  struct Unshared {
    std::size_t index;
    std::int32_t block;
  };

  /// Copies the shared blocks that appending n tokens to `seq` in `layer` would write into
  /// (copy on write), recording each in `log` (room for copies_needed(seq, layer, n) entries);
  /// returns how many it made. The free list must hold that many blocks (ensure_free_blocks).
  /// For layer calls (detail::CacheCall), which undo it with undo_unshare. Cannot throw.
  Index unshare(SeqId seq, int layer, Index n, Unshared* log) noexcept {
    Sequence& s = seq_ref(seq);
    if (n <= 0) return 0;
    const auto r = write_range(s, static_cast<std::size_t>(layer), n);
    Index made = 0;
    for (std::size_t i = r.first; i < r.second; ++i) {
      const std::int32_t old = s.blocks[i];
      if (copy_if_shared(s, i)) log[made++] = Unshared{i, old};
    }
    return made;
  }

  /// Undoes unshare(seq, ..., log) returning `count`: each copy goes back to the free list (last
  /// first) and the shared block into the table. Cannot throw.
  void undo_unshare(SeqId seq, const Unshared* log, Index count) noexcept {
    Sequence& s = seq_ref(seq);
    for (Index k = count - 1; k >= 0; --k) {
      const std::int32_t copy = s.blocks[log[k].index];
      refs_[static_cast<std::size_t>(copy)] = 0;
      free_.push_back(copy);
      s.blocks[log[k].index] = log[k].block;
      ++refs_[static_cast<std::size_t>(log[k].block)];
    }
  }

  /// Releases the storage of the newest free blocks until at most `allocated` blocks hold
  /// storage: undoes ensure_free_blocks() of a call that failed later (detail::CacheCall).
  /// Cannot throw.
  void undo_allocation(Index allocated) noexcept {
    while (allocated_blocks() > allocated && !free_.empty()) {
      release_block(free_.back());
      free_.pop_back();
    }
  }

  /// Read-only view of `seq` in `layer` for the kernels (see SeqView).
  /// \throws Error on an unknown sequence or layer.
  SeqView<Scalar> view(SeqId seq, int layer) const {
    check_layer("KVCache::view", layer);
    check_seq("KVCache::view", seq);
    const Sequence& s = seq_ref(seq);
    const auto l = static_cast<std::size_t>(layer);
    SeqView<Scalar> v;
    v.block_base = layer_base_[l].data();
    v.table = s.blocks.data();
    v.places = layers_[l].places.data();
    v.n_tokens = s.len[l];
    v.first_token = first_token_of(s);
    v.block_tokens = block_tokens_;
    v.huge_pages = huge_pages_;
    return v;
  }

  /// Block ids of `seq`, in token order (for tests and diagnostics).
  const std::vector<std::int32_t>& block_table(SeqId seq) const {
    check_seq("KVCache::block_table", seq);
    return seq_ref(seq).blocks;
  }

 private:
  struct LayerInfo {
    Index block_offset = 0;           // elements from a block's start to this layer's region
    Index token_units = 0;            // Scalars per token: elements (+ 4 per scale for q8)
    std::vector<FactorPlace> places;  // each factor's placement inside the region
  };
  struct Sequence {
    bool active = false;
    std::int64_t generation = 0;      // of the slot's current (or next, when free) sequence
    std::vector<std::int32_t> blocks;  // block ids; a block may be shared with forks
    std::vector<Index> len;            // per layer
    std::size_t dropped = 0;           // leading table entries released by drop_before
  };
  static constexpr std::int64_t kMaxGeneration = INT32_MAX;  // generations wrap at 2^31
  // Table entry of a block released by drop_before (the table keeps positions absolute).
  static constexpr std::int32_t kDropped = -1;
  // Tokens before the first table entry not released by drop_before.
  Index first_token_of(const Sequence& s) const {
    return static_cast<Index>(s.dropped) * block_tokens_;
  }
  // Storage of one block: aligned operator new (so allocation failures can be injected in
  // tests like any other), freed with the same alignment.
  struct BlockDeleter {
    std::size_t align = 64;
    void operator()(Scalar* p) const { ::operator delete(p, std::align_val_t(align)); }
  };
  static constexpr std::size_t kHugePage = std::size_t(2) << 20;
  // Bytes of one block's storage (whole cache lines).
  std::size_t block_bytes() const {
    return (static_cast<std::size_t>(block_elements_) * sizeof(Scalar) + 63) / 64 * 64;
  }
  // Elements of one block at most: no size or byte count computed from it can overflow.
  static constexpr Index kMaxBlockElements = Index(1) << 57;

  // Blocks that hold `tokens` ≥ 0 tokens (no overflow).
  Index blocks_for(Index tokens) const {
    return tokens / block_tokens_ + (tokens % block_tokens_ != 0 ? 1 : 0);
  }

  void check_layer(const char* who, int layer) const {
    TPA_CHECK(layer >= 0 && layer < num_layers(), who, ": layer (", layer,
              ") is not in [0, ", num_layers(), ")");
  }
  void check_seq(const char* who, SeqId seq) const {
    if (contains(seq)) return;
    if (seq >= 0 && slot_of(seq) < seqs_.size())
      ::tpa::detail::fail(who, ": sequence ", describe(seq), " is not a live sequence of this cache: it was "
                "freed (its slot now holds generation ", seqs_[slot_of(seq)].generation,
                seqs_[slot_of(seq)].active ? ", live" : ", not started", ")");
    ::tpa::detail::fail(who, ": sequence ", seq, " is not a live sequence of this cache");
  }

  static std::size_t slot_of(SeqId seq) {
    return static_cast<std::size_t>(static_cast<std::uint64_t>(seq) & 0xffffffffu);
  }
  static std::int64_t generation_of(SeqId seq) { return seq >> 32; }
  SeqId handle(std::size_t slot) const {
    return static_cast<SeqId>((seqs_[slot].generation << 32) | static_cast<std::int64_t>(slot));
  }
  // "5 (slot 5, generation 0)": a handle as error messages name it.
  static std::string describe(SeqId seq) {
    return std::to_string(seq) + " (slot " + std::to_string(slot_of(seq)) + ", generation " +
           std::to_string(generation_of(seq)) + ")";
  }
  Sequence& seq_ref(SeqId seq) { return seqs_[slot_of(seq)]; }
  const Sequence& seq_ref(SeqId seq) const { return seqs_[slot_of(seq)]; }

  // A slot for a new sequence (a freed one if there is one), marked live, empty, with room for
  // `table` block ids in its table. Strong guarantee.
  std::size_t new_slot(std::size_t table) {
    if (!free_seqs_.empty()) {
      const auto slot = static_cast<std::size_t>(free_seqs_.back());
      seqs_[slot].blocks.reserve(table);  // may throw: nothing changed
      seqs_[slot].active = true;
      free_seqs_.pop_back();
      return slot;
    }
    TPA_CHECK(seqs_.size() < static_cast<std::size_t>(INT32_MAX), "KVCache: too many sequences");
    Sequence s;
    s.active = true;
    s.len.assign(layers_.size(), 0);
    s.blocks.reserve(std::max(table, static_cast<std::size_t>(std::min<Index>(max_blocks_, 1024))));
    // Room for every slot on free_seqs_ first (free_sequence cannot throw), then the push:
    // either may throw std::bad_alloc with nothing observable changed.
    free_seqs_.reserve(seqs_.size() + 1);
    seqs_.push_back(std::move(s));
    return seqs_.size() - 1;
  }

  static Index max_length(const Sequence& s) { return *std::max_element(s.len.begin(), s.len.end()); }

  // Tokens of layer l that s holds in its i-th block.
  Index tokens_in_block(const Sequence& s, std::size_t i, std::size_t l) const {
    return std::clamp<Index>(s.len[l] - static_cast<Index>(i) * block_tokens_, 0, block_tokens_);
  }
  // Whether a live sequence in slots [from, to) holds block b at table index i.
  bool holds(std::size_t from, std::size_t to, std::size_t i, std::int32_t b) const {
    for (std::size_t sj = from; sj < to; ++sj) {
      const Sequence& o = seqs_[sj];
      if (o.active && o.blocks.size() > i && o.blocks[i] == b) return true;
    }
    return false;
  }

  // Table indices [first, second) of s's existing blocks that appending n ≥ 1 tokens to layer l
  // writes into.
  std::pair<std::size_t, std::size_t> write_range(const Sequence& s, std::size_t l, Index n) const {
    const Index len = s.len[l];
    const auto first = static_cast<std::size_t>(len / block_tokens_);
    const Index end = n > std::numeric_limits<Index>::max() - len
                          ? std::numeric_limits<Index>::max() / block_tokens_
                          : blocks_for(len + n);
    const auto last = std::min(s.blocks.size(), static_cast<std::size_t>(end));
    return {first, std::max(first, last)};
  }
  // Blocks among s.blocks[first, last) that other sequences hold too.
  Index shared_in(const Sequence& s, std::size_t first, std::size_t last) const {
    Index n = 0;
    for (std::size_t i = first; i < last; ++i)
      if (s.blocks[i] != kDropped && refs_[static_cast<std::size_t>(s.blocks[i])] > 1) ++n;
    return n;
  }
  // Copy on write: if s's i-th block is shared, replaces it with a copy taken from the free list
  // (which must not be empty) and returns true. Cannot throw.
  bool copy_if_shared(Sequence& s, std::size_t i) noexcept {
    if (s.blocks[i] == kDropped) return false;
    const auto old = static_cast<std::size_t>(s.blocks[i]);
    if (refs_[old] <= 1) return false;
    const std::int32_t copy = free_.back();
    free_.pop_back();
    std::memcpy(blocks_[static_cast<std::size_t>(copy)].get(), blocks_[old].get(),
                static_cast<std::size_t>(block_elements_) * sizeof(Scalar));
    --refs_[old];
    refs_[static_cast<std::size_t>(copy)] = 1;
    s.blocks[i] = copy;
    return true;
  }
  // Shrinks s's table to `keep` blocks, last first; a block nobody else holds goes to the free
  // list. Cannot throw (free_ has room for every id).
  void drop_blocks(Sequence& s, std::size_t keep) noexcept {
    while (s.blocks.size() > keep) {
      if (s.blocks.back() != kDropped) {
        const auto b = static_cast<std::size_t>(s.blocks.back());
        if (--refs_[b] == 0) free_.push_back(s.blocks.back());
      }
      s.blocks.pop_back();
    }
  }

  // Moves `need` blocks from the pool (the free list, after allocating what it lacks) to the
  // end of s's table. Does nothing when need is 0. Strong guarantee.
  void take_blocks(Sequence& s, Index need) {
    if (need <= 0) return;
    s.blocks.reserve(s.blocks.size() + static_cast<std::size_t>(need));
    grow_free_list(need);
    for (Index i = 0; i < need; ++i) {  // cannot throw: capacity reserved above
      s.blocks.push_back(free_.back());
      refs_[static_cast<std::size_t>(free_.back())] = 1;
      free_.pop_back();
    }
  }

  // Allocates blocks onto the free list until it holds n. Strong guarantee: on std::bad_alloc
  // the blocks allocated here are released again.
  void grow_free_list(Index n) {
    const std::size_t before = free_.size();
    try {
      while (static_cast<Index>(free_.size()) < n) free_.push_back(allocate_block());
    } catch (...) {
      while (free_.size() > before) {
        release_block(free_.back());
        free_.pop_back();
      }
      throw;
    }
  }

  // Makes room for `n` block ids in every per-id vector, growing their capacity geometrically
  // (up to max_blocks). Invariant: free_ and empty_ can each hold every id there is, so pushing
  // onto them (free_sequence, release_block, undo paths) and taking a free block never
  // reallocates; only an allocation of a new id may. Capacities only: on std::bad_alloc nothing
  // observable changed.
  void reserve_ids(std::size_t n) {
    if (id_capacity_ >= n) return;
    const std::size_t cap = std::max(
        n, std::min(static_cast<std::size_t>(max_blocks_),
                    std::max(2 * id_capacity_, std::size_t(16))));
    for (auto& base : layer_base_) base.reserve(cap);
    free_.reserve(cap);
    empty_.reserve(cap);
    blocks_.reserve(cap);
    refs_.reserve(cap);
    id_capacity_ = cap;
  }

  // Allocates one block's storage (an id without storage if there is one, else a new id) and
  // returns its id. Strong guarantee.
  std::int32_t allocate_block() {
    if (empty_.empty()) reserve_ids(blocks_.size() + 1);
    const std::size_t bytes = block_bytes();
    const std::size_t align = bytes >= kHugePage ? kHugePage : 64;
    std::unique_ptr<Scalar, BlockDeleter> owner(
        static_cast<Scalar*>(::operator new(bytes, std::align_val_t(align))), BlockDeleter{align});
#ifdef __linux__
    if (align == kHugePage) (void)::madvise(owner.get(), bytes, MADV_HUGEPAGE);
#endif
    // Room for a new id was reserved above (reserve_ids), so nothing below throws.
    std::int32_t id;
    if (!empty_.empty()) {
      id = empty_.back();
      empty_.pop_back();
    } else {
      id = static_cast<std::int32_t>(blocks_.size());
      blocks_.emplace_back();
      refs_.push_back(0);
      for (auto& base : layer_base_) base.push_back(nullptr);
    }
    for (std::size_t l = 0; l < layers_.size(); ++l)
      layer_base_[l][static_cast<std::size_t>(id)] = owner.get() + layers_[l].block_offset;
    blocks_[static_cast<std::size_t>(id)] = std::move(owner);
    return id;
  }

  // Frees the storage of block `id` (held by no sequence, and no longer on the free list once
  // the caller is done); its id is reused by the next allocation. Cannot throw.
  void release_block(std::int32_t id) noexcept {
    const auto i = static_cast<std::size_t>(id);
    blocks_[i].reset();
    for (auto& base : layer_base_) base[i] = nullptr;
    empty_.push_back(id);
  }

  std::vector<CacheLayout> layouts_;
  std::vector<LayerInfo> layers_;
  Index block_tokens_ = 0;
  Index max_blocks_ = 0;
  Index block_elements_ = 0;  // elements of one block, all layers
  bool huge_pages_ = false;   // blocks of ≥ 2 MiB with transparent huge pages on (SeqView)
  std::vector<std::unique_ptr<Scalar, BlockDeleter>> blocks_;  // [block id], null: no storage
  std::vector<std::vector<const Scalar*>> layer_base_;         // [layer][block id]
  std::vector<std::int32_t> free_;   // ids with storage that no sequence holds
  std::vector<std::int32_t> empty_;  // ids whose storage was released
  std::size_t id_capacity_ = 0;      // ids every per-id vector above has capacity for
  std::vector<Index> refs_;          // [block id] sequences holding it (0: free or no storage)
  std::vector<Sequence> seqs_;
  std::vector<std::int32_t> free_seqs_;  // free slots
  bool strict_ = false;                  // strict reservation mode
};

}  // namespace tpa
