"""q4_0 rows -> a float matrix in one Triton pass (prefill: the batch matmuls of the hot half and
of streamed cold rows read dense weights).

torch's quant.unpack makes ~6 full-size float32 temporaries per matrix (cat, casts, multiply), so
at 14336 x 4096 a matrix costs milliseconds; this kernel reads the packed bytes once and writes the
output dtype once (0.56 + 2 bytes per value for bf16).

Layouts (uint8 [n, nb*18], nb = d/32; both hold value(32b + i) = (nibble - 8) * d_b, and byte j of
block b holds element 32b+j in its low nibble and 32b+16+j in its high nibble):
  "gguf": block b at bytes [18b, 18b+18): f16 scale d_b, then its 16 nibble bytes
  "gpu":  nibble bytes of all blocks [0, 16nb), then the nb f16 scales (kernels.gpu.q4_rows_to_gpu)
Runs on CUDA; with TRITON_INTERPRET=1 also on CPU tensors (how CI tests it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _q4_values(base, b, bm, NB, GPU_LAYOUT: tl.constexpr):
    """Blocks b [BB] of the q4_0 row at base -> (elements 32b + j, elements 32b + 16 + j) [BB, 16]
    in float32."""
    j = tl.arange(0, 16)                                          # [16] byte in block
    if GPU_LAYOUT:
        qa = base + b[:, None] * 16 + j[None, :]
        sa = base + NB * 16 + 2 * b
    else:
        qa = base + b[:, None] * 18 + 2 + j[None, :]
        sa = base + 18 * b
    q = tl.load(qa, mask=bm[:, None], other=0).to(tl.int32)        # [BB, 16]
    lo = tl.load(sa, mask=bm, other=0).to(tl.int32)
    hi = tl.load(sa + 1, mask=bm, other=0).to(tl.int32)
    d = (lo | (hi << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)[:, None]
    return ((q & 15) - 8).to(tl.float32) * d, ((q >> 4) - 8).to(tl.float32) * d


@triton.jit(do_not_specialize=["NA", "A_MS", "B_MS", "OUT_MS"])   # row counts vary per expert:
def _dequant_q4_kernel(a_ptr, b_ptr, out_ptr, NA, NB, RB, A_MS, B_MS, OUT_MS,
                       A_GPU: tl.constexpr, B_GPU: tl.constexpr, BB: tl.constexpr):
    """Program (row, block tile, matrix m): BB blocks of output row `row` of matrix m ->
    out[m, row, 32*b0 : 32*(b0+BB)). Rows [0, NA) come from a (row `row` of a's matrix m),
    the rest from b (row `row - NA`); each source in its own layout. A_MS / B_MS / OUT_MS: the
    matrix strides in bytes / bytes / elements. Not specialised on the counts: each new
    divisibility of an expert's hot count compiled a variant inside a timed prompt (0.5 s)."""
    row = tl.program_id(0).to(tl.int64)
    m = tl.program_id(2).to(tl.int64)
    b = tl.program_id(1) * BB + tl.arange(0, BB)                   # [BB] block ids
    bm = b < NB
    if row < NA:
        v_lo, v_hi = _q4_values(a_ptr + m * A_MS + row * RB, b, bm, NB, A_GPU)
    else:
        v_lo, v_hi = _q4_values(b_ptr + m * B_MS + (row - NA) * RB, b, bm, NB, B_GPU)
    # [BB, 16] lo and hi -> [BB, 32] in element order (lo = 32b + j, hi = 32b + 16 + j), so ONE
    # store writes the tile's BB*32 values contiguously (two interleaved half stores wrote every
    # 64-byte span in two halves)
    v = tl.reshape(tl.permute(tl.join(v_lo, v_hi), (0, 2, 1)), (BB, 32))
    k = tl.arange(0, 32)
    o = out_ptr + m * OUT_MS + row * NB * 32 + b[:, None] * 32 + k[None, :]
    tl.store(o, v.to(out_ptr.dtype.element_ty), mask=bm[:, None])


def _check_rows(rows: torch.Tensor, d: int) -> None:
    nb = d // 32
    if rows.dtype != torch.uint8 or rows.dim() not in (2, 3) or d % 32 or rows.shape[-1] != nb * 18:
        raise ValueError(f"dequant_q4_0: expected uint8 [n, {nb * 18}] for d={d}, got "
                         f"{rows.dtype} {tuple(rows.shape)}")


def dequant_q4_0(rows: torch.Tensor, d: int, layout: str, dtype: torch.dtype,
                 out: torch.Tensor | None = None, rows_b: torch.Tensor | None = None,
                 layout_b: str = "gguf", *, bb: int = 128, num_warps: int = 4) -> torch.Tensor:
    """uint8 q4_0 rows in `layout` ("gguf" or "gpu") -> float rows in dtype, on rows' device,
    in ONE launch:
      rows [n, d/32*18]                 -> [n, d]
      rows [m, n, d/32*18] (m matrices) -> [m, n, d]
      with rows_b [m, n_b, d/32*18] (in layout_b): [m, n + n_b, d], each matrix's rows of
      `rows` first, then those of rows_b (prefill: an FFN's gate, up and down_t from its hot
      rows on the device and its streamed cold rows: one launch instead of six; a Triton
      launch costs ~50 us of host time, and the prompt was host-bound).
    Written into `out` (contiguous, that shape) when given. bb (blocks a program, a power of
    two) and num_warps: the launch's tile. H100, one M47 expert's [3, 14336, 4096] to bf16
    (benchmarks/dequant_sweep.py, results/dequant_sweep_h100_s11.txt): 32 blocks a program
    0.251 ms, 128 (a whole 4096-wide row) 0.194 ms, 2329 GB/s moved."""
    for lay in (layout, layout_b):
        if lay not in ("gguf", "gpu"):
            raise ValueError(f"unknown q4_0 row layout {lay!r}")
    _check_rows(rows, d)
    flat = rows.dim() == 2
    a = rows[None] if flat else rows
    b = a if rows_b is None else rows_b
    if rows_b is not None:
        _check_rows(rows_b, d)
        if flat or b.dim() != 3 or b.shape[0] != a.shape[0]:
            raise ValueError(f"dequant_q4_0: rows_b must be [{a.shape[0]}, n_b, {a.shape[-1]}] beside "
                             f"rows [m, n, ...], got {tuple(b.shape)} and {tuple(rows.shape)}")
    a, b = a.contiguous(), b.contiguous()
    m, na, nb = a.shape[0], a.shape[1], d // 32
    n = na + (b.shape[1] if rows_b is not None else 0)
    shape = (n, d) if flat else (m, n, d)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=rows.device)
    elif tuple(out.shape) != shape or not out.is_contiguous() or out.device != rows.device:
        raise ValueError(f"dequant_q4_0: out must be contiguous {list(shape)} on {rows.device}, "
                         f"got {tuple(out.shape)} on {out.device}")
    if n == 0 or m == 0:
        return out
    _dequant_q4_kernel[(n, triton.cdiv(nb, bb), m)](
        a, b, out, na, nb, nb * 18, na * nb * 18, b.shape[1] * nb * 18, n * d,
        A_GPU=layout == "gpu", B_GPU=layout_b == "gpu", BB=bb, num_warps=num_warps)
    return out
