// AVX2 q8_0 / q4_0 dot, dot2 and dot_rows over GGUF rows: x pre-quantised to q8; per 32-block one
// maddubs + madd gives the exact integer sum, then one FMA with scale_w * scale_x. q4_0 feeds the
// unsigned nibbles to maddubs and subtracts 8 * sum(x_q) (precomputed per x block) instead of
// re-centring. Batches of tokens: the weight block is loaded/expanded once for every token.
// See avx2_common.h for the file layout.
#include <utility>

#include "avx2_common.h"

namespace hi {
namespace avx2 {
namespace {

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

}  // namespace

// The FFN's dot2 streams at the block pair at o (avx2_common.h Dot2Streams).
template <Fmt F>
void Dot2Streams::pair(size_t o) const {
  prefetch_ahead(row_a, o, rb);
  prefetch_ahead(row_b, o, rb);
  prefetch_pair<F, 3>(next_a, o);
  prefetch_pair<F, 3>(next_b, o);
  prefetch_pair<F, 2>(later, o);
}

namespace {

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

// Two rows, one token: q4_0 in groups of 8 blocks, then the pair loop for the rest; the prefetch
// stream S (Dot2Streams or RunStream, avx2_common.h) advanced a group / block pair at a time.
template <Fmt F, class S>
void dot2_quant_one(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out, S& pf) {
  constexpr size_t BB = kBlockBytes<F>;
  const int nb = x.d / QK, np = nb / 2;
  __m256 accA = _mm256_setzero_ps(), accB = accA;
  int j = 0;
  if constexpr (F == Fmt::Q4_0) {   // groups of 8 blocks, then the pair loop for the rest
    for (int g = 0; x.xh && g < nb / kGroupBlocks; ++g, j += kGroupBlocks / 2) {
      const size_t o = size_t(g) * kGroupBytes;
      pf.group(o);
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
    pf.template pair<F>(o);
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

// Gate and up of one id in one pass (kernels.h Dot2Fn), one token: the x block pair is loaded
// once for both rows, both rows are read (and prefetched ahead) at once, and the next / later
// rows are prefetched a line or so per block pair. Measured on the dev machine (docs/KERNELS.md):
// the fused pass alone took dense q4_0 from 11.7 to 10.8-11.3 ms at one thread, the streams of
// the down row and the next id's rows to ~8.2 ms. A batch (b > 1) takes two dot calls after the
// three rows were prefetched up front into L2.
template <Fmt F>
void dot2_quant(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
                const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later) {
  const size_t rb = size_t(x.d / QK) * kBlockBytes<F>;
  if (x.b != 1 || x.d / QK / 2 == 0) {
    prefetch_dot2_rows_l2(rb, next_a, next_b, later);
    dot_quant<F>(row_a, x, out);
    dot_quant<F>(row_b, x, out + x.b);
    return;
  }
  Dot2Streams pf{row_a, row_b, next_a, next_b, later, rb};
  dot2_quant_one<F>(row_a, row_b, x, out, pf);
}

// A run of rows, one token (kernels.h DotRowsFn): pairs as dot2, one stream kRunAhead ahead.
template <Fmt F>
void dot_rows_quant(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end) {
  const size_t rb = size_t(x.d / QK) * kBlockBytes<F>;
  if (x.d / QK / 2 == 0) {   // one block a row: no pair loop
    for (int r = 0; r < n; ++r) dot_quant<F>(w + size_t(r) * rb, x, out + r);
    return;
  }
  dot_rows_run(w, n, rb, out, end,
               [&](const uint8_t* a, const uint8_t* b, float* o, RunStream& s) { dot2_quant_one<F>(a, b, x, o, s); },
               [&](const uint8_t* row, float* o) { dot_quant<F>(row, x, o); });
}

}  // namespace

void dot_q8_0(const uint8_t* row, const XPrep& x, float* out) { dot_quant<Fmt::Q8_0>(row, x, out); }
void dot_q4_0(const uint8_t* row, const XPrep& x, float* out) { dot_quant<Fmt::Q4_0>(row, x, out); }
void dot2_q8_0(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
               const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later) {
  dot2_quant<Fmt::Q8_0>(row_a, row_b, x, out, next_a, next_b, later);
}
void dot2_q4_0(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
               const uint8_t* next_a, const uint8_t* next_b, const uint8_t* later) {
  dot2_quant<Fmt::Q4_0>(row_a, row_b, x, out, next_a, next_b, later);
}
void dot_rows_q8_0(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end) {
  dot_rows_quant<Fmt::Q8_0>(w, n, x, out, end);
}
void dot_rows_q4_0(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end) {
  dot_rows_quant<Fmt::Q4_0>(w, n, x, out, end);
}

}  // namespace avx2
}  // namespace hi
