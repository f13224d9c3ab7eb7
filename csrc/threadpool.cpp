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
    stop_.store(true, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  for (auto& th : threads_) th.join();
}

void ThreadPool::run(const std::function<void(int)>& fn) {
  if (n_ == 1) { fn(0); return; }
  {
    std::lock_guard<std::mutex> lk(mu_);  // sleeping workers check gen_ under it (no lost wake)
    job_.store(&fn, std::memory_order_relaxed);
    pending_.store(n_ - 1, std::memory_order_relaxed);
    gen_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  fn(0);
  // Workers finish at about the same time as we do: spin, yielding now and then.
  spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
}

void ThreadPool::worker(int tid) {
  uint64_t seen = 0;
  for (;;) {
    // Spin up to kSpin for the next job before sleeping on the condition variable: a decode
    // step calls every ~100-300 us, and a futex wake costs tens of microseconds. Timed, not
    // counted: a PAUSE is ~10 cycles on some x86 cores and ~140 on others.
    uint64_t g = seen;
    const auto t0 = std::chrono::steady_clock::now();
    for (uint32_t i = 1; (g = gen_.load(std::memory_order_acquire)) == seen; ++i) {
      cpu_relax();
      if ((i & 63) == 0 && std::chrono::steady_clock::now() - t0 > kSpin) break;
    }
    if (g == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return gen_.load() != seen; });
      g = gen_.load();
    }
    seen = g;
    if (stop_.load(std::memory_order_acquire)) return;
    // the next run() waits for this job to finish, so job_ still holds it
    (*job_.load(std::memory_order_acquire))(tid);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
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
