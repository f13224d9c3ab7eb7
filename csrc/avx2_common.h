// Internal to the AVX2 kernel files (*_avx2.cpp, built with -mavx2 -mfma -mf16c): the inline
// load / convert / prefetch helpers several of them use, the group switch of the AXPY, and the
// entry points that kernels_avx2.cpp puts into the table. Include it from *_avx2.cpp only: its
// inline functions are compiled with the AVX2 flags, and an ISA-neutral file that included it
// would not build (or, worse, run AVX2 code on a machine dispatch had ruled out).
//   kernels_avx2.cpp  the table, the f16 table, x -> q8, the read probe
//   float_avx2.cpp    f32 / f16 / bf16 dot and AXPY
//   qdot_avx2.cpp     q8_0 / q4_0 dot, dot2 and dot_rows over GGUF rows
//   q4g_avx2.cpp      q4_0 grouped rows (Q4_0G): dot and dot_rows
//   qaxpy_avx2.cpp    q8_0 / q4_0 AXPY (the FFN's down rows)
#pragma once
#ifndef __AVX2__
#error "avx2_common.h is for the *_avx2.cpp files only (built with -mavx2 -mfma -mf16c)"
#endif
#include <immintrin.h>
#include <initializer_list>

#include <cstring>
#include <type_traits>

#include "kernels.h"

namespace hi {
namespace avx2 {

// Software prefetch kPrefetch bytes ahead inside the current row (clipped at its end: for a
// sparse id set the bytes after a row are not needed). The hardware prefetchers alone left
// q4_0 at ~40% of the bandwidth; the driver prefetches the head of the next id's rows.
constexpr size_t kPrefetch = HI_PREFETCH_BYTES;
inline void prefetch_ahead(const uint8_t* row, size_t off, size_t rb) {
  if (off + kPrefetch < rb) _mm_prefetch(reinterpret_cast<const char*>(row + off + kPrefetch), HI_PREFETCH_HINT);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// f16 -> f32 by table (256 KiB, filled once by avx2_kernels() before any kernel runs): a block
// scale then costs loads only, no vcvtph2ps + shuffle on the vector ports, which the q4_0 loops
// are short of.
extern float g_f16_table[1 << 16];
inline const float* h2f_ptr(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return &g_f16_table[v]; }
inline float h2f(const uint8_t* p) { return *h2f_ptr(p); }

// ---- block formats ---------------------------------------------------------------------------
template <Fmt F> constexpr size_t kBlockBytes = F == Fmt::Q8_0 ? 34 : 18;

// The 32 weights of a block as bytes in element order: q4_0 -> unsigned nibbles 0..15,
// q8_0 -> |q| (the signs are moved onto x, since maddubs multiplies unsigned by signed).
// q4_0: the 16 bytes go to both 128-bit lanes and the upper lane is shifted right by 4 (one
// variable shift instead of shift + insert).
template <Fmt F>
inline __m256i block_bytes(const uint8_t* blk, __m256i* sign_src) {
  if constexpr (F == Fmt::Q4_0) {
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)));
    const __m256i hi = _mm256_srlv_epi32(both, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(hi, _mm256_set1_epi8(0x0F));
  } else {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    *sign_src = q;
    return _mm256_sign_epi8(q, q);  // |q|
  }
}

// Integer sums of one weight block against one x block: 8 int32 lanes (not yet corrected for
// q4_0's offset of 8).
template <Fmt F>
inline __m256i block_isum(__m256i w, __m256i sign_src, const int8_t* xq8) {
  __m256i xq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq8));
  if constexpr (F == Fmt::Q8_0) xq = _mm256_sign_epi8(xq, sign_src);
  return _mm256_madd_epi16(_mm256_maddubs_epi16(w, xq), _mm256_set1_epi16(1));
}

// The lines of [p, p + kGroupBytes) (a group may span 3 or 4 lines; a repeated line is cheap).
template <int Locality>
inline void prefetch_group(const uint8_t* p) {
  __builtin_prefetch(p, 0, Locality);
  __builtin_prefetch(p + 64, 0, Locality);
  __builtin_prefetch(p + kGroupBytes - 1, 0, Locality);
}

// dot2's streams, one 144-byte group at offset o: its own rows kPrefetch ahead (clipped at the
// row end), the next pair's rows into L1 and `later` into L2 at the same offset.
inline void prefetch_dot2_group(const uint8_t* row_a, const uint8_t* row_b, size_t o, size_t rb,
                                const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later) {
  if (o + kPrefetch < rb) {
    prefetch_group<HI_PREFETCH_LOCALITY>(row_a + o + kPrefetch);
    prefetch_group<HI_PREFETCH_LOCALITY>(row_b + o + kPrefetch);
  }
  if (next_a) prefetch_group<3>(next_a + o);
  if (next_b) prefetch_group<3>(next_b + o);
  if (later) prefetch_group<2>(later + o);
}

// dot2 with a batch (b > 1) runs two dot calls: the next pair's rows and `later` (rb bytes
// each, any may be null) are prefetched into L2 up front instead of in step.
inline void prefetch_dot2_rows_l2(size_t rb, const uint8_t* next_a, const uint8_t* next_b,
                                  const uint8_t* later) {
  for (const uint8_t* p : {next_a, next_b, later})
    for (size_t o = 0; p && o < rb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T1);
}

