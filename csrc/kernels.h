// hybridinfer CPU kernels: the one header that declares every kernel once.
//
// Two implementations share these signatures: a scalar reference (kernels_ref.cpp) and an
// AVX2+FMA+F16C version (the *_avx2.cpp files, table in kernels_avx2.cpp). dispatch picks one
// table at runtime (cpuid, or HYBRIDINFER_FORCE_REF=1 / force_reference(true) for the reference). The FFN drivers in
// ffn.cpp (threads, sparsity, activations) are ISA-independent and call only these tables.
//
// Row formats (one packed row = one neuron, bytes contiguous; GGUF-compatible blocks):
//   F32  : d floats                        BF16 : d bf16 (upper half of an f32)
//   F16  : d IEEE halves                   Q8_0 : d/32 blocks {f16 scale, int8 q[32]}
//   Q4_0 : d/32 blocks {f16 scale, uint8 nibbles[16]}, value = (nibble-8)*scale;
//          byte j holds element j (low nibble) and element j+16 (high nibble).
//   Q4_0G: q4_0 with each row's blocks regrouped for the AVX2 dot (the same bytes per row,
//          permuted inside the row; a dense linear's rows only, see kGroupBlocks below).
#pragma once
#include <cstddef>
#include <cstdint>

namespace hi {

enum class Fmt : int { F32 = 0, F16 = 1, BF16 = 2, Q8_0 = 3, Q4_0 = 4, Q4_0G = 5 };
constexpr int kNumFmts = 6;
constexpr int QK = 32;  // values per quantisation block

// Bytes the kernels prefetch ahead inside a row; the drivers prefetch this much of the head of
// the next id's rows (see avx2_common.h).
#ifndef HI_PREFETCH_BYTES
#define HI_PREFETCH_BYTES 1024
#endif
#ifndef HI_PREFETCH_L2  // 1: prefetch into L2 only (prefetcht1), 0: into L1 (prefetcht0)
#define HI_PREFETCH_L2 0
#endif
#define HI_PREFETCH_HINT (HI_PREFETCH_L2 ? _MM_HINT_T1 : _MM_HINT_T0)
#define HI_PREFETCH_LOCALITY (HI_PREFETCH_L2 ? 2 : 3)

// Activation x quantised to q8_0 for the integer dot products (q8_0 / q4_0 weights).
// Not a GGUF block: the scale stays f32 (more exact than f16) and `sum8` = 8 * sum(q) lets
// the q4_0 kernel use unsigned nibbles: sum((n-8)*q) = sum(n*q) - sum8.
struct BlockQ8X {
  float d;         // scale: amax / 127 over the 32 values (0 for an all-zero block)
  int32_t sum8;    // 8 * sum(q)
  int8_t q[QK];    // round-half-even(x / d) computed as x * (1/d) in f32
};

// Q4_0G rows ("q4_0 grouped"): a q4_0 row of nb blocks whose first 8 * (nb / 8) blocks are
// regrouped, 8 blocks (256 values, 144 bytes) at a time; the nb % 8 last blocks stay GGUF blocks.
// Group g (bytes 144 g ..): the 8 f16 scales of blocks 8g .. 8g+7 (16 bytes), then for v = 0..3
// and k = 0..7 the nibble bytes 4v .. 4v+3 of block 8g+k (128 bytes). So a 32-byte load at
// 16 + 32 v holds block k in its 32-bit lane k: low nibbles = values 4v .. 4v+3, high nibbles =
// values 16+4v .. 16+4v+3 of that block. Against x laid out the same way (XPrep::xg) the
// maddubs products of one lane all belong to one block: 8 of them add up in int16 lanes
// (|sum| <= 8 * 2 * 15 * 127 < 2^15), one madd gives the 8 blocks' integer sums in 8 lanes, and
// the 8 scales convert with one vcvtph2ps: no horizontal sum and no per-block scale shuffling
// (docs/KERNELS.md, "q4_0 grouped rows"). Only `linear` reads this format (PackedLinear, repacked
// at construction); the FFN drivers keep GGUF rows (row copies to the GPU, the AXPY).
constexpr int kGroupBlocks = 8;
constexpr size_t kGroupBytes = 144;
constexpr int kGroupXBytes = 256;  // x of one group in XPrep::xg

// Two consecutive x blocks (2j, 2j+1) laid out for the AVX2 kernel, which reduces the integer
// sums of two weight blocks into one vector (hadd: lanes a a b b | a a b b) before converting.
struct XPairQ8 {
  float d[8];        // scales in that lane pattern: da da db db da da db db
  int32_t sum8[8];   // {sum8_a, 0, sum8_b, 0, 0, 0, 0, 0}
};

// The input of a batch of b tokens that share one set of rows, prepared once per call.
struct XPrep {
  const float* xf = nullptr;      // [b, d] f32, row-major (float formats)
  const BlockQ8X* xq = nullptr;   // [b, d/32] (only for Q8_0 / Q4_0 weights)
  const XPairQ8* xpair = nullptr; // [b, d/64] (ditto)
  int b = 0, d = 0;
  // Only for Q4_0G weights: the q8 values of xq regrouped as the weights (per token and group g
  // of 8 blocks, for v = 0..3: 32 bytes with lane k = values 4v..4v+3 of block 8g+k, then 32
  // with values 16+4v..16+4v+3), and the blocks' scales and 8 * sums as plain arrays.
  const int8_t* xg = nullptr;     // [b, d/256, 256]
  const float* xd = nullptr;      // [b, d/32]  = xq[.].d
  const int32_t* xs8 = nullptr;   // [b, d/32]  = xq[.].sum8
  // Only for GGUF Q4_0 rows, one token (the AVX2 dot2's groups of 8 blocks): per block pair p
  // 64 bytes = values 0..15 of block 2p, of block 2p+1, then values 16..31 of each (the halves of
  // a [block 2p | block 2p+1] weight vector); per group of 8 blocks the x scales and 8 * sums in
  // the lane order 0 2 4 6 1 3 5 7 that the kernel's hadd reduction leaves.
  const int8_t* xh = nullptr;      // [d/64, 64]
  const float* xdo = nullptr;      // [d/256 * 8]
  const int32_t* xs8o = nullptr;   // [d/256 * 8]
};

// out[t] = row . x_t for t < b.     row: one packed row of d values (d % 32 == 0 for Q*).
using DotFn = void (*)(const uint8_t* row, const XPrep& x, float* out);
// Two rows (an id's gate and up) in one pass: out[t] = row_a . x_t, out[b + t] = row_b . x_t.
// While it computes, the kernel prefetches three more rows (each row_bytes(F, d) long; any may be
// null), spread evenly over the pass: next_a / next_b, read by the next call, into L1, and
// `later`, read some calls later, into L2. The FFN passes the next id's gate / up rows and this
// id's down row (read by the AXPY up to 8 ids later), so their reads overlap this compute instead
// of following it (docs/KERNELS.md, "Memory behaviour"). A table may leave a format's entry null:
// the driver then calls dot twice.
using Dot2Fn = void (*)(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
                        const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later);
// A run of n contiguous rows (row i at w + i * row_bytes(F, d)), one token (x.b == 1):
// out[i] = row_i . x. Dense `linear` reads its matrices as such runs (a chunk of rows). While it
// computes, the kernel prefetches the bytes kRunAhead ahead of where it reads, in address order
// (one line per 64 bytes consumed, never at or past `end`, the end of the matrix): one stream
// the hardware prefetcher keeps up with, instead of dot2's five (its own rows, the next pair,
// `later`) that fit the FFN's scattered ids. A table may leave a format's entry null: the driver
// then takes dot2 / dot.
using DotRowsFn = void (*)(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end);
// 8 KiB ahead into L2 (prefetcht1): M7's attention projections and lm_head back to back
// (benchmarks/linear_m7.py, Zen 3 dev VM) read 0.66-0.82 / 0.53-0.65 of the read probe at 1 / 2
// threads, against 0.34-0.47 / 0.36-0.48 through dot2; 4 and 16 KiB, and prefetcht0, were level
// with this (docs/KERNELS.md, "One token: runs of rows").
constexpr size_t kRunAhead = 8192;

// y[t, :] += coef[r * b + t] * row_r  for r < nrows, t < b.   y: [b, d] f32.
// Several rows per call let the AVX2 kernel keep partial sums in registers.
// pf[0 .. npf): rows (each as long as a row; pf may be null when npf = 0) the caller passes to
// its next call; the kernel may prefetch them into L2 while it computes (the AVX2 q4_0 kernel
// does, in step with its second pass), so the reads of the next group overlap this one's compute
// (docs/KERNELS.md, "Memory behaviour"). They do not change the result.
// q4_0: the rows go in groups of kAxpyGroup (rows [0, 8), [8, 16), ... of the call); per group,
// token and 32-column block the coefficients s_r = coef * block scale are quantised to int8
// against the group's largest |s_r| (gm = max(max |s_r|, 1e-30), q_r = rne(s_r * (127 / gm)))
// and the block is added as (gm / 127) * sum_r q_r * (nibble - 8), an exact integer sum: an
// error of at most gm / 254 per coefficient (see docs/KERNELS.md).
constexpr int kAxpyGroup = 8;
using AxpyFn = void (*)(const uint8_t* const* rows, int nrows, const float* coef, int b,
                        float* y, int d, const uint8_t* const* pf, int npf);
// x [n] f32 -> n/32 blocks (n % 32 == 0).
using QuantizeFn = void (*)(const float* x, int n, BlockQ8X* out);
// Sum of n floats (the STREAM-like read-bandwidth probe; the sum keeps the reads alive).
using ReadSumFn = double (*)(const float* p, size_t n);

struct Kernels {
  const char* name;
  DotFn dot[kNumFmts];
  AxpyFn axpy[kNumFmts];
  QuantizeFn quantize_q8;
  ReadSumFn read_sum;
  Dot2Fn dot2[kNumFmts];  // null where a format has none (then the driver calls dot twice)
  DotRowsFn dot_rows[kNumFmts];  // null where a format has none (then the driver takes dot2)
};

const Kernels& ref_kernels();     // kernels_ref.cpp (always built)
const Kernels* avx2_kernels();    // kernels_avx2.cpp; nullptr when not built (non-x86)

// dispatch.cpp
const Kernels& active_kernels();  // the table the drivers use now
bool cpu_has_avx2();
void force_reference(bool on);    // initialised from HYBRIDINFER_FORCE_REF
bool reference_forced();

// Shared scalar helpers (both implementations use them for scales and tails).
float f16_to_f32(uint16_t h);
inline float bf16_to_f32(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  __builtin_memcpy(&f, &u, 4);
  return f;
}
inline size_t row_bytes(Fmt f, int d) {
  switch (f) {
    case Fmt::F32: return size_t(d) * 4;
    case Fmt::F16:
    case Fmt::BF16: return size_t(d) * 2;
    case Fmt::Q8_0: return size_t(d / QK) * 34;
    case Fmt::Q4_0:
    case Fmt::Q4_0G: return size_t(d / QK) * 18;
  }
  return 0;
}
constexpr bool is_quant(Fmt f) { return f == Fmt::Q8_0 || f == Fmt::Q4_0 || f == Fmt::Q4_0G; }
constexpr bool is_grouped(Fmt f) { return f == Fmt::Q4_0G; }

}  // namespace hi
