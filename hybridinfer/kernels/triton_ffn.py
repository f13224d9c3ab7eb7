"""Triton kernels for the hot half of an FFN, one token (decode, b = 1):

  gate_up: a[j] = act(W1h[j]·x, W3h[j]·x) for the hot rows j whose mask is set (else 0);
           masked rows are never read; for drelu/relu/fatrelu the up row is read only where the
           gate fires (a second pass over the rows whose gate fired). q4_0 rows of whole words:
           integer dots over x quantised to q8 (Q8X: triton_q8x's arithmetic, dp4a).
  down:    y = sum_j a[j] * W2h^T[j]: a transposed axpy over rows, split over row chunks and
           column tiles (atomic adds into y); rows with a = 0 are never read.
  matvec:  y = W x over every row (a dense GEMV: attention projections and lm_head held in q4_0
           on the GPU, kernels.gpu.DeviceLinear); gate_up's first pass without a mask, or for
           q4_0 rows of whole words the integer-dot kernel of triton_q8x (x quantised to q8).

Each program owns a chunk of CHUNK rows. It first compacts the chunk's rows that need reading
(mask set / gate fired / a != 0) into a list (cumsum, in a scratch buffer), then streams R of
them at a time: every tile load is R full live rows, so sparse masks waste no lanes. The loads
of the next R rows are issued before the current tile is used (a register prefetch): the kernels
are bound by loads in flight, not by arithmetic.
  gate_up (q4_0): one K tile = the whole row (BK = 128 blocks for D = 4096, x's tile held in
    registers for the program's life), one block (16 bytes) per thread per row, R = 2 rows.
  down (q4_0): a program owns CHUNK rows x a column tile of BK blocks (BK = 8: 256 columns;
    grid = column tiles x row chunks), one block per thread per row, R = 16 rows a tile with
    4 warps; elementwise accumulators of the tile's shape (one FMA per weight), reduced over the
    row axis once at the end, then one relaxed atomic add per column per program.
Weights: float rows [n, D] (f32/f16/bf16), or q4_0 rows in the GPU row layout below
(HotFFN.build repacks GGUF rows into it; kernels.gpu.q4_rows_to_gpu / q4_rows_from_gpu).

q4_0 GPU row layout: the same bytes as a GGUF q4_0 row (uint8 [n, nb*18], nb = D/32 blocks,
so footprint.ffn_rows_bytes is unchanged), permuted so that every field is contiguous:
  bytes [0, 16*nb)        the 16 nibble bytes of block 0, of block 1, ... (GGUF's qs, in order):
                          byte j of block b holds element 32b+j (low nibble) and 32b+16+j (high)
  bytes [16*nb, 18*nb)    the nb f16 scales d_b (little-endian)
  value(32b + i) = (nibble - 8) * d_b.
The kernels read a row as int32 words (rows with an even number of blocks: every row 4-byte
aligned) or int16 halfwords, 16-byte loads (one whole block per thread) when 18*nb is a multiple
of 16, i.e. D % 256 == 0. Halfword m of block b holds, from bit 0, elements 32b+2m, 32b+16+2m,
32b+2m+1, 32b+16+2m+1; word w = halfwords 2w (low) and 2w+1 (high; one shift a word brings it
down: int16 loads cost a byte permute per nibble instead). A nibble becomes a float without an
int->float conversion (1/4 rate on Hopper): (h & (0xF << s)) | 0x4B000000 read as f32 is
2^23 + nib*2^s, and subtracting 2^23 + 8*2^s leaves (nib - 8) * 2^s exactly; x is pre-scaled by
2^-s (gate_up) or the sums by 2^-s at the end (down), powers of two, so no rounding is added.

Runs on CUDA; with TRITON_INTERPRET=1 also on CPU tensors (how CI tests the logic).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ACT = {"drelu": 0, "relu": 1, "fatrelu": 2, "silu": 3}
Q4_BLOCK_BYTES = 18
MAGIC = tl.constexpr(0x4B000000)        # f32 bits of 2^23
LAST: dict = {}    # kernel name -> the last launch's CompiledKernel (benchmarks read registers)


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
def _list_rows(lst, i, cnt, R: tl.constexpr):
    """Entries [i, i+R) of a compacted row list: rows int64 [R] (0 past cnt), live bool [R]."""
    ri = i + tl.arange(0, R)
    lv = ri < cnt
    return tl.load(lst + ri, mask=lv, other=0).to(tl.int64), lv


@triton.jit
def _nib(e, S: tl.constexpr):
    """e int32 [...] halfwords -> f32 (nibble at bits S..S+3 - 8) * 2^S, exactly."""
    f = ((e & (15 << S)) | MAGIC).to(tl.float32, bitcast=True)
    return f - (8388608.0 + 8.0 * (1 << S))


@triton.jit
def _load_rows(w_ptr, rows, live, k0, D, NB, RS, IS_Q4: tl.constexpr, BK: tl.constexpr,
               WORDS: tl.constexpr, GGUF: tl.constexpr = False):
    """The raw K tile k0 of R rows (int64 [R], live bool [R]), loaded, not yet expanded, so the
    loads of the next rows can be issued before this tile is used (a register prefetch):
    q4_0 (k0, BK in blocks): e [R, BK, 8] int16 halfwords (halfword m of block b), or with WORDS
    [R, BK, 4] int32 words (word w = halfwords 2w, 2w+1), sc f16 [R, BK] scales;
    float rows (k0, BK in columns): e [R, BK] (sc: the same tensor, unused).
    w_ptr: q4_0 rows as int16 (RS halfwords a row; int32 with WORDS: rows of an even number of
    blocks), or the float rows (RS elements).
    GGUF: q4_0 rows in GGUF's own layout (9 halfwords a block: the scale, then the 8 nibble
    halfwords; never WORDS: a block's nibbles are only 2-byte aligned) -- the CPU's cold rows,
    read in place from page-locked host memory (the warm tier)."""
    base = rows * RS
    if IS_Q4 and GGUF:
        b = k0 + tl.arange(0, BK)
        bm = b < NB
        m = tl.arange(0, 8)
        blk = base[:, None] + (b * 9)[None, :]                                        # [R, BK]
        e = tl.load(w_ptr + blk[:, :, None] + 1 + m[None, None, :],
                    mask=live[:, None, None] & bm[None, :, None])                   # [R, BK, 8]
        sc = tl.load(w_ptr + blk, mask=live[:, None] & bm[None, :], other=0)
        sc = sc.to(tl.float16, bitcast=True)
    elif IS_Q4:
        b = k0 + tl.arange(0, BK)
        bm = b < NB
        if WORDS:
            w = tl.arange(0, 4)
            e = tl.load(w_ptr + (base // 2)[:, None, None] + (b * 4)[None, :, None]
                        + w[None, None, :], mask=live[:, None, None] & bm[None, :, None])
            # [R, BK, 4] words; no `other`: masked lanes decode to finite values whose
            # coefficient (down) or scale (gate_up) is 0
            h_ptr = w_ptr.to(tl.pointer_type(tl.int16), bitcast=True)
        else:
            m = tl.arange(0, 8)
            e = tl.load(w_ptr + base[:, None, None] + (b * 8)[None, :, None] + m[None, None, :],
                        mask=live[:, None, None] & bm[None, :, None])              # [R, BK, 8]
            h_ptr = w_ptr
        sc = tl.load(h_ptr + base[:, None] + NB * 8 + b[None, :],
                     mask=live[:, None] & bm[None, :], other=0)                    # [R, BK]
        sc = sc.to(tl.float16, bitcast=True)
    else:
        c = k0 + tl.arange(0, BK)
        e = tl.load(w_ptr + base[:, None] + c[None, :], mask=live[:, None] & (c < D)[None, :],
                    other=0.0)
        sc = e
    return e, sc


@triton.jit
def _expand(e, WORDS: tl.constexpr):
    """A loaded q4_0 tile (_load_rows: int16 [R, BK, 8] or int32 words [R, BK, 4]) -> f32
    [R, BK, 8] each, m the halfword: n0 = (q[32b+2m] - 8), n8 = (q[32b+2m+1] - 8) * 2^8,
    n4 = (q[32b+16+2m] - 8) * 2^4, n12 = (q[32b+17+2m] - 8) * 2^12."""
    if WORDS:   # halfword m in bits 0..15 (one shift a word, not a byte permute a nibble)
        e = tl.join(e, e >> 16).reshape([e.shape[0], e.shape[1], 8])
    else:
        e = e.to(tl.int32)
    return _nib(e, 0), _nib(e, 8), _nib(e, 4), _nib(e, 12)


@triton.jit
def _x_tile(x_ptr, k0, D, IS_Q4: tl.constexpr, BK: tl.constexpr, Q8X: tl.constexpr = False):
    """x over the K tile starting at k0 (a block for q4_0, a column for float rows):
    q4_0: f32 [BK, 8] each, x[32b+2m], x[32b+2m+1] / 2^8, x[32b+16+2m] / 2^4, x[32b+17+2m] / 2^12
    (the slots of _expand); float rows: x0 = x[k0:k0+BK] (the others unused).
    Q8X: x_ptr is x quantised to q8 (triton_q8x.packed_x: int32 [NB*8 | NB | NB]); returns the
    int8 words of the blocks' first and second halves [BK, 4] each, d_x f32 [BK], s_x [BK]."""
    if Q8X:
        NB = D // 32
        b = k0 + tl.arange(0, BK)
        bm = b < NB
        w = tl.arange(0, 4)
        xlo = tl.load(x_ptr + (b * 8)[:, None] + w[None, :], mask=bm[:, None], other=0)
        xhi = tl.load(x_ptr + (b * 8 + 4)[:, None] + w[None, :], mask=bm[:, None], other=0)
        xd = tl.load(x_ptr + NB * 8 + b, mask=bm, other=0).to(tl.float32, bitcast=True)
        xs = tl.load(x_ptr + NB * 9 + b, mask=bm, other=0)
        return xlo, xhi, xd, xs
    elif IS_Q4:             # (one if-chain, a return in each branch: compiled Triton checks
        b = k0 + tl.arange(0, BK)                       # the return types of every return)
        j = tl.arange(0, 16)
        col = b[:, None] * 32 + j[None, :]                      # [BK, 16]: 16-byte loads
        cm = col < D
        lo = tl.load(x_ptr + col, mask=cm, other=0.0).to(tl.float32).reshape([BK, 8, 2])
        hi = tl.load(x_ptr + col + 16, mask=cm, other=0.0).to(tl.float32).reshape([BK, 8, 2])
        x0, x8 = tl.split(lo)                                   # even / odd columns
        x4, x12 = tl.split(hi)
        x8 = x8 * 0.00390625
        x4 = x4 * 0.0625
        x12 = x12 * 0.000244140625
        return x0, x8, x4, x12
    else:
        c = k0 + tl.arange(0, BK)
        x0 = tl.load(x_ptr + c, mask=c < D, other=0.0).to(tl.float32)
        return x0, x0, x0, x0


