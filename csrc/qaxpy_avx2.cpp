// AVX2 q8_0 / q4_0 AXPY (the FFN's down rows, W2^T, GGUF blocks): up to 8 rows per pass, the y
// slice stays in registers across the rows; q4_0 with int8-quantised row coefficients and integer
// block sums (maddubs over row pairs). See avx2_common.h for the file layout.
#include <algorithm>
#include <cmath>

#include "avx2_common.h"

namespace hi {
namespace avx2 {
namespace {

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
//      scales of one row come from scalar 16-bit loads, shifts and ORs (integer ports, idle
//      here; no gathers, slow) into two 64-bit halves; the per-block
//      records are, per row pair p, the int8 pair (q_p, q_{p+4}) twice (4 bytes: a vbroadcastss
//      load, no shuffle), -8 sum_r q_r (int16, twice) and gs.
//   2. the AXPY: rows p and p+4 are interleaved byte-wise, so one maddubs gives
//      q_p n_p + q_{p+4} n_{p+4} for 16 columns; the int16 sum starts at -8 sum q. |acc| <=
//      8*127*8 fits int16 (each maddubs pair <= 2*15*127, no saturation; the adds may wrap on
//      the way, the exact final value is in range). One convert + FMA per 8 columns for all
//      rows instead of one convert + FMA per row. The pairs are placed (two pshufb of the rows'
//      16 bytes broadcast to both lanes) so that acc's even int16 are y columns 0-7 and its odd
//      ones 8-15 (16-23 / 24-31 for the high nibbles): one vpmaddwd by (1, 0) / (0, 1) each
//      widens them to int32 in y's order, on the multiply pipes. Zen 3 (session 9) is
//      compute-bound here with the shuffle / shift pipes (FP1 / FP2) the busiest; the earlier
//      form (unpacklo / unpackhi + vinserti128 per pair, a pshufb per pair for (q_p, q_{p+4}),
//      vpmovsxwd + vextracti128 to widen) put 22 shuffles a block on them, this one 8.
//      In-process A/B (benchmarks/axpy_q4.py): 3-5 % (docs/KERNELS.md, session 9).
// Pass 1 reads every cache line of the chunk's rows (the scales sit in each 18-byte block), so it
// also carries their prefetch ahead; pass 2 then reads the rows from L1. The caller's next rows
// (pf) are prefetched into L2 during pass 2, a line or so per block and row: issued in pass 1
// (~27% of the time, 8 rows x 144 bytes per step) they came in bursts the memory system did not
// keep up with. down_sparse 14336 x 4096 q4_0, one thread, LLC flushed, in-process A/B:
// dense 4.24 -> 3.83 ms, 10% 0.67 -> 0.60 ms (benchmarks/results/q4_axpy_dev2core.txt).
struct Q4Rec {
  static constexpr int kChunk = 128;  // blocks per pass
  alignas(32) uint32_t qp[kChunk][4];  // pair p: int8 (q_p, q_{p+4}, q_p, q_{p+4})
  alignas(32) int32_t init[kChunk];   // -8 sum q in both int16 halves
  alignas(32) float gs[kChunk];
};

// Records of blocks i .. i+7 (all inside the rows). rows[r] for r >= R is not read.
template <int R>
inline void q4_records8(const uint8_t* const* rows, const float* c, size_t rb, int i, Q4Rec& rec, int k) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 S[8];
  __m256 M = _mm256_set1_ps(1e-30f);
  const size_t off = size_t(i) * 18;
  for (int r = 0; r < 8; ++r) {
    if (r >= R) { S[r] = _mm256_setzero_ps(); continue; }
    const uint8_t* p = rows[r] + off;
    for (size_t o = 0; o < 144; o += 64) prefetch_ahead(rows[r], off + o, rb);
    // f16 scales of blocks i..i+7 (bytes 0..1 of each 18-byte block). Until session 9 four
    // 32-byte loads + pshufb + OR (5 shuffles a row on Zen 3's busiest pipes): 1-3 % slower in
    // the AXPY (in-process A/B, benchmarks/axpy_q4.py), level on Zen 4 (q4_axpy_dev2core.txt)
    auto sc = [p](int j) { uint16_t u; std::memcpy(&u, p + 18 * j, 2); return uint64_t(u); };
    const __m128i h = _mm_set_epi64x(int64_t(sc(4) | sc(5) << 16 | sc(6) << 32 | sc(7) << 48),
                                     int64_t(sc(0) | sc(1) << 16 | sc(2) << 32 | sc(3) << 48));
    S[r] = _mm256_mul_ps(_mm256_set1_ps(c[r]), _mm256_cvtph_ps(h));
    M = _mm256_max_ps(M, _mm256_and_ps(S[r], absmask));
  }
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
  // (8 bytes per block: q0 q4 q1 q5 q2 q6 q3 q7), then each 16-bit pair twice (16 bytes a block)
  const __m256i lo = _mm256_unpacklo_epi32(Xt, Yt), hi = _mm256_unpackhi_epi32(Xt, Yt);  // blocks 0 1 4 5 / 2 3 6 7
  const __m256i W0 = _mm256_permute2x128_si256(lo, hi, 0x20), W1 = _mm256_permute2x128_si256(lo, hi, 0x31);
  for (int h = 0; h < 2; ++h) {   // W0: blocks 0 1 | 2 3, W1: 4 5 | 6 7
    const __m256i W = h ? W1 : W0;
    const __m256i a = _mm256_unpacklo_epi16(W, W), b = _mm256_unpackhi_epi16(W, W);  // blocks 0 2 / 1 3 (+4h)
    _mm256_store_si256(reinterpret_cast<__m256i*>(rec.qp[k + 4 * h]), _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_store_si256(reinterpret_cast<__m256i*>(rec.qp[k + 4 * h + 2]), _mm256_permute2x128_si256(a, b, 0x31));
  }
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
  for (int p = 0; p < 4; ++p) {
    const int qa = int(std::nearbyint(s[p] * inv)), qb = int(std::nearbyint(s[p + 4] * inv));
    const uint32_t h = uint32_t(uint8_t(int8_t(qa))) | uint32_t(uint8_t(int8_t(qb))) << 8;
    rec.qp[k][p] = h | h << 16;
    sum += qa + qb;
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
  const __m256i pa = _mm256_setr_epi8(0, -128, 8, -128, 1, -128, 9, -128, 2, -128, 10, -128, 3, -128, 11, -128,
                                      4, -128, 12, -128, 5, -128, 13, -128, 6, -128, 14, -128, 7, -128, 15, -128);
  const __m256i pb = _mm256_setr_epi8(-128, 0, -128, 8, -128, 1, -128, 9, -128, 2, -128, 10, -128, 3, -128, 11,
                                      -128, 4, -128, 12, -128, 5, -128, 13, -128, 6, -128, 14, -128, 7, -128, 15);
  const __m256i even = _mm256_set1_epi32(1), odd = _mm256_set1_epi32(0x10000);  // int16 (1, 0) / (0, 1)
  Q4Rec rec;
  for (int t = 0; t < b; ++t) {
    float* yt = y + size_t(t) * d;
    float c[8];
    for (int r = 0; r < 8; ++r) c[r] = r < R ? coef[r * b + t] : 0.f;
    for (int i0 = 0; i0 < nb; i0 += Q4Rec::kChunk) {
      const int n = std::min(Q4Rec::kChunk, nb - i0);
      int k = 0;
      for (; k + 8 <= n; k += 8) q4_records8<R>(rows, c, rb, i0 + k, rec, k);
      for (; k < n; ++k) q4_record1<R>(rows, c, i0 + k, rec, k);
      const int np = t == 0 ? npf : 0;    // the next rows, once (into L2: read by the next call)
      for (k = 0; k < n; ++k) {
        const size_t off = size_t(i0 + k) * 18;
        if (!(k & 1))                       // every 36 bytes: each line of the 18-byte blocks
          for (int r = 0; r < np; ++r) __builtin_prefetch(pf[r] + off, 0, 2);
        __m256i acc0 = _mm256_set1_epi32(rec.init[k]), acc1 = acc0;
        for (int p = 0; p < NP; ++p) {
          const __m256i A = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[p] + off + 2)));
          const __m256i B = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[p + 4] + off + 2)));
          // bytes (a_j, b_j) for j = 0 8 1 9 2 10 3 11 | 4 12 5 13 6 14 7 15: low nibbles =
          // columns j, high nibbles = columns j + 16
          const __m256i ab = _mm256_or_si256(_mm256_shuffle_epi8(A, pa), _mm256_shuffle_epi8(B, pb));
          // (q_p, q_{p+4}) in every 16-bit lane, by a builtin load: a plain uint32_t read of
          // rec.qp here (_mm256_set1_epi32) gave wrong sums for groups of 1 and 2 rows under GCC
          // 12.2 at -O2 and -O3 (a volatile read was right; cause not found, docs/KERNELS.md)
          const __m256i qp = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(rec.qp[k] + p)));
          acc0 = _mm256_add_epi16(acc0, _mm256_maddubs_epi16(_mm256_and_si256(ab, m0f), qp));
          acc1 = _mm256_add_epi16(acc1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(ab, 4), m0f), qp));
        }
        const __m256 gs = _mm256_broadcast_ss(rec.gs + k);
        float* yb = yt + size_t(i0 + k) * QK;
        auto upd = [&](float* o, __m256i v) {   // v: 8 int32 of y's columns in order
          _mm256_storeu_ps(o, _mm256_fmadd_ps(gs, _mm256_cvtepi32_ps(v), _mm256_loadu_ps(o)));
        };
        upd(yb, _mm256_madd_epi16(acc0, even)); upd(yb + 8, _mm256_madd_epi16(acc0, odd));
        upd(yb + 16, _mm256_madd_epi16(acc1, even)); upd(yb + 24, _mm256_madd_epi16(acc1, odd));
      }
    }
  }
}

}  // namespace

void axpy_q8_0(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
               const uint8_t* const*, int) {   // pf: not used by q8_0 (not measured)
  axpy_groups(nrows, 0, [&](auto R, int r, int) {
    axpy_q8<decltype(R)::value>(rows + r, coef + size_t(r) * b, b, y, d);
  });
}
void axpy_q4_0(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
               const uint8_t* const* pf, int npf) {
  axpy_groups(nrows, npf, [&](auto R, int r, int np) {
    axpy_q4<decltype(R)::value>(rows + r, coef + size_t(r) * b, b, y, d, pf, np);
  });
}

}  // namespace avx2
}  // namespace hi
