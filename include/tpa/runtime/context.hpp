// Execution context: the thread pool and the scratch arena a layer call runs with.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <new>
#include <thread>
#include <vector>


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

namespace detail {

/// \brief The worker threads of a Context: `workers` std::threads that run the shares of one
/// parallel region at a time. A region is published by bumping a generation counter; a worker
/// that has seen no new generation for `spin` keeps polling it (so a decode step's regions, and
/// steps that follow each other, start on cores that stayed awake, with their L1/L2 still
/// holding what the previous step left there), then sleeps on a condition variable until the
/// next one. Only that sleep and the wake-up take the mutex: back-to-back regions take no lock.
class SpinPool {
 public:
  using Task = void (*)(const void* arg, Index part);

  SpinPool(int workers, std::chrono::nanoseconds spin) : spin_(spin) {
    threads_.reserve(static_cast<std::size_t>(workers));
    try {
      for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { work(i); });
    } catch (...) {
      shut_down();
      throw;
    }
  }
  SpinPool(const SpinPool&) = delete;
  SpinPool& operator=(const SpinPool&) = delete;
  ~SpinPool() { shut_down(); }

  /// Runs task(arg, p) for p in [1, parts) on the workers (worker i runs part i + 1) and
  /// task(arg, 0) on the calling thread; returns when all are done. parts ≤ workers + 1.
  void run(Task task, const void* arg, Index parts) {
    task_ = task;
    arg_ = arg;
    parts_ = parts;
    pending_.store(static_cast<int>(threads_.size()), std::memory_order_relaxed);
    publish();
    task(arg, 0);
    // Every worker acknowledges every generation, so when this returns none of them reads
    // task_/arg_ any more and the next run() may overwrite them.
    for (long spins = 0; pending_.load(std::memory_order_acquire) != 0; ++spins) {
      if (spins < kJoinPauses)
        cpu_pause();
      else
        std::this_thread::yield();
    }
  }

  static void cpu_pause() {
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
    __builtin_ia32_pause();
#elif defined(__aarch64__) && defined(__GNUC__)
    asm volatile("yield");
#endif
  }

 private:
  /// Pause rounds of the caller's join before it yields its core (0.01–0.2 ms, by the core's
  /// pause latency): the other shares of a decode step's regions finish within it.
  static constexpr long kJoinPauses = 1 << 12;
  /// A polling worker checks the clock every this many pauses, and after kPollAlone of
  /// polling also yields its core at each check (where threads outnumber cores, the thread
  /// whose work it waits for may need it).
  static constexpr int kPausesPerCheck = 64;
  static constexpr std::chrono::microseconds kPollAlone{100};

  // A new generation; wakes sleeping workers. seq_cst on generation_ and sleepers_ (here and
  // in wait_for_region): either this sees the worker's sleepers_ increment, or the worker sees
  // the new generation before it waits.
  void publish() {
    generation_.fetch_add(1, std::memory_order_seq_cst);
    if (sleepers_.load(std::memory_order_seq_cst) > 0) {
      { std::lock_guard<std::mutex> lock(mutex_); }
      wake_.notify_all();
    }
  }

  std::uint64_t wait_for_region(std::uint64_t seen) {
    using Clock = std::chrono::steady_clock;
    const auto start = Clock::now();
    for (int k = 1;; ++k) {
      const std::uint64_t g = generation_.load(std::memory_order_acquire);
      if (g != seen) return g;
      cpu_pause();
      if (k % kPausesPerCheck == 0) {
        const auto waited = Clock::now() - start;
        if (waited >= spin_) break;
        if (waited >= kPollAlone) std::this_thread::yield();
      }
    }
    std::unique_lock<std::mutex> lock(mutex_);
    sleepers_.fetch_add(1, std::memory_order_seq_cst);
    wake_.wait(lock, [&] { return generation_.load(std::memory_order_seq_cst) != seen; });
    sleepers_.fetch_sub(1, std::memory_order_relaxed);
    return generation_.load(std::memory_order_acquire);
  }

  void work(int i) {
    std::uint64_t seen = 0;
    for (;;) {
      seen = wait_for_region(seen);
      if (stop_.load(std::memory_order_acquire)) return;
      if (i + 1 < parts_) task_(arg_, i + 1);
      pending_.fetch_sub(1, std::memory_order_release);  // last touch of the region
    }
  }

  void shut_down() noexcept {
    stop_.store(true, std::memory_order_release);
    publish();
    for (auto& t : threads_) t.join();
    threads_.clear();
  }

  std::chrono::nanoseconds spin_;
  std::vector<std::thread> threads_;
  // The current region: written by run() before it publishes the generation, read by the
  // workers after they acquire it.
  Task task_ = nullptr;
  const void* arg_ = nullptr;
  Index parts_ = 0;
  std::atomic<std::uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> stop_{false};
  std::mutex mutex_;
  std::condition_variable wake_;
};

}  // namespace detail

/// \brief What a layer call runs with: worker threads and a scratch arena. Owned by the caller
/// and passed to every call. Not thread-safe: one calling thread at a time, so each thread that
/// calls layers needs its own Context (its workers run only inside that thread's calls).
class Context {
 public:
  /// How long an idle worker keeps polling for the next parallel region before it sleeps.
  static constexpr std::chrono::microseconds kDefaultSpin{2000};

  /// \param threads threads a call may use, including the calling thread (≥ 1).
  /// \param spin how long each of the threads − 1 workers polls (keeps its core busy) after a
  /// region before it sleeps: a region that starts within it takes no wake-up (tens of
  /// microseconds on a VM) and no lock; 0 sleeps at once.
  /// \throws Error if threads < 1 or spin is negative.
  explicit Context(int threads = 1, std::chrono::microseconds spin = kDefaultSpin)
      : threads_(threads) {
    TPA_CHECK(threads >= 1, "Context: threads (", threads, ") must be >= 1");
    TPA_CHECK(spin.count() >= 0, "Context: spin (", spin.count(), " us) must be >= 0");
    if (threads_ > 1) pool_ = std::make_unique<detail::SpinPool>(threads_ - 1, spin);
  }

  int threads() const { return threads_; }
  Scratch& scratch() { return scratch_; }

  /// Runs f(i) for i in [0, n), spread over the threads in contiguous shares (the calling
  /// thread runs the first); returns when all are done. f must not throw.
  ///
  /// The calling thread waits for the others by spinning on an atomic counter (with a pause,
  /// then yielding its core): no lock and no sleep, so the join costs about a microsecond.
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
    } job{&f, n, parts};
    pool_->run(
        [](const void* arg, Index part) {
          const Job& j = *static_cast<const Job*>(arg);
          for (Index i = part * j.n / j.parts; i < (part + 1) * j.n / j.parts; ++i) (*j.f)(i);
        },
        &job, parts);
  }

 private:
  int threads_;
  std::unique_ptr<detail::SpinPool> pool_;
  Scratch scratch_;
};

}  // namespace tpa