@triton.jit
def _tile_dot(e, sc, x0, x8, x4, x12, IS_Q4: tl.constexpr, WORDS: tl.constexpr,
              Q8X: tl.constexpr = False, ASM: tl.constexpr = False):
    """f32 [R]: one loaded K tile of R rows (_load_rows) dotted with x's tile (_x_tile).
    Q8X (q4_0 words, x0, x8, x4, x12 = x's q8 tile): two dp4a per word (triton_q8x)."""
    if Q8X:
        acc = _dp4a(e & 0x0F0F0F0F, tl.broadcast_to(x0[None, :, :], e.shape), tl.zeros_like(e), ASM)
        acc = _dp4a((e >> 4) & 0x0F0F0F0F, tl.broadcast_to(x8[None, :, :], e.shape), acc, ASM)
        t = (tl.sum(acc, axis=2) - 8 * x12[None, :]).to(tl.float32) * sc.to(tl.float32) * x4[None, :]
        return tl.sum(t, axis=1)
    elif IS_Q4:
        n0, n8, n4, n12 = _expand(e, WORDS)
        part = tl.sum(n0 * x0[None] + n8 * x8[None] + n4 * x4[None] + n12 * x12[None], axis=2,
                      keep_dims=True)                           # [R, BK, 1]
        # the scale multiplies in the 3-d layout (no layout conversion through shared memory)
        return tl.sum(tl.sum(part * sc.to(tl.float32)[:, :, None], axis=2), axis=1)   # [R]
    else:
        return tl.sum(e.to(tl.float32) * x0[None, :], axis=1)


