// Decode-step RMSNorm and attention on the CPU (see attention.h).
#include "attention.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <vector>

#include "ffn.h"
#include "kernels.h"
#include "threadpool.h"

namespace hi {
namespace {

// Below this many cache bytes read (K and V over the span) the call stays on the calling
// thread: as the FFN drivers' kSerialBytes, a pool hand-off costs more than such work.
constexpr size_t kSerialBytes = size_t(256) << 10;

// x [hd] rotated by the RoPE row (rotate-half: the pair (i, i + hd/2)) into out [hd]; torch's
// x * cos + cat(-x2, x1) * sin in the same order of operations.
inline void rope(const float* x, const float* cos, const float* sin, int hd, float* out) {
  const int h = hd / 2;
  for (int i = 0; i < h; ++i) {
    out[i] = x[i] * cos[i] + (-x[i + h]) * sin[i];
    out[i + h] = x[i + h] * cos[i + h] + x[i] * sin[i + h];
  }
}

// KV head g's query heads [rep, hd] (rows of qr) against cache positions [lo, pos] -> y [rep, hd].
void attend_group(const Kernels& K, const float* qr, const float* kc, const float* vc, int rep,
                  int hd, int lo, int pos, float scale, float* y) {
  const int span = pos - lo + 1;
  thread_local std::vector<float> sc, coef;   // scores [rep, span]; p transposed [span, rep]
  thread_local std::vector<const uint8_t*> rows;
  sc.resize(size_t(rep) * span);
  coef.resize(size_t(rep) * span);
  rows.resize(size_t(span));
  const XPrep xp{qr, nullptr, nullptr, rep, hd};
  float out[64];
  for (int s = 0; s < span; ++s) {
    const float* kr = kc + size_t(lo + s) * hd;
    K.dot[int(Fmt::F32)](reinterpret_cast<const uint8_t*>(kr), xp, out);   // rep dots, row read once
    for (int t = 0; t < rep; ++t) sc[size_t(t) * span + s] = out[t] * scale;
    rows[size_t(s)] = reinterpret_cast<const uint8_t*>(vc + size_t(lo + s) * hd);
  }
  for (int t = 0; t < rep; ++t) {                 // softmax over s, as torch: exp(x - max) / sum
    float* r = sc.data() + size_t(t) * span;
    const float m = *std::max_element(r, r + span);
    double sum = 0;
    for (int s = 0; s < span; ++s) { r[s] = std::exp(r[s] - m); sum += r[s]; }
    const float z = float(sum);
    for (int s = 0; s < span; ++s) coef[size_t(s) * rep + t] = r[s] / z;
  }
  std::fill(y, y + size_t(rep) * hd, 0.f);
  K.axpy[int(Fmt::F32)](rows.data(), span, coef.data(), rep, y, hd, nullptr, 0);   // y[t] += p[t, s] v[s]
}

}  // namespace

void rms_norm(const float* x, const float* add, const float* w, int n, int d, float eps,
              float* sum, float* y) {
  if (n < 0 || d <= 0) throw std::invalid_argument("rms_norm: bad shape");
  thread_local std::vector<float> row;
  row.resize(size_t(d));
  for (int r = 0; r < n; ++r) {
    const float* xr = x + size_t(r) * d;
    const float* ar = add ? add + size_t(r) * d : nullptr;
    float* sr = sum ? sum + size_t(r) * d : row.data();
    double ss = 0;
    for (int j = 0; j < d; ++j) {
      sr[j] = ar ? xr[j] + ar[j] : xr[j];
      ss += double(sr[j]) * sr[j];
    }
    const float inv = 1.f / std::sqrt(float(ss / d) + eps);
    float* yr = y + size_t(r) * d;
    for (int j = 0; j < d; ++j) yr[j] = w[j] * (sr[j] * inv);
  }
}

void attend_one(const float* q, const float* k, const float* v, float* kc, float* vc, int H,
                int KV, int hd, int cap, int pos, int lo, const float* cos, const float* sin,
                float scale, float* y) {
  if (H <= 0 || KV <= 0 || H % KV || hd <= 0 || hd % 2)
    throw std::invalid_argument("attend_one: heads must be a multiple of KV heads, head_dim even");
  if (H / KV > 64) throw std::invalid_argument("attend_one: at most 64 query heads per KV head");
  if (pos < 0 || pos >= cap || lo < 0 || lo > pos)
    throw std::invalid_argument("attend_one: need 0 <= lo <= pos < capacity");
  const int rep = H / KV;
  thread_local std::vector<float> qr;
  qr.resize(size_t(H) * hd);
  for (int h = 0; h < H; ++h) rope(q + size_t(h) * hd, cos, sin, hd, qr.data() + size_t(h) * hd);
  for (int g = 0; g < KV; ++g) {
    float* kdst = kc + (size_t(g) * cap + pos) * hd;
    rope(k + size_t(g) * hd, cos, sin, hd, kdst);
    std::memcpy(vc + (size_t(g) * cap + pos) * hd, v + size_t(g) * hd, size_t(hd) * sizeof(float));
  }
  std::lock_guard<std::mutex> lk(pool_lock());
  ThreadPool& P = pool();
  const Kernels& K = active_kernels();
  const float* qs = qr.data();   // (a thread_local named in the lambda would be the worker's own)
  auto group = [&](int g) {
    attend_group(K, qs + size_t(g) * rep * hd, kc + size_t(g) * cap * hd,
                 vc + size_t(g) * cap * hd, rep, hd, lo, pos, scale, y + size_t(g) * rep * hd);
  };
  const size_t bytes = size_t(pos - lo + 1) * KV * hd * 2 * sizeof(float);
  if (bytes < kSerialBytes || P.size() == 1 || KV == 1) {
    for (int g = 0; g < KV; ++g) group(g);
    return;
  }
  std::atomic<int> next{0};
  P.run([&](int) {
    for (int g; (g = next.fetch_add(1, std::memory_order_relaxed)) < KV;) group(g);
  });
}

AttnStep::AttnStep(const float* norm1, LinearDesc qkv, LinearDesc o, const float* norm2, float eps,
                   float* kc, float* vc, int H, int KV, int hd, int cap)
    : n1_(norm1), n2_(norm2), qkv_(qkv), o_(o), eps_(eps), kc_(kc), vc_(vc), H_(H), KV_(KV),
      hd_(hd), cap_(cap), d_(qkv.d) {
  if (qkv.n != (H + 2 * KV) * hd || o.d != H * hd || o.n != qkv.d || H <= 0 || KV <= 0)
    throw std::invalid_argument("AttnStep: qkv must be [(H + 2 KV) hd, d] and o [d, H hd]");
  s_.resize(size_t(d_)); xn_.resize(size_t(d_)); ao_.resize(size_t(d_));
  qkvo_.resize(size_t(qkv.n)); y_.resize(size_t(H) * hd);
}

void AttnStep::run(const float* x, const float* add, int pos, int lo, const float* cos,
                   const float* sin, float* x_out, float* h) {
  rms_norm(x, add, n1_, 1, d_, eps_, s_.data(), xn_.data());
  linear(qkv_.fmt, d_, qkv_.n, qkv_.w, xn_.data(), 1, qkvo_.data());
  const float* q = qkvo_.data();
  attend_one(q, q + size_t(H_) * hd_, q + size_t(H_ + KV_) * hd_, kc_, vc_, H_, KV_, hd_, cap_,
             pos, lo, cos, sin, 1.f / std::sqrt(float(hd_)), y_.data());
  linear(o_.fmt, o_.d, o_.n, o_.w, y_.data(), 1, ao_.data());
  rms_norm(s_.data(), ao_.data(), n2_, 1, d_, eps_, x_out, h);
}

}  // namespace hi
