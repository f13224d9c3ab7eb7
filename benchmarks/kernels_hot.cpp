// Hot-cache timing of one format's AXPY (down, groups of 8 rows) and dot kernels: rows in L2,
// so this measures compute rates, not memory (docs/KERNELS.md). Not part of the build:
//   g++ -O3 -std=c++17 -DHI_HAVE_X86=1 -Icsrc -c csrc/kernels_avx2.cpp -mavx2 -mfma -mf16c -o /tmp/k_avx2.o
//   g++ -O3 -std=c++17 -DHI_HAVE_X86=1 -Icsrc -c csrc/kernels_ref.cpp -o /tmp/k_ref.o
//   g++ -O3 -std=c++17 -DHI_HAVE_X86=1 -Icsrc -c csrc/dispatch.cpp -o /tmp/k_disp.o
//   g++ -O3 -std=c++17 -mf16c -Icsrc benchmarks/kernels_hot.cpp /tmp/k_*.o -o /tmp/kernels_hot
//   flock /tmp/hybridinfer-bench.lock /tmp/kernels_hot [rows=64] [fmt=4 (q4_0; 3 = q8_0)]
// Prints the AVX2-vs-reference difference of y and (q4_0) the relative RMS error against a
// float64 sum, then ns per row-block (one 32-value block of one row) and GB/s of row bytes.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <random>
#include <immintrin.h>
#include <vector>
#include "kernels.h"
using namespace hi;
int main(int argc, char** argv) {
  const int d = 4096, NR = argc > 1 ? atoi(argv[1]) : 64, G = 8;
  const int fmt = argc > 2 ? atoi(argv[2]) : 4;
  const size_t rb = row_bytes(Fmt(fmt), d);
  std::mt19937 rng(1);
  std::vector<uint8_t> W(rb * NR);
  for (auto& v : W) v = rng() & 255;
  if (fmt >= 3) {
    const size_t bb = fmt == 3 ? 34 : 18;
    for (int r = 0; r < NR; ++r) for (int i = 0; i < d / 32; ++i) {
      float s = (0.5f + (rng() % 1000) / 1000.f) * 0.01f * ((rng() & 1) ? 1 : -1);
      uint16_t h = _cvtss_sh(s, 0); memcpy(&W[r * rb + i * bb], &h, 2);
    }
  }
  std::vector<float> coef(NR), y(d, 0.f), y2(d, 0.f);
  for (auto& c : coef) c = std::exp(std::normal_distribution<float>(0, 1)(rng)) * ((rng() & 1) ? 1 : -1);
  std::vector<const uint8_t*> rows(NR);
  for (int r = 0; r < NR; ++r) rows[r] = W.data() + r * rb;
  const Kernels& A = *avx2_kernels();
  const Kernels& R = ref_kernels();
  // agreement
  for (int r = 0; r < NR; r += G) { A.axpy[fmt](&rows[r], G, &coef[r], 1, y.data(), d, nullptr, 0); R.axpy[fmt](&rows[r], G, &coef[r], 1, y2.data(), d, nullptr, 0); }
  double md = 0, my = 0;
  for (int j = 0; j < d; ++j) { md = std::fmax(md, std::fabs(y[j] - y2[j])); my = std::fmax(my, std::fabs(y2[j])); }
  // exact float reference
  std::vector<double> ye(d, 0.0);
  for (int r = 0; r < NR; ++r) for (int j = 0; j < d; ++j) {
    const uint8_t* blk = rows[r] + (j / 32) * 18; uint16_t h; memcpy(&h, blk, 2);
    int n = (j % 32) < 16 ? (blk[2 + j % 16] & 15) : (blk[2 + j % 16] >> 4);
    if (fmt == 4) ye[j] += double(coef[r]) * f16_to_f32(h) * (n - 8);
  }
  double e2 = 0, n2 = 0;
  if (fmt == 4) for (int j = 0; j < d; ++j) { e2 += (y[j] - ye[j]) * (y[j] - ye[j]); n2 += ye[j] * ye[j]; }
  printf("avx2 vs ref max diff %.3g (max |y| %.3g); rel rms err vs f64 %.3g\n", md, my, std::sqrt(e2 / (n2 + 1e-300)));
  const int reps = 20000 * 64 / NR / 8;
  for (int trial = 0; trial < 8; ++trial) {
    auto t0 = std::chrono::steady_clock::now();
    for (int k = 0; k < reps; ++k)
      for (int r = 0; r < NR; r += G) A.axpy[fmt](&rows[r], G, &coef[r], 1, y.data(), d, nullptr, 0);
    auto t1 = std::chrono::steady_clock::now();
    double s = std::chrono::duration<double>(t1 - t0).count();
    double blocks = double(reps) * NR * (d / 32);
    printf("axpy: %.3f ns per row-block, %.2f GB/s\n", s / blocks * 1e9, blocks * (rb / (d / 32)) / s / 1e9);
  }
  std::vector<float> x(d); for (auto& v : x) v = std::normal_distribution<float>(0, 1)(rng);
  std::vector<BlockQ8X> xq(d / 32); A.quantize_q8(x.data(), d, xq.data());
  std::vector<XPairQ8> xp(d / 64);
  for (int j = 0; j < d / 64; ++j) { for (int l = 0; l < 8; ++l) { xp[j].d[l] = (l & 2) ? xq[2*j+1].d : xq[2*j].d; xp[j].sum8[l] = 0; } xp[j].sum8[0] = xq[2*j].sum8; xp[j].sum8[2] = xq[2*j+1].sum8; }
  XPrep X; X.xf = x.data(); X.xq = xq.data(); X.xpair = xp.data(); X.b = 1; X.d = d;
  float out; double acc = 0;
  auto t0 = std::chrono::steady_clock::now();
  for (int k = 0; k < reps; ++k) for (int r = 0; r < NR; ++r) { A.dot[fmt](rows[r], X, &out); acc += out; }
  double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  double blocks = double(reps) * NR * (d / 32);
  printf("dot:  %.3f ns per row-block, %.2f GB/s (%g)\n", s / blocks * 1e9, blocks * (rb / (d / 32)) / s / 1e9, acc > 0 ? 0. : 1.);
}
