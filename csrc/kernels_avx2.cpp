// AVX2 + FMA + F16C implementation of kernels.h (this file alone is built with -mavx2 -mfma
// -mf16c; dispatch.cpp only calls it after cpuid said yes).
//   f32 / f16 (vcvtph2ps) / bf16 (zero-extend + shift): 8 floats per step, FMA.
//   q8_0 / q4_0 dot: x pre-quantised to q8; per 32-block one maddubs + madd gives the exact
//     integer sum, then one FMA with scale_w * scale_x. q4_0 feeds the unsigned nibbles to
//     maddubs and subtracts 8 * sum(x_q) (precomputed per x block) instead of re-centring.
//   axpy (down): up to 8 rows per pass, the y slice stays in registers across the rows; q4_0
//     with int8-quantised row coefficients and integer block sums (maddubs over row pairs).
// Batches of tokens: the weight block is loaded/expanded once and used for every token.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <utility>

#include "kernels.h"

namespace hi {
namespace {

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

// f16 -> f32 by table (256 KiB, filled once): a block scale then costs loads only, no
// vcvtph2ps + shuffle on the vector ports, which the q4_0 loops are short of.
float g_f16_table[1 << 16];
inline const float* h2f_ptr(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return &g_f16_table[v]; }
inline float h2f(const uint8_t* p) { return *h2f_ptr(p); }

// ---- float formats ---------------------------------------------------------------------
template <Fmt F>
inline __m256 load8(const uint8_t* row, size_t j) {  // values j .. j+7 as f32
  if constexpr (F == Fmt::F32) return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + j);
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j));
  if constexpr (F == Fmt::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));  // bf16
}

template <Fmt F>
inline float load1(const uint8_t* row, size_t j) {
  if constexpr (F == Fmt::F32) { float v; std::memcpy(&v, row + 4 * j, 4); return v; }
  uint16_t h;
  std::memcpy(&h, row + 2 * j, 2);
  if constexpr (F == Fmt::F16) return _cvtsh_ss(h);
  return bf16_to_f32(h);
}

// NT tokens at once, U independent accumulators per token (NT * U chains hide FMA latency).
template <Fmt F, int NT, int U>
void dot_float_tile(const uint8_t* row, const float* x, int d, float* out) {
  __m256 acc[NT][U];
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < U; ++u) acc[t][u] = _mm256_setzero_ps();
  int j = 0;
  // No software prefetch in the float kernels: on the Zen 4 dev VM prefetcht0 1 KiB ahead held
  // a dense f16 FFN at ~12 GB/s a core, without it the hardware prefetchers reach ~17
  // (docs/KERNELS.md, "Float formats: no software prefetch").
  for (; j + 8 * U <= d; j += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 w = load8<F>(row, size_t(j + 8 * u));
      for (int t = 0; t < NT; ++t)
        acc[t][u] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + size_t(t) * d + j + 8 * u), acc[t][u]);
    }
  }
  for (; j + 8 <= d; j += 8) {
    const __m256 w = load8<F>(row, size_t(j));
    for (int t = 0; t < NT; ++t)
      acc[t][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + size_t(t) * d + j), acc[t][0]);
  }
  for (int t = 0; t < NT; ++t) {
    for (int u = 1; u < U; ++u) acc[t][0] = _mm256_add_ps(acc[t][0], acc[t][u]);
    float s = hsum(acc[t][0]);
    for (int jj = j; jj < d; ++jj) s += load1<F>(row, size_t(jj)) * x[size_t(t) * d + jj];
    out[t] = s;
  }
}

template <Fmt F>
void dot_float(const uint8_t* row, const XPrep& x, float* out) {
  int t = 0;
  if (x.b == 1) { dot_float_tile<F, 1, 4>(row, x.xf, x.d, out); return; }
  for (; t + 4 <= x.b; t += 4) dot_float_tile<F, 4, 2>(row, x.xf + size_t(t) * x.d, x.d, out + t);
  for (; t < x.b; ++t) dot_float_tile<F, 1, 4>(row, x.xf + size_t(t) * x.d, x.d, out + t);
}

// ---- quantised formats -------------------------------------------------------------------
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

