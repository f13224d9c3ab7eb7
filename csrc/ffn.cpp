// FFN drivers (see ffn.h). Work partitioning:
//   - the ids of every FFN are cut into chunks; threads claim chunks from one atomic counter
//     (dynamic: a thread that hits slow memory simply claims fewer chunks);
//   - each id is fused: gate dot, up dot, activation, then its down row is accumulated into the
//     claiming thread's private y buffer [b, d];
//   - then the private buffers are summed into y: on the pool by the same job once every chunk
//     is done, slices of columns claimed from a second counter (accumulate_chunks). No thread
//     ever writes memory another thread writes. No driver relies on every pool thread taking
//     part (ThreadPool::run's contract: a worker whose core is taken may never enter a job).
#include "ffn.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "spin.h"
#include "threadpool.h"
#include "xprep.h"

namespace hi {
namespace {

constexpr int kRows = 8;  // down rows handed to one axpy call (partial sums stay in registers)

struct Scratch {
  std::vector<float> y;     // [b, d] private down accumulator
  std::vector<float> gu;    // [2, b]: gate dots, then up dots
  std::vector<float> coef;  // [kRows, b]
  bool used = false;
};
std::vector<Scratch> g_scr;       // one per pool thread (guarded by pool_lock)

struct Chunk { int e; int64_t j0, j1; };

// Prefetch the first HI_PREFETCH_BYTES of a row that is about to be read (the kernels prefetch
// the rest from inside the row). Rows of a sparse id set are not adjacent, so without this the
// head of every row would be a demand miss.
inline void prefetch_head(const uint8_t* row, size_t rb) {
  const size_t n = std::min<size_t>(rb, HI_PREFETCH_BYTES);
  for (size_t o = 0; o < n; o += 64) __builtin_prefetch(row + o, 0, HI_PREFETCH_LOCALITY);
}

inline bool gate_fires(Act act, float g, float thr) {
  switch (act) {
    case Act::DRELU: return g > 0.f;
    case Act::RELU: return g > 0.f;
    case Act::FATRELU: return g > thr;
    case Act::SILU: return true;
  }
  return true;
}

inline float activate(Act act, float g, float u, float thr) {
  switch (act) {
    case Act::DRELU: return (g > 0.f && u > 0.f) ? g * u : 0.f;
    case Act::RELU: return g > 0.f ? g * u : 0.f;
    case Act::FATRELU: return g > thr ? g * u : 0.f;
    case Act::SILU: return g / (1.f + std::exp(-g)) * u;
  }
  return 0.f;
}

// grouped_ok: Q4_0G rows are accepted (only `linear` reads them: no AXPY, kernels.h).
void check_ffn(const FFNDesc& f, int d, bool grouped_ok = false) {
  if (int(f.fmt) < 0 || int(f.fmt) >= kNumFmts) throw std::invalid_argument("unknown weight format");
  if (is_grouped(f.fmt) && !grouped_ok)
    throw std::invalid_argument("q4_0 grouped rows (Q4_0G) are read by linear only");
  if (f.d != d || f.d <= 0 || f.n_ff < 0)
    throw std::invalid_argument("FFN shape mismatch: d_model " + std::to_string(f.d) + " vs x " +
                                std::to_string(d));
  if (is_quant(f.fmt) && f.d % QK) throw std::invalid_argument("quantised rows need d % 32 == 0");
}

// Ids must be in [0, n_ff) and distinct (a duplicate would add its down row twice).
void check_ids(const int32_t* ids, int64_t k, int n_ff) {
  if (k < 0) throw std::invalid_argument("negative id count");
  if (k == 0) return;
  static thread_local std::vector<uint8_t> seen;
  seen.assign(size_t(n_ff), 0);
  for (int64_t j = 0; j < k; ++j) {
    const int32_t i = ids[j];
    if (i < 0 || i >= n_ff)
      throw std::invalid_argument("neuron id " + std::to_string(i) + " at position " +
                                  std::to_string(j) + " is out of range [0, " +
                                  std::to_string(n_ff) + ")");
    if (seen[size_t(i)]) throw std::invalid_argument("neuron id " + std::to_string(i) + " is duplicated");
    seen[size_t(i)] = 1;
  }
}

std::vector<Chunk> make_chunks(const int64_t* k, int E, int threads) {
  int64_t total = 0;
  for (int e = 0; e < E; ++e) total += k[e];
  const int64_t ch = std::clamp<int64_t>(total / (int64_t(threads) * 8), 4, 64);
  std::vector<Chunk> chunks;
  for (int e = 0; e < E; ++e)
    for (int64_t j = 0; j < k[e]; j += ch) chunks.push_back({e, j, std::min(k[e], j + ch)});
  return chunks;
}

// Below this many weight bytes a call runs on the calling thread: waking pool workers costs
// more than such work (measured on the loaded 2-core VM: ~270 us a call for 256 x 256 q4_0;
// 256 KiB is ~25 us of reading on one core). A pool of more than 2 threads (a machine with
// cores to spare) hands off from kSerialBytesWide: on the GPU machine's CPU a pool call with no
// rows costs ~5 us while 32 cold rows (221 KiB) took 44 us on one thread, latency-bound at
// ~1.4 us a row (benchmarks/results/cold_step_latency_gpumachine.*) — the decode step's cold
// half sits between two layers' GPU work.
constexpr size_t kSerialBytes = size_t(256) << 10;
constexpr size_t kSerialBytesWide = size_t(32) << 10;

// Runs body(tid, chunk) over all chunks: with dynamic claiming on the pool, or on the calling
// thread (tid 0) when the call reads fewer than the serial threshold of weights.
inline bool on_caller(const ThreadPool& P, size_t bytes) {
  return P.size() == 1 || bytes < (P.size() > 2 ? kSerialBytesWide : kSerialBytes);
}

template <class Body>
void parallel_chunks(ThreadPool& P, const std::vector<Chunk>& chunks, const Body& body,
                     size_t bytes = kSerialBytes) {
  if (on_caller(P, bytes)) {
    for (const Chunk& c : chunks) body(0, c);
    return;
  }
  std::atomic<size_t> next{0};
  P.run([&](int tid) {
    for (size_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks.size();)
      body(tid, chunks[c]);
  });
}

void prepare_scratch(int T, int b, int d, bool need_y) {
  if (int(g_scr.size()) < T) g_scr.resize(size_t(T));
  for (int t = 0; t < T; ++t) {
    Scratch& s = g_scr[size_t(t)];
    if (need_y && s.y.size() < size_t(b) * d) s.y.resize(size_t(b) * d);
    s.gu.resize(size_t(2) * b); s.coef.resize(size_t(kRows) * b);
    s.used = false;
  }
}

// Lazily zeroes a thread's accumulator the first time it claims work.
inline float* acc_of(int tid, size_t n) {
  Scratch& s = g_scr[size_t(tid)];
  if (!s.used) { std::fill(s.y.begin(), s.y.begin() + long(n), 0.f); s.used = true; }
  return s.y.data();
}

// y[lo, hi) = the sum of the used private accumulators of threads < T over those columns.
void sum_parts(float* y, size_t lo, size_t hi, int T) {
  bool first = true;
  for (int t = 0; t < T; ++t) {
    if (!g_scr[size_t(t)].used) continue;
    const float* p = g_scr[size_t(t)].y.data();
    if (first) std::memcpy(y + lo, p + lo, (hi - lo) * sizeof(float));
    else for (size_t i = lo; i < hi; ++i) y[i] += p[i];
    first = false;
  }
  if (first) std::fill(y + lo, y + hi, 0.f);
}

// parallel_chunks whose bodies add into the threads' private accumulators, then y [n] = their
// sum. On the pool the same job sums: a thread whose claims are exhausted waits until every
// chunk is done (every accumulator final; only claimed work is waited for, never a thread that
// has not entered: ThreadPool's contract), then claims slices of columns (16-float aligned)
// from a second counter: no second hand-off and no pass of one core over T accumulators in
// other cores' caches (the decode step's cold half at 8 threads, d = 4096: 128 KiB of
// cross-core reads). H100 machine, 8 threads, with the pool's lock-free wake: 96 cold rows
// 56 -> 47 us (benchmarks/results/cold_step_latency_pool_ab.txt).
// body(tid, chunk, peek): peek() is the chunk the next claim would get (not claimed: some
// thread's next chunk, or null), for prefetching across the chunk's end.
template <class Body>
void accumulate_chunks(ThreadPool& P, const std::vector<Chunk>& chunks, const Body& body,
                       size_t bytes, float* y, size_t n) {
  const int T = P.size();
  if (on_caller(P, bytes)) {
    for (size_t i = 0; i < chunks.size(); ++i)
      body(0, chunks[i], [&]() -> const Chunk* { return i + 1 < chunks.size() ? &chunks[i + 1] : nullptr; });
    sum_parts(y, 0, n, T);
    return;
  }
  std::atomic<size_t> next{0}, done{0}, next_slice{0};
  // 2T slices: a thread that arrives late at the reduction still finds some left
  const size_t step = ((n + size_t(2 * T) - 1) / size_t(2 * T) + 15) / 16 * 16;
  const size_t slices = (n + step - 1) / step;
  // peek(): the chunk the next claim would get (some thread's next chunk), not claimed
  auto peek = [&]() -> const Chunk* {
    const size_t p = next.load(std::memory_order_relaxed);
    return p < chunks.size() ? &chunks[p] : nullptr;
  };
  P.run([&](int tid) {
    for (size_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks.size();) {
      body(tid, chunks[c], peek);
      done.fetch_add(1, std::memory_order_release);   // this chunk's adds (and `used`) published
    }
    // every chunk is claimed; wait for those still running elsewhere, then every used
    // accumulator (and each thread's `used` flag, set before its first done) is final
    spin_until([&] { return done.load(std::memory_order_acquire) == chunks.size(); });
    for (size_t sl; (sl = next_slice.fetch_add(1, std::memory_order_relaxed)) < slices;)
      sum_parts(y, sl * step, std::min(n, (sl + 1) * step), T);
  });
}

}  // namespace

void ffn_sparse_multi(const FFNDesc* ffns, int E, const float* x, int b,
                      const int32_t* const* ids, const int64_t* k, const float* scales, Act act,
                      float thr, bool exact, float* y, bool trusted_ids) {
  if (E < 1 || b < 1) throw std::invalid_argument("need at least one FFN and one token");
  const int d = ffns[0].d;
  bool need_q8 = false, q4 = false;
  for (int e = 0; e < E; ++e) {
    check_ffn(ffns[e], d);
    if (!trusted_ids) check_ids(ids[e], k[e], ffns[e].n_ff);
    need_q8 |= is_quant(ffns[e].fmt);
    q4 |= ffns[e].fmt == Fmt::Q4_0;
  }
  std::lock_guard<std::mutex> lk(pool_lock());
  ThreadPool& P = pool();
  const Kernels& K = active_kernels();
  const XPrep xp = prepare_x(K, x, b, d, need_q8, false, q4 && !exact);
  prepare_scratch(P.size(), b, d, true);
  const std::vector<Chunk> chunks = make_chunks(k, E, P.size());
  size_t bytes = 0;                                   // at most, read per token batch
  for (int e = 0; e < E; ++e) bytes += size_t(k[e]) * 3 * row_bytes(ffns[e].fmt, d);

  accumulate_chunks(P, chunks, [&](int tid, const Chunk& c, const auto&) {
    const FFNDesc& f = ffns[c.e];
    const size_t rb = row_bytes(f.fmt, d);
    const DotFn dot = K.dot[int(f.fmt)];
    const AxpyFn axpy = K.axpy[int(f.fmt)];
    // One token, every id's rows read: gate and up in one pass (null: two dots).
    const Dot2Fn dot2 = (b == 1 && !exact) ? K.dot2[int(f.fmt)] : nullptr;
    Scratch& s = g_scr[size_t(tid)];
    float* acc = acc_of(tid, size_t(b) * d);
    const uint8_t* rows[kRows];
    const uint8_t* pf[kRows];   // the next group's down rows
    int np = 0;
    float* g = s.gu.data();  // [b] gate, then [b] up
    float* u = g + b;
    for (int64_t j = c.j0; j < c.j1; ++j) {
      const size_t off = size_t(ids[c.e][j]) * rb;
      const bool next = j + 1 < c.j1;
      const size_t nx = next ? size_t(ids[c.e][j + 1]) * rb : 0;
      if (dot2) {
        // Sparse ids (the row after next is not adjacent: no hardware stream covers it): that
        // row's gate and up go into L2 now, two ids ahead, so more of them is in flight while
        // this row computes (random rows are latency-bound). q4_0 ffn_sparse 14336 x 4096 at
        // 10%, dev VM, 4 alternating processes each: 1 thread 1.77-2.09 -> 1.60-1.82 ms, 2
        // threads 1.10-1.43 -> 0.86-1.08; dense unchanged (adjacent ids: none issued)
        // (benchmarks/results/q4_sparse_prefetch2_dev2core.txt).
        if (j + 2 < c.j1 && ids[c.e][j + 2] != ids[c.e][j + 1] + 1) {
          const size_t o2 = size_t(ids[c.e][j + 2]) * rb;
          for (size_t o = 0; o < rb; o += 64) {
            __builtin_prefetch(f.gate + o2 + o, 0, 2);   // locality 2: prefetcht1, into L2
            __builtin_prefetch(f.up + o2 + o, 0, 2);
          }
        }
        // While gate and up are computed, the next id's gate and up rows stream into L1 and
        // the down row of this id into L2 (read by the axpy up to kRows ids later: L2 keeps
        // it, L1 would not). q4_0 dense, 1 thread: 10.8-11.3 -> 8.2-8.3 ms, docs/KERNELS.md.
        dot2(f.gate + off, f.up + off, xp, g, next ? f.gate + nx : nullptr,
             next ? f.up + nx : nullptr, f.down + off);
      } else {
        // Float formats: not when the next row follows this one in memory (dense runs): the
        // hardware prefetchers stream those, and software prefetches into L1 slowed them
        // (Zen 4: f16 dense 28 -> 20 ms at 1 thread without any, docs/KERNELS.md).
        const bool adjacent = !is_quant(f.fmt) && next && ids[c.e][j + 1] == ids[c.e][j] + 1;
        if (next && !adjacent) {
          // Not the down row: it is read up to kRows ids later (axpy batches), by which time an
          // early prefetch has been pushed out of L1 by the gate/up streams; leaving it to the
          // axpy's own prefetch measured +13 % at 10 % density (q4_0), +2.5 % dense, f16 level.
          prefetch_head(f.gate + nx, rb); prefetch_head(f.up + nx, rb);
        }
        dot(f.gate + off, xp, g);
        if (exact) {
          bool any = false;
          for (int t = 0; t < b; ++t) any |= gate_fires(act, g[t], thr);
          if (!any) continue;
        }
        dot(f.up + off, xp, u);
      }
      float* co = s.coef.data() + size_t(np) * b;
      bool nz = false;
      for (int t = 0; t < b; ++t) {
        const float sc = scales ? scales[size_t(c.e) * b + t] : 1.f;
        co[t] = activate(act, g[t], u[t], thr) * sc;
        nz |= co[t] != 0.f;
      }
      if (exact && !nz) continue;
      rows[np++] = f.down + off;
      if (np == kRows) {
        // every id passes when !exact: the next group's down rows are those of the next kRows
        // ids of the chunk, prefetched by the AXPY (the memory system was idle through it)
        int npf = 0;
        for (int64_t i = j + 1; !exact && i < std::min<int64_t>(c.j1, j + 1 + kRows); ++i)
          pf[npf++] = f.down + size_t(ids[c.e][i]) * rb;
        axpy(rows, np, s.coef.data(), b, acc, d, pf, npf);
        np = 0;
      }
    }
    if (np) axpy(rows, np, s.coef.data(), b, acc, d, nullptr, 0);
  }, bytes, y, size_t(b) * d);
}

void gate_up_sparse(const FFNDesc& f, const float* x, int b, const int32_t* ids, int64_t k,
                    Act act, float thr, bool exact, float* a) {
  if (b < 1) throw std::invalid_argument("need at least one token");
  check_ffn(f, f.d);
  check_ids(ids, k, f.n_ff);
  std::lock_guard<std::mutex> lk(pool_lock());
  ThreadPool& P = pool();
  const Kernels& K = active_kernels();
  const XPrep xp = prepare_x(K, x, b, f.d, is_quant(f.fmt));
  prepare_scratch(P.size(), b, f.d, false);
  const size_t rb = row_bytes(f.fmt, f.d);
  const DotFn dot = K.dot[int(f.fmt)];
  parallel_chunks(P, make_chunks(&k, 1, P.size()), [&](int tid, const Chunk& c) {
    Scratch& s = g_scr[size_t(tid)];
    for (int64_t j = c.j0; j < c.j1; ++j) {
      const size_t off = size_t(ids[j]) * rb;
      if (j + 1 < c.j1) {
        const size_t nx = size_t(ids[j + 1]) * rb;
        prefetch_head(f.gate + nx, rb); prefetch_head(f.up + nx, rb);
      }
      float* g = s.gu.data();
      float* u = g + b;
      dot(f.gate + off, xp, g);
      bool any = !exact;
      for (int t = 0; t < b && !any; ++t) any = gate_fires(act, g[t], thr);
      if (any) dot(f.up + off, xp, u);
      for (int t = 0; t < b; ++t)
        a[size_t(t) * k + j] = any ? activate(act, g[t], u[t], thr) : 0.f;
    }
  }, size_t(k) * 2 * rb);
}

void down_sparse(const FFNDesc& f, const float* a, int b, const int32_t* ids, int64_t k,
                 bool skip_zero, float* y) {
  if (b < 1) throw std::invalid_argument("need at least one token");
  check_ffn(f, f.d);
  check_ids(ids, k, f.n_ff);
  const int d = f.d;
  std::lock_guard<std::mutex> lk(pool_lock());
  ThreadPool& P = pool();
  const Kernels& K = active_kernels();
  prepare_scratch(P.size(), b, d, true);
  const size_t rb = row_bytes(f.fmt, d);
  const AxpyFn axpy = K.axpy[int(f.fmt)];
  accumulate_chunks(P, make_chunks(&k, 1, P.size()), [&](int tid, const Chunk& c, const auto& peek) {
    Scratch& s = g_scr[size_t(tid)];
    float* acc = acc_of(tid, size_t(b) * d);
    const uint8_t* rows[kRows];
    const uint8_t* pf[kRows];   // the next group's rows
    int np = 0;
    auto passes = [&](int64_t j) {
      if (!skip_zero) return true;
      for (int t = 0; t < b; ++t) if (a[size_t(t) * k + j] != 0.f) return true;
      return false;
    };
    // the passing rows at the start of the upcoming chunk, up to kRows in pf: the predictor's
    // fc2 (8 KiB rows, chunks of 64) alone 582 -> 555 us a call, in the M7 decode 15.3-16.1 ->
    // 14.8-15.6 ms a token (the FFN's own chunk ends: within noise, not done there)
    auto more = [&](const uint8_t** pf, int& npf) {
      if (const Chunk* pc = peek())
        for (int64_t i = pc->j0; i < pc->j1 && npf < kRows; ++i)
          if (passes(i)) pf[npf++] = f.down + size_t(ids[i]) * rb;
    };
    for (int64_t j = c.j0; j < c.j1; ++j) {
      if (!passes(j)) continue;
      float* co = s.coef.data() + size_t(np) * b;
      for (int t = 0; t < b; ++t) co[t] = a[size_t(t) * k + j];
      if (j + 1 < c.j1) prefetch_head(f.down + size_t(ids[j + 1]) * rb, rb);
      rows[np++] = f.down + size_t(ids[j]) * rb;
      if (np == kRows) {
        // the AXPY prefetches the rows of the next group (the next kRows passing ids)
        int npf = 0;
        for (int64_t i = j + 1; i < c.j1 && npf < kRows; ++i)
          if (passes(i)) pf[npf++] = f.down + size_t(ids[i]) * rb;
        if (npf < kRows) more(pf, npf);
        axpy(rows, np, s.coef.data(), b, acc, d, pf, npf);
        np = 0;
      }
    }
    int npf = 0;
    if (np) {
      more(pf, npf);
      axpy(rows, np, s.coef.data(), b, acc, d, pf, npf);
    }
  }, size_t(k) * rb, y, size_t(b) * d);
}

void linear(Fmt fmt, int d, int n, const uint8_t* w, const float* x, int b, float* y) {
  if (b < 1) throw std::invalid_argument("need at least one token");
  if (n < 0) throw std::invalid_argument("negative row count");
  check_ffn(FFNDesc{fmt, d, n, w, w, w}, d, true);
  if (n == 0) return;
  std::lock_guard<std::mutex> lk(pool_lock());
  ThreadPool& P = pool();
  const Kernels& K = active_kernels();
  const XPrep xp = prepare_x(K, x, b, d, is_quant(fmt), is_grouped(fmt), fmt == Fmt::Q4_0);
  prepare_scratch(P.size(), b, d, false);
  const size_t rb = row_bytes(fmt, d);
  const DotFn dot = K.dot[int(fmt)];
  const int64_t rows = n;
  // One token (block formats; the table's dot_rows): a chunk is one run of contiguous rows,
  // read in pairs with one prefetch stream kRunAhead ahead in address order, across the chunk's
  // end (this thread's next claim or the other thread's) up to the matrix's end. It replaced
  // pairs through dot2 with the FFN's five streams (own rows, next pair, a later row), which
  // left M7's attention projections and lm_head at 0.34-0.48 of the read probe on the Zen 3 dev
  // VM (benchmarks/linear_m7.py; docs/KERNELS.md, "One token: runs of rows").
  const DotRowsFn run = b == 1 ? K.dot_rows[int(fmt)] : nullptr;
  const uint8_t* end = w + size_t(n) * rb;
  // Else (a batch, float formats): all b tokens from one read of each row, the next row's head
  // prefetched, the rest of a row by the kernel itself. Chunks of 4..64 contiguous rows.
  auto body = [&](int tid, const Chunk& c) {
    if (run) {
      run(w + size_t(c.j0) * rb, int(c.j1 - c.j0), xp, y + c.j0, end);
      return;
    }
    float* out = g_scr[size_t(tid)].gu.data();   // [2b]
    for (int64_t r = c.j0; r < c.j1; ++r) {
      if (r + 1 < c.j1) prefetch_head(w + size_t(r + 1) * rb, rb);
      dot(w + size_t(r) * rb, xp, out);
      for (int t = 0; t < b; ++t) y[size_t(t) * n + size_t(r)] = out[t];
    }
  };
  // small matrices (small models' layers) on the calling thread (kSerialBytes)
  parallel_chunks(P, make_chunks(&rows, 1, P.size()), body, size_t(n) * rb);
}

void relu_mlp_t(Fmt f1, int d, int r, const uint8_t* w1, Fmt f2, int n2, const uint8_t* w2t,
                const float* x, float* h, float* y) {
  linear(f1, d, r, w1, x, 1, h);
  for (int j = 0; j < r; ++j) h[j] = h[j] > 0.f ? h[j] : 0.f;
  thread_local std::vector<int32_t> all;
  if (int(all.size()) != r) { all.resize(size_t(r)); for (int j = 0; j < r; ++j) all[size_t(j)] = j; }
  down_sparse(FFNDesc{f2, n2, r, nullptr, nullptr, w2t}, h, 1, all.data(), r, true, y);
}

double read_sum(const float* p, size_t n) {
  std::lock_guard<std::mutex> lk(pool_lock());
  ThreadPool& P = pool();
  const Kernels& K = active_kernels();
  constexpr size_t kStep = size_t(1) << 20;  // 4 MiB per claimed piece
  const size_t pieces = (n + kStep - 1) / kStep;
  // padded: one cache line per thread; zeroed, as a tid may not run (ThreadPool::run)
  std::vector<double> part(size_t(P.size()) * 8, 0.0);
  std::atomic<size_t> next{0};
  P.run([&](int tid) {
    double s = 0;
    for (size_t c; (c = next.fetch_add(1)) < pieces;)
      s += K.read_sum(p + c * kStep, std::min(kStep, n - c * kStep));
    part[size_t(tid) * 8] = s;
  });
  double s = 0;
  for (int t = 0; t < P.size(); ++t) s += part[size_t(t) * 8];
  return s;
}

}  // namespace hi
