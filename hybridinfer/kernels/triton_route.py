"""One token's MoE routing in one launch (decode, b = 1), for the CUDA-graph decoder:

  x [d] (the FFN input, bf16/f16/f32), router [E, d] in x's dtype, k experts:
  logits = router x (f32 sums, rounded to x's dtype as F.linear's output is),
  p = softmax(logits) in f32, the k largest p (ties to the lower expert id), w = p / sum(p)
  over the k, rounded to x's dtype -> w [k] (x's dtype), ids [k] int64.

Exactly ffn.route's arithmetic, which on the GPU took seven kernels a layer (cuBLAS's split-K
GEMV and its reduction for the [8, 4096] router, then five small fused kernels for the softmax
and the k max reductions): ~12 us of kernels and ~3 us of gaps a layer on the H100, against
one program here. E <= 128.

Runs on CUDA; with TRITON_INTERPRET=1 also on CPU tensors (how CI tests it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 128


@triton.jit
def _route_kernel(x_ptr, r_ptr, w_ptr, id_ptr, E, D, K: tl.constexpr, KP: tl.constexpr,
                  EP: tl.constexpr, BD: tl.constexpr):
    e = tl.arange(0, EP)
    live = e < E
    acc = tl.zeros([EP, BD], dtype=tl.float32)
    # BD >= D on the GPU (route_one): the whole router in one tile, every load in flight at once
    # (a loop of dependent tiles waits one memory latency per tile: ~2 us each)
    for d0 in range(0, D, BD):
        j = d0 + tl.arange(0, BD)
        xj = tl.load(x_ptr + j, mask=j < D, other=0.0).to(tl.float32)
        rj = tl.load(r_ptr + e[:, None] * D + j[None, :], mask=live[:, None] & (j[None, :] < D),
                     other=0.0).to(tl.float32)
        acc += rj * xj[None, :]
    logit = tl.sum(acc, axis=1).to(x_ptr.dtype.element_ty).to(tl.float32)      # F.linear's dtype
    logit = tl.where(live, logit, float("-inf"))
    z = tl.exp(logit - tl.max(logit, axis=0))
    p = tl.where(live, z / tl.sum(z, axis=0), -1.0)                              # softmax [EP]
    # the k largest, one max reduction each (as ffn.route: a taken one is set to -1)
    kk = tl.arange(0, KP)
    vals = tl.zeros([KP], dtype=tl.float32)
    picks = tl.zeros([KP], dtype=tl.int32)
    for i in tl.static_range(K):
        m = tl.max(p, axis=0)
        pick = tl.min(tl.where(p == m, e, EP), axis=0)
        vals = tl.where(kk == i, m, vals)
        picks = tl.where(kk == i, pick, picks)
        p = tl.where(e == pick, -1.0, p)
    w = vals / tl.sum(vals, axis=0)                 # the padding lanes hold 0
    tl.store(w_ptr + kk, w.to(w_ptr.dtype.element_ty), mask=kk < K)
    tl.store(id_ptr + kk, picks.to(tl.int64), mask=kk < K)


def route_one(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [d] or [1, d], router [E, d] (same dtype, contiguous) -> (w [1, k] in x's dtype, ids
    [1, k] int64), as ffn.route for one row."""
    x = x.reshape(-1)
    E, d = router.shape
    if x.numel() != d or router.dtype != x.dtype or not 1 <= k <= E or E > MAX_EXPERTS:
        raise ValueError(f"route_one: x [{d}] and router [E <= {MAX_EXPERTS}, {d}] of one dtype, "
                         f"1 <= k <= E; got x {tuple(x.shape)} {x.dtype}, router "
                         f"{tuple(router.shape)} {router.dtype}, k {k}")
    w = torch.empty(1, k, dtype=x.dtype, device=x.device)
    ids = torch.empty(1, k, dtype=torch.int64, device=x.device)
    ep = triton.next_power_of_2(E)
    # one tile of up to 32K router weights (64 KB in bf16: 64 values a thread at 16 warps)
    bd = max(16, min(triton.next_power_of_2(d), 32768 // ep))
    _route_kernel[(1,)](x.contiguous(), router.contiguous(), w, ids, E, d, K=k,
                        KP=triton.next_power_of_2(k), EP=ep, BD=bd, num_warps=16)
    return w, ids