// NT tokens at once. Blocks go in pairs: the two integer sums are folded into one vector by
// hadd (lanes a a b b | a a b b), so one convert, one scale multiply and one FMA serve two
// blocks; the scale vector pairs the weight scales (two table loads + blend) with the x scales
// pre-arranged in XPairQ8. An odd last block takes the single-block path.
template <Fmt F, int NT>
void dot_quant_tile(const uint8_t* row, const BlockQ8X* xq, const XPairQ8* xp, int nb,
                    float* out) {
  constexpr size_t BB = kBlockBytes<F>;
  const int np = nb / 2;
  const size_t rb = size_t(nb) * BB;
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int j = 0; j < np; ++j) {
    const uint8_t* pa = row + size_t(2 * j) * BB;
    const uint8_t* pb = pa + BB;
    prefetch_ahead(row, size_t(2 * j) * BB, rb);
    __m256i sa = _mm256_setzero_si256(), sb = sa;
    const __m256i wa = block_bytes<F>(pa, &sa), wb = block_bytes<F>(pb, &sb);
    const __m256 dw = _mm256_blend_ps(_mm256_broadcast_ss(h2f_ptr(pa)),
                                      _mm256_broadcast_ss(h2f_ptr(pb)), 0xCC);
    for (int t = 0; t < NT; ++t) {
      const BlockQ8X* xt = xq + size_t(t) * nb + 2 * j;
      const XPairQ8& pr = xp[size_t(t) * np + j];
      __m256i h = _mm256_hadd_epi32(block_isum<F>(wa, sa, xt[0].q), block_isum<F>(wb, sb, xt[1].q));
      if constexpr (F == Fmt::Q4_0)
        h = _mm256_sub_epi32(h, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr.sum8)));
      const __m256 s = _mm256_mul_ps(dw, _mm256_loadu_ps(pr.d));
      acc[t] = _mm256_fmadd_ps(s, _mm256_cvtepi32_ps(h), acc[t]);
    }
  }
  if (nb % 2) {
    const uint8_t* p = row + size_t(nb - 1) * BB;
    __m256i sg = _mm256_setzero_si256();
    const __m256i w = block_bytes<F>(p, &sg);
    for (int t = 0; t < NT; ++t) {
      const BlockQ8X& xb = xq[size_t(t) * nb + nb - 1];
      __m256i i = block_isum<F>(w, sg, xb.q);
      if constexpr (F == Fmt::Q4_0)
        i = _mm256_sub_epi32(i, _mm256_zextsi128_si256(_mm_cvtsi32_si128(xb.sum8)));
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(h2f(p) * xb.d), _mm256_cvtepi32_ps(i), acc[t]);
    }
  }
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
}

template <Fmt F>
void dot_quant(const uint8_t* row, const XPrep& x, float* out) {
  const int nb = x.d / QK, np = nb / 2;
  int t = 0;
  auto at = [&](int t0) { return std::make_pair(x.xq + size_t(t0) * nb, x.xpair + size_t(t0) * np); };
  for (; t + 4 <= x.b; t += 4) { auto p = at(t); dot_quant_tile<F, 4>(row, p.first, p.second, nb, out + t); }
  for (; t + 2 <= x.b; t += 2) { auto p = at(t); dot_quant_tile<F, 2>(row, p.first, p.second, nb, out + t); }
  for (; t < x.b; ++t) { auto p = at(t); dot_quant_tile<F, 1>(row, p.first, p.second, nb, out + t); }
}

// Prefetch of the bytes at offset o (and o + BB where a block pair spans more than a line) of
// a row that may be null: called once per block pair, it touches every line of the row.
// Locality 3 = prefetcht0 (L1), 2 = prefetcht1 (L2).
template <Fmt F, int Locality>
inline void prefetch_pair(const uint8_t* row, size_t o) {
  if (!row) return;
  __builtin_prefetch(row + o, 0, Locality);
  if constexpr (2 * kBlockBytes<F> > 64) __builtin_prefetch(row + o + kBlockBytes<F>, 0, Locality);
}

// Gate and up of one id in one pass (kernels.h Dot2Fn), one token: the x block pair is loaded
// once for both rows, both rows are read (and prefetched ahead) at once, and the next / later
// rows are prefetched a line or so per block pair. Measured on the dev machine (docs/KERNELS.md):
// the fused pass alone took dense q4_0 from 11.7 to 10.8-11.3 ms at one thread, the streams of
// the down row and the next id's rows to ~8.2 ms. A batch (b > 1) takes two dot calls after the
// three rows were prefetched up front into L2.
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

// GGUF q4_0, one token, 8 blocks (144 bytes) of one row at p: the integer sums of the 8 blocks
// in int32 lanes ordered 0 2 4 6 1 3 5 7, corrected for the nibble offset. Block pairs load as
// [block 2j | block 2j+1] (one insert), their nibble products against XPrep::xh add up in int16
// (8 per block and half); three hadd16 fold the 4 pair vectors into 2 int16 per block (|.| <=
// 4 * 4 * 15 * 127 < 2^15) and one madd finishes: no per-pair hadd32, convert, scale blend and
// FMA as in the pair loop below (docs/KERNELS.md, "GGUF q4_0 dot2 in groups of 8").
inline __m256i q4_gguf_isum8(const uint8_t* p, const int8_t* xh, const int32_t* s8o) {
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  __m256i T[4];
  for (int j = 0; j < 4; ++j) {
    const uint8_t* b = p + 36 * j;
    const __m256i w = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(b + 20),
                                          reinterpret_cast<const __m128i*>(b + 2));
    const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + 64 * j));
    const __m256i xhh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xh + 64 * j + 32));
    T[j] = _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_and_si256(w, m0f), xl),
                            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m0f), xhh));
  }
  const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(T[0], T[1]), _mm256_hadd_epi16(T[2], T[3]));
  return _mm256_sub_epi32(_mm256_madd_epi16(h, _mm256_set1_epi16(1)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s8o)));
}

