// One decode step's small float32 operations on the CPU, in native code: the RMSNorm and the
// attention of one new token over its KV cache. In torch each is ~5-20 small ops of ~5-10 us
// dispatch apiece on the dev VM (~15 ms a token for M7's 32 layers, more than the weights' read
// time of a layer); here each is one call. Arithmetic through the f32 kernels of the active
// table (dot for q.k, axpy for p.V), so the scalar reference and AVX2 share this driver.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels.h"

namespace hi {

// y [n, d] = w * s / sqrt(mean(s^2) + eps), row by row, with s = x + add (add may be null:
// s = x); s is stored into sum when sum is not null (the residual stream of a decoder layer:
// x + attention's output, then the FFN norm, in one pass). float32; the sum of squares in double.
void rms_norm(const float* x, const float* add, const float* w, int n, int d, float eps,
              float* sum, float* y);

// One token's grouped-query attention, b = 1. q [H, hd], k / v [KV, hd] (the projections of the
// new token); caches kc / vc [KV, cap, hd] (one layer of KVCache, batch 1). cos / sin [hd]: the
// RoPE row of position pos (rotate-half layout). Steps: rope(q), rope(k); k, v written at
// position pos of the caches; then per query head h (KV head h / (H / KV)):
//   y[h] = softmax_s(q_h . kc[s] * scale) . vc[s] over s in [lo, pos]   (lo: sliding window)
// y [H, hd] f32 (overwritten). q is not modified. KV heads are split over the pool when the
// cache span read is large (kSerialBytes, as the FFN drivers).
void attend_one(const float* q, const float* k, const float* v, float* kc, float* vc, int H,
                int KV, int hd, int cap, int pos, int lo, const float* cos, const float* sin,
                float scale, float* y);

// A dense linear layer's packed rows (ffn.h's linear): n rows of row_bytes(fmt, d) at w.
struct LinearDesc {
  Fmt fmt;
  int d, n;
  const uint8_t* w;
};

// One decoder layer's attention half for one token, bound once to its weights and its KV cache
// (batch 1): run() is
//   s = x (+ add);  y = attend_one(qkv(rms_norm(s) * norm1));  x_out = s + o(y);
//   h = rms_norm(x_out) * norm2
// qkv: q, k and v stacked ([H*hd + 2*KV*hd] rows); add: the previous layer's FFN output or
// null. One call instead of four native calls and the Python between them (~140 us a layer
// on the 2-core dev VM: wrappers, checks, views).
class AttnStep {
 public:
  AttnStep(const float* norm1, LinearDesc qkv, LinearDesc o, const float* norm2, float eps,
           float* kc, float* vc, int H, int KV, int hd, int cap);
  void run(const float* x, const float* add, int pos, int lo, const float* cos, const float* sin,
           float* x_out, float* h);

 private:
  const float* n1_;
  const float* n2_;
  LinearDesc qkv_, o_;
  float eps_;
  float* kc_;
  float* vc_;
  int H_, KV_, hd_, cap_, d_;
  std::vector<float> s_, xn_, qkvo_, y_, ao_;   // scratch: [d], [d], [qkv rows], [H*hd], [d]
};

}  // namespace hi
