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
def _dequant_q4_kernel(p_ptr, out_ptr, NB, RB, GPU_LAYOUT: tl.constexpr, BB: tl.constexpr):
    """Program (row, block tile): BB blocks of one row -> out[row, 32*b0 : 32*(b0+BB))."""
    row = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1) * BB + tl.arange(0, BB)                   # [BB] block ids
    bm = b < NB
    j = tl.arange(0, 16)                                          # [16] byte in block
    base = p_ptr + row * RB
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
    v_lo = ((q & 15) - 8).to(tl.float32) * d                       # elements 32b + j
    v_hi = ((q >> 4) - 8).to(tl.float32) * d                       # elements 32b + 16 + j
    o = out_ptr + row * NB * 32 + b[:, None] * 32 + j[None, :]
    tl.store(o, v_lo.to(out_ptr.dtype.element_ty), mask=bm[:, None])
    tl.store(o + 16, v_hi.to(out_ptr.dtype.element_ty), mask=bm[:, None])


def dequant_q4_0(rows: torch.Tensor, d: int, layout: str, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [n, d/32*18] q4_0 rows in `layout` ("gguf" or "gpu") -> [n, d] in dtype, on rows'
    device."""
    if layout not in ("gguf", "gpu"):
        raise ValueError(f"unknown q4_0 row layout {layout!r}")
    nb = d // 32
    if rows.dtype != torch.uint8 or rows.dim() != 2 or d % 32 or rows.shape[1] != nb * 18:
        raise ValueError(f"dequant_q4_0: expected uint8 [n, {nb * 18}] for d={d}, got "
                         f"{rows.dtype} {tuple(rows.shape)}")
    rows = rows.contiguous()
    out = torch.empty(rows.shape[0], d, dtype=dtype, device=rows.device)
    if rows.shape[0] == 0:
        return out
    bb = 32
    _dequant_q4_kernel[(rows.shape[0], triton.cdiv(nb, bb))](
        rows, out, nb, nb * 18, GPU_LAYOUT=layout == "gpu", BB=bb, num_warps=4)
    return out