// The 8 f16 scales of those blocks in the same lane order, gathered with scalar loads and
// shifts (integer ports, idle in this loop) instead of vector shuffles.
inline __m256 q4_gguf_scales8(const uint8_t* p) {
  auto h = [&](int k) { uint16_t v; std::memcpy(&v, p + 18 * k, 2); return uint64_t(v); };
  const uint64_t lo = h(0) | h(2) << 16 | h(4) << 32 | h(6) << 48;
  const uint64_t hi = h(1) | h(3) << 16 | h(5) << 32 | h(7) << 48;
  return _mm256_cvtph_ps(_mm_set_epi64x(int64_t(hi), int64_t(lo)));
}

template <Fmt F>
void dot2_quant(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
                const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later) {
  constexpr size_t BB = kBlockBytes<F>;
  const int nb = x.d / QK, np = nb / 2;
  const size_t rb = size_t(nb) * BB;
  if (x.b != 1 || np == 0) {
    for (const uint8_t* p : {next_a, next_b, later})
      for (size_t o = 0; p && o < rb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T1);
    dot_quant<F>(row_a, x, out);
    dot_quant<F>(row_b, x, out + x.b);
    return;
  }
  __m256 accA = _mm256_setzero_ps(), accB = accA;
  int j = 0;
  if constexpr (F == Fmt::Q4_0) {   // groups of 8 blocks, then the pair loop for the rest
    for (int g = 0; x.xh && g < nb / kGroupBlocks; ++g, j += kGroupBlocks / 2) {
      const size_t o = size_t(g) * kGroupBytes;
      prefetch_dot2_group(row_a, row_b, o, rb, next_a, next_b, later);
      const int8_t* xh = x.xh + size_t(g) * 4 * 64;
      const int32_t* s8 = x.xs8o + size_t(g) * kGroupBlocks;
      const __m256 dx = _mm256_loadu_ps(x.xdo + size_t(g) * kGroupBlocks);
      const __m256i ia = q4_gguf_isum8(row_a + o, xh, s8), ib = q4_gguf_isum8(row_b + o, xh, s8);
      accA = _mm256_fmadd_ps(_mm256_mul_ps(q4_gguf_scales8(row_a + o), dx), _mm256_cvtepi32_ps(ia), accA);
      accB = _mm256_fmadd_ps(_mm256_mul_ps(q4_gguf_scales8(row_b + o), dx), _mm256_cvtepi32_ps(ib), accB);
    }
  }
  for (; j < np; ++j) {
    const size_t o = size_t(2 * j) * BB;
    prefetch_ahead(row_a, o, rb);
    prefetch_ahead(row_b, o, rb);
    prefetch_pair<F, 3>(next_a, o);
    prefetch_pair<F, 3>(next_b, o);
    prefetch_pair<F, 2>(later, o);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    const __m256i wa0 = block_bytes<F>(row_a + o, &s0), wa1 = block_bytes<F>(row_a + o + BB, &s1);
    const __m256i wb0 = block_bytes<F>(row_b + o, &s2), wb1 = block_bytes<F>(row_b + o + BB, &s3);
    const __m256 dA = _mm256_blend_ps(_mm256_broadcast_ss(h2f_ptr(row_a + o)),
                                      _mm256_broadcast_ss(h2f_ptr(row_a + o + BB)), 0xCC);
    const __m256 dB = _mm256_blend_ps(_mm256_broadcast_ss(h2f_ptr(row_b + o)),
                                      _mm256_broadcast_ss(h2f_ptr(row_b + o + BB)), 0xCC);
    const BlockQ8X* xt = x.xq + 2 * j;
    const XPairQ8& pr = x.xpair[j];
    const __m256 dx = _mm256_loadu_ps(pr.d);
    __m256i hA = _mm256_hadd_epi32(block_isum<F>(wa0, s0, xt[0].q), block_isum<F>(wa1, s1, xt[1].q));
    __m256i hB = _mm256_hadd_epi32(block_isum<F>(wb0, s2, xt[0].q), block_isum<F>(wb1, s3, xt[1].q));
    if constexpr (F == Fmt::Q4_0) {
      const __m256i s8 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pr.sum8));
      hA = _mm256_sub_epi32(hA, s8);
      hB = _mm256_sub_epi32(hB, s8);
    }
    accA = _mm256_fmadd_ps(_mm256_mul_ps(dA, dx), _mm256_cvtepi32_ps(hA), accA);
    accB = _mm256_fmadd_ps(_mm256_mul_ps(dB, dx), _mm256_cvtepi32_ps(hB), accB);
  }
  float ta = 0.f, tb = 0.f;  // an odd last block: the single-block path of dot_quant_tile
  if (nb % 2) {
    dot_quant_tile<F, 1>(row_a + size_t(nb - 1) * BB, x.xq + nb - 1, nullptr, 1, &ta);
    dot_quant_tile<F, 1>(row_b + size_t(nb - 1) * BB, x.xq + nb - 1, nullptr, 1, &tb);
  }
  out[0] = hsum(accA) + ta;
  out[1] = hsum(accB) + tb;
}