@triton.jit
def _dot_pass(w_ptr, lst, cnt, a_ptr, x_ptr, x0, x8, x4, x12, D, NB, RS, MODE: tl.constexpr,
              IS_Q4: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
              WORDS: tl.constexpr, GGUF: tl.constexpr, Q8X: tl.constexpr = False,
              ASM: tl.constexpr = False):
    """For the cnt rows listed at lst, R at a time: t = w[row]·x, then by MODE
    0: a[row] = t; 1 (drelu up): a[row] *= max(t, 0); 2 (relu/fatrelu up): a[row] *= t;
    3 (silu up): a[row] = silu(a[row]) * t.
    x0..x12: x's tile when a row is one K tile (NK == 1, loaded once per program); else x is
    loaded per K tile. Register prefetch: the next R rows' first K tile is loaded before this
    one is used (a deeper prefetch measured slower: more registers, see KERNELS.md)."""
    rows, lv = _list_rows(lst, 0, cnt, R)
    e, sc = _load_rows(w_ptr, rows, lv, 0, D, NB, RS, IS_Q4, BK, WORDS, GGUF)
    for i in range(0, cnt, R):
        rows_n, lv_n = _list_rows(lst, i + R, cnt, R)
        e_n, sc_n = _load_rows(w_ptr, rows_n, lv_n, 0, D, NB, RS, IS_Q4, BK, WORDS, GGUF)   # prefetch
        t = _tile_dot(e, sc, x0, x8, x4, x12, IS_Q4, WORDS, Q8X, ASM)
        for kt in tl.static_range(1, NK):
            xk0, xk8, xk4, xk12 = _x_tile(x_ptr, kt * BK, D, IS_Q4, BK, Q8X)
            ek, sck = _load_rows(w_ptr, rows, lv, kt * BK, D, NB, RS, IS_Q4, BK, WORDS, GGUF)
            t += _tile_dot(ek, sck, xk0, xk8, xk4, xk12, IS_Q4, WORDS, Q8X, ASM)
        if MODE == 0:
            tl.store(a_ptr + rows, t, mask=lv)
        else:
            g = tl.load(a_ptr + rows, mask=lv, other=0.0)
            if MODE == 1:
                t = g * tl.maximum(t, 0.0)
            elif MODE == 2:
                t = g * t
            else:
                t = g / (1.0 + tl.exp(-g)) * t
            tl.store(a_ptr + rows, t, mask=lv)
        rows, lv, e, sc = rows_n, lv_n, e_n, sc_n


