"""The hot-half Triton kernels as of commit e84314a (before the register-prefetch / column-tiled
down rewrite), kept so benchmarks/triton_hot_ffn.py times before and after in one run.

Triton kernels for the hot half of an FFN, one token (decode, b = 1):

  gate_up: a[j] = act(W1h[j]·x, W3h[j]·x) for the hot rows j whose mask is set (else 0);
           masked rows are never read; for drelu/relu/fatrelu the up row is read only where the
           gate fires (a second pass over the rows whose gate fired).
  down:    y = sum_j a[j] * W2h^T[j]: a transposed axpy over rows, split over row chunks and
           column tiles (atomic adds into y); rows with a = 0 are never read.

Each program owns a chunk of CHUNK rows. It first compacts the chunk's rows that need reading
(mask set / gate fired / a != 0) into a list (cumsum, in a scratch buffer), then streams R of
them at a time: every tile load is R full live rows, so sparse masks waste no lanes.

Weights: float rows [n, D] (f32/f16/bf16), or q4_0 rows in the GPU row layout below
(HotFFN.build repacks GGUF rows into it; kernels.gpu.q4_rows_to_gpu / q4_rows_from_gpu).

q4_0 GPU row layout: the same bytes as a GGUF q4_0 row (uint8 [n, nb*18], nb = D/32 blocks,
so footprint.ffn_rows_bytes is unchanged), permuted so that every field is contiguous:
  bytes [0, 16*nb)        the 16 nibble bytes of block 0, of block 1, ... (GGUF's qs, in order):
                          byte j of block b holds element 32b+j (low nibble) and 32b+16+j (high)
  bytes [16*nb, 18*nb)    the nb f16 scales d_b (little-endian)
  value(32b + i) = (nibble - 8) * d_b.
The kernels read a row as int16 halfwords (16-byte loads of one whole block per thread when
18*nb is a multiple of 16, i.e. D % 256 == 0): halfword m of block b holds, from bit 0,
elements 32b+2m, 32b+16+2m, 32b+2m+1, 32b+16+2m+1. A nibble becomes a float without an int->float
conversion (1/4 rate on Hopper): (h & (0xF << s)) | 0x4B000000 read as f32 is 2^23 + nib*2^s,
and subtracting 2^23 + 8*2^s leaves (nib - 8) * 2^s exactly; x is pre-scaled by 2^-s (gate_up)
or the sums by 2^-s at the end (down), powers of two, so no rounding is added.

Runs on CUDA; with TRITON_INTERPRET=1 also on CPU tensors (how CI tests the logic).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACT = {"drelu": 0, "relu": 1, "fatrelu": 2, "silu": 3}
Q4_BLOCK_BYTES = 18
MAGIC = tl.constexpr(0x4B000000)        # f32 bits of 2^23


# ---- helpers (inlined into the kernels) ------------------------------------------------------

@triton.jit
def _compact(flag, offs, lst):
    """Writes offs[i] where flag[i] (bool [CHUNK]) to lst[0:cnt] in order; returns cnt."""
    f = flag.to(tl.int32)
    pos = tl.cumsum(f, axis=0) - 1
    tl.store(lst + pos, offs, mask=flag)
    tl.debug_barrier()                     # the list is read back by other threads of the program
    return tl.sum(f, axis=0)


@triton.jit
def _nib(e, S: tl.constexpr):
    """e int32 [...] halfwords -> f32 (nibble at bits S..S+3 - 8) * 2^S, exactly."""
    f = ((e & (15 << S)) | MAGIC).to(tl.float32, bitcast=True)
    return f - (8388608.0 + 8.0 * (1 << S))


@triton.jit
def _q4_tile(w_ptr, rows, live, b0, NB, RS, BK: tl.constexpr):
    """R q4_0 rows (int64 [R], live: bool [R]) x blocks [b0, b0+BK), halfword m of block b ->
    f32 [R, BK, 8] each: n0 = (q[32b+2m] - 8), n8 = (q[32b+2m+1] - 8) * 2^8,
    n4 = (q[32b+16+2m] - 8) * 2^4, n12 = (q[32b+17+2m] - 8) * 2^12; sc f32 [R, BK]: the scales.
    w_ptr: int16 view of the rows, RS halfwords per row."""
    b = b0 + tl.arange(0, BK)
    m = tl.arange(0, 8)
    bm = b < NB
    base = rows * RS
    e = tl.load(w_ptr + base[:, None, None] + (b * 8)[None, :, None] + m[None, None, :],
                mask=live[:, None, None] & bm[None, :, None], other=0).to(tl.int32)  # [R, BK, 8]
    sc = tl.load(w_ptr + base[:, None] + NB * 8 + b[None, :],
                 mask=live[:, None] & bm[None, :], other=0)                         # [R, BK]
    sc = sc.to(tl.float16, bitcast=True).to(tl.float32)
    return _nib(e, 0), _nib(e, 8), _nib(e, 4), _nib(e, 12), sc


@triton.jit
def _x_tile(x_ptr, k0, D, IS_Q4: tl.constexpr, BK: tl.constexpr):
    """x over the K tile starting at k0 (a block for q4_0, a column for float rows):
    q4_0: f32 [BK, 8] each, x[32b+2m], x[32b+2m+1] / 2^8, x[32b+16+2m] / 2^4, x[32b+17+2m] / 2^12
    (the slots of _q4_tile); float rows: x0 = x[k0:k0+BK] (the others unused)."""
    if IS_Q4:
        b = k0 + tl.arange(0, BK)
        m = tl.arange(0, 8)
        col = b[:, None] * 32 + 2 * m[None, :]                  # [BK, 8]
        cm = col < D
        x0 = tl.load(x_ptr + col, mask=cm, other=0.0).to(tl.float32)
        x8 = tl.load(x_ptr + col + 1, mask=cm, other=0.0).to(tl.float32) * 0.00390625
        x4 = tl.load(x_ptr + col + 16, mask=cm, other=0.0).to(tl.float32) * 0.0625
        x12 = tl.load(x_ptr + col + 17, mask=cm, other=0.0).to(tl.float32) * 0.000244140625
    else:
        c = k0 + tl.arange(0, BK)
        x0 = tl.load(x_ptr + c, mask=c < D, other=0.0).to(tl.float32)
        x8 = x0
        x4 = x0
        x12 = x0
    return x0, x8, x4, x12


@triton.jit
def _rows_dot(w_ptr, rows, live, x_ptr, x0, x8, x4, x12, D, NB, RS, IS_Q4: tl.constexpr,
              BK: tl.constexpr, NK: tl.constexpr):
    """f32 [R]: the dot products of R rows with x. x0..x12: x's tile when the row is one K tile
    (NK == 1, loaded once per program); else x is loaded per K tile."""
    acc = tl.zeros([rows.shape[0]], dtype=tl.float32)
    for kt in tl.static_range(NK):
        if NK > 1:
            x0, x8, x4, x12 = _x_tile(x_ptr, kt * BK, D, IS_Q4, BK)
        if IS_Q4:
            n0, n8, n4, n12, sc = _q4_tile(w_ptr, rows, live, kt * BK, NB, RS, BK)
            part = tl.sum(n0 * x0[None] + n8 * x8[None] + n4 * x4[None] + n12 * x12[None],
                          axis=2)                                # [R, BK]
            acc += tl.sum(part * sc, axis=1)
        else:
            c = kt * BK + tl.arange(0, BK)
            w = tl.load(w_ptr + rows[:, None] * RS + c[None, :],
                        mask=live[:, None] & (c < D)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * x0[None, :], axis=1)
    return acc


# ---- kernels ---------------------------------------------------------------------------------

@triton.jit
def _gate_up_kernel(x_ptr, g_ptr, u_ptr, mask_ptr, a_ptr, lst_ptr, N, D, NB, RS, threshold,
                    HAS_MASK: tl.constexpr, ACT_KIND: tl.constexpr, IS_Q4: tl.constexpr,
                    CHUNK: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr):
    """a [N] f32. Program p: rows [p*CHUNK, (p+1)*CHUNK). lst: int32 [grid*CHUNK] scratch."""
    pid = tl.program_id(0)
    offs = pid * CHUNK + tl.arange(0, CHUNK)                    # [CHUNK] rows of this program
    inr = offs < N
    live = inr
    if HAS_MASK:
        live = live & (tl.load(mask_ptr + offs, mask=inr, other=0) != 0)
    lst = lst_ptr + pid * CHUNK
    cnt = _compact(live, offs, lst)
    x0, x8, x4, x12 = _x_tile(x_ptr, 0, D, IS_Q4, BK)            # used when NK == 1
    ri0 = tl.arange(0, R)
    if ACT_KIND == 3:                                           # silu: gate and up of every row
        tl.store(a_ptr + offs, 0.0, mask=inr & (live == 0))
        for i in range(0, cnt, R):
            lv = i + ri0 < cnt
            rows = tl.load(lst + i + ri0, mask=lv, other=0).to(tl.int64)
            g = _rows_dot(g_ptr, rows, lv, x_ptr, x0, x8, x4, x12, D, NB, RS, IS_Q4, BK, NK)
            u = _rows_dot(u_ptr, rows, lv, x_ptr, x0, x8, x4, x12, D, NB, RS, IS_Q4, BK, NK)
            tl.store(a_ptr + rows, g / (1.0 + tl.exp(-g)) * u, mask=lv)
    else:
        # pass 1: the gates of the live rows (kept in a); pass 2: up where the gate fired
        for i in range(0, cnt, R):
            lv = i + ri0 < cnt
            rows = tl.load(lst + i + ri0, mask=lv, other=0).to(tl.int64)
            g = _rows_dot(g_ptr, rows, lv, x_ptr, x0, x8, x4, x12, D, NB, RS, IS_Q4, BK, NK)
            tl.store(a_ptr + rows, g, mask=lv)
        tl.debug_barrier()
        gv = tl.load(a_ptr + offs, mask=live, other=0.0)
        if ACT_KIND == 2:
            fire = live & (gv > threshold)
        else:
            fire = live & (gv > 0.0)
        tl.store(a_ptr + offs, 0.0, mask=inr & (fire == 0))
        cnt2 = _compact(fire, offs, lst)
        for i in range(0, cnt2, R):
            lv = i + ri0 < cnt2
            rows = tl.load(lst + i + ri0, mask=lv, other=0).to(tl.int64)
            g = tl.load(a_ptr + rows, mask=lv, other=0.0)
            u = _rows_dot(u_ptr, rows, lv, x_ptr, x0, x8, x4, x12, D, NB, RS, IS_Q4, BK, NK)
            if ACT_KIND == 0:
                u = tl.maximum(u, 0.0)
            tl.store(a_ptr + rows, g * u, mask=lv)


@triton.jit
def _axpy_kernel(a_ptr, w_ptr, y_ptr, lst_ptr, N, D, NB, RS, IS_Q4: tl.constexpr,
                 CHUNK: tl.constexpr, R: tl.constexpr, BK: tl.constexpr):
    """y [D] f32 += sum_j a[j] * W[j]. Program (pc, pr): K tile pc (BK blocks or columns) of
    the rows [pr*CHUNK, (pr+1)*CHUNK). lst: int32 [grid0*grid1*CHUNK] scratch."""
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    offs = pr * CHUNK + tl.arange(0, CHUNK)
    inr = offs < N
    live = inr & (tl.load(a_ptr + offs, mask=inr, other=0.0) != 0.0)
    lst = lst_ptr + (pr * tl.num_programs(0) + pc) * CHUNK
    cnt = _compact(live, offs, lst)
    k0 = pc * BK
    ri0 = tl.arange(0, R)
    if IS_Q4:
        a0 = tl.zeros([BK, 8], dtype=tl.float32)               # the 4 nibble slots of _q4_tile
        a8 = tl.zeros([BK, 8], dtype=tl.float32)
        a4 = tl.zeros([BK, 8], dtype=tl.float32)
        a12 = tl.zeros([BK, 8], dtype=tl.float32)
        for i in range(0, cnt, R):
            lv = i + ri0 < cnt
            rows = tl.load(lst + i + ri0, mask=lv, other=0).to(tl.int64)
            ar = tl.load(a_ptr + rows, mask=lv, other=0.0)
            n0, n8, n4, n12, sc = _q4_tile(w_ptr, rows, lv, k0, NB, RS, BK)
            coef = (ar[:, None] * sc)[:, :, None]               # [R, BK, 1]
            a0 += tl.sum(n0 * coef, axis=0)
            a8 += tl.sum(n8 * coef, axis=0)
            a4 += tl.sum(n4 * coef, axis=0)
            a12 += tl.sum(n12 * coef, axis=0)
        b = k0 + tl.arange(0, BK)
        m = tl.arange(0, 8)
        col = b[:, None] * 32 + 2 * m[None, :]                  # [BK, 8]
        cm = col < D
        tl.atomic_add(y_ptr + col, a0, mask=cm)
        tl.atomic_add(y_ptr + col + 1, a8 * 0.00390625, mask=cm)
        tl.atomic_add(y_ptr + col + 16, a4 * 0.0625, mask=cm)
        tl.atomic_add(y_ptr + col + 17, a12 * 0.000244140625, mask=cm)
    else:
        c = k0 + tl.arange(0, BK)
        acc = tl.zeros([BK], dtype=tl.float32)
        for i in range(0, cnt, R):
            lv = i + ri0 < cnt
            rows = tl.load(lst + i + ri0, mask=lv, other=0).to(tl.int64)
            ar = tl.load(a_ptr + rows, mask=lv, other=0.0)
            w = tl.load(w_ptr + rows[:, None] * RS + c[None, :],
                        mask=lv[:, None] & (c < D)[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(w * ar[:, None], axis=0)
        tl.atomic_add(y_ptr + c, acc, mask=c < D)


# ---- launch configuration --------------------------------------------------------------------

def config(fmt: str, d: int, n: int, device: torch.device | None = None) -> dict:
    """Launch parameters per shape class: the best measured ones of the sweep in
    benchmarks/results/triton_hot_ffn_h100.md (H100, d = 4096). CHUNK: rows per program (compacted
    in-program), R: live rows per tile, BK: K tile (q4_0: blocks of 32 values; float: columns;
    one tile covers d <= 4096 for gate_up), num_warps. device is unused (kept for callers)."""
    if fmt == "q4_0":
        bk = min(triton.next_power_of_2(d // 32), 128)
        gu = dict(CHUNK=16, R=2, BK=bk, num_warps=4) if n >= 4096 else \
            dict(CHUNK=16, R=4, BK=bk, num_warps=8)
        dn = dict(CHUNK=64, R=4, BK=bk, num_warps=4) if n >= 12288 else \
            dict(CHUNK=64, R=8, BK=bk, num_warps=8)
    else:
        gu = dict(CHUNK=16, R=4, BK=min(triton.next_power_of_2(d), 4096), num_warps=8)
        dn = dict(CHUNK=64, R=8, BK=min(triton.next_power_of_2(d), 1024), num_warps=4)
    return {"gate_up": gu, "down": dn}


def _rows_view(fmt: str, w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The pointer view the kernels read and its row stride in elements."""
    if fmt == "q4_0":
        v = w.view(torch.int16)                                # halfwords; 18*nb bytes is even
        return v, v.shape[1]
    return w, w.shape[1]


