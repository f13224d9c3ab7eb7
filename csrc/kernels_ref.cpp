// Scalar reference implementation of kernels.h: plain loops, one value at a time.
// The quantised formats use the same arithmetic as the AVX2 version (x quantised to q8_0,
// exact integer block sums, one f32 scale per block), so the two differ only in the order of
// float additions.
#include <cmath>
#include <cstring>

#include "kernels.h"

namespace hi {

float f16_to_f32(uint16_t h) {
  // IEEE half -> float, exact (normals, subnormals, inf, nan).
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else {  // subnormal: renormalise
      int e = -1;
      do { man <<= 1; ++e; } while (!(man & 0x400));
      bits = sign | uint32_t(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000u | man << 13;
  } else {
    bits = sign | (exp + 127 - 15) << 23 | man << 13;
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

namespace {

inline uint16_t rd16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }

// Value j of a float-format row.
template <Fmt F>
inline float fval(const uint8_t* row, int j) {
  if constexpr (F == Fmt::F32) { float v; std::memcpy(&v, row + 4 * size_t(j), 4); return v; }
  if constexpr (F == Fmt::F16) return f16_to_f32(rd16(row + 2 * size_t(j)));
  if constexpr (F == Fmt::BF16) return bf16_to_f32(rd16(row + 2 * size_t(j)));
  return 0.f;
}

template <Fmt F>
void dot_float(const uint8_t* row, const XPrep& x, float* out) {
  for (int t = 0; t < x.b; ++t) {
    const float* xt = x.xf + size_t(t) * x.d;
    float acc = 0.f;
    for (int j = 0; j < x.d; ++j) acc += fval<F>(row, j) * xt[j];
    out[t] = acc;
  }
}

// Integer sum of block `blk` of a quantised row against one q8 x block (exact).
template <Fmt F>
inline int32_t block_isum(const uint8_t* blk, const BlockQ8X& xb) {
  int32_t s = 0;
  if constexpr (F == Fmt::Q8_0) {
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    for (int j = 0; j < QK; ++j) s += int32_t(q[j]) * xb.q[j];
  } else {
    const uint8_t* q = blk + 2;
    for (int j = 0; j < QK / 2; ++j)
      s += int32_t(q[j] & 0x0F) * xb.q[j] + int32_t(q[j] >> 4) * xb.q[j + QK / 2];
    s -= xb.sum8;  // nibble n stands for n - 8
  }
  return s;
}

template <Fmt F>
void dot_quant(const uint8_t* row, const XPrep& x, float* out) {
  constexpr size_t bb = F == Fmt::Q8_0 ? 34 : 18;
  const int nb = x.d / QK;
  for (int t = 0; t < x.b; ++t) {
    const BlockQ8X* xq = x.xq + size_t(t) * nb;
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
      const uint8_t* blk = row + i * bb;
      acc += f16_to_f32(rd16(blk)) * xq[i].d * float(block_isum<F>(blk, xq[i]));
    }
    out[t] = acc;
  }
}

// Q4_0G (kernels.h): block i of a grouped row: its scale and its nibble byte j (j < 16) where
// the grouping put them; the tail blocks (i >= 8 * (nb / 8)) are GGUF blocks. The same integer
// sums and float order as dot_quant<Q4_0> over the ungrouped row.
void dot_q4g(const uint8_t* row, const XPrep& x, float* out) {
  const int nb = x.d / QK, ng = nb / kGroupBlocks;
  for (int t = 0; t < x.b; ++t) {
    const BlockQ8X* xq = x.xq + size_t(t) * nb;
    float acc = 0.f;
    for (int i = 0; i < nb; ++i) {
      float scale;
      int32_t s = 0;
      if (i < ng * kGroupBlocks) {
        const uint8_t* g = row + size_t(i / kGroupBlocks) * kGroupBytes;
        const int k = i % kGroupBlocks;
        scale = f16_to_f32(rd16(g + 2 * k));
        for (int j = 0; j < QK / 2; ++j) {
          const uint8_t q = g[16 + 32 * (j / 4) + 4 * k + j % 4];
          s += int32_t(q & 0x0F) * xq[i].q[j] + int32_t(q >> 4) * xq[i].q[j + QK / 2];
        }
        s -= xq[i].sum8;
      } else {
        const uint8_t* blk = row + size_t(ng) * kGroupBytes + size_t(i - ng * kGroupBlocks) * 18;
        scale = f16_to_f32(rd16(blk));
        s = block_isum<Fmt::Q4_0>(blk, xq[i]);
      }
      acc += scale * xq[i].d * float(s);
    }
    out[t] = acc;
  }
}

// Gate and up of one id: two dots (the prefetch hints are not needed here).
template <Fmt F>
void dot2(const uint8_t* row_a, const uint8_t* row_b, const XPrep& x, float* out,
          const uint8_t*, const uint8_t*, const uint8_t*) {
  if constexpr (is_quant(F)) {
    dot_quant<F>(row_a, x, out);
    dot_quant<F>(row_b, x, out + x.b);
  } else {
    dot_float<F>(row_a, x, out);
    dot_float<F>(row_b, x, out + x.b);
  }
}

// A run of contiguous rows, one token: a dot per row (no prefetch in the reference).
template <Fmt F>
void dot_rows(const uint8_t* w, int n, const XPrep& x, float* out, const uint8_t*) {
  const size_t rb = row_bytes(F, x.d);
  for (int r = 0; r < n; ++r) {
    if constexpr (F == Fmt::Q4_0G) dot_q4g(w + size_t(r) * rb, x, out + r);
    else dot_quant<F>(w + size_t(r) * rb, x, out + r);
  }
}

// Value j of block blk (without its scale).
template <Fmt F>
inline float qval(const uint8_t* blk, int j) {
  if constexpr (F == Fmt::Q8_0) return float(int8_t(blk[2 + j]));
  const uint8_t byte = blk[2 + (j & 15)];
  return float(int((j < 16) ? (byte & 0x0F) : (byte >> 4)) - 8);
}

// q4_0 down (kernels.h): per group of kAxpyGroup rows, token and 32-column block the row
// coefficients s_r = c_r * scale_r are quantised to int8 against the group's largest |s_r|,
// the block sum is an exact integer, scaled once.
void axpy_q4(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d) {
  for (int g0 = 0; g0 < nrows; g0 += kAxpyGroup) {
    const int g1 = nrows < g0 + kAxpyGroup ? nrows : g0 + kAxpyGroup;
    for (int t = 0; t < b; ++t) {
      float* yt = y + size_t(t) * d;
      for (int i = 0; i < d / QK; ++i) {
        float s[kAxpyGroup];
        float gm = 0.f;
        for (int r = g0; r < g1; ++r) {
          s[r - g0] = coef[r * b + t] * f16_to_f32(rd16(rows[r] + i * 18));
          gm = std::fmax(gm, std::fabs(s[r - g0]));
        }
        gm = std::fmax(gm, 1e-30f);
        const float inv = 127.f / gm, gs = gm * (1.f / 127.f);
        int q[kAxpyGroup];
        for (int r = g0; r < g1; ++r) q[r - g0] = int(std::nearbyint(s[r - g0] * inv));
        for (int j = 0; j < QK; ++j) {
          int32_t acc = 0;
          for (int r = g0; r < g1; ++r) acc += q[r - g0] * int32_t(qval<Fmt::Q4_0>(rows[r] + i * 18, j));
          yt[i * QK + j] += gs * float(acc);
        }
      }
    }
  }
}

template <Fmt F>
void axpy(const uint8_t* const* rows, int nrows, const float* coef, int b, float* y, int d,
          const uint8_t* const*, int) {  // (no prefetch in the reference)
  if constexpr (F == Fmt::Q4_0) {
    axpy_q4(rows, nrows, coef, b, y, d);
    return;
  }
  for (int r = 0; r < nrows; ++r) {
    for (int t = 0; t < b; ++t) {
      const float c = coef[r * b + t];
      float* yt = y + size_t(t) * d;
      if constexpr (F == Fmt::Q8_0) {
        for (int i = 0; i < d / QK; ++i) {
          const uint8_t* blk = rows[r] + i * 34;
          const float s = c * f16_to_f32(rd16(blk));
          for (int j = 0; j < QK; ++j) yt[i * QK + j] += s * qval<F>(blk, j);
        }
      } else {
        for (int j = 0; j < d; ++j) yt[j] += c * fval<F>(rows[r], j);
      }
    }
  }
}

void quantize_q8(const float* x, int n, BlockQ8X* out) {
  for (int i = 0; i < n / QK; ++i) {
    const float* v = x + size_t(i) * QK;
    float amax = 0.f;
    for (int j = 0; j < QK; ++j) amax = std::fmax(amax, std::fabs(v[j]));
    const float d = amax / 127.f;
    const float id = amax > 1e-30f ? 1.f / d : 0.f;  // all-zero (or denormal) block -> zeros
    int32_t s = 0;
    for (int j = 0; j < QK; ++j) {
      const int q = int(std::nearbyint(v[j] * id));  // round half to even, as cvtps2dq
      out[i].q[j] = int8_t(q);
      s += q;
    }
    out[i].d = amax > 1e-30f ? d : 0.f;
    out[i].sum8 = 8 * s;
  }
}

double read_sum(const float* p, size_t n) {
  double s = 0;
  for (size_t i = 0; i < n; ++i) s += p[i];
  return s;
}

const Kernels kRef = {
    "scalar",
    {dot_float<Fmt::F32>, dot_float<Fmt::F16>, dot_float<Fmt::BF16>, dot_quant<Fmt::Q8_0>,
     dot_quant<Fmt::Q4_0>, dot_q4g},
    // Q4_0G: no AXPY (only `linear` reads grouped rows; the drivers check)
    {axpy<Fmt::F32>, axpy<Fmt::F16>, axpy<Fmt::BF16>, axpy<Fmt::Q8_0>, axpy<Fmt::Q4_0>, nullptr},
    quantize_q8,
    read_sum,
    {dot2<Fmt::F32>, dot2<Fmt::F16>, dot2<Fmt::BF16>, dot2<Fmt::Q8_0>, dot2<Fmt::Q4_0>, nullptr},
    // as the AVX2 table: runs of block-format rows (the driver's path is the same on both)
    {nullptr, nullptr, nullptr, dot_rows<Fmt::Q8_0>, dot_rows<Fmt::Q4_0>, dot_rows<Fmt::Q4_0G>},
};

}  // namespace

const Kernels& ref_kernels() { return kRef; }

}  // namespace hi
