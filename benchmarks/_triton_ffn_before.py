"""Triton kernels for the hot half of an FFN, one token (decode):

  hot_gate_up: a[j] = act(W1h[j]·x, W3h[j]·x) for the hot rows j whose mask is set (else 0):
               a row-gather GEMV; rows with mask 0 are never read (masked loads).
  hot_down:    y = sum_j a[j] * W2h^T[j]: a transposed axpy over rows, split over row chunks
               (atomic adds into y) so that a few thousand rows fill the GPU; rows with a = 0
               are never read (lossless skipping: the GPU side of "exact").

Weights: float rows [n, D] (f16/bf16/f32) or GGUF q4_0 rows (uint8 [n, D/32*18]: f16 scale,
16 bytes of nibbles; element i of a block is the low nibble of byte i for i < 16, the high
nibble of byte i-16 otherwise; value = (nibble - 8) * scale).
Runs on CUDA; with TRITON_INTERPRET=1 also on CPU tensors (how CI tests the logic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT = {"drelu": 0, "relu": 1, "fatrelu": 2, "silu": 3}
Q4_BLOCK_BYTES = 18


@triton.jit
def _row_dot(w_ptr, rows, rmask, x_ptr, D, RB, IS_Q4: tl.constexpr, BLOCK_R: tl.constexpr,
             BLOCK_C: tl.constexpr):
    """[BLOCK_R] dot products of the given rows with x (f32 accumulate)."""
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if IS_Q4:
        # c runs over the nibble bytes of the row: 16 per 32-value block
        for c0 in range(0, D // 2, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < D // 2
            blk = c // 16
            j = c % 16
            base = rows[:, None].to(tl.int64) * RB + blk[None, :] * 18
            m2 = rmask[:, None] & cm[None, :]
            b = tl.load(w_ptr + base + 2 + j[None, :], mask=m2, other=0).to(tl.int32)
            s_lo = tl.load(w_ptr + base, mask=m2, other=0).to(tl.uint16)
            s_hi = tl.load(w_ptr + base + 1, mask=m2, other=0).to(tl.uint16)
            scale = (s_lo | (s_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            xlo = tl.load(x_ptr + blk * 32 + j, mask=cm, other=0.0).to(tl.float32)
            xhi = tl.load(x_ptr + blk * 32 + 16 + j, mask=cm, other=0.0).to(tl.float32)
            v = ((b & 15) - 8).to(tl.float32) * xlo[None, :] + ((b >> 4) - 8).to(tl.float32) * xhi[None, :]
            acc += tl.sum(v * scale, axis=1)
    else:
        for c0 in range(0, D, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            cm = c < D
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * D + c[None, :],
                        mask=rmask[:, None] & cm[None, :], other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + c, mask=cm, other=0.0).to(tl.float32)
            acc += tl.sum(w * xv[None, :], axis=1)
    return acc


@triton.jit
def _gate_up_kernel(x_ptr, g_ptr, u_ptr, mask_ptr, a_ptr, N, D, RB, threshold,
                    HAS_MASK: tl.constexpr, ACT_KIND: tl.constexpr, IS_Q4: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    live = rows < N
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + rows, mask=rows < N, other=0) != 0)
    g = _row_dot(g_ptr, rows, live, x_ptr, D, RB, IS_Q4, BLOCK_R, BLOCK_C)
    if ACT_KIND == 0:      # dReLU: up only where the gate fires
        live_u = live & (g > 0)
    elif ACT_KIND == 1:
        live_u = live & (g > 0)
    elif ACT_KIND == 2:
        live_u = live & (g > threshold)
    else:
        live_u = live
    u = _row_dot(u_ptr, rows, live_u, x_ptr, D, RB, IS_Q4, BLOCK_R, BLOCK_C)
    if ACT_KIND == 0:
        a = tl.maximum(g, 0.0) * tl.maximum(u, 0.0)
    elif ACT_KIND == 3:
        a = g / (1.0 + tl.exp(-g)) * u
    else:
        a = g * u
    a = tl.where(live_u, a, 0.0)
    tl.store(a_ptr + rows, a, mask=rows < N)


@triton.jit
def _down_kernel(a_ptr, w_ptr, y_ptr, N, D, RB, ROWS_PER: tl.constexpr, IS_Q4: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    cm = cols < D
    r0 = tl.program_id(1) * ROWS_PER
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for rr in range(0, ROWS_PER, BLOCK_R):
        rows = r0 + rr + tl.arange(0, BLOCK_R)
        a = tl.load(a_ptr + rows, mask=rows < N, other=0.0)
        live = a != 0.0
        m2 = live[:, None] & cm[None, :]
        if IS_Q4:
            blk = cols // 32
            within = cols % 32
            base = rows[:, None].to(tl.int64) * RB + blk[None, :] * 18
            b = tl.load(w_ptr + base + 2 + (within % 16)[None, :], mask=m2, other=0).to(tl.int32)
            nib = tl.where((within < 16)[None, :], b & 15, b >> 4)
            s_lo = tl.load(w_ptr + base, mask=m2, other=0).to(tl.uint16)
            s_hi = tl.load(w_ptr + base + 1, mask=m2, other=0).to(tl.uint16)
            scale = (s_lo | (s_hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)
            w = (nib - 8).to(tl.float32) * scale
        else:
            w = tl.load(w_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=m2,
                        other=0.0).to(tl.float32)
        acc += tl.sum(w * a[:, None], axis=0)
    tl.atomic_add(y_ptr + cols, acc, mask=cm)


def supported(fmt: str) -> bool:
    return fmt in ("f32", "f16", "bf16", "q4_0")


def hot_ffn_one_token(fmt: str, d: int, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor,
                      x: torch.Tensor, act: str, threshold: float,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """x [d] (any float dtype) -> y [d] float32 over the hot rows (mask: bool [n_hot] or None)."""
    n = gate.shape[0]
    is_q4 = fmt == "q4_0"
    rb = gate.shape[1] if is_q4 else d
    a = torch.empty(n, dtype=torch.float32, device=x.device)
    y = torch.zeros(d, dtype=torch.float32, device=x.device)
    if n == 0:
        return y
    BR = 16
    m = mask if mask is not None else a   # a dummy pointer when there is no mask
    _gate_up_kernel[(triton.cdiv(n, BR),)](
        x, gate, up, m, a, n, d, rb, float(threshold), HAS_MASK=mask is not None,
        ACT_KIND=ACT[act], IS_Q4=is_q4, BLOCK_R=BR, BLOCK_C=128 if not is_q4 else 64)
    BD = 128
    rows_per = 256
    _down_kernel[(triton.cdiv(d, BD), triton.cdiv(n, rows_per))](
        a, down_t, y, n, d, rb, ROWS_PER=rows_per, IS_Q4=is_q4, BLOCK_R=16, BLOCK_D=BD)
    return y
