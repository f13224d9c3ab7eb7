// AVX2 + FMA + F16C implementation of kernels.h (this file alone is built with -mavx2 -mfma
// -mf16c; dispatch.cpp only calls it after cpuid said yes).
//   f32 / f16 (vcvtph2ps) / bf16 (zero-extend + shift): 8 floats per step, FMA.
//   q8_0 / q4_0 dot: x pre-quantised to q8; per 32-block one maddubs + madd gives the exact
//     integer sum, then one FMA with scale_w * scale_x. q4_0 feeds the unsigned nibbles to
//     maddubs and subtracts 8 * sum(x_q) (precomputed per x block) instead of re-centring.
//   axpy (down): up to 8 rows per pass, the y slice stays in registers across the rows.
// Batches of tokens: the weight block is loaded/expanded once and used for every token.
#include <immintrin.h>

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
  constexpr size_t es = F == Fmt::F32 ? 4 : 2;
  for (; j + 8 * U <= d; j += 8 * U) {
    for (size_t o = 0; o < 8 * U * es; o += 64) prefetch_ahead(row, size_t(j) * es + o, size_t(d) * es);
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

// ---- axpy (down) -------------------------------------------------------------------------
// Float formats: y_t[j..j+8) += sum_r c[r,t] * row_r[j..j+8), R rows per pass.
template <Fmt F, int R>
void axpy_float(const uint8_t* const* rows, const float* coef, int b, float* y, int d) {
  for (int t = 0; t < b; ++t) {
    float* yt = y + size_t(t) * d;
    __m256 c[R];
    for (int r = 0; r < R; ++r) c[r] = _mm256_set1_ps(coef[r * b + t]);
    int j = 0;
    constexpr size_t es = F == Fmt::F32 ? 4 : 2;
    for (; j + 8 <= d; j += 8) {
      if ((j * es) % 64 == 0)
        for (int r = 0; r < R; ++r) prefetch_ahead(rows[r], size_t(j) * es, size_t(d) * es);
      __m256 v = _mm256_loadu_ps(yt + j);
      for (int r = 0; r < R; ++r) v = _mm256_fmadd_ps(c[r], load8<F>(rows[r], size_t(j)), v);
      _mm256_storeu_ps(yt + j, v);
    }
    for (; j < d; ++j)
      for (int r = 0; r < R; ++r) yt[j] += coef[r * b + t] * load1<F>(rows[r], size_t(j));
  }
}

// Quantised: per 32-block, v[0..3] (32 floats of y) += s_r * q_r with s_r = c[r,t] * scale_r.
// q4_0 accumulates s_r * nibble and subtracts 8 * sum_r s_r once per block.
template <Fmt F, int R>
void axpy_quant(const uint8_t* const* rows, const float* coef, int b, float* y, int d) {
  const int nb = d / QK;
  const __m256i m0f = _mm256_set1_epi32(0x0F);
  for (int t = 0; t < b; ++t) {
    float* yt = y + size_t(t) * d;
    float c[R];
    for (int r = 0; r < R; ++r) c[r] = coef[r * b + t];
    for (int i = 0; i < nb; ++i) {
      float* yb = yt + size_t(i) * QK;
      __m256 v0 = _mm256_loadu_ps(yb), v1 = _mm256_loadu_ps(yb + 8);
      __m256 v2 = _mm256_loadu_ps(yb + 16), v3 = _mm256_loadu_ps(yb + 24);
      float corr = 0.f;
      for (int r = 0; r < R; ++r) {
        const uint8_t* p = rows[r] + size_t(i) * kBlockBytes<F>;
        prefetch_ahead(rows[r], size_t(i) * kBlockBytes<F>, size_t(nb) * kBlockBytes<F>);
        const float sr = c[r] * h2f(p);
        const __m256 s = _mm256_set1_ps(sr);
        __m256 q0, q1, q2, q3;
        if constexpr (F == Fmt::Q4_0) {
          // bytes 0..7 and 8..15 zero-extended to int32; low nibble = element j, high = j+16.
          const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2)));
          const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 10)));
          q0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, m0f));
          q1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, m0f));
          q2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));
          q3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
          corr += sr;
        } else {
          auto ld = [&](int o) {
            return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + o))));
          };
          q0 = ld(0); q1 = ld(8); q2 = ld(16); q3 = ld(24);
        }
        v0 = _mm256_fmadd_ps(s, q0, v0);
        v1 = _mm256_fmadd_ps(s, q1, v1);
        v2 = _mm256_fmadd_ps(s, q2, v2);
        v3 = _mm256_fmadd_ps(s, q3, v3);
      }
      if constexpr (F == Fmt::Q4_0) {
        const __m256 k = _mm256_set1_ps(-8.f * corr);
        v0 = _mm256_add_ps(v0, k); v1 = _mm256_add_ps(v1, k);
        v2 = _mm256_add_ps(v2, k); v3 = _mm256_add_ps(v3, k);
      }
      _mm256_storeu_ps(yb, v0); _mm256_storeu_ps(yb + 8, v1);
      _mm256_storeu_ps(yb + 16, v2); _mm256_storeu_ps(yb + 24, v3);
    }
  }
}

template <Fmt F, int R>
void axpy_r(const uint8_t* const* rows, const float* coef, int b, float* y, int d) {
  if constexpr (F == Fmt::Q8_0 || F == Fmt::Q4_0) axpy_quant<F, R>(rows, coef, b, y, d);
  else axpy_float<F, R>(rows, coef, b, y, d);
}

constexpr int kMaxRows = 8;
template <Fmt F>
void axpy(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d) {
  for (int r = 0; r < nrows; r += kMaxRows) {
    const float* c = coef + size_t(r) * b;
    switch (nrows - r) {
      case 1: axpy_r<F, 1>(rows + r, c, b, y, d); break;
      case 2: axpy_r<F, 2>(rows + r, c, b, y, d); break;
      case 3: axpy_r<F, 3>(rows + r, c, b, y, d); break;
      case 4: axpy_r<F, 4>(rows + r, c, b, y, d); break;
      case 5: axpy_r<F, 5>(rows + r, c, b, y, d); break;
      case 6: axpy_r<F, 6>(rows + r, c, b, y, d); break;
      case 7: axpy_r<F, 7>(rows + r, c, b, y, d); break;
      default: axpy_r<F, kMaxRows>(rows + r, c, b, y, d); break;
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
     dot_quant<Fmt::Q4_0>},
    {axpy<Fmt::F32>, axpy<Fmt::F16>, axpy<Fmt::BF16>, axpy<Fmt::Q8_0>, axpy<Fmt::Q4_0>},
    quantize_q8,
    read_sum,
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
