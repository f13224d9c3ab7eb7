// A persistent thread pool: n-1 workers created once, the calling thread is worker 0.
// run(fn) calls fn(tid) on every thread (tid < size()) and returns when all have finished;
// the work inside fn is split by the caller (e.g. chunks claimed from an atomic counter).
// Workers spin up to 1 ms for the next job (decode calls come back-to-back), then sleep.
#pragma once
#include <atomic>
#include <condition_variable>
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
  int n_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable cv_;
  // published before gen_ (release): a worker that sees the new gen_ while spinning reads the
  // job without the mutex (at 8 threads, 7 workers taking one mutex in turn cost microseconds)
  std::atomic<const std::function<void(int)>*> job_{nullptr};
  std::atomic<uint64_t> gen_{0};       // bumped once per job
  std::atomic<int> pending_{0};        // workers still running the current job
  std::atomic<bool> stop_{false};
};

// The process-wide pool used by the kernels (created on first use; resized by set_num_threads).
// pool_lock() serialises native calls: one kernel call owns the pool at a time.
ThreadPool& pool();
std::mutex& pool_lock();
void set_num_threads(int n);
int get_num_threads();

}  // namespace hi
