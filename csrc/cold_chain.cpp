// ColdChain (see cold_chain.h): one persistent service thread per chain; it spins on the
// device's flags (host-pinned memory the device writes over PCIe) and runs the cold steps.
#include "cold_chain.h"

#include <chrono>
#include <cstring>
#include <stdexcept>
#include <string>
#include "spin.h"

namespace hi {

using Clock = std::chrono::steady_clock;

static inline int32_t load_acquire(int32_t* p) {
  return __atomic_load_n(p, __ATOMIC_ACQUIRE);
}
static inline void store_release(int32_t* p, int32_t v) {
  __atomic_store_n(p, v, __ATOMIC_RELEASE);
}

bool wait_flag(int32_t* flag, double timeout_s, bool reset, const std::atomic<bool>* cancel) {
  const Clock::time_point t0 = Clock::now();
  for (uint32_t i = 0; load_acquire(flag) != 1; ++i) {
    if ((i & 1023) == 1023) {       // a clock read and a cancel check every ~1k pauses
      if (cancel && cancel->load(std::memory_order_relaxed)) return false;
      if (std::chrono::duration<double>(Clock::now() - t0).count() > timeout_s) return false;
    }
    cpu_relax();
  }
  if (reset) store_release(flag, 0);
  return true;
}

ColdChain::ColdChain(std::vector<ColdLink> links, double timeout_s)
    : links_(std::move(links)), timeout_s_(timeout_s) {
  for (const ColdLink& k : links_)
    if (!k.step || !k.ready || !k.done || !k.y || k.d <= 0)
      throw std::invalid_argument("ColdChain: every link needs a step, two flags and y");
  if (!(timeout_s_ > 0)) throw std::invalid_argument("ColdChain: timeout must be > 0");
  th_ = std::thread([this] { serve(); });
}

ColdChain::~ColdChain() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_ = true;
    cancel_.store(true);
  }
  cv_.notify_all();
  th_.join();
}

void ColdChain::begin() {
  std::lock_guard<std::mutex> lk(mu_);
  if (gen_ - ended_ >= kAhead)
    throw std::logic_error("ColdChain: begin() with " + std::to_string(kAhead) +
                           " tokens in flight (end() the oldest first)");
  if (gen_ == ended_) cancel_.store(false);   // nothing in flight: a past cancel is over
  ++gen_;
  cv_.notify_all();
}

void ColdChain::end(bool cancel) {
  uint64_t want;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (gen_ == ended_) return;
    want = cancel ? gen_ : ended_ + 1;
  }
  if (cancel) cancel_.store(true);
  // the token's device work takes milliseconds: spin briefly, then yield
  spin_until([&] { return served_.load(std::memory_order_acquire) >= want; });
  std::exception_ptr e;
  {
    std::lock_guard<std::mutex> lk(mu_);
    for (uint64_t t = ended_ + 1; t <= want; ++t) {
      std::exception_ptr& slot = err_[t % kAhead];
      if (!e) e = slot;
      slot = nullptr;
    }
    ended_ = want;
  }
  if (e && !cancel) std::rethrow_exception(e);
}

void ColdChain::serve() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lk(mu_);
      cv_.wait(lk, [&] { return stop_ || gen_ != seen; });
      if (stop_) return;
    }
    ++seen;                                   // the tokens in order, one at a time
    err_[seen % kAhead] = serve_token();
    served_.store(seen, std::memory_order_release);
  }
}

std::exception_ptr ColdChain::serve_token() {
  std::exception_ptr err;
  size_t i = 0;
  for (; i < links_.size(); ++i) {
    const ColdLink& k = links_[i];
    const Clock::time_point t0 = Clock::now();
    const bool ok = wait_flag(k.ready, timeout_s_, /*reset=*/true, &cancel_);
    const Clock::time_point t1 = Clock::now();
    wait_s_ += std::chrono::duration<double>(t1 - t0).count();
    ++waits_;
    if (!ok) {
      if (!cancel_.load())
        err = std::make_exception_ptr(std::runtime_error(
            "ColdChain: the device did not signal link " + std::to_string(i) + " within " +
            std::to_string(timeout_s_) + " s"));
      break;
    }
    try {
      k.step->run();
    } catch (...) {
      err = std::current_exception();
      std::memset(k.y, 0, sizeof(float) * size_t(k.d));
      store_release(k.done, 1);
      ++i;
      break;
    }
    busy_s_ += std::chrono::duration<double>(Clock::now() - t1).count();
    store_release(k.done, 1);    // y's stores are visible before done (release)
  }
  for (; i < links_.size(); ++i) {  // after an error: unblock the device for the rest
    std::memset(links_[i].y, 0, sizeof(float) * size_t(links_[i].d));
    store_release(links_[i].done, 1);
  }
  return err;
}

}  // namespace hi
