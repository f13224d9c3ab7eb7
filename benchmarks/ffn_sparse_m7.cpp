// M7's CPU FFN kernels outside Python (docs/KERNELS.md, "Session 9: where the sparse FFN's time
// goes"). Not part of the build:
//   mkdir -p /tmp/fm && for f in csrc/*_avx2.cpp; do g++ -O3 -std=c++17 -DHI_HAVE_X86=1 -Icsrc
//       -mavx2 -mfma -mf16c -c $f -o /tmp/fm/$(basename $f .cpp).o; done      (one line each)
//   for f in kernels_ref dispatch xprep ffn threadpool; do g++ -O3 -std=c++17 -DHI_HAVE_X86=1
//       -Icsrc -c csrc/$f.cpp -o /tmp/fm/$f.o; done
//   g++ -O3 -std=c++17 -mf16c -DHI_HAVE_X86=1 -Icsrc benchmarks/ffn_sparse_m7.cpp /tmp/fm/*.o
//       -o /tmp/ffn_sparse_m7 -lpthread
//   flock /tmp/hybridinfer-bench.lock /tmp/ffn_sparse_m7 ffn [threads=2] [density=0.15] [layers=32]
//   flock /tmp/hybridinfer-bench.lock /tmp/ffn_sparse_m7 axpy [threads=1]
// ffn: ffn_sparse_multi (q4_0, dReLU, exact=false, one token) over `layers` distinct random
//   14336 x 4096 FFNs (gate, up, down^T: 99 MB each) with `density` of the ids (sorted), called
//   32 times in rotation: layers = 32 reads from DRAM (as a decode token), layers = 1 from the LLC
//   (14.9 MB at 15 %). Median of 5 sweeps after one warm-up; GB/s = the rows' bytes / time.
//   NOHUGE=1 in the environment: no MADV_HUGEPAGE (4 KiB pages, as torch.empty's memory).
//   PFILE=path: the ids drawn per neuron from firing probabilities (float32 [14336], e.g. M7's
//   curve: python -c "from hybridinfer.bench.workload import firing_curve;
//   firing_curve(14336).astype('float32').tofile('/tmp/p.bin')"), the neurons in a random row
//   order (as a checkpoint's), or with SORTED=1 in descending probability (build.split_rows with a
//   profile); density is then unused.
// axpy: down_sparse over every row of a q4_0 matrix (b = 1, the AXPY in groups of 8): 96 rows
//   (216 KiB, in L2: the compute rate) and 14336 rows over 8 rotating copies (from DRAM);
//   ns per row-block = one 32-value block of one row.
// Random rows (nibbles and sane f16 scales), seeded: mt19937(1).
#include <sys/mman.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <immintrin.h>
#include <random>
#include <string>
#include <vector>

#include "ffn.h"
#include "threadpool.h"

using namespace hi;
using Clock = std::chrono::steady_clock;

// n bytes on a 2 MiB boundary, huge pages unless NOHUGE (as kernels.cpu.alloc_weights)
static uint8_t* alloc_rows(size_t n) {
  const size_t A = size_t(2) << 20;
  void* p = mmap(nullptr, n + A, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  uint8_t* q = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + A - 1) & ~(A - 1));
  if (!std::getenv("NOHUGE")) madvise(q, n, MADV_HUGEPAGE);
  return q;
}

static uint8_t* random_q4(int rows, int d, std::mt19937& rng) {
  const size_t n = size_t(rows) * row_bytes(Fmt::Q4_0, d);
  uint8_t* p = alloc_rows(n);
  for (size_t i = 0; i < n; i += 4) { const uint32_t v = rng(); std::memcpy(p + i, &v, 4); }
  for (size_t i = 0; i < n; i += 18) {
    const uint16_t h = _cvtss_sh(0.01f * (0.5f + float(rng() % 1000) / 1000.f), 0);
    std::memcpy(p + i, &h, 2);
  }
  return p;
}

static double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

