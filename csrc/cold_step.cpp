// ColdStep (see cold_step.h): mask -> cold-row ids on the calling thread (a scan of n_cold
// bytes, a few microseconds), then the fused cold FFNs of the chosen experts on the pool.
#include "cold_step.h"

#include <cstring>
#include <numeric>
#include <stdexcept>
#include <string>

namespace hi {

ColdStep::ColdStep(std::vector<ColdExpert> experts, int d, const int64_t* sel, const float* w,
                   int k, const float* x, float* y, Act act, float threshold, bool exact,
                   const uint8_t* slot_masks, int64_t slot_stride)
    : ex_(std::move(experts)), sel_(sel), w_(w), k_(k), x_(x), y_(y), act_(act),
      thr_(threshold), exact_(exact), d_(d), slot_masks_(slot_masks), slot_stride_(slot_stride) {
  if (ex_.empty() || d_ <= 0) throw std::invalid_argument("ColdStep: no experts or d_model <= 0");
  if (!x_ || !y_) throw std::invalid_argument("ColdStep: x and y buffers are required");
  if (sel_ ? (k_ < 1 || !w_) : k_ != 1)
    throw std::invalid_argument("ColdStep: a router needs k >= 1 ids and weights; a dense layer k = 1");
  int max_cold = 0;
  for (const ColdExpert& e : ex_) {
    if (e.f.n_ff == 0) continue;
    if (e.f.d != d_) throw std::invalid_argument("ColdStep: experts differ in d_model");
    if (int64_t(e.neuron.size()) != e.f.n_ff)
      throw std::invalid_argument("ColdStep: one neuron id per cold row is needed");
    max_cold = std::max(max_cold, e.f.n_ff);
  }
  if (slot_masks_) {                       // every slot's mask must cover its expert's neurons
    for (const ColdExpert& e : ex_)
      for (int32_t v : e.neuron)
        if (v < 0 || v >= slot_stride_)
          throw std::invalid_argument("ColdStep: a cold row's neuron id is outside the slot masks");
  }
  all_.resize(size_t(max_cold));
  std::iota(all_.begin(), all_.end(), 0);
  ids_.resize(size_t(k_));
}

void ColdStep::run() {
  std::vector<FFNDesc>& fs = call_.f;       // reused: no allocation per step
  std::vector<const int32_t*>& idp = call_.ids;
  std::vector<int64_t>& ks = call_.k;
  std::vector<float>& sc = call_.scale;
  fs.clear(); idp.clear(); ks.clear(); sc.clear();
  last_rows_ = 0;
  for (int s = 0; s < k_; ++s) {
    const int64_t e = sel_ ? sel_[s] : 0;
    if (e < 0 || e >= int64_t(ex_.size()))
      throw std::invalid_argument("ColdStep: expert id " + std::to_string(e) + " out of range");
    const ColdExpert& ce = ex_[size_t(e)];
    if (ce.f.n_ff == 0) continue;
    const int32_t* ids = all_.data();
    int64_t n = ce.f.n_ff;
    const uint8_t* mask = slot_masks_ ? slot_masks_ + s * slot_stride_ : ce.mask;
    if (mask) {
      // branch-free compaction: at ~15% of rows set, a branch per row mispredicts often
      // (2 experts of 12750 cold rows, M47 at 8 GiB, none set, 1 thread, dev VM: 15.5 -> 11.4 us)
      std::vector<int32_t>& v = ids_[size_t(s)];
      v.resize(size_t(ce.f.n_ff));
      const int32_t* nr = ce.neuron.data();
      int32_t* out = v.data();
      int64_t m = 0;
      for (int32_t r = 0; r < ce.f.n_ff; ++r) {
        out[m] = r;
        m += mask[nr[r]] != 0;
      }
      ids = v.data();
      n = m;
    }
    if (n == 0) continue;
    fs.push_back(ce.f);
    idp.push_back(ids);
    ks.push_back(n);
    sc.push_back(w_ ? w_[s] : 1.f);
    last_rows_ += n;
  }
  if (fs.empty()) {
    std::memset(y_, 0, sizeof(float) * size_t(d_));
    return;
  }
  // the ids were made just above (ascending, in range): not checked again per step
  ffn_sparse_multi(fs.data(), int(fs.size()), x_, 1, idp.data(), ks.data(), sc.data(), act_, thr_,
                   exact_, y_, /*trusted_ids=*/true);
}

}  // namespace hi
