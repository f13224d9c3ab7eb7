"""One token's attention over a static KV cache (decode, b = 1), split over positions
(flash-decoding), for the CUDA-graph decoder:

  q [H, hd] (RoPE applied), K, V [KV, C, hd] (the static cache, this token's row written),
  live positions [lo, pos] with lo = max(0, pos - window + 1) (window 0: lo = 0);
  y [H, hd] = softmax(q K^T * scale over the live positions) V, GQA: head h reads KV head
  h // (H / KV).

Kernel 1, grid (KV, S): program (g, s) takes the g-th KV head's REP query heads (padded to
16 rows for tl.dot) over the s-th of S equal slices of the live positions (in BLOCK_N
tiles), with an online softmax; it writes its unnormalised output, row max and row sum.
Kernel 2, grid (H,): merges the S partials of a head (empty slices: max -inf, sum 0).
Only live positions are read: the plain masked matmuls read all C positions of K and V
(8 MiB a layer at C = 4096, M47) whatever the position. pos is read on the device, so one
CUDA graph serves every position. Runs on CUDA; with TRITON_INTERPRET=1 also on CPU tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MQ = 16            # query rows a program (tl.dot's minimum); REP <= 16 real ones
# the interpreter's tl.dot mishandles bf16 operands: there every dot runs in f32 (on CUDA,
# 16-bit caches use the tensor cores' bf16/f16 dot with f32 accumulation)
INTERPRET = os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


@triton.jit
def _attn_part(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, m_ptr, l_ptr, C, window, scale,
               REP: tl.constexpr, HD: tl.constexpr, BLOCK_N: tl.constexpr, S: tl.constexpr,
               MQ: tl.constexpr, F32: tl.constexpr):
    g = tl.program_id(0)
    sp = tl.program_id(1)
    pos = tl.load(pos_ptr).to(tl.int32)
    lo = 0
    if window > 0:
        lo = tl.maximum(pos - window + 1, 0)
    per = tl.cdiv(tl.cdiv(pos + 1 - lo, S), BLOCK_N) * BLOCK_N       # positions a slice
    start = lo + sp * per
    end = tl.minimum(start + per, pos + 1)
    r = tl.arange(0, MQ)
    d = tl.arange(0, HD)
    q = tl.load(q_ptr + (g * REP + r)[:, None] * HD + d[None, :], mask=(r < REP)[:, None],
                other=0.0)                                             # [MQ, HD]
    if F32:
        q = q.to(tl.float32)
    m_i = tl.full([MQ], float("-inf"), tl.float32)
    l_i = tl.zeros([MQ], tl.float32)
    acc = tl.zeros([MQ, HD], tl.float32)
    kb = k_ptr + g * C * HD
    vb = v_ptr + g * C * HD
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cm = cols < end
        k = tl.load(kb + cols[:, None] * HD + d[None, :], mask=cm[:, None], other=0.0)
        if F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(cm[None, :], s * scale, float("-inf"))          # [MQ, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vb + cols[:, None] * HD + d[None, :], mask=cm[:, None], other=0.0)
        if F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (g * S + sp) * MQ + r
    tl.store(o_ptr + row[:, None] * HD + d[None, :], acc)
    tl.store(m_ptr + row, m_i)
    tl.store(l_ptr + row, l_i)


@triton.jit
def _attn_merge(o_ptr, m_ptr, l_ptr, y_ptr, REP: tl.constexpr, HD: tl.constexpr,
                S: tl.constexpr, MQ: tl.constexpr):
    h = tl.program_id(0)
    g = h // REP
    r = h % REP
    s = tl.arange(0, S)
    d = tl.arange(0, HD)
    row = (g * S + s) * MQ + r                                         # [S]
    m = tl.load(m_ptr + row)
    w = tl.exp(m - tl.max(m, 0))                                       # empty slices: 0
    den = tl.sum(tl.load(l_ptr + row) * w, 0)
    o = tl.load(o_ptr + row[:, None] * HD + d[None, :])                # [S, HD]
    y = tl.sum(o * w[:, None], 0) / den
    tl.store(y_ptr + h * HD + d, y.to(y_ptr.dtype.element_ty))


def slices(capacity: int, block_n: int) -> int:
    """S: slices of the live positions (a power of two, at most 16: 8 KV heads x 16 programs
    cover an H100's SMs once at long contexts; a short context leaves all but the first empty)."""
    return min(16, triton.next_power_of_2(triton.cdiv(capacity, block_n)))


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                     window: int, scale: float) -> torch.Tensor:
    """y [H, hd] in q's dtype; q [H, hd], k, v [KV, C, hd] contiguous, pos int64 [1] (device)."""
    H, hd = q.shape
    KV, C, _ = k.shape
    rep = H // KV
    if rep > MQ or hd & (hd - 1) or hd < 16:
        raise ValueError(f"decode_attention: needs H/KV <= {MQ} and a power-of-two head dim >= 16")
    block_n = 64 if hd <= 128 else 32
    S = slices(C, block_n)
    o = torch.empty(KV * S * MQ, hd, dtype=torch.float32, device=q.device)
    m = torch.empty(KV * S * MQ, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    y = torch.empty(H, hd, dtype=torch.float32, device=q.device)
    _attn_part[(KV, S)](q, k, v, pos, o, m, l, C, int(window), float(scale), REP=rep, HD=hd,
                        BLOCK_N=block_n, S=S, MQ=MQ, F32=q.dtype == torch.float32 or INTERPRET,
                        num_warps=4)
    _attn_merge[(H,)](o, m, l, y, REP=rep, HD=hd, S=S, MQ=MQ, num_warps=1)
    return y.to(q.dtype)