static int ffn(int threads, double density, int layers) {
  const int d = 4096, n = 14336;
  const size_t rb = row_bytes(Fmt::Q4_0, d);
  std::mt19937 rng(1);
  std::vector<FFNDesc> F;
  std::vector<std::vector<int32_t>> ids(static_cast<size_t>(layers));
  for (int l = 0; l < layers; ++l) {
    uint8_t* g = random_q4(n, d, rng);
    uint8_t* u = random_q4(n, d, rng);
    F.push_back(FFNDesc{Fmt::Q4_0, d, n, g, u, random_q4(n, d, rng)});
  }
  size_t total = 0;
  std::vector<float> pc(static_cast<size_t>(n), float(density));
  const char* pfile = std::getenv("PFILE");
  if (pfile) {
    FILE* fp = std::fopen(pfile, "rb");
    const bool ok = fp && std::fread(pc.data(), 4, size_t(n), fp) == size_t(n);
    if (fp) std::fclose(fp);
    if (!ok) { std::fprintf(stderr, "PFILE: need %d float32 values\n", n); return 2; }
  }
  const bool sorted_rows = std::getenv("SORTED") != nullptr;
  for (auto& v : ids) {
    std::vector<int> perm(static_cast<size_t>(n));   // row i holds the neuron of curve rank perm[i]
    for (int i = 0; i < n; ++i) perm[size_t(i)] = i;
    if (pfile && !sorted_rows) std::shuffle(perm.begin(), perm.end(), rng);
    for (int i = 0; i < n; ++i)
      if (double(rng() % 1000000) < double(pc[size_t(perm[size_t(i)])]) * 1e6) v.push_back(i);
  }
  for (int l0 = 0; l0 < 32; ++l0) total += ids[size_t(l0 % layers)].size();
  std::vector<float> x(d), y(d);
  for (auto& v : x) v = std::normal_distribution<float>(0, 1)(rng);
  std::vector<double> ts;
  for (int rep = 0; rep <= 5; ++rep) {
    const auto t0 = Clock::now();
    for (int l0 = 0; l0 < 32; ++l0) {
      const auto& v = ids[size_t(l0 % layers)];
      const int32_t* ip = v.data();
      const int64_t k = int64_t(v.size());
      ffn_sparse_multi(&F[size_t(l0 % layers)], 1, x.data(), 1, &ip, &k, nullptr, Act::DRELU, 0.f,
                       false, y.data());
    }
    if (rep) ts.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  const double m = median(ts), bytes = double(total) * 3 * rb;
  const std::string how = pfile ? std::string("curve ") + pfile + (sorted_rows ? " rows by p" : " rows random")
                                : "density " + std::to_string(density).substr(0, 4);
  std::printf("ffn_sparse q4_0 14336 x 4096, %s, %d threads, %d layers in rotation%s: "
              "%.2f ms for 32 calls, %.1f GB/s (%.0f MB)\n", how.c_str(), threads, layers,
              std::getenv("NOHUGE") ? ", 4 KiB pages" : "", m * 1e3, bytes / m / 1e9, bytes / 1e6);
  return 0;
}

static int axpy(int threads) {
  const int d = 4096;
  const size_t rb = row_bytes(Fmt::Q4_0, d);
  std::mt19937 rng(1);
  for (int n : {96, 14336}) {
    const int copies = n < 1000 ? 1 : 8, iters = n < 1000 ? 2000 : 8;
    std::vector<uint8_t*> W;
    for (int c = 0; c < copies; ++c) W.push_back(random_q4(n, d, rng));
    std::vector<float> a(static_cast<size_t>(n)), y(static_cast<size_t>(d));
    for (auto& v : a) v = std::normal_distribution<float>(0, 1)(rng);
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) ids[size_t(i)] = i;
    std::vector<double> ts;
    for (int rep = 0; rep < 5; ++rep) {
      const auto t0 = Clock::now();
      for (int it = 0; it < iters; ++it)
        down_sparse(FFNDesc{Fmt::Q4_0, d, n, nullptr, nullptr, W[size_t(it % copies)]}, a.data(), 1,
                    ids.data(), n, false, y.data());
      ts.push_back(std::chrono::duration<double>(Clock::now() - t0).count() / iters);
    }
    const double m = median(ts);
    std::printf("down_sparse q4_0 %d x %d, %d threads (%s): %.1f us, %.2f ns a row-block, %.1f GB/s\n",
                n, d, threads, copies == 1 ? "in L2" : "from DRAM", m * 1e6,
                m * 1e9 / (double(n) * d / 32), double(n) * rb / m / 1e9);
  }
  return 0;
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "ffn";
  const int threads = argc > 2 ? std::atoi(argv[2]) : (mode == "ffn" ? 2 : 1);
  set_num_threads(threads);
  if (mode == "axpy") return axpy(threads);
  if (mode != "ffn") { std::fprintf(stderr, "mode: ffn | axpy\n"); return 2; }
  return ffn(threads, argc > 3 ? std::atof(argv[3]) : 0.15, argc > 4 ? std::atoi(argv[4]) : 32);
}