@triton.jit
def _dp4a(a, b, c, ASM: tl.constexpr):
    """int32: c + sum over the 4 bytes of a (unsigned) times the 4 bytes of b (signed): PTX dp4a
    on CUDA (ASM), spelled out in integer ops under Triton's interpreter."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    for k in tl.static_range(4):
        c += ((a >> (8 * k)) & 255) * ((b << (24 - 8 * k)) >> 24)   # byte k, sign-extended
    return c


@triton.jit
def _slot_rows(sel_ptr, tab_ptr, cnt_ptr, like_ptr, s):
    """Slot s of a device-selected launch: the expert e = sel[s], its rows' base pointer (an
    address in the table, typed like like_ptr) and its row count."""
    e = tl.load(sel_ptr + s)
    base = tl.load(tab_ptr + e).to(tl.pointer_type(like_ptr.dtype.element_ty))
    return e, base, tl.load(cnt_ptr + e)


# ---- kernels ---------------------------------------------------------------------------------

@triton.jit
def _gate_up_kernel(x_ptr, g_ptr, u_ptr, mask_ptr, a_ptr, lst_ptr, N, D, NB, RS, threshold,
                    sel_ptr, gtab, utab, itab, ntab, MS, AS,
                    HAS_MASK: tl.constexpr, ACT_KIND: tl.constexpr, IS_Q4: tl.constexpr,
                    CHUNK: tl.constexpr, R: tl.constexpr, BK: tl.constexpr, NK: tl.constexpr,
                    WORDS: tl.constexpr, SLOT: tl.constexpr, GGUF: tl.constexpr = False,
                    Q8X: tl.constexpr = False, ASM: tl.constexpr = False):
    """a [N] f32. Program p: rows [p*CHUNK, (p+1)*CHUNK). lst: int32 [grid*CHUNK] scratch.
    Q8X: x_ptr is x quantised to q8 (triton_q8x.packed_x), the dots integer (dp4a; ASM on CUDA).
    SLOT (device-selected experts, grid axis 1 = slot s): expert e = sel[s]'s rows from the
    tables (gtab/utab: row addresses, itab: its hot neuron ids' address, ntab: its row count),
    mask_ptr [k, MS] the slot's mask over neurons (read at the rows' neuron ids), a [k, AS]."""
    pid = tl.program_id(0)
    if SLOT:
        s = tl.program_id(1)
        e, g_ptr, N = _slot_rows(sel_ptr, gtab, ntab, g_ptr, s)
        u_ptr = tl.load(utab + e).to(tl.pointer_type(u_ptr.dtype.element_ty))
        a_ptr += s * AS
        lst_ptr += s * tl.num_programs(0) * CHUNK
    offs = pid * CHUNK + tl.arange(0, CHUNK)                    # [CHUNK] rows of this program
    inr = offs < N
    live = inr
    if HAS_MASK:
        if SLOT:
            ids = tl.load(itab + e).to(tl.pointer_type(tl.int32))
            nid = tl.load(ids + offs, mask=inr, other=0)
            live = live & (tl.load(mask_ptr + s * MS + nid, mask=inr, other=0) != 0)
        else:
            live = live & (tl.load(mask_ptr + offs, mask=inr, other=0) != 0)
    lst = lst_ptr + pid * CHUNK
    cnt = _compact(live, offs, lst)
    x0, x8, x4, x12 = _x_tile(x_ptr, 0, D, IS_Q4, BK, Q8X)       # used when NK == 1
    # pass 1: the gates of the live rows (kept in a)
    _dot_pass(g_ptr, lst, cnt, a_ptr, x_ptr, x0, x8, x4, x12, D, NB, RS, 0, IS_Q4, R, BK, NK,
              WORDS, GGUF, Q8X, ASM)
    tl.debug_barrier()
    if ACT_KIND == 3:                                           # silu: up of every live row
        tl.store(a_ptr + offs, 0.0, mask=inr & (live == 0))
        _dot_pass(u_ptr, lst, cnt, a_ptr, x_ptr, x0, x8, x4, x12, D, NB, RS, 3, IS_Q4, R, BK, NK,
                  WORDS, GGUF, Q8X, ASM)
    else:                                                       # pass 2: up where the gate fired
        gv = tl.load(a_ptr + offs, mask=live, other=0.0)
        if ACT_KIND == 2:
            fire = live & (gv > threshold)
        else:
            fire = live & (gv > 0.0)
        tl.store(a_ptr + offs, 0.0, mask=inr & (fire == 0))
        cnt2 = _compact(fire, offs, lst)
        _dot_pass(u_ptr, lst, cnt2, a_ptr, x_ptr, x0, x8, x4, x12, D, NB, RS,
                  1 if ACT_KIND == 0 else 2, IS_Q4, R, BK, NK, WORDS, GGUF, Q8X, ASM)


@triton.jit
def _axpy_kernel(a_ptr, w_ptr, y_ptr, lst_ptr, N, D, NB, RS, sel_ptr, wtab, ntab, rw_ptr, AS, YS,
                 IS_Q4: tl.constexpr, CHUNK: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                 WORDS: tl.constexpr, SLOT: tl.constexpr, HAS_RW: tl.constexpr,
                 RELU_A: tl.constexpr = False, GGUF: tl.constexpr = False):
    """y [D] f32 += sum_j a[j] * W[j]. Program (pc, pr): K tile pc (BK blocks or columns) of
    the rows [pr*CHUNK, (pr+1)*CHUNK). lst: int32 [grid0*grid1*CHUNK] scratch.
    q4_0: elementwise accumulators of the tile's shape [R, BK, 8] (one FMA per weight, no
    reduction in the row loop), reduced over the R axis once at the end; one atomic add per
    column per program.
    SLOT (grid axis 2 = slot s): expert sel[s]'s rows from the tables (wtab: row addresses,
    ntab: row counts), a at a_ptr + s*AS, y at y_ptr + s*YS (YS = 0: every slot into one y),
    with HAS_RW the sums scaled by rw[s] (the router's weight of the slot's expert).
    RELU_A: the coefficients are relu(a) (a predictor's hidden layer; one kernel less)."""
    pc = tl.program_id(0)
    pr = tl.program_id(1)
    rw = 1.0
    if SLOT:
        s = tl.program_id(2)
        _, w_ptr, N = _slot_rows(sel_ptr, wtab, ntab, w_ptr, s)
        a_ptr += s * AS
        y_ptr += s * YS
        lst_ptr += s * tl.num_programs(0) * tl.num_programs(1) * CHUNK
        if HAS_RW:
            rw = tl.load(rw_ptr + s)
    offs = pr * CHUNK + tl.arange(0, CHUNK)
    inr = offs < N
    av = tl.load(a_ptr + offs, mask=inr, other=0.0)
    live = inr & ((av > 0.0) if RELU_A else (av != 0.0))        # relu: rows with a <= 0 unread
    lst = lst_ptr + (pr * tl.num_programs(0) + pc) * CHUNK
    cnt = _compact(live, offs, lst)
    k0 = pc * BK
    rows, lv = _list_rows(lst, 0, cnt, R)
    ar = tl.load(a_ptr + rows, mask=lv, other=0.0)
    e, sc = _load_rows(w_ptr, rows, lv, k0, D, NB, RS, IS_Q4, BK, WORDS, GGUF)
    if IS_Q4:
        a0 = tl.zeros([R, BK, 8], dtype=tl.float32)            # the 4 nibble slots of _expand
        a8 = tl.zeros([R, BK, 8], dtype=tl.float32)
        a4 = tl.zeros([R, BK, 8], dtype=tl.float32)
        a12 = tl.zeros([R, BK, 8], dtype=tl.float32)
        for i in range(0, cnt, R):
            rows_n, lv_n = _list_rows(lst, i + R, cnt, R)    # prefetch the next R rows
            ar_n = tl.load(a_ptr + rows_n, mask=lv_n, other=0.0)
            e_n, sc_n = _load_rows(w_ptr, rows_n, lv_n, k0, D, NB, RS, IS_Q4, BK, WORDS, GGUF)
            coef = (ar[:, None] * sc.to(tl.float32))[:, :, None]          # [R, BK, 1]
            n0, n8, n4, n12 = _expand(e, WORDS)
            a0 += n0 * coef
            a8 += n8 * coef
            a4 += n4 * coef
            a12 += n12 * coef
            ar, e, sc = ar_n, e_n, sc_n
        b = k0 + tl.arange(0, BK)
        m = tl.arange(0, 8)
        col = b[:, None] * 32 + 2 * m[None, :]                  # [BK, 8]
        cm = col < D
        tl.atomic_add(y_ptr + col, tl.sum(a0, axis=0) * rw, mask=cm, sem="relaxed")
        tl.atomic_add(y_ptr + col + 1, tl.sum(a8, axis=0) * (0.00390625 * rw), mask=cm,
                      sem="relaxed")
        tl.atomic_add(y_ptr + col + 16, tl.sum(a4, axis=0) * (0.0625 * rw), mask=cm,
                      sem="relaxed")
        tl.atomic_add(y_ptr + col + 17, tl.sum(a12, axis=0) * (0.000244140625 * rw), mask=cm,
                      sem="relaxed")
    else:
        c = k0 + tl.arange(0, BK)
        acc = tl.zeros([BK], dtype=tl.float32)
        for i in range(0, cnt, R):
            rows_n, lv_n = _list_rows(lst, i + R, cnt, R)
            ar_n = tl.load(a_ptr + rows_n, mask=lv_n, other=0.0)
            e_n, sc_n = _load_rows(w_ptr, rows_n, lv_n, k0, D, NB, RS, IS_Q4, BK, WORDS, GGUF)
            acc += tl.sum(e.to(tl.float32) * ar[:, None], axis=0)
            ar, e = ar_n, e_n
        tl.atomic_add(y_ptr + c, acc * rw, mask=c < D, sem="relaxed")


@triton.jit
def _matvec_kernel(x_ptr, w_ptr, y_ptr, lst_ptr, N, D, NB, RS, sel_ptr, wtab, ntab, XS, YS,
                   IS_Q4: tl.constexpr, CHUNK: tl.constexpr, R: tl.constexpr, BK: tl.constexpr,
                   NK: tl.constexpr, WORDS: tl.constexpr, SLOT: tl.constexpr,
                   GGUF: tl.constexpr = False):
    """y [N] f32 = W x. Program p: rows [p*CHUNK, (p+1)*CHUNK), listed in lst (int32
    [grid*CHUNK] scratch) so that the row loop is gate_up's (_dot_pass, register prefetch).
    SLOT (grid axis 1 = slot s): expert sel[s]'s rows from the tables, x at x_ptr + s*XS
    (XS = 0: one x for every slot), y at y_ptr + s*YS."""
    pid = tl.program_id(0)
    if SLOT:
        s = tl.program_id(1)
        _, w_ptr, N = _slot_rows(sel_ptr, wtab, ntab, w_ptr, s)
        x_ptr += s * XS
        y_ptr += s * YS
        lst_ptr += s * tl.num_programs(0) * CHUNK
    offs = pid * CHUNK + tl.arange(0, CHUNK)
    lst = lst_ptr + pid * CHUNK
    cnt = _compact(offs < N, offs, lst)
    x0, x8, x4, x12 = _x_tile(x_ptr, 0, D, IS_Q4, BK)            # used when NK == 1
    _dot_pass(w_ptr, lst, cnt, y_ptr, x_ptr, x0, x8, x4, x12, D, NB, RS, 0, IS_Q4, R, BK, NK,
              WORDS, GGUF)


# ---- launch configuration --------------------------------------------------------------------

def config(fmt: str, d: int, n: int, device: torch.device | None = None) -> dict:
    """Launch parameters per shape class: the best measured ones of the sweeps in
    benchmarks/results/triton_hot_ffn_h100.md and triton_sweep_*_h100.txt (H100, d = 4096).
    CHUNK: rows per program (compacted in-program), R: live rows per tile, BK: K tile (q4_0:
    blocks of 32 values; float: columns; one tile covers d <= 4096 for gate_up; down's column
    tile), num_warps; optional WORDS=False reads q4_0 rows as int16 halfwords. device is unused
    (kept for callers)."""
    if fmt == "q4_0":
        nb2 = triton.next_power_of_2(d // 32)
        # n <= 1024 (a predictor's fc1 per slot): more programs (benchmarks/results/
        # triton_sweep_h100.json: 6.8 -> 5.8 us for 2 slots of 1024 x 4096)
        gu = dict(CHUNK=16 if n > 1024 else 8, R=4 if 1024 < n < 4096 else 2,
                  BK=min(nb2, 128), num_warps=4)
        # wide rows (a predictor's fc2^T, 14336 columns): 256-row chunks (12.9 -> 10.7 us)
        dn = dict(CHUNK=256 if n >= 8192 or d >= 8192 else 128, R=16, BK=min(nb2, 8), num_warps=4)
        # (a sparse mask over a large expert's hot rows: the isolated sweep of
        # triton_sweep.py --density found longer chunks faster, gate_up CHUNK 128 R 4 and down
        # CHUNK 1024 R 32 BK 4, 26.0 -> 20.8 and 19.4 -> 14.5 us at 15% live; in the decode step
        # they were not: gate_up 24.1 -> 25.6 us, the axpys unchanged; triton_sweep_hot_h100.txt)
    else:
        gu = dict(CHUNK=16, R=4, BK=min(triton.next_power_of_2(d), 4096), num_warps=8)
        dn = dict(CHUNK=64, R=8, BK=min(triton.next_power_of_2(d), 1024), num_warps=4)
    return {"gate_up": gu, "down": dn}


def _rows_view(fmt: str, w: torch.Tensor, words: bool) -> tuple[torch.Tensor, int]:
    """The pointer view the kernels read and the row stride in elements (q4_0: in halfwords,
    also for the int32 view of words)."""
    if fmt == "q4_0":
        v = w.view(torch.int16)                                # halfwords; 18*nb bytes is even
        return (w.view(torch.int32) if words else v), v.shape[1]
    return w, w.shape[1]


def _words(fmt: str, d: int, cfg: dict) -> bool:
    """q4_0 rows are read as int32 words (one shift a word splits its halfwords) when every row
    starts 4-byte aligned (an even number of blocks), unless cfg says WORDS=False."""
    want = cfg.pop("WORDS", True)
    return fmt == "q4_0" and (d // 32) % 2 == 0 and want


def _dot_launch(fmt: str, d: int, n: int, cfg: dict | None, device, slots: int = 1,
                gguf: bool = False, q8x: bool = False) -> tuple[dict, int, torch.Tensor, bool]:
    """The row-dot kernels' (gate_up, matvec) launch: (constexpr kwargs incl. WORDS, GGUF, NK and
    num_warps, grid size along the rows, the row-list scratch for `slots` slots, WORDS).
    gguf: q4_0 rows in GGUF's layout (read as halfwords). q8x (or cfg's Q8X, which wins): for
    q4_0 words, the integer dots over x quantised to q8 (Q8X and ASM in the kwargs; the caller
    passes triton_q8x.packed_x(x) as x when kwargs["Q8X"])."""
    c = dict(cfg or config(fmt, d, n, device)["gate_up"])
    grid = triton.cdiv(n, c["CHUNK"])
    lst = torch.empty(slots * grid * c["CHUNK"], dtype=torch.int32, device=device)
    q8 = c.pop("Q8X", q8x)
    words = _words(fmt, d, c) and not gguf
    if q8 and words:
        c.update(Q8X=True, ASM=torch.device(device).type == "cuda")
    units = d // 32 if fmt == "q4_0" else d
    c.update(IS_Q4=fmt == "q4_0", WORDS=words, NK=triton.cdiv(units, c["BK"]), GGUF=gguf)
    return c, grid, lst, words


def _down_launch(fmt: str, d: int, n: int, cfg: dict | None, device, slots: int = 1,
                 gguf: bool = False):
    """The axpy kernel's launch: (constexpr kwargs, grid (column tiles, row chunks), scratch)."""
    c = dict(cfg or config(fmt, d, n, device)["down"])
    units = d // 32 if fmt == "q4_0" else d
    grid = (triton.cdiv(units, c["BK"]), triton.cdiv(n, c["CHUNK"]))
    lst = torch.empty(slots * grid[0] * grid[1] * c["CHUNK"], dtype=torch.int32, device=device)
    words = _words(fmt, d, c) and not gguf
    c.update(IS_Q4=fmt == "q4_0", WORDS=words, GGUF=gguf)
    return c, grid, lst, words


@dataclass(frozen=True, eq=False)
class RowTable:
    """E experts' row matrices (uint8 q4_0 rows in the GPU row layout, float rows, or int32 id
    vectors) as device-side tables, for launches whose experts are chosen on the device (a
    slot's expert is sel[s], read by the kernel): ptr int64 [E] the address of expert e's rows
    (another expert's where it has none: never read, its count is 0), cnt int32 [E] its rows,
    n_max the most rows, like the typed view the kernels read (pointer type, row stride rs),
    gguf: q4_0 rows in GGUF's layout, not the GPU row layout.
    Holds the tensors, so the addresses stay valid while the table lives. The rows may be in
    page-locked host memory (UVA addresses: the kernels then read them over PCIe)."""
    ptr: torch.Tensor
    cnt: torch.Tensor
    n_max: int
    like: torch.Tensor
    rs: int
    keep: tuple
    gguf: bool = False

    @classmethod
    def build(cls, fmt: str | None, d: int, rows: list, device, gguf: bool = False) -> "RowTable":
        """rows[e]: [n_e, ...] on the device (or page-locked host memory) or None. fmt None:
        int32 vectors (hot ids). `like` is always a device tensor (what Triton's launcher checks)."""
        real = [r for r in rows if r is not None and r.shape[0] > 0]
        if not real:
            raise ValueError("RowTable: no expert has rows")
        if fmt is None:
            like, rs = real[0], 1
        else:
            like, rs = _rows_view(fmt, real[0], _words(fmt, d, {}) and not gguf)
        if like.device != torch.device(device):       # host rows: a typed device stand-in
            like = torch.empty(1, dtype=like.dtype, device=device)
        ptr = [real[0].data_ptr() if r is None or r.shape[0] == 0 else r.data_ptr() for r in rows]
        cnt = [0 if r is None else r.shape[0] for r in rows]
        return cls(torch.tensor(ptr, dtype=torch.int64, device=device),
                   torch.tensor(cnt, dtype=torch.int32, device=device), max(cnt), like, rs,
                   tuple(real), gguf)


def gate_up(fmt: str, d: int, gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, act: str,
            threshold: float, mask: torch.Tensor | None, cfg: dict | None = None,
            gguf: bool = False) -> torch.Tensor:
    """a [n] f32 = act(gate·x, up·x) on the rows whose mask is set (0 elsewhere).
    gguf: q4_0 rows in GGUF's layout (else the GPU row layout)."""
    n = gate.shape[0]
    c, grid, lst, words = _dot_launch(fmt, d, n, cfg, x.device, gguf=gguf, q8x=True)
    if c.get("Q8X"):
        x = _q8x().packed_x(x, d)[0]
    a = torch.empty(n, dtype=torch.float32, device=x.device)
    g, rs = _rows_view(fmt, gate, words)
    u, _ = _rows_view(fmt, up, words)
    m = mask.view(torch.uint8) if mask is not None else a      # a dummy pointer without a mask
    LAST["gate_up"] = _gate_up_kernel[(grid,)](
        x, g, u, m, a, lst, n, d, d // 32, rs, float(threshold), a, a, a, a, a, 0, 0,
        HAS_MASK=mask is not None, ACT_KIND=ACT[act], SLOT=False, **c)
    return a


def gate_up_slots(fmt: str, d: int, gt: RowTable, ut: RowTable, it: RowTable, x: torch.Tensor,
                  act: str, threshold: float, mask: torch.Tensor | None, sel: torch.Tensor,
                  a: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """Device-selected gate_up: for slot s (expert e = sel[s], int64 [k] on the device),
    a[s, :n_e] = act(gate_e·x, up_e·x) on the rows whose neuron (it: hot ids) mask[s] sets
    (mask bool [k, n_ff] or None); a f32 [k, AS], AS >= gt.n_max, written (rows past n_e untouched)."""
    k = sel.numel()
    c, grid, lst, _ = _dot_launch(fmt, d, gt.n_max, cfg, x.device, k, gt.gguf, q8x=True)
    if c.get("Q8X"):
        x = _q8x().packed_x(x, d)[0]
    m = mask.view(torch.uint8) if mask is not None else a
    LAST["gate_up_slots"] = _gate_up_kernel[(grid, k)](
        x, gt.like, ut.like, m, a, lst, 0, d, d // 32, gt.rs, float(threshold), sel, gt.ptr,
        ut.ptr, it.ptr, gt.cnt, 0 if mask is None else mask.shape[1], a.shape[1],
        HAS_MASK=mask is not None, ACT_KIND=ACT[act], SLOT=True, **c)
    return a


def matvec(fmt: str, d: int, w: torch.Tensor, x: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """y [n] f32 = w x for rows w [n, d] (q4_0 in the GPU row layout, or float) and x [d] (any
    float dtype, contiguous). q4_0 rows of whole words (d % 64 == 0) go to the integer-dot
    kernel (triton_q8x: x quantised to q8) unless a launch cfg is given (the float kernel's)."""
    if cfg is None and _q8x().usable(fmt, d):
        return _q8x().matvec(d, w, x)
    n = w.shape[0]
    c, grid, lst, words = _dot_launch(fmt, d, n, cfg, x.device)
    y = torch.empty(n, dtype=torch.float32, device=x.device)
    if n == 0:
        return y
    wv, rs = _rows_view(fmt, w, words)
    LAST["matvec"] = _matvec_kernel[(grid,)](x, wv, y, lst, n, d, d // 32, rs, y, y, y, 0, 0,
                                             SLOT=False, **c)
    return y


def matvec_slots(fmt: str, d: int, wt: RowTable, x: torch.Tensor, xs: int, y: torch.Tensor,
                 sel: torch.Tensor, cfg: dict | None = None) -> torch.Tensor:
    """Device-selected GEMV: y[s, :n_e] = W_e x_s for slot s (e = sel[s]); x at x + s*xs
    (xs = 0: one x [d] for every slot); y f32 [k, YS], YS >= wt.n_max. q4_0 as matvec."""
    if cfg is None and not wt.gguf and _q8x().usable(fmt, d):
        return _q8x().matvec_slots(d, wt, x, xs, y, sel)
    k = sel.numel()
    c, grid, lst, _ = _dot_launch(fmt, d, wt.n_max, cfg, x.device, k)
    LAST["matvec_slots"] = _matvec_kernel[(grid, k)](
        x, wt.like, y, lst, 0, d, d // 32, wt.rs, sel, wt.ptr, wt.cnt, xs, y.shape[1],
        SLOT=True, **c)
    return y


def down(fmt: str, d: int, w: torch.Tensor, a: torch.Tensor, y: torch.Tensor | None = None,
         cfg: dict | None = None, gguf: bool = False) -> torch.Tensor:
    """y [d] f32 (+)= sum_j a[j] * w[j] over the rows with a[j] != 0 (w: [n, d] rows, e.g. W2^T;
    gguf: q4_0 rows in GGUF's layout)."""
    n = w.shape[0]
    if y is None:
        y = torch.zeros(d, dtype=torch.float32, device=a.device)
    c, grid, lst, words = _down_launch(fmt, d, n, cfg, a.device, gguf=gguf)
    wv, rs = _rows_view(fmt, w, words)
    LAST["down"] = _axpy_kernel[grid](a, wv, y, lst, n, d, d // 32, rs, a, a, a, a, 0, 0,
                                      SLOT=False, HAS_RW=False, **c)
    return y


def down_slots(fmt: str, d: int, wt: RowTable, a: torch.Tensor, a_stride: int, y: torch.Tensor,
               y_stride: int, sel: torch.Tensor, rw: torch.Tensor | None = None,
               cfg: dict | None = None, relu_a: bool = False) -> torch.Tensor:
    """Device-selected axpy: for slot s (e = sel[s]) y[s*y_stride : +d] += rw[s] * sum_j
    a[s*a_stride + j] * W_e[j] over expert e's rows with a != 0 (y_stride 0: every slot into one
    y [d]; a_stride 0: one a for every slot; rw None: weight 1). y f32, zeroed by the caller.
    relu_a: relu(a) instead of a (rows with a <= 0 are not read)."""
    k = sel.numel()
    c, grid, lst, _ = _down_launch(fmt, d, wt.n_max, cfg, a.device, k, wt.gguf)
    LAST["down_slots"] = _axpy_kernel[(*grid, k)](
        a, wt.like, y, lst, 0, d, d // 32, wt.rs, sel, wt.ptr, wt.cnt,
        rw if rw is not None else a, a_stride, y_stride, SLOT=True, HAS_RW=rw is not None,
        RELU_A=relu_a, **c)
    return y


def _q8x():
    """The integer-dot GEMV module (imported on first use: it imports this one)."""
    from . import triton_q8x
    return triton_q8x


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
