// AVX2 f32 / f16 (vcvtph2ps) / bf16 (zero-extend + shift) kernels: 8 floats per step, FMA.
// dot: several tokens and accumulators at once; AXPY (down): up to 8 rows per pass, the y slice
// stays in registers across the rows. See avx2_common.h for the file layout.
#include "avx2_common.h"

namespace hi {
namespace avx2 {
namespace {

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

// y_t[j..j+8) += sum_r c[r,t] * row_r[j..j+8), R rows per pass.
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

// pf: not used by the float formats (not measured)
template <Fmt F>
void axpy_float_rows(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d) {
  axpy_groups(nrows, 0, [&](auto R, int r, int) {
    axpy_float<F, decltype(R)::value>(rows + r, coef + size_t(r) * b, b, y, d);
  });
}

}  // namespace

void dot_f32(const uint8_t* row, const XPrep& x, float* out) { dot_float<Fmt::F32>(row, x, out); }
void dot_f16(const uint8_t* row, const XPrep& x, float* out) { dot_float<Fmt::F16>(row, x, out); }
void dot_bf16(const uint8_t* row, const XPrep& x, float* out) { dot_float<Fmt::BF16>(row, x, out); }
void axpy_f32(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
              const uint8_t* const*, int) {
  axpy_float_rows<Fmt::F32>(rows, nrows, coef, b, y, d);
}
void axpy_f16(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
              const uint8_t* const*, int) {
  axpy_float_rows<Fmt::F16>(rows, nrows, coef, b, y, d);
}
void axpy_bf16(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
               const uint8_t* const*, int) {
  axpy_float_rows<Fmt::BF16>(rows, nrows, coef, b, y, d);
}

}  // namespace avx2
}  // namespace hi
