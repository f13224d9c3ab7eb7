// The cold half of one layer for one decode step, bound once to a decoder's static buffers.
//
// The CUDA-graph decoder (hybridinfer/graphs.py) copies into pinned host buffers, per layer: the
// FFN input x [d] f32, the router's choice (expert ids int64 [k], weights f32 [k]) and each
// expert's predicted mask (bool [n_ff] over all neurons). A ColdStep holds pointers to those
// buffers and to the experts' compact cold rows, so the per-layer host work is one call with no
// arguments: read the choice, turn each chosen expert's mask into ids of its cold rows
// (neuron[r] = the neuron of cold row r), and run ffn_sparse_multi into y [d] (f32, overwritten;
// zero when no chosen expert has cold rows). Python builds the id lists no more.
#pragma once
#include <cstdint>
#include <vector>

#include "ffn.h"

namespace hi {

struct ColdExpert {
  FFNDesc f;                       // the compact cold rows (f.n_ff = n_cold; 0: no cold rows)
  std::vector<int32_t> neuron;     // [n_cold] neuron id of each cold row (< mask length)
  const uint8_t* mask = nullptr;   // bool [n_ff] (predicted active), nullptr: every cold row
};

class ColdStep {
 public:
  // experts[e] for e < E; sel/w: the router's buffers (k entries) or nullptr for a dense layer
  // (expert 0, weight 1). slot_masks: when set, slot s's mask (bool over neurons) is
  // slot_masks + s * slot_stride, whatever expert it chose (the decoder whose experts are chosen
  // on the device copies the k chosen masks, not E), and the experts' own masks are unused.
  // Validates shapes once (std::invalid_argument).
  ColdStep(std::vector<ColdExpert> experts, int d, const int64_t* sel, const float* w, int k,
           const float* x, float* y, Act act, float threshold, bool exact,
           const uint8_t* slot_masks = nullptr, int64_t slot_stride = 0);
  // One step (call with the buffers filled). Throws std::invalid_argument on an expert id out of
  // range (a corrupt buffer), never reads outside the bound buffers.
  void run();
  // Cold rows computed by the last run(), summed over the chosen experts (for tests/stats).
  int64_t last_rows() const { return last_rows_; }

 private:
  std::vector<ColdExpert> ex_;
  const int64_t* sel_;
  const float* w_;
  int k_;
  const float* x_;
  float* y_;
  Act act_;
  float thr_;
  bool exact_;
  const int d_;
  const uint8_t* slot_masks_;
  int64_t slot_stride_;
  std::vector<std::vector<int32_t>> ids_;   // per slot, reused
  struct Call {                             // ffn_sparse_multi's arguments, reused per step
    std::vector<FFNDesc> f;
    std::vector<const int32_t*> ids;
    std::vector<int64_t> k;
    std::vector<float> scale;
  } call_;
  std::vector<int32_t> all_;                // 0 .. max n_cold - 1 (masks absent)
  int64_t last_rows_ = 0;
};

}  // namespace hi
