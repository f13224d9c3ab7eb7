#include "threadpool.h"

#include <memory>
#include "spin.h"

namespace hi {

ThreadPool::ThreadPool(int n) : n_(n < 1 ? 1 : n) {
  for (int t = 1; t < n_; ++t) threads_.emplace_back([this, t] { worker(t); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    gen_.fetch_add(1);
  }
  cv_.notify_all();
  for (auto& th : threads_) th.join();
}

void ThreadPool::run(const std::function<void(int)>& fn) {
  if (n_ == 1) { fn(0); return; }
  {
    std::lock_guard<std::mutex> lk(mu_);
    job_ = &fn;
    pending_.store(n_ - 1);
    gen_.fetch_add(1, std::memory_order_release);
  }
  cv_.notify_all();
  fn(0);
  // Workers finish at about the same time as we do: spin, yielding now and then.
  for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) {
    if (i < 4096) cpu_relax(); else std::this_thread::yield();
  }
}

void ThreadPool::worker(int tid) {
  uint64_t seen = 0;
  for (;;) {
    // Spin ~tens of microseconds for the next job before sleeping on the condition variable.
    for (int i = 0; i < 20000 && gen_.load(std::memory_order_acquire) == seen; ++i) cpu_relax();
    const std::function<void(int)>* job;
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return gen_.load() != seen; });
      seen = gen_.load();
      if (stop_) return;
      job = job_;
    }
    (*job)(tid);
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
