// AVX2 + FMA + F16C implementation of kernels.h: the table, plus x -> q8 and the read probe.
// The kernels live in the other *_avx2.cpp files (avx2_common.h lists them); only those files are
// built with -mavx2 -mfma -mf16c, and dispatch.cpp only calls them after cpuid said yes.
#include "avx2_common.h"

namespace hi {
namespace avx2 {

float g_f16_table[1 << 16];

namespace {

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
    {dot_f32, dot_f16, dot_bf16, dot_q8_0, dot_q4_0, dot_q4g},
    // Q4_0G: no AXPY (only `linear` reads grouped rows; the drivers check)
    {axpy_f32, axpy_f16, axpy_bf16, axpy_q8_0, axpy_q4_0, nullptr},
    quantize_q8,
    read_sum,
    {nullptr, nullptr, nullptr, dot2_q8_0, dot2_q4_0, nullptr},   // Q4_0G: linear takes dot_rows
    {nullptr, nullptr, nullptr, dot_rows_q8_0, dot_rows_q4_0, dot_rows_q4g},
};

}  // namespace
}  // namespace avx2

const Kernels* avx2_kernels() {
  static const bool filled = [] {
    for (uint32_t h = 0; h < (1u << 16); ++h) avx2::g_f16_table[h] = _cvtsh_ss(uint16_t(h));
    return true;
  }();
  (void)filled;
  return &avx2::kAvx2;
}

}  // namespace hi
