// Execution context: the thread pool and the scratch arena a layer call runs with.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <new>
#include <thread>
#include <vector>

#define EIGEN_USE_THREADS
#include <unsupported/Eigen/CXX11/ThreadPool>

#include "tpa/core/error.hpp"
#include "tpa/core/tensor.hpp"

namespace tpa {

/// \brief Bump allocator for per-call temporaries. Memory handed out stays valid until released
/// back to an earlier mark; chunks are never moved. After warm-up (once the largest call has
/// run) it allocates nothing.
class Scratch {
 public:
  struct Mark {
    std::size_t chunk = 0;
    std::size_t offset = 0;
  };

  Scratch() = default;
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  /// 64-byte aligned uninitialised storage for n floats.
  float* floats(Index n) { return static_cast<float*>(bytes(static_cast<std::size_t>(n) * 4)); }

  /// 64-byte aligned uninitialised storage of `n` bytes.
  void* bytes(std::size_t n) {
    n = (n + 63) / 64 * 64;
    if (chunks_.empty() || cur_.offset + n > chunks_[cur_.chunk].size) {
      // Move to the next chunk that fits, or add one.
      std::size_t c = chunks_.empty() ? 0 : cur_.chunk + 1;
      while (c < chunks_.size() && chunks_[c].size < n) ++c;
      if (c >= chunks_.size()) {
        std::size_t size = std::max<std::size_t>(n, capacity() + (1u << 16));
        chunks_.push_back(Chunk{allocate(size), size});
        c = chunks_.size() - 1;
      }
      cur_ = Mark{c, 0};
    }
    void* p = chunks_[cur_.chunk].data.get() + cur_.offset;
    cur_.offset += n;
    return p;
  }

  /// Position to release back to.
  Mark mark() const { return cur_; }

  /// Releases everything handed out since `m`. Releasing to an empty arena that grew to several
  /// chunks merges them into one, so the next use is served from a single chunk (if that
  /// allocation fails, the chunks are kept as they are). Cannot throw.
  void release(Mark m) noexcept {
    cur_ = m;
    if (m.chunk == 0 && m.offset == 0 && chunks_.size() > 1) {
      const std::size_t total = capacity();
      try {
        Chunk merged{allocate(total), total};
        chunks_.clear();
        chunks_.push_back(std::move(merged));  // capacity ≥ 1 after clear(): no allocation
      } catch (const std::bad_alloc&) {
      }
    }
  }

  /// Bytes held in all chunks.
  std::size_t capacity() const {
    std::size_t n = 0;
    for (const auto& c : chunks_) n += c.size;
    return n;
  }

 private:
  // Chunks come from aligned operator new (so that tests can make them fail like any other
  // allocation).
  struct FreeDeleter {
    void operator()(unsigned char* p) const { ::operator delete(p, std::align_val_t(64)); }
  };
  struct Chunk {
    std::unique_ptr<unsigned char[], FreeDeleter> data;
    std::size_t size = 0;
  };
  static std::unique_ptr<unsigned char[], FreeDeleter> allocate(std::size_t n) {
    return std::unique_ptr<unsigned char[], FreeDeleter>(
        static_cast<unsigned char*>(::operator new(n, std::align_val_t(64))));
  }

  std::vector<Chunk> chunks_;
  Mark cur_;
};

/// Releases a Scratch back to where it was when the guard was made.
class ScratchGuard {
 public:
  explicit ScratchGuard(Scratch& s) : s_(s), m_(s.mark()) {}
  ~ScratchGuard() { s_.release(m_); }
  ScratchGuard(const ScratchGuard&) = delete;
  ScratchGuard& operator=(const ScratchGuard&) = delete;

 private:
  Scratch& s_;
  Scratch::Mark m_;
};

/// \brief What a layer call runs with: a thread pool and a scratch arena. Owned by the caller
/// and passed to every call. Not thread-safe: one calling thread at a time, so each thread that
/// calls layers needs its own Context (the pool's threads work only inside that thread's calls).
class Context {
 public:
  /// \param threads worker threads a call may use, including the calling thread (≥ 1).
  /// \throws Error if threads < 1.
  explicit Context(int threads = 1) : threads_(threads) {
    TPA_CHECK(threads >= 1, "Context: threads (", threads, ") must be >= 1");
    if (threads_ > 1) pool_ = std::make_unique<Eigen::ThreadPool>(threads_ - 1);
  }

  int threads() const { return threads_; }
  Scratch& scratch() { return scratch_; }

  /// Runs f(i) for i in [0, n), spread over the threads; returns when all are done.
  /// f must not throw.
  ///
  /// The calling thread runs the first share and then waits for the others by spinning on an
  /// atomic counter (with a pause, then yielding the core after kSpinPauses rounds): no lock
  /// and no sleep, so the join costs about a microsecond instead of a futex wake-up of the
  /// caller (tens of microseconds on a VM), paid by every parallel region of a decode step.
  template <class F>
  void parallel_for(Index n, const F& f) {
    if (n <= 0) return;
    const Index parts = std::min<Index>(n, threads_);
    if (parts <= 1) {
      for (Index i = 0; i < n; ++i) f(i);
      return;
    }
    struct Job {
      const F* f;
      Index n, parts;
      std::atomic<Index> pending;
      void run(Index part) const {
        for (Index i = part * n / parts; i < (part + 1) * n / parts; ++i) (*f)(i);
      }
    } job{&f, n, parts, {parts - 1}};
    Job* jp = &job;
    for (Index p = 1; p < parts; ++p) {
      pool_->Schedule([jp, p] {
        jp->run(p);
        jp->pending.fetch_sub(1, std::memory_order_release);  // last touch of *jp
      });
    }
    job.run(0);
    for (long spins = 0; job.pending.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kSpinPauses)
        cpu_pause();
      else
        std::this_thread::yield();
    }
  }

 private:
  /// Pause rounds of a join before it yields its core (0.01–0.2 ms, by the core's pause
  /// latency): the other shares of a decode step's regions finish within it; a longer wait (an
  /// unbalanced prefill, more threads than cores) leaves the core to other threads.
  static constexpr long kSpinPauses = 1 << 12;

  static void cpu_pause() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) && defined(__GNUC__)
    asm volatile("yield");
#endif
  }

  int threads_;
  std::unique_ptr<Eigen::ThreadPool> pool_;
  Scratch scratch_;
};

}  // namespace tpa
