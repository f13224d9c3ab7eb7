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
//      scales of one row come from 4 loads + pshufb (no gathers, slow here); the per-block
//      records are q of rows 0 4 1 5 2 6 3 7 as 8 bytes, -8 sum_r q_r (int16, twice) and gs.
//   2. the AXPY: rows p and p+4 are interleaved byte-wise, so one maddubs gives
//      q_p n_p + q_{p+4} n_{p+4} for 16 columns; the int16 sum starts at -8 sum q. |acc| <=
//      8*127*8 fits int16 (each maddubs pair <= 2*15*127, no saturation; the adds may wrap on
//      the way, the exact final value is in range). One convert + FMA per 8 columns for all
//      rows instead of one convert + FMA per row.
// Pass 1 reads every cache line of the chunk's rows (the scales sit in each 18-byte block), so it
// also carries their prefetch ahead; pass 2 then reads the rows from L1. The caller's next rows
// (pf) are prefetched into L2 during pass 2, a line or so per block and row: issued in pass 1
// (~27% of the time, 8 rows x 144 bytes per step) they came in bursts the memory system did not
// keep up with. down_sparse 14336 x 4096 q4_0, one thread, LLC flushed, in-process A/B:
// dense 4.24 -> 3.83 ms, 10% 0.67 -> 0.60 ms (benchmarks/results/q4_axpy_dev2core.txt).
struct Q4Rec {
  static constexpr int kChunk = 128;  // blocks per pass
  alignas(32) uint8_t q[kChunk][8];   // int8 q of rows 0 4 1 5 2 6 3 7
  alignas(32) int32_t init[kChunk];   // -8 sum q in both int16 halves
  alignas(32) float gs[kChunk];
};

// Records of blocks i .. i+7 (all inside the rows). rows[r] for r >= R is not read.
template <int R>
inline void q4_records8(const uint8_t* const* rows, const float* c, size_t rb, int i, Q4Rec& rec, int k) {
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
      for (; k + 8 <= n; k += 8) q4_records8<R>(rows, c, rb, i0 + k, rec, k);
      for (; k < n; ++k) q4_record1<R>(rows, c, i0 + k, rec, k);
      const int np = t == 0 ? npf : 0;    // the next rows, once (into L2: read by the next call)
      for (k = 0; k < n; ++k) {
        const size_t off = size_t(i0 + k) * 18;
        if (!(k & 1))                       // every 36 bytes: each line of the 18-byte blocks
          for (int r = 0; r < np; ++r) __builtin_prefetch(pf[r] + off, 0, 2);
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
