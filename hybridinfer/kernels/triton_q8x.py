"""The one-token q4_0 GEMV with integer dot products (triton_ffn.matvec's q4_0 path wherever a
row is a whole number of 4-byte words, d % 64 == 0: attention projections, lm_head, the
predictors' fc1 on the GPU).

x is quantised per 32-value block b to int8 first (q8, as the CPU kernels and llama.cpp do):
  d_x[b] = max|x_b| / 127,  q[32b+j] = round(x[32b+j] / d_x[b]),  s_x[b] = sum_j q[32b+j].
A q4_0 word (GPU row layout, triton_ffn's docstring) holds 4 nibble bytes of a block: word w's
low nibbles are columns 32b+4w..+3, its high nibbles columns 32b+16+4w..+3, so x's int8 bytes
packed four to an int32 meet them as they are: two dp4a (4 byte products summed into an int32)
per 8 weights, ~0.6 integer instructions a weight where the float dequant took ~4 (which made
the GEMV ALU-bound at about half the HBM bandwidth). With n the unsigned nibble (0..15):
  y[r] = sum_b d_w[r,b] * d_x[b] * (sum_j n[r,32b+j] * q[32b+j] - 8 * s_x[b]).
H100, weights rotated over 8 copies (HBM, not the 50 MB L2), float dequant -> dp4a:
4096 x 4096 9.3 -> 5.1 us, 6144 x 4096 10.8 -> 6.5, 32000 x 4096 41.5 -> 25.7 (0.95 of the copy
bandwidth); quantising x is one more launch of ~1.5 us (benchmarks/triton_q8x.py).
Error: half a quantum of x per element, |y - W x| <= sum_j |W[r,j]| * d_x[j/32] / 2 (the tests
hold it to that bound): ~5e-3 of max|y| on random data, the order of q4_0's own rounding.

Under Triton's interpreter (CI, CPU tensors) dp4a is spelled out in integer ops (ASM=False).
Shapes: d columns, NB = d/32 blocks, n rows, k slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_ffn import LAST, RowTable, _dp4a, _slot_rows


def usable(fmt: str, d: int) -> bool:
    """q4_0 rows of an even number of blocks (every row 4-byte aligned: read as int32 words)."""
    return fmt == "q4_0" and d % 64 == 0


@triton.jit
def _quant_x_kernel(x_ptr, xq_ptr, xd_ptr, xs_ptr, NB, XS, BB: tl.constexpr):
    """Slot s (grid axis 1) of x (at x_ptr + s*XS, any float dtype), blocks [p*BB, (p+1)*BB):
    xq int32 [k, NB*8] (4 int8 a word, column order), xd f32 [k, NB], xs int32 [k, NB]."""
    s = tl.program_id(1)
    b = tl.program_id(0) * BB + tl.arange(0, BB)
    bm = b < NB
    j = tl.arange(0, 32)
    x = tl.load(x_ptr + s * XS + b[:, None] * 32 + j[None, :], mask=bm[:, None], other=0.0)
    x = x.to(tl.float32)
    amax = tl.max(tl.abs(x), axis=1)
    inv = tl.where(amax > 0, 127.0 / amax, 0.0)
    q = tl.floor(x * inv[:, None] + 0.5).to(tl.int32)                 # |q| <= 127
    words = tl.sum((q & 255).reshape([BB, 8, 4]) << (tl.arange(0, 4) * 8)[None, None, :], axis=2)
    o = s * NB + b
    tl.store(xq_ptr + o[:, None] * 8 + tl.arange(0, 8)[None, :], words, mask=bm[:, None])
    tl.store(xd_ptr + o, amax / 127.0, mask=bm)
    tl.store(xs_ptr + o, tl.sum(q, axis=1), mask=bm)


@triton.jit
def _matvec_q8x_kernel(xq_ptr, xd_ptr, xs_ptr, w_ptr, y_ptr, N, NB, RSW, sel_ptr, wtab, ntab,
                       QS, YS, R: tl.constexpr, NBP: tl.constexpr, SLOT: tl.constexpr,
                       ASM: tl.constexpr):
    """y[r] for rows [p*R, (p+1)*R) (module docstring), each row whole in one tile: all its
    loads are issued at once (no loop: one memory round trip a program). w_ptr: int32 words,
    RSW words a row. SLOT (grid axis 1 = slot s): expert sel[s]'s rows from the tables, x's
    quantised blocks at s*QS (QS = 0: one x for every slot), y at y_ptr + s*YS."""
    pid = tl.program_id(0)
    if SLOT:
        s = tl.program_id(1)
        _, w_ptr, N = _slot_rows(sel_ptr, wtab, ntab, w_ptr, s)
        xq_ptr += s * QS * 8
        xd_ptr += s * QS
        xs_ptr += s * QS
        y_ptr += s * YS
    r = pid * R + tl.arange(0, R)
    live = r < N
    b = tl.arange(0, NBP)
    bm = b < NB
    w = tl.arange(0, 4)
    base = r.to(tl.int64) * RSW
    words = tl.load(w_ptr + base[:, None, None] + (b * 4)[None, :, None] + w[None, None, :],
                    mask=live[:, None, None] & bm[None, :, None], other=0)         # [R, NBP, 4]
    h_ptr = w_ptr.to(tl.pointer_type(tl.int16), bitcast=True)
    sc = tl.load(h_ptr + (base * 2)[:, None] + NB * 8 + b[None, :], mask=live[:, None] & bm[None, :],
                 other=0).to(tl.float16, bitcast=True).to(tl.float32)            # [R, NBP]
    xlo = tl.load(xq_ptr + (b * 8)[:, None] + w[None, :], mask=bm[:, None], other=0)       # [NBP, 4]
    xhi = tl.load(xq_ptr + (b * 8 + 4)[:, None] + w[None, :], mask=bm[:, None], other=0)
    lo = words & 0x0F0F0F0F
    hi = (words >> 4) & 0x0F0F0F0F
    acc = _dp4a(lo, tl.broadcast_to(xlo[None, :, :], lo.shape), tl.zeros_like(lo), ASM)
    acc = _dp4a(hi, tl.broadcast_to(xhi[None, :, :], hi.shape), acc, ASM)
    xs = tl.load(xs_ptr + b, mask=bm, other=0)
    xd = tl.load(xd_ptr + b, mask=bm, other=0.0)
    t = (tl.sum(acc, axis=2) - 8 * xs[None, :]).to(tl.float32) * sc * xd[None, :]
    tl.store(y_ptr + r, tl.sum(t, axis=1), mask=live)


def quantize_x(x: torch.Tensor, d: int, slots: int = 1, stride: int = 0):
    """x's q8 blocks for the kernel: slot s's x at x.flatten()[s*stride:][:d] (stride 0: one x)
    -> (xq int32 [k, d/4], xd f32 [k, d/32], xs int32 [k, d/32]), k = slots if stride else 1."""
    k, nb = (slots if stride else 1), d // 32
    xq = torch.empty(k, nb * 8, dtype=torch.int32, device=x.device)
    xd = torch.empty(k, nb, dtype=torch.float32, device=x.device)
    xs = torch.empty(k, nb, dtype=torch.int32, device=x.device)
    bb = 8
    _quant_x_kernel[(triton.cdiv(nb, bb), k)](x, xq, xd, xs, nb, stride, BB=bb, num_warps=1)
    return xq, xd, xs


def packed_x(x: torch.Tensor, d: int) -> torch.Tensor:
    """x [d] quantised for triton_ffn's Q8X row dots (gate_up): one int32 buffer
    [d/32*8 words | d/32 d_x (f32 bits) | d/32 s_x]."""
    nb = d // 32
    buf = torch.empty(nb * 10, dtype=torch.int32, device=x.device)
    _quant_x_kernel[(triton.cdiv(nb, 8), 1)](x, buf, buf[nb * 8:nb * 9].view(torch.float32),
                                             buf[nb * 9:], nb, 0, BB=8, num_warps=1)
    return buf


def _launch(n: int) -> dict:
    """Rows per program and warps (H100 sweep of benchmarks/triton_q8x.py: one row a program
    from 4096 rows on; 4 rows and 2 warps below, where one row a program leaves SMs idle)."""
    return dict(R=1, num_warps=4) if n >= 4096 else dict(R=4, num_warps=2)


def matvec(d: int, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y [n] f32 = w x: q4_0 rows w [n, d/32*18] (GPU row layout, d % 64 == 0), x [d] any float."""
    n = w.shape[0]
    y = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return y
    xq, xd, xs = quantize_x(x, d)
    wv = w.view(torch.int32)
    c = _launch(n)
    LAST["matvec_q8x"] = _matvec_q8x_kernel[(triton.cdiv(n, c["R"]),)](
        xq, xd, xs, wv, y, n, d // 32, wv.shape[1], y, y, y, 0, 0,
        NBP=triton.next_power_of_2(d // 32), SLOT=False, ASM=x.is_cuda, **c)
    return y


def matvec_slots(d: int, wt: RowTable, x: torch.Tensor, xs_stride: int, y: torch.Tensor,
                 sel: torch.Tensor) -> torch.Tensor:
    """y[s, :n_e] = W_e x_s for slot s (e = sel[s]); x_s at x + s*xs_stride (0: one x [d]);
    y f32 [k, YS], YS >= wt.n_max; wt: q4_0 rows read as words (RowTable.like int32)."""
    k = sel.numel()
    xq, xd, xs = quantize_x(x, d, k, xs_stride)
    c = _launch(wt.n_max)
    LAST["matvec_q8x_slots"] = _matvec_q8x_kernel[(triton.cdiv(wt.n_max, c["R"]), k)](
        xq, xd, xs, wt.like, y, 0, d // 32, wt.rs // 2, sel, wt.ptr, wt.cnt,
        d // 32 if xs_stride else 0, y.shape[1], NBP=triton.next_power_of_2(d // 32), SLOT=True,
        ASM=x.is_cuda, **c)
    return y
