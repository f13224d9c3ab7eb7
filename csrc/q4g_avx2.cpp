// AVX2 dot and dot_rows over q4_0 grouped rows (Q4_0G, kernels.h; only `linear` reads them).
// See avx2_common.h for the file layout.
#include "avx2_common.h"

namespace hi {
namespace avx2 {
namespace {

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

// Two grouped rows, one token: the 144-byte groups of both rows side by side, the prefetch
// stream (avx2_common.h RunStream) advanced a group at a time. (Until session 9 `linear` read
// row pairs through a dot2 with the FFN's streams, Dot2Streams: docs/KERNELS.md.)
void dot2_q4g_one(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out, RunStream& pf) {
  const int nb = x.d / QK, ng = nb / kGroupBlocks;
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int g = 0; g < ng; ++g) {
    const size_t o = size_t(g) * kGroupBytes;
    pf.group(o);
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

}  // namespace

void dot_q4g(const uint8_t* row, const XPrep& x, float* out) {
  int t = 0;
  for (; t + 4 <= x.b; t += 4) dot_q4g_tile<4>(row, x, t, out + t);
  for (; t + 2 <= x.b; t += 2) dot_q4g_tile<2>(row, x, t, out + t);
  for (; t < x.b; ++t) dot_q4g_tile<1>(row, x, t, out + t);
}

// A run of grouped rows, one token (DotRowsFn): pairs as above, one stream kRunAhead ahead.
void dot_rows_q4g(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t* end) {
  dot_rows_run(w, n, size_t(x.d / QK) * 18, out, end,
               [&](const uint8_t* a, const uint8_t* b, float* o, RunStream& s) { dot2_q4g_one(a, b, x, o, s); },
               [&](const uint8_t* row, float* o) { dot_q4g_tile<1>(row, x, 0, o); });
}

}  // namespace avx2
}  // namespace hi