// ---- q4_0 grouped rows (Q4_0G, kernels.h) ----------------------------------------------------
// Per group of 8 blocks (144 bytes) and token: 4 weight loads, each split into low / high nibbles
// (and, shift + and), 8 maddubs against the regrouped x (XPrep::xg) summed in int16 (lane k =
// block k), one madd to int32, minus 8 sum(x) per block, one convert, the 8 scales by one
// vcvtph2ps times the x scales, one FMA. About 33 vector ops per 8 row-blocks against ~60 for the
// GGUF pair loop (dot_quant_tile), whose per-pair hadd, scale blend and convert dominate; hot
// (rows in L2, Zen 4 dev VM): 0.69 vs 1.45-1.65 ns a row-block (.dev prototype, docs/KERNELS.md).

// Integer sums of group g's 8 blocks of one row against one token's regrouped x: lane k = block k,
// already corrected for the nibble offset (- 8 sum q).
inline __m256i q4g_isum(const uint8_t* grp, const int8_t* xg, const int32_t* xs8) {
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  __m256i lo = _mm256_setzero_si256(), hi = lo;
  for (int v = 0; v < 4; ++v) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(grp + 16 + 32 * v));
    const __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 64 * v));
    const __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xg + 64 * v + 32));
    lo = _mm256_add_epi16(lo, _mm256_maddubs_epi16(_mm256_and_si256(w, m0f), xl));
    hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), m0f), xh));
  }
  return _mm256_sub_epi32(_mm256_madd_epi16(_mm256_add_epi16(lo, hi), _mm256_set1_epi16(1)),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs8)));
}

// The nb % 8 GGUF tail blocks of a grouped row (first block index i0), added to acc[t].
template <int NT>
inline void q4g_tail(const uint8_t* tail, const XPrep& x, int t0, int i0, int nb, __m256* acc) {
  for (int i = i0; i < nb; ++i) {
    const uint8_t* p = tail + size_t(i - i0) * 18;
    const __m256i w = block_bytes<Fmt::Q4_0>(p, nullptr);
    for (int t = 0; t < NT; ++t) {
      const BlockQ8X& xb = x.xq[size_t(t0 + t) * nb + i];
      const __m256i s = _mm256_sub_epi32(block_isum<Fmt::Q4_0>(w, w, xb.q),
                                         _mm256_zextsi128_si256(_mm_cvtsi32_si128(xb.sum8)));
      acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(h2f(p) * xb.d), _mm256_cvtepi32_ps(s), acc[t]);
    }
  }
}

// NT tokens (t0 ..) of one grouped row: each weight group is loaded once for the NT tokens.
template <int NT>
void dot_q4g_tile(const uint8_t* row, const XPrep& x, int t0, float* out) {
  const int nb = x.d / QK, ng = nb / kGroupBlocks;
  const size_t rb = size_t(nb) * 18;
  __m256 acc[NT];
  for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
  for (int g = 0; g < ng; ++g) {
    const uint8_t* p = row + size_t(g) * kGroupBytes;
    if (size_t(g) * kGroupBytes + kPrefetch < rb) prefetch_group<HI_PREFETCH_LOCALITY>(p + kPrefetch);
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    for (int t = 0; t < NT; ++t) {
      const size_t tb = size_t(t0 + t) * nb + size_t(g) * kGroupBlocks;   // token t's block 8g
      const __m256i s = q4g_isum(p, x.xg + size_t(t0 + t) * ng * kGroupXBytes + size_t(g) * kGroupXBytes,
                                 x.xs8 + tb);
      acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(dw, _mm256_loadu_ps(x.xd + tb)), _mm256_cvtepi32_ps(s), acc[t]);
    }
  }
  q4g_tail<NT>(row + size_t(ng) * kGroupBytes, x, t0, ng * kGroupBlocks, nb, acc);
  for (int t = 0; t < NT; ++t) out[t] = hsum(acc[t]);
}

void dot_q4g(const uint8_t* row, const XPrep& x, float* out) {
  int t = 0;
  for (; t + 4 <= x.b; t += 4) dot_q4g_tile<4>(row, x, t, out + t);
  for (; t + 2 <= x.b; t += 2) dot_q4g_tile<2>(row, x, t, out + t);
  for (; t < x.b; ++t) dot_q4g_tile<1>(row, x, t, out + t);
}