// dot2's prefetch streams for the FFN's gate / up (kernels.h Dot2Fn): each row kPrefetch ahead,
// the next pair into L1 and `later` into L2 at the offset being read. group(o): the 144-byte
// group at o (q4_0 groups of 8 blocks); pair<F>(o): the block pair at o.
struct Dot2Streams {
  const uint8_t *row_a, *row_b, *next_a, *next_b, *later;
  size_t rb;
  void group(size_t o) const { prefetch_dot2_group(row_a, row_b, o, rb, next_a, next_b, later); }
  template <Fmt F> void pair(size_t o) const;   // qdot_avx2.cpp
};

// dot_rows' one stream (kernels.h DotRowsFn): rows are read in pairs from `pair_base`; once the
// pair has been read up to offset o of each row, every line below pair_base + kRunAhead + 2 o
// (and below `end`) has been prefetched into L2, each line once (`line` is the next one).
struct RunStream {
  const uint8_t* pair_base;
  const uint8_t* end;
  const uint8_t* line;
  RunStream(const uint8_t* w, const uint8_t* e)
      : pair_base(w), end(e),
        line(reinterpret_cast<const uint8_t*>((reinterpret_cast<uintptr_t>(w) + kRunAhead) & ~uintptr_t(63))) {}
  void to(size_t o) {
    const uint8_t* t = pair_base + kRunAhead + 2 * o;
    if (t > end) t = end;
    for (; line < t; line += 64) _mm_prefetch(reinterpret_cast<const char*>(line), _MM_HINT_T1);
  }
  void group(size_t o) { to(o + kGroupBytes); }
  template <Fmt F> void pair(size_t o) { to(o + 2 * kBlockBytes<F>); }
};

// A run of n rows (DotRowsFn) in pairs: pair(row_a, row_b, out, stream) computes two rows
// advancing the stream as it reads; an odd last row goes to one(row, out) (its own in-row
// prefetch). The stream is brought to the pair's end after each pair (a row's GGUF tail blocks
// do not advance it).
template <class Pair, class One>
inline void dot_rows_run(const uint8_t* w, int n, size_t rb, float* out, const uint8_t* end,
                         const Pair& pair, const One& one) {
  RunStream s(w, end);
  int r = 0;
  for (; r + 2 <= n; r += 2) {
    s.pair_base = w + size_t(r) * rb;
    pair(s.pair_base, s.pair_base + rb, out + r, s);
    s.to(rb);
  }
  if (r < n) one(w + size_t(r) * rb, out + r);
}

// The rows of one AXPY call (kernels.h AxpyFn) in groups of kAxpyGroup: group(R, r, np) adds rows
// [r, r + R) with R = std::integral_constant<int, min(8, nrows - r)>, so each kernel keeps a
// group's partial sums in registers; np = npf with the last group of the call (the caller's next
// rows, prefetched while the last group computes), 0 before it.
template <class Group>
inline void axpy_groups(int nrows, int npf, const Group& group) {
  for (int r = 0; r < nrows; r += kAxpyGroup) {
    const int np = r + kAxpyGroup >= nrows ? npf : 0;
    switch (nrows - r) {
      case 1: group(std::integral_constant<int, 1>(), r, np); break;
      case 2: group(std::integral_constant<int, 2>(), r, np); break;
      case 3: group(std::integral_constant<int, 3>(), r, np); break;
      case 4: group(std::integral_constant<int, 4>(), r, np); break;
      case 5: group(std::integral_constant<int, 5>(), r, np); break;
      case 6: group(std::integral_constant<int, 6>(), r, np); break;
      case 7: group(std::integral_constant<int, 7>(), r, np); break;
      default: group(std::integral_constant<int, kAxpyGroup>(), r, np); break;
    }
  }
}

// ---- the entry points (kernels.h signatures) --------------------------------------------------
// float_avx2.cpp
void dot_f32(const uint8_t* row, const XPrep& x, float* out);
void dot_f16(const uint8_t* row, const XPrep& x, float* out);
void dot_bf16(const uint8_t* row, const XPrep& x, float* out);
void axpy_f32(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
              const uint8_t* const* pf, int npf);
void axpy_f16(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
              const uint8_t* const* pf, int npf);
void axpy_bf16(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
               const uint8_t* const* pf, int npf);
// qdot_avx2.cpp
void dot_q8_0(const uint8_t* row, const XPrep& x, float* out);
void dot_q4_0(const uint8_t* row, const XPrep& x, float* out);
void dot2_q8_0(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
               const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later);
void dot2_q4_0(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
               const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later);
void dot_rows_q8_0(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end);
void dot_rows_q4_0(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end);
// q4g_avx2.cpp
void dot_q4g(const uint8_t* row, const XPrep& x, float* out);
void dot_rows_q4g(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end);
// qaxpy_avx2.cpp
void axpy_q8_0(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
               const uint8_t* const* pf, int npf);
void axpy_q4_0(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
               const uint8_t* const* pf, int npf);

}  // namespace avx2
}  // namespace hi
