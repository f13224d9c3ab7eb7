#include "threadpool.h"

#include <chrono>
#include <memory>

#include "spin.h"

namespace hi {

constexpr std::chrono::microseconds kSpin{1000};

ThreadPool::ThreadPool(int n) : n_(n < 1 ? 1 : n) {
  for (int t = 1; t < n_; ++t) threads_.emplace_back([this, t] { worker(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true, std::memory_order_relaxed);   // published by the release below
    state_.store((++gen_ << kGenShift) | kClosed, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& th : threads_) th.join();
}

void ThreadPool::run(const std::function<void(int)>& fn) {
  if (n_ == 1) { fn(0); return; }
  // The last job is closed and every worker that entered it has finished: nobody reads these.
  job_.store(&fn, std::memory_order_relaxed);
  finished_.store(0, std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lk(mu_);  // sleeping workers check the generation under it
    state_.store(++gen_ << kGenShift, std::memory_order_release);   // open, none entered
  }
  cv_.notify_all();
  fn(0);
  // fn(0) returned: every piece of work is claimed. Close the job; wait only for the workers
  // that entered it (they may still be in a claimed piece), never for one yet to arrive.
  const uint64_t s = state_.fetch_or(kClosed, std::memory_order_acq_rel);
  const int entered = int(s & kEntered);
  spin_until([&] { return finished_.load(std::memory_order_acquire) == entered; });
}

void ThreadPool::worker(int tid) {
  uint64_t seen = 0;   // the generation of the last job this worker woke for
  for (;;) {
    // Spin up to kSpin for the next job before sleeping on the condition variable: a decode
    // step calls every ~100-300 us, and a futex wake costs tens of microseconds. Timed, not
    // counted: a PAUSE is ~10 cycles on some x86 cores and ~140 on others.
    uint64_t s;
    const auto t0 = std::chrono::steady_clock::now();
    for (uint32_t i = 1; gen_of(s = state_.load(std::memory_order_acquire)) == seen; ++i) {
      cpu_relax();
      if ((i & 63) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) break;
    }
    if (gen_of(s) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return gen_of(state_.load(std::memory_order_acquire)) != seen; });
      s = state_.load(std::memory_order_acquire);
    }
    seen = gen_of(s);
    if (stop_.load(std::memory_order_relaxed)) return;   // after the acquire of its generation
    // Enter only the job of generation `seen`, only while it is open. Late (closed, or a later
    // generation already): skip it; the loop above then waits for / picks up the next one.
    while (!(s & kClosed) && gen_of(s) == seen) {
      if (state_.compare_exchange_weak(s, s + 1, std::memory_order_acquire,
                                       std::memory_order_acquire)) {
        (*job_.load(std::memory_order_relaxed))(tid);   // job_ stays put until we finish
        finished_.fetch_add(1, std::memory_order_release);
        break;
      }
    }
  }
}

static std::unique_ptr<ThreadPool> g_pool;
static std::mutex g_pool_mu;

static int default_threads() {
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? int(hc) : 1;
}

std::mutex& pool_lock() { return g_pool_mu; }

ThreadPool& pool() {  // caller holds pool_lock()
  if (!g_pool) g_pool = std::make_unique<ThreadPool>(default_threads());
  return *g_pool;
}

void set_num_threads(int n) {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  if (n < 1) n = default_threads();
  if (!g_pool || g_pool->size() != n) {
    g_pool.reset();
    g_pool = std::make_unique<ThreadPool>(n);
  }
}

int get_num_threads() {
  std::lock_guard<std::mutex> lk(g_pool_mu);
  return pool().size();
}

}  // namespace hi