// Two grouped rows, one token (Dot2Fn: `linear` hands over row pairs), streaming the next pair
// into L1 and `later` into L2 a group at a time, as dot2_quant does for GGUF rows. These streams
// matter on the Zen 4 dev VM (14336 x 4096, 1 thread, LLC flushed, a scratch runtime switch):
// 2.6-2.8 ms with them and the in-row prefetch, 4.7-5.4 ms with no software prefetch, 3.6-4.3 ms
// with the in-row one alone; 2 KiB ahead into L2 instead of 1 KiB into L1: level.
void dot2_q4g(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
              const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later) {
  const int nb = x.d / QK, ng = nb / kGroupBlocks;
  const size_t rb = size_t(nb) * 18;
  if (x.b != 1) {
    for (const uint8_t* p : {next_a, next_b, later})
      for (size_t o = 0; p && o < rb; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T1);
    dot_q4g(row_a, x, out);
    dot_q4g(row_b, x, out + x.b);
    return;
  }
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int g = 0; g < ng; ++g) {
    const size_t o = size_t(g) * kGroupBytes;
    prefetch_dot2_group(row_a, row_b, o, rb, next_a, next_b, later);
    const int8_t* xg = x.xg + size_t(g) * kGroupXBytes;
    const int32_t* s8 = x.xs8 + size_t(g) * kGroupBlocks;
    const __m256 dx = _mm256_loadu_ps(x.xd + size_t(g) * kGroupBlocks);
    const __m256i sa = q4g_isum(row_a + o, xg, s8), sb = q4g_isum(row_b + o, xg, s8);
    const __m256 da = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_a + o)));
    const __m256 db = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row_b + o)));
    acc[0] = _mm256_fmadd_ps(_mm256_mul_ps(da, dx), _mm256_cvtepi32_ps(sa), acc[0]);
    acc[1] = _mm256_fmadd_ps(_mm256_mul_ps(db, dx), _mm256_cvtepi32_ps(sb), acc[1]);
  }
  const size_t to = size_t(ng) * kGroupBytes;
  q4g_tail<1>(row_a + to, x, 0, ng * kGroupBlocks, nb, &acc[0]);
  q4g_tail<1>(row_b + to, x, 0, ng * kGroupBlocks, nb, &acc[1]);
  out[0] = hsum(acc[0]);
  out[1] = hsum(acc[1]);
}

// ---- axpy (down) -------------------------------------------------------------------------
// Float formats: y_t[j..j+8) += sum_r c[r,t] * row_r[j..j+8), R rows per pass.
template <Fmt F, int R>
void axpy_float(const uint8_t* const* rows, const float* coef, int b, float* y, int d) {
  for (int t = 0; t < b; ++t) {
    float* yt = y + size_t(t) * d;
    __m256 c[R];
    for (int r = 0; r < R; ++r) c[r] = _mm256_set1_ps(coef[r * b + t]);
    int j = 0;
    for (; j + 8 <= d; j += 8) {  // no software prefetch (see dot_float_tile)
      __m256 v = _mm256_loadu_ps(yt + j);
      for (int r = 0; r < R; ++r) v = _mm256_fmadd_ps(c[r], load8<F>(rows[r], size_t(j)), v);
      _mm256_storeu_ps(yt + j, v);
    }
    for (; j < d; ++j)
      for (int r = 0; r < R; ++r) yt[j] += coef[r * b + t] * load1<F>(rows[r], size_t(j));
  }
}

// q8_0: per 32-block, v[0..3] (32 floats of y) += s_r * q_r with s_r = c[r,t] * scale_r.
template <int R>
void axpy_q8(const uint8_t* const* rows, const float* coef, int b, float* y, int d) {
  const int nb = d / QK;
  for (int t = 0; t < b; ++t) {
    float* yt = y + size_t(t) * d;
    float c[R];
    for (int r = 0; r < R; ++r) c[r] = coef[r * b + t];
    for (int i = 0; i < nb; ++i) {
      float* yb = yt + size_t(i) * QK;
      __m256 v0 = _mm256_loadu_ps(yb), v1 = _mm256_loadu_ps(yb + 8);
      __m256 v2 = _mm256_loadu_ps(yb + 16), v3 = _mm256_loadu_ps(yb + 24);
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = rows[r] + size_t(i) * 34;
        prefetch_ahead(rows[r], size_t(i) * 34, size_t(nb) * 34);
        const __m256 s = _mm256_set1_ps(c[r] * h2f(p));
        auto ld = [&](int o) {
          return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + o))));
        };
        v0 = _mm256_fmadd_ps(s, ld(0), v0);
        v1 = _mm256_fmadd_ps(s, ld(8), v1);
        v2 = _mm256_fmadd_ps(s, ld(16), v2);
        v3 = _mm256_fmadd_ps(s, ld(24), v3);
      }
      _mm256_storeu_ps(yb, v0); _mm256_storeu_ps(yb + 8, v1);
      _mm256_storeu_ps(yb + 16, v2); _mm256_storeu_ps(yb + 24, v3);
    }
  }
}

