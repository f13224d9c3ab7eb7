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
H100, weights rotated over 8 copies (HBM, not the 50 MB L2), float dequant -> dp4a, the q8x
times including the ~1.5 us launch that quantises x (benchmarks/triton_q8x.py,
results/triton_q8x_h100_v2.log): 4096 x 4096 9.6 -> 6.7 us, 6144 x 4096 10.8 -> 8.2, 32000 x 4096
41.5 -> 27.5 (2.7 TB/s of the 2.9 copy).
Error: half a quantum of x per element, |y - W x| <= sum_j |W[r,j]| * d_x[j/32] / 2 (the tests
hold it to that bound): ~5e-3 of max|y| on random data, the order of q4_0's own rounding.

Under Triton's interpreter (CI, CPU tensors) dp4a is spelled out in integer ops (ASM=False).
Shapes: d columns, NB = d/32 blocks, n rows, k slots.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_ffn import LAST, RowTable, _load_rows, _slot_rows, _tile_dot, _x_tile


def usable(fmt: str, d: int) -> bool:
    """q4_0 rows of an even number of blocks (every row 4-byte aligned: read as int32 words)."""
    return fmt == "q4_0" and d % 64 == 0


@triton.jit
def _quant_x_kernel(x_ptr, q_ptr, NB, XS, BB: tl.constexpr):
    """Slot s (grid axis 1) of x (at x_ptr + s*XS, any float dtype), blocks [p*BB, (p+1)*BB),
    into row s of q int32 [k, NB*10]: NB*8 words of x's int8 (4 a word, column order), NB d_x
    (f32 bits), NB s_x (the layout triton_ffn._x_tile reads with Q8X)."""
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
    row = q_ptr + s * NB * 10
    tl.store(row + b[:, None] * 8 + tl.arange(0, 8)[None, :], words, mask=bm[:, None])
    tl.store(row + NB * 8 + b, (amax / 127.0).to(tl.int32, bitcast=True), mask=bm)
    tl.store(row + NB * 9 + b, tl.sum(q, axis=1), mask=bm)


@triton.jit
def _matvec_q8x_kernel(q_ptr, w_ptr, y_ptr, N, D, NB, RS, sel_ptr, wtab, ntab, QS, YS,
                       R: tl.constexpr, NBP: tl.constexpr, SLOT: tl.constexpr,
                       ASM: tl.constexpr):
    """y[r] for rows [p*R, (p+1)*R) (module docstring) with gate_up's Q8X tile helpers, each row
    whole in one tile: all its loads are issued at once (no loop: one memory round trip a
    program). w_ptr: int32 words, RS halfwords a row. SLOT (grid axis 1 = slot s): expert
    sel[s]'s rows from the tables, x's packed q8 at q_ptr + s*QS (QS = 0: one x for every
    slot), y at y_ptr + s*YS."""
    pid = tl.program_id(0)
    if SLOT:
        s = tl.program_id(1)
        _, w_ptr, N = _slot_rows(sel_ptr, wtab, ntab, w_ptr, s)
        q_ptr += s * QS
        y_ptr += s * YS
    r = pid * R + tl.arange(0, R)
    live = r < N
    e, sc = _load_rows(w_ptr, r.to(tl.int64), live, 0, D, NB, RS, True, NBP, True)   # [R, NBP, 4]
    xlo, xhi, xd, xs = _x_tile(q_ptr, 0, D, True, NBP, True)
    tl.store(y_ptr + r, _tile_dot(e, sc, xlo, xhi, xd, xs, True, True, True, ASM), mask=live)


def packed_x(x: torch.Tensor, d: int, slots: int = 1, stride: int = 0) -> torch.Tensor:
    """x quantised to q8 for the Q8X row dots (this GEMV, triton_ffn's gate_up): slot s's x at
    x.flatten()[s*stride:][:d] (stride 0: one x) -> int32 [k, d/32*10] (k = slots if stride
    else 1): d/32*8 words of int8 | d/32 d_x (f32 bits) | d/32 s_x."""
    k, nb = (slots if stride else 1), d // 32
    q = torch.empty(k, nb * 10, dtype=torch.int32, device=x.device)
    _quant_x_kernel[(triton.cdiv(nb, 8), k)](x, q, nb, stride, BB=8, num_warps=1)
    return q


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
    wv = w.view(torch.int32)
    c = _launch(n)
    LAST["matvec_q8x"] = _matvec_q8x_kernel[(triton.cdiv(n, c["R"]),)](
        packed_x(x, d), wv, y, n, d, d // 32, wv.shape[1] * 2, y, y, y, 0, 0,
        NBP=triton.next_power_of_2(d // 32), SLOT=False, ASM=x.is_cuda, **c)
    return y


def matvec_slots(d: int, wt: RowTable, x: torch.Tensor, xs_stride: int, y: torch.Tensor,
                 sel: torch.Tensor) -> torch.Tensor:
    """y[s, :n_e] = W_e x_s for slot s (e = sel[s]); x_s at x + s*xs_stride (0: one x [d]);
    y f32 [k, YS], YS >= wt.n_max; wt: q4_0 rows read as words (RowTable.like int32)."""
    k = sel.numel()
    q = packed_x(x, d, k, xs_stride)
    c = _launch(wt.n_max)
    LAST["matvec_q8x_slots"] = _matvec_q8x_kernel[(triton.cdiv(wt.n_max, c["R"]), k)](
        q, wt.like, y, 0, d, d // 32, wt.rs, sel, wt.ptr, wt.cnt, q.shape[1] if xs_stride else 0,
        y.shape[1], NBP=triton.next_power_of_2(d // 32), SLOT=True, ASM=x.is_cuda, **c)
    return y
