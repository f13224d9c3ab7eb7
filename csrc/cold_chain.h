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
  // Start serving one token's links (the previous token must have ended).
  void begin();
  // Wait until every link of the token was served; rethrow the first error. cancel: stop
  // waiting for flags that will not come (the caller failed before enqueuing the device work);
  // the links not yet served get done = 1 and a zero y.
  void end(bool cancel = false);
  // Accumulated since construction: seconds in ColdStep::run, seconds spinning for ready
  // flags, flags waited for.
  double busy_s() const { return busy_s_; }
  double wait_s() const { return wait_s_; }
  int64_t waits() const { return waits_; }

 private:
  void serve();
  void serve_token();
  std::vector<ColdLink> links_;
  double timeout_s_;
  std::thread th_;
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t gen_ = 0;                 // tokens begun (guarded by mu_)
  std::atomic<uint64_t> served_{0};  // tokens fully served
  std::atomic<bool> cancel_{false};
  bool stop_ = false;
  bool active_ = false;              // between begin() and end()
  std::exception_ptr err_;
  double busy_s_ = 0, wait_s_ = 0;
  int64_t waits_ = 0;
};

}  // namespace hi