// q4_0 with integer coefficients (the arithmetic of kernels.h, "q4_0 down"). Per token and
// 32-column block, for the group of R <= 8 rows:
//   s_r = c_r * scale_r (f32), gm = max(max_r |s_r|, 1e-30), q_r = rne(s_r * (127 / gm)),
//   gs = gm * (1/127);  acc_j = sum_r q_r * (n_rj - 8) in int16;  y_j += gs * acc_j.
// Two passes over a chunk of up to 128 blocks:
//   1. coefficients, 8 blocks at a time with the blocks in the lanes (no horizontal max): the 8
//      scales of one row come from 4 loads + pshufb (no gathers, slow here); the per-block
//      records are q of rows 0 4 1 5 2 6 3 7 as 8 bytes, -8 sum_r q_r (int16, twice) and gs.
//   2. the AXPY: rows p and p+4 are interleaved byte-wise, so one maddubs gives
//      q_p n_p + q_{p+4} n_{p+4} for 16 columns; the int16 sum starts at -8 sum q. |acc| <=
//      8*127*8 fits int16 (each maddubs pair <= 2*15*127, no saturation; the adds may wrap on
//      the way, the exact final value is in range). One convert + FMA per 8 columns for all
//      rows instead of one convert + FMA per row.
// Pass 1 reads every cache line of the chunk's rows (the scales sit in each 18-byte block), so it
// also carries the prefetches; pass 2 then reads the rows from L1.
struct Q4Rec {
  static constexpr int kChunk = 128;  // blocks per pass
  alignas(32) uint8_t q[kChunk][8];   // int8 q of rows 0 4 1 5 2 6 3 7
  alignas(32) int32_t init[kChunk];   // -8 sum q in both int16 halves
  alignas(32) float gs[kChunk];
};

// Records of blocks i .. i+7 (all inside the rows). rows[r] for r >= R is not read.
template <int R>
inline void q4_records8(const uint8_t* const* rows, const float* c, size_t rb, int i, Q4Rec& rec, int k,
                        const uint8_t* const* pf, int npf) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  // 32-byte loads at blocks i, i+2, i+4, i+6: scale of block i+2j at bytes 0..1 (low lane), of
  // block i+2j+1 at bytes 18..19 (high lane bytes 2..3); pshufb moves them to 16-bit slot 2j of
  // the low lane / slot 2j+1 of the high lane, so OR-ing the two lanes gives blocks i..i+7 in order.
  alignas(32) static const int8_t pat[4][32] = {
      {0, 1, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128,
       -128, -128, 2, 3, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128},
      {-128, -128, -128, -128, 0, 1, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128,
       -128, -128, -128, -128, -128, -128, 2, 3, -128, -128, -128, -128, -128, -128, -128, -128},
      {-128, -128, -128, -128, -128, -128, -128, -128, 0, 1, -128, -128, -128, -128, -128, -128,
       -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, 2, 3, -128, -128, -128, -128},
      {-128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, 0, 1, -128, -128,
       -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, -128, 2, 3}};
  __m256 S[8];
  __m256 M = _mm256_set1_ps(1e-30f);
  const size_t off = size_t(i) * 18;
  for (int r = 0; r < 8; ++r) {
    if (r >= R) { S[r] = _mm256_setzero_ps(); continue; }
    const uint8_t* p = rows[r] + off;
    for (size_t o = 0; o < 144; o += 64) prefetch_ahead(rows[r], off + o, rb);
    __m256i v = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j)
      v = _mm256_or_si256(v, _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 36 * j)),
                                                 _mm256_load_si256(reinterpret_cast<const __m256i*>(pat[j]))));
    const __m128i h = _mm_or_si128(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    S[r] = _mm256_mul_ps(_mm256_set1_ps(c[r]), _mm256_cvtph_ps(h));
    M = _mm256_max_ps(M, _mm256_and_ps(S[r], absmask));
  }
  // the caller's next rows, the same 144 bytes of each (into L2: read by the next call)
  for (int r = 0; r < npf; ++r)
    for (size_t o = 0; o < 144 && off + o < rb; o += 64) __builtin_prefetch(pf[r] + off + o, 0, 2);
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(127.f), M);
  _mm256_store_ps(rec.gs + k, _mm256_mul_ps(M, _mm256_set1_ps(1.f / 127.f)));
  __m256i Q[8];
  __m256i sum = _mm256_setzero_si256();
  for (int r = 0; r < 8; ++r) {
    Q[r] = _mm256_cvtps_epi32(_mm256_mul_ps(S[r], inv));
    sum = _mm256_add_epi32(sum, Q[r]);
  }
  const __m256i m8 = _mm256_sub_epi32(_mm256_setzero_si256(), _mm256_slli_epi32(sum, 3));
  _mm256_store_si256(reinterpret_cast<__m256i*>(rec.init + k),
                     _mm256_or_si256(_mm256_and_si256(m8, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(m8, 16)));
  // lanes = blocks; transpose to 8 bytes per block: packs give [q0 q4 q1 q5] / [q2 q6 q3 q7]
  // row-major per 4 blocks and lane, pshufb makes them block-major.
  const __m256i X = _mm256_packs_epi16(_mm256_packs_epi32(Q[0], Q[4]), _mm256_packs_epi32(Q[1], Q[5]));
  const __m256i Y = _mm256_packs_epi16(_mm256_packs_epi32(Q[2], Q[6]), _mm256_packs_epi32(Q[3], Q[7]));
  const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                      0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i Xt = _mm256_shuffle_epi8(X, tr), Yt = _mm256_shuffle_epi8(Y, tr);
  const __m256i lo = _mm256_unpacklo_epi32(Xt, Yt), hi = _mm256_unpackhi_epi32(Xt, Yt);  // blocks 0 1 4 5 / 2 3 6 7
  _mm256_store_si256(reinterpret_cast<__m256i*>(rec.q[k]), _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_store_si256(reinterpret_cast<__m256i*>(rec.q[k + 4]), _mm256_permute2x128_si256(lo, hi, 0x31));
}

// The record of one block (chunk tails), the same arithmetic in scalar code.
template <int R>
inline void q4_record1(const uint8_t* const* rows, const float* c, int i, Q4Rec& rec, int k) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  float gm = 1e-30f;
  for (int r = 0; r < R; ++r) {
    s[r] = c[r] * h2f(rows[r] + size_t(i) * 18);
    gm = std::fmax(gm, std::fabs(s[r]));
  }
  const float inv = 127.f / gm;
  int32_t sum = 0;
  static constexpr int order[8] = {0, 4, 1, 5, 2, 6, 3, 7};
  for (int l = 0; l < 8; ++l) {
    const int q = int(std::nearbyint(s[order[l]] * inv));
    rec.q[k][l] = uint8_t(int8_t(q));
    sum += q;
  }
  const uint32_t m8 = uint32_t(-8 * sum) & 0xFFFF;
  rec.init[k] = int32_t(m8 | m8 << 16);
  rec.gs[k] = gm * (1.f / 127.f);
}

