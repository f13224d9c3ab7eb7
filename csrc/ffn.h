// FFN drivers: sparse gate/up, sparse down, the fused cold half of one or several FFNs.
// ISA-independent: threads and sparsity logic here, arithmetic through active_kernels().
// All entry points validate first (std::invalid_argument, on the calling thread), then run on
// the persistent pool. The caller (bindings.cpp) has released the GIL.
#pragma once
#include <cstdint>

#include "kernels.h"

namespace hi {

enum class Act : int { DRELU = 0, RELU = 1, FATRELU = 2, SILU = 3 };

// One FFN (a dense FFN or one MoE expert). Each matrix is [n_ff, row_bytes(fmt, d)] bytes,
// row i = neuron i: gate = W1[i, :], up = W3[i, :], down = W2[:, i] (W2 transposed).
struct FFNDesc {
  Fmt fmt;
  int d, n_ff;
  const uint8_t* gate;
  const uint8_t* up;
  const uint8_t* down;
};

// y [b, d] = sum_e scales[e, t] * FFN_e(x_t) restricted to ids[e][0 .. k[e]) (overwrites y).
// x [b, d] f32. scales: [E, b] or nullptr (all 1). exact: compute up only where the gate can
// fire and down only where the activation is non-zero (same result, fewer bytes read).
// trusted_ids: the caller made the ids itself, distinct and in range (ColdStep, every decode
// step), so they are not checked again per call.
void ffn_sparse_multi(const FFNDesc* ffns, int E, const float* x, int b,
                      const int32_t* const* ids, const int64_t* k, const float* scales, Act act,
                      float threshold, bool exact, float* y, bool trusted_ids = false);

// a [b, k] = act(W1[ids] x, W3[ids] x); exact: up skipped (a = 0) where the gate cannot fire.
void gate_up_sparse(const FFNDesc& f, const float* x, int b, const int32_t* ids, int64_t k,
                    Act act, float threshold, bool exact, float* a);

// y [b, d] = sum_j a[:, j] * W2[:, ids[j]] (overwrites y). skip_zero: rows with an all-zero
// column of a are not read.
void down_sparse(const FFNDesc& f, const float* a, int b, const int32_t* ids, int64_t k,
                 bool skip_zero, float* y);

// y [b, n] = x W^T: y[t, r] = W[r, :] . x_t for every row r < n (a dense linear layer, e.g.
// attention projections and lm_head on the CPU). W: [n, row_bytes(fmt, d)] packed rows; x [b, d]
// f32 (quantised once to q8 for Q8_0 / Q4_0); y [b, n] f32 (overwritten). Rows are cut into
// chunks claimed by the pool's threads; each row is read once for all b tokens.
void linear(Fmt fmt, int d, int n, const uint8_t* w, const float* x, int b, float* y);

// A low-rank relu MLP whose second layer is stored transposed (a predictor's scores, one
// token): h [r] = relu(W1 x) (linear over W1's r rows), y [n2] = sum_j h_j * W2t[j, :] over the
// rows with h_j > 0 (down_sparse with skip_zero: rows of zero activation are not read).
// W1: [r, row_bytes(f1, d)], W2t: [r, row_bytes(f2, n2)]. One call instead of two and the
// relu between them.
void relu_mlp_t(Fmt f1, int d, int r, const uint8_t* w1, Fmt f2, int n2, const uint8_t* w2t,
                const float* x, float* h, float* y);

// Parallel sum of n floats on the pool (read-bandwidth probe).
double read_sum(const float* p, size_t n);

}  // namespace hi
