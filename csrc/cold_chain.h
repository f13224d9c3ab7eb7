// The cold halves of one decode step, served by a host thread while the device runs ahead.
//
// The chained graph decoder (hybridinfer/graphs.py) enqueues a whole token's GPU work at once.
// For each layer with cold rows the device writes ready = 1 (a host-pinned int32) once the
// layer's FFN input, choice and masks are on the host, then waits (on the device) for done == 1
// before it adds the CPU half. A ColdChain's service thread serves those layers in order: spin
// for ready, reset it, run the layer's ColdStep (the cold rows into its pinned y), publish y,
// set done. The device resets done itself. So no host call sits between two layers' GPU work:
// the critical path is device -> flag -> CPU half -> flag -> device.
//
// Errors (an expert id out of range, or a flag that never comes within the timeout) do not
// stall the device: the service thread zeroes that layer's y, sets done for it and every later
// layer, and end() rethrows the first error.
//
// Run-ahead decode (GraphDecoder.stream) enqueues token t+1's graph before the host reads token
// t: up to kAhead tokens are begun and not yet ended. The thread serves them in order (token
// t+1's ready flags can only come after token t's device work, one stream); each has its own
// error slot, so end() of token t never sees token t+1's error.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "cold_step.h"

namespace hi {

struct ColdLink {
  ColdStep* step;        // the layer's cold half (owned by the caller, outlives the chain)
  int32_t* ready;        // set to 1 by the device; reset to 0 here
  int32_t* done;         // set to 1 here after y is written; reset by the device
  float* y;              // the step's output (zeroed on an error)
  int d;
};

// Spin until *flag == 1 (acquire), up to timeout_s; then store 0 when reset. false: timed out
// (or *cancel became true).
bool wait_flag(int32_t* flag, double timeout_s, bool reset, const std::atomic<bool>* cancel = nullptr);

class ColdChain {
 public:
  ColdChain(std::vector<ColdLink> links, double timeout_s);
  ~ColdChain();
  ColdChain(const ColdChain&) = delete;
  ColdChain& operator=(const ColdChain&) = delete;
  static constexpr uint64_t kAhead = 2;   // tokens begun and not ended, at most
  // Start serving one more token's links (at most kAhead tokens in flight: else logic_error).
  void begin();
  // Wait until every link of the oldest token in flight was served; rethrow its first error.
  // cancel: stop waiting for flags that will not come (the caller failed before enqueuing the
  // device work) and end every token in flight; the links not yet served get done = 1 and a
  // zero y; nothing is rethrown.
  void end(bool cancel = false);
  // Accumulated since construction: seconds in ColdStep::run, seconds spinning for ready
  // flags, flags waited for.
  double busy_s() const { return busy_s_; }
  double wait_s() const { return wait_s_; }
  int64_t waits() const { return waits_; }

 private:
  void serve();
  std::exception_ptr serve_token();
  std::vector<ColdLink> links_;
  double timeout_s_;
  std::thread th_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t gen_ = 0;                 // tokens begun (guarded by mu_)
  uint64_t ended_ = 0;               // tokens ended (guarded by mu_)
  std::atomic<uint64_t> served_{0};  // tokens fully served
  std::atomic<bool> cancel_{false};
  bool stop_ = false;
  // token t's first error, slot t % kAhead: written by the thread before served_ passes t,
  // read and cleared by end() (the slot is not reused before that end: begin's limit)
  std::exception_ptr err_[kAhead];
  double busy_s_ = 0, wait_s_ = 0;
  int64_t waits_ = 0;
};

}  // namespace hi