static_assert(kAxpyGroup == 8, "axpy_q4 pairs rows p and p + 4 of 8");
template <int R>
void axpy_q4(const uint8_t* const* rows_in, const float* coef, int b, float* y, int d,
             const uint8_t* const* pf, int npf) {
  constexpr int NP = R < 4 ? R : 4;  // row pairs (p, p+4) that hold a real row
  const int nb = d / QK;
  const size_t rb = size_t(nb) * 18;
  const uint8_t* rows[8];
  for (int r = 0; r < 8; ++r) rows[r] = r < R ? rows_in[r] : rows_in[0];  // q = 0 for r >= R
  const __m256i m0f = _mm256_set1_epi8(0x0F);
  Q4Rec rec;
  for (int t = 0; t < b; ++t) {
    float* yt = y + size_t(t) * d;
    float c[8];
    for (int r = 0; r < 8; ++r) c[r] = r < R ? coef[r * b + t] : 0.f;
    for (int i0 = 0; i0 < nb; i0 += Q4Rec::kChunk) {
      const int n = std::min(Q4Rec::kChunk, nb - i0);
      int k = 0;
      for (; k + 8 <= n; k += 8) q4_records8<R>(rows, c, rb, i0 + k, rec, k, pf, t == 0 ? npf : 0);
      for (; k < n; ++k) q4_record1<R>(rows, c, i0 + k, rec, k);
      for (k = 0; k < n; ++k) {
        const size_t off = size_t(i0 + k) * 18;
        int64_t q8;
        std::memcpy(&q8, rec.q[k], 8);
        const __m256i qv = _mm256_set1_epi64x(q8);
        __m256i acc0 = _mm256_set1_epi32(rec.init[k]), acc1 = acc0;
        for (int p = 0; p < NP; ++p) {
          const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[p] + off + 2));
          const __m128i bq = _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[p + 4] + off + 2));
          // bytes (a_j, b_j), j = 0..15: low nibbles = columns j, high nibbles = columns j + 16
          const __m256i ab = _mm256_set_m128i(_mm_unpackhi_epi8(a, bq), _mm_unpacklo_epi8(a, bq));
          const __m256i qp = _mm256_shuffle_epi8(qv, _mm256_set1_epi16(short(0x0100 + 0x0202 * p)));
          acc0 = _mm256_add_epi16(acc0, _mm256_maddubs_epi16(_mm256_and_si256(ab, m0f), qp));
          acc1 = _mm256_add_epi16(acc1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(ab, 4), m0f), qp));
        }
        const __m256 gs = _mm256_broadcast_ss(rec.gs + k);
        float* yb = yt + size_t(i0 + k) * QK;
        auto upd = [&](float* o, __m128i v) {
          _mm256_storeu_ps(o, _mm256_fmadd_ps(gs, _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(v)), _mm256_loadu_ps(o)));
        };
        upd(yb, _mm256_castsi256_si128(acc0)); upd(yb + 8, _mm256_extracti128_si256(acc0, 1));
        upd(yb + 16, _mm256_castsi256_si128(acc1)); upd(yb + 24, _mm256_extracti128_si256(acc1, 1));
      }
    }
  }
}