def gate_up(fmt: str, d: int, gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, act: str,
            threshold: float, mask: torch.Tensor | None, cfg: dict | None = None) -> torch.Tensor:
    """a [n] f32 = act(gate·x, up·x) on the rows whose mask is set (0 elsewhere)."""
    n = gate.shape[0]
    is_q4 = fmt == "q4_0"
    c = dict(cfg or config(fmt, d, n, x.device)["gate_up"])
    nw = c.pop("num_warps")
    units = d // 32 if is_q4 else d
    a = torch.empty(n, dtype=torch.float32, device=x.device)
    grid = triton.cdiv(n, c["CHUNK"])
    lst = torch.empty(grid * c["CHUNK"], dtype=torch.int32, device=x.device)
    g, rs = _rows_view(fmt, gate)
    u, _ = _rows_view(fmt, up)
    m = mask.view(torch.uint8) if mask is not None else a      # a dummy pointer without a mask
    _gate_up_kernel[(grid,)](x, g, u, m, a, lst, n, d, d // 32, rs, float(threshold),
                             HAS_MASK=mask is not None, ACT_KIND=ACT[act], IS_Q4=is_q4,
                             NK=triton.cdiv(units, c["BK"]), num_warps=nw, **c)
    return a


def down(fmt: str, d: int, w: torch.Tensor, a: torch.Tensor, y: torch.Tensor | None = None,
         cfg: dict | None = None) -> torch.Tensor:
    """y [d] f32 (+)= sum_j a[j] * w[j] over the rows with a[j] != 0 (w: [n, d] rows, e.g. W2^T)."""
    n = w.shape[0]
    is_q4 = fmt == "q4_0"
    c = dict(cfg or config(fmt, d, n, a.device)["down"])
    nw = c.pop("num_warps")
    if y is None:
        y = torch.zeros(d, dtype=torch.float32, device=a.device)
    units = d // 32 if is_q4 else d
    grid = (triton.cdiv(units, c["BK"]), triton.cdiv(n, c["CHUNK"]))
    lst = torch.empty(grid[0] * grid[1] * c["CHUNK"], dtype=torch.int32, device=a.device)
    wv, rs = _rows_view(fmt, w)
    _axpy_kernel[grid](a, wv, y, lst, n, d, d // 32, rs, IS_Q4=is_q4, num_warps=nw, **c)
    return y


def supported(fmt: str) -> bool:
    return fmt in ("f32", "f16", "bf16", "q4_0")


def hot_ffn_one_token(fmt: str, d: int, gate: torch.Tensor, up: torch.Tensor, down_t: torch.Tensor,
                      x: torch.Tensor, act: str, threshold: float,
                      mask: torch.Tensor | None) -> torch.Tensor:
    """x [d] (any float dtype) -> y [d] float32 over the hot rows (mask: bool [n_hot] or None).
    q4_0 rows in the GPU row layout (module docstring)."""
    y = torch.zeros(d, dtype=torch.float32, device=x.device)
    if gate.shape[0] == 0:
        return y
    a = gate_up(fmt, d, gate, up, x.contiguous(), act, threshold, mask)
    return down(fmt, d, down_t, a, y)
