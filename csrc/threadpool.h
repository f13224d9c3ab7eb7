// A persistent thread pool: n-1 workers created once, the calling thread is tid 0.
//
// Contract of run(fn): fn(0) runs on the caller; while it runs the job is OPEN and any subset
// of the workers (none, some or all) may ENTER it and run fn(tid), each tid at most once per
// job. When fn(0) returns the job is closed (a worker that wakes later skips it), and run()
// returns once every worker that entered has returned from fn. So fn must not rely on every
// tid running: the work inside fn is claimed dynamically (chunks from an atomic counter, the
// caller's fn looping until they are exhausted), per-tid outputs start zeroed or unused, and a
// wait inside fn may only wait for work already claimed, never for a tid to arrive.
// Why: a worker whose core is taken by another process joins a scheduler time slice late; with
// "every worker runs fn" the call waited for it though the caller could have done the work
// (1024 x 4096 q4_0 linear, 2 threads, one core busy: a mean 595-1036 us a call -> 200-287, 1
// thread 112-268; benchmarks/results/pool_contention_dev2core.txt). A worker that entered and is
// preempted inside its chunk is still waited for (its chunk writes the caller's output).
// Workers spin up to 1 ms for the next job (decode calls come back-to-back), then sleep.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace hi {

class ThreadPool {
 public:
  explicit ThreadPool(int n);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  int size() const { return n_; }
  void run(const std::function<void(int)>& fn);

 private:
  void worker(int tid);
  // state_: generation << kGenShift | closed bit | entered count. The generation changes only
  // under mu_ (a sleeping worker's wait predicate reads it: no lost wake-up); entering is a CAS
  // that keeps the generation and requires the closed bit clear, so a worker that woke for an
  // older job can never enter a later one under the old one's name, nor enter one job twice.
  static constexpr int kGenShift = 32;
  static constexpr uint64_t kClosed = uint64_t(1) << 31;
  static constexpr uint64_t kEntered = kClosed - 1;
  static uint64_t gen_of(uint64_t s) { return s >> kGenShift; }

  int n_;
  uint64_t gen_ = 0;   // the caller's copy of the current generation (run / ~ThreadPool only)
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  // published before the job opens (release on state_): an entering worker reads it without
  // the mutex. Changed only while no worker is inside a job (the last one closed and drained).
  std::atomic<const std::function<void(int)>*> job_{nullptr};
  alignas(64) std::atomic<uint64_t> state_{kClosed};
  alignas(64) std::atomic<int> finished_{0};   // workers of the current job that have returned
  std::atomic<bool> stop_{false};
};

// The process-wide pool used by the kernels (created on first use; resized by set_num_threads).
// pool_lock() serialises native calls: one kernel call owns the pool at a time.
ThreadPool& pool();
std::mutex& pool_lock();
void set_num_threads(int n);
int get_num_threads();

}  // namespace hi