// pf: the q4_0 kernel prefetches them (kernels.h); q8_0 and the float formats do not (not measured)
template <Fmt F, int R>
void axpy_r(const uint8_t* const* rows, const float* coef, int b, float* y, int d,
            const uint8_t* const* pf, int npf) {
  if constexpr (F == Fmt::Q8_0) axpy_q8<R>(rows, coef, b, y, d);
  else if constexpr (F == Fmt::Q4_0) axpy_q4<R>(rows, coef, b, y, d, pf, npf);
  else axpy_float<F, R>(rows, coef, b, y, d);
}

constexpr int kMaxRows = kAxpyGroup;  // the q4_0 kernel assumes 8
template <Fmt F>
void axpy(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
          const uint8_t* const* pf, int npf) {
  for (int r = 0; r < nrows; r += kMaxRows) {
    const float* c = coef + size_t(r) * b;
    const int np = r + kMaxRows >= nrows ? npf : 0;   // with the last group of the call
    switch (nrows - r) {
      case 1: axpy_r<F, 1>(rows + r, c, b, y, d, pf, np); break;
      case 2: axpy_r<F, 2>(rows + r, c, b, y, d, pf, np); break;
      case 3: axpy_r<F, 3>(rows + r, c, b, y, d, pf, np); break;
      case 4: axpy_r<F, 4>(rows + r, c, b, y, d, pf, np); break;
      case 5: axpy_r<F, 5>(rows + r, c, b, y, d, pf, np); break;
      case 6: axpy_r<F, 6>(rows + r, c, b, y, d, pf, np); break;
      case 7: axpy_r<F, 7>(rows + r, c, b, y, d, pf, np); break;
      default: axpy_r<F, kMaxRows>(rows + r, c, b, y, d, pf, np); break;
    }
  }
}

// ---- x -> q8 and the read probe --------------------------------------------------------
void quantize_q8(const float* x, int n, BlockQ8X* out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  for (int i = 0; i < n / QK; ++i) {
    const float* v = x + size_t(i) * QK;
    __m256 a[4];
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      a[k] = _mm256_loadu_ps(v + 8 * k);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, a[k]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    const float amax = _mm_cvtss_f32(h);
    const float d = amax / 127.f;
    const float id = amax > 1e-30f ? 1.f / d : 0.f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(a[k], vid));  // RNE
    const __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    // int32 x32 -> int8 x32: packs work per 128-bit lane, so fix the order with a permute.
    const __m256i p16a = _mm256_packs_epi32(q[0], q[1]), p16b = _mm256_packs_epi32(q[2], q[3]);
    const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
    const __m256i ordered = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out[i].q), ordered);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    out[i].d = amax > 1e-30f ? d : 0.f;
    out[i].sum8 = 8 * _mm_cvtsi128_si32(s);
  }
}

double read_sum(const float* p, size_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  size_t i = 0;
  for (; i + 32 <= n; i += 32) {
    a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
    a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
    a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
    a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
  }
  double s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}

const Kernels kAvx2 = {
    "avx2",
    {dot_float<Fmt::F32>, dot_float<Fmt::F16>, dot_float<Fmt::BF16>, dot_quant<Fmt::Q8_0>,
     dot_quant<Fmt::Q4_0>, dot_q4g},
    // Q4_0G: no AXPY (only `linear` reads grouped rows; the drivers check)
    {axpy<Fmt::F32>, axpy<Fmt::F16>, axpy<Fmt::BF16>, axpy<Fmt::Q8_0>, axpy<Fmt::Q4_0>, nullptr},
    quantize_q8,
    read_sum,
    {nullptr, nullptr, nullptr, dot2_quant<Fmt::Q8_0>, dot2_quant<Fmt::Q4_0>, dot2_q4g},
};

}  // namespace

const Kernels* avx2_kernels() {
  static const bool filled = [] {
    for (uint32_t h = 0; h < (1u << 16); ++h) g_f16_table[h] = _cvtsh_ss(uint16_t(h));
    return true;
  }();
  (void)filled;
  return &kAvx2;
}

}  // namespace hi
