"""FFN variants behind one interface: forward(x [n, d]) -> [n, d].

DenseFFN computes every neuron. MoE routes each token to its top-k experts (Mixtral's rule:
softmax over all experts in float32, top-k, renormalise) and sums their FFNs.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .predictor import Predictor, predictor_device


def activate(g: torch.Tensor, u: torch.Tensor, kind: str, threshold: float = 0.0) -> torch.Tensor:
    """Gated activation a = act(g, u), elementwise; g, u: [n, n_ff]."""
    if kind == "drelu":      # TurboSparse: relu on both branches
        return F.relu(g) * F.relu(u)
    if kind == "relu":       # ReluLLaMA: relu(gate) * up
        return F.relu(g) * u
    if kind == "fatrelu":    # ProSparse: gate kept where above the threshold
        return torch.where(g > threshold, g, torch.zeros_like(g)) * u
    if kind == "silu":
        return F.silu(g) * u
    raise ValueError(f"unknown activation {kind!r}")


def gated_rows(x: torch.Tensor, w: torch.Tensor, kind: str, threshold: float = 0.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """A batch through an FFN's float rows: x [m, d] -> [m, d] = (act(x W1^T, x W3^T) * mask)
    W2^T. w: gate, up, down_t as ONE contiguous tensor [3, n, d], so gate and up are one matmul
    [m, 2n] and dReLU one relu over it (prefill is host-bound: each torch call costs ~20-60 us
    of host time against a few us of GPU time). mask: bool [n] (the rows to keep) or None."""
    n = w.shape[1]
    gu = F.linear(x, w[:2].view(2 * n, w.shape[2]))                # [m, 2n]: gate | up
    if kind == "drelu":                                              # activate's rule, one relu
        r = F.relu(gu)
        a = r[:, :n] * r[:, n:]
    else:
        a = activate(gu[:, :n], gu[:, n:], kind, threshold)
    if mask is not None:
        a = a * mask.to(a.dtype)
    return a @ w[2]


class DenseFFN(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 activation: str, threshold: float = 0.0, predictor: Predictor | None = None):
        super().__init__()
        self.gate = gate          # W1 [n_ff, d]
        self.up = up              # W3 [n_ff, d]
        self.down = down          # W2 [d, n_ff]
        self.activation = activation
        self.threshold = threshold
        self.predictor = predictor  # kept for the sparse modes; dense mode ignores it

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """a [n, n_ff]: the neuron activations (zeros are the sparsity the runtime exploits)."""
        return activate(F.linear(x, self.gate), F.linear(x, self.up), self.activation, self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activations(x), self.down)


def route(x: torch.Tensor, router: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral's router: x [n, d], router [E, d] -> (weights [n, k] in x's dtype, summing to 1,
    expert ids [n, k]): softmax over all experts in float32, top k, renormalised. One token on
    CUDA: the same arithmetic in one Triton launch (kernels.gpu.route_one)."""
    if x.is_cuda:                           # route_one says where it applies (None: not here)
        from .kernels.gpu import route_one
        r = route_one(x, router, top_k)
        if r is not None:
            return r
    probs = torch.softmax(F.linear(x, router).float(), dim=-1)
    # top k as k max reductions (probabilities are >= 0: a taken one is set to -1): for k of 8
    # experts torch.topk is a sort (two kernels, ~8 us a layer on the H100); these fuse into the
    # compiled decode step. Ties go to the lower expert id.
    ws, ids, p = [], [], probs
    for _ in range(top_k):
        w, i = p.max(dim=-1, keepdim=True)
        ws.append(w)
        ids.append(i)
        p = p.scatter(-1, i, -1.0)
    w, ids = torch.cat(ws, dim=-1), torch.cat(ids, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    return w.to(x.dtype), ids


def expert_groups(w: torch.Tensor, ids: torch.Tensor, n_experts: int):
    """A batch's routing (w, ids [n, k]) in expert order -> (tok int64 [n*k]: the token of each
    slot, weights [n*k], counts: a list of n_experts ints, slots per expert). One sort on the
    device and one host sync (the counts), instead of one nonzero (a sync) per expert."""
    k, flat = ids.shape[1], ids.flatten()
    order = torch.argsort(flat, stable=True)            # [n*k] token-slots grouped by expert
    counts = torch.bincount(flat, minlength=n_experts).tolist()
    return order // k, w.flatten()[order], counts


def grouped_sum(x: torch.Tensor, tok: torch.Tensor, ws: torch.Tensor, counts: list, run) -> torch.Tensor:
    """A batch through its experts (expert_groups' tok, ws, counts): y[t] = sum over t's slots of
    weight * run(e, x_e)[row], run(e, x_e [m, d]) -> [m, d] for every expert with tokens, in
    expert order. The tokens are gathered once in expert order, each expert reads a slice, and
    one weighted index_add adds the outputs back: four torch calls a layer instead of three an
    expert (prefill is host-bound: each call costs ~10-20 us of host time)."""
    xs = x[tok]                                         # [n*k, d] in expert order
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(run(e, xs[start:start + c]))
        start += c
    ys = outs[0] if len(outs) == 1 else torch.cat(outs)
    return torch.zeros_like(x).index_add_(0, tok, ys * ws[:, None])


class MoE(nn.Module):
    def __init__(self, router: torch.Tensor, experts: list[DenseFFN], top_k: int):
        super().__init__()
        self.router = router      # [n_experts, d]
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d] -> (weights [n, k] in x's dtype, expert ids [n, k])."""
        return route(x, self.router, self.top_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.route(x)
        return grouped_sum(x, *expert_groups(w, ids, len(self.experts)), lambda e, xe: self.experts[e](xe))


# ---- hybrid: hot rows on the GPU side, cold rows in the CPU kernels ----------------------------

SPARSITY_MODES = ("dense", "exact", "predictor")


class HybridFFN(nn.Module):
    """One FFN split by neuron: hot rows (kernels.gpu.HotFFN) on the GPU side, cold rows
    (kernels.cpu.PackedFFN, compact) on the CPU. Both halves are built once; nothing is copied
    per token but x (D2H), the cold ids (D2H) and the CPU partial (H2D).

    sparsity: dense (every neuron), exact (all gates, down only where a != 0: lossless),
    predictor (only neurons the predictor calls active; a batch computes the union of its
    tokens' predicted sets).

    n_warm: the first n_warm cold rows (build.split_rows puts them first) are the warm tier: rows
    in page-locked host memory that the GPU reads directly over PCIe. Only the graph decoder's
    fused layers (graphs.py) hand rows [0, n_warm) to the GPU; every other path (prefill
    streaming, batches, the CPU kernels, this class's own forward) computes ALL cold rows, the
    warm ones included.
    """

    def __init__(self, n_ff: int, hot, cold, cold_ids: torch.Tensor, activation: str,
                 threshold: float, sparsity: str, predictor: Predictor | None, device,
                 dense_above: int = 16, stream_above: int | None = None, *, n_warm: int = 0):
        super().__init__()
        if sparsity not in SPARSITY_MODES:
            raise ValueError(f"unknown sparsity {sparsity!r}")
        if sparsity == "predictor" and predictor is None:
            raise ValueError("sparsity 'predictor' needs a predictor for every FFN")
        self.n_ff, self.hot, self.cold = n_ff, hot, cold          # HotFFN | None, PackedFFN | None
        self.cold_ids = cold_ids            # int64 [n_cold] neuron id of each cold row (CPU)
        if not 0 <= n_warm <= (cold.n_ff if cold is not None else 0):
            raise ValueError(f"n_warm {n_warm} is more than the {0 if cold is None else cold.n_ff} cold rows")
        self.n_warm = n_warm                # cold rows [0, n_warm): the warm tier (graph decode only)
        self.hot_ids = hot.ids.long() if hot is not None else None   # [n_hot] (device)
        self.activation, self.threshold, self.sparsity = activation, threshold, sparsity
        self.predictor = predictor
        self.device = device
        self.dense_above = dense_above      # batches larger than this (prefill) compute densely
        self.stream_above = stream_above    # batches larger than this stream the cold rows to the device
        self.device_bytes = hot.nbytes if hot is not None else 0   # what this FFN holds on the device
        self._all_cold = (torch.arange(cold.n_ff, dtype=torch.int32) if cold is not None else None)
        if cold is not None and (stream_above is not None or n_warm) and torch.device(device).type == "cuda":
            from .kernels.pinned import pin_host
            # prefill streams them (async DMA); the decoder's GPU reads the warm rows in place
            # (zero-copy: only page-locked memory can be; kernels.gpu.WarmRows checks)
            st = cold.stacked()                         # pinned whole: cudaHostRegister refuses overlaps
            pin_host(self, *((cold.gate, cold.up, cold.down_t) if st is None else (st,)))
        self._cold_np = cold_ids.numpy()
        self._step = None                   # _cpu_decode's ColdStep, made on first use
        self._row_ids = None                # device_batch's neuron id per row (hot, then cold)
        self._cpu_only = hot is None and cold is not None and dense_above >= 1
        # every neuron cold, in order (a CPU-only model): the mask's nonzeros are the row ids
        self._cold_all = cold_ids.numel() == n_ff and bool(np.array_equal(self._cold_np, np.arange(n_ff)))

    def mode(self, n_tokens: int) -> str:
        """The sparsity for a batch: a large batch (prefill) touches nearly every neuron anyway,
        so it reads each row once, densely."""
        return "dense" if n_tokens > self.dense_above else self.sparsity

    def predict(self, x: torch.Tensor) -> torch.Tensor | None:
        """bool [n_ff] on the device: neurons predicted active for any token of x; None = all."""
        if self.mode(x.shape[0]) != "predictor":
            return None
        dev = predictor_device(self.predictor, x.device)   # the placement may keep it on the CPU
        m = self.predictor.active(x if dev == x.device else x.to(dev))
        return m[0] if m.shape[0] == 1 else m.any(dim=0)

    def gpu_half(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
        if self.hot is None:
            return None
        from .kernels.gpu import hot_ffn
        if mask is not None and mask.device != x.device:   # a predictor kept on the CPU
            mask = mask.to(x.device, non_blocking=True)
        return hot_ffn(self.hot, x, self.activation, self.threshold,
                       None if mask is None else mask[self.hot_ids])

    def cold_rows(self, mask_cpu: torch.Tensor | None) -> torch.Tensor:
        """int32 ids into the compact cold rows to compute (mask_cpu: bool [n_ff] on the CPU).
        numpy, not torch: a few-thousand-element gather must not wake torch's thread pool while
        the kernels' pool is busy (measured: 50 us vs 10 ms under contention)."""
        if mask_cpu is None:
            return self._all_cold
        m = mask_cpu.numpy()
        return torch.from_numpy(np.flatnonzero(m if self._cold_all else m[self._cold_np]).astype(np.int32))

    def streams(self, n_tokens: int) -> bool:
        """Whether a batch of n_tokens computes the cold rows on the device (streamed there)."""
        return self.cold is not None and self.stream_above is not None and n_tokens > self.stream_above

    def copy_cold(self, device) -> torch.Tensor:
        """The packed cold rows copied to `device` as one tensor [3, n_cold, row_bytes] (gate, up,
        down_t): asynchronous where they are page-locked, on the current stream; one copy where
        the three share one allocation (PackedFFN.stacked)."""
        c = self.cold
        buf = torch.empty((3, *c.gate.shape), dtype=c.gate.dtype, device=device)
        st = c.stacked()
        if st is not None:
            return buf.copy_(st, non_blocking=True)
        for i, t in enumerate((c.gate, c.up, c.down_t)):
            buf[i].copy_(t, non_blocking=True)
        return buf

    def forward(self, x: torch.Tensor, cold_rows: tuple | None = None) -> torch.Tensor:
        """x [n, d] on the device. Order (DESIGN.md, one decode step): predictor on the device;
        one D2H copy of x and the mask (the only sync); the hot half launched (async on a GPU);
        the cold half in the CPU kernels meanwhile (GIL released); one H2D copy; the sum.
        cold_rows: the packed cold rows already on the device (ColdPrefetch), for a streamed batch."""
        if self._cpu_only and x.shape[0] == 1 and x.dtype == torch.float32 and x.device.type == "cpu":
            return self._cpu_decode(x)
        from .kernels import cpu, gpu
        mask = self.predict(x)
        if self.cold is None:
            return self.gpu_half(x, mask)
        if self.streams(x.shape[0]):                      # prefill: the cold rows travel instead
            return self.device_batch(x, mask, cold_rows)
        host = gpu.to_host(x, *(() if mask is None else (mask,)))
        y = self.gpu_half(x, mask)
        ids = self.cold_rows(host[1] if mask is not None else None)
        y_cpu = cpu.ffn_sparse(self.cold, host[0].float().contiguous(), ids, self.activation,
                               self.threshold, exact=self.mode(x.shape[0]) == "exact")
        y_cpu = gpu.to_device(y_cpu, x.device, x.dtype)
        return y_cpu if y is None else y + y_cpu

    def _cpu_decode(self, x: torch.Tensor) -> torch.Tensor:
        """One token of an FFN wholly on the CPU (no hot rows): x [1, d] float32 -> [1, d]. A
        ColdStep bound once to this FFN's own buffers (x, the predicted mask, y) turns the mask
        into row ids and computes them in one native call: on M7's 2-core decode the Python of
        the general path (host copies, id lists, the kernel wrapper's checks) cost ~80 us a layer."""
        bx, _, by = self.cpu_bound()
        bx.copy_(x[0])
        self.run_bound()
        return by.clone().view(1, -1)

    def cpu_bound(self) -> tuple:
        """(x [d], mask [n_ff] | None, y [d]): the float32 buffers run_bound() reads and writes,
        made (with the ColdStep bound to them) on first use. CPU-only FFNs (no hot rows)."""
        if self._step is None:
            from .kernels import cpu_step
            d = self.cold.d_model
            bx, by = torch.empty(d), torch.empty(d)
            bm = torch.zeros(self.n_ff, dtype=torch.bool) if self.sparsity == "predictor" else None
            self._bufs, self._bx1 = (bx, bm, by), bx.view(1, -1)
            self._step = cpu_step.ColdStep([self.cold], [self.cold_ids], [bm], bx, by,
                                           act=self.activation, threshold=self.threshold,
                                           exact=self.sparsity == "exact")
            # a predictor computing on the CPU is called directly (predict()'s checks skipped)
            self._pred_here = bm is not None and predictor_device(self.predictor, bx.device) == bx.device
        return self._bufs

    def run_bound(self) -> None:
        """One token from the bound x buffer into the bound y buffer (cpu_bound: the caller
        wrote x): the mask, then the cold rows it selects, in one native call."""
        bm = self._bufs[1]
        if bm is not None:
            bm.copy_(self.predictor.active(self._bx1)[0] if self._pred_here else self.predict(self._bx1))
        self._step.run()

    def device_batch(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                     rows: torch.Tensor | None = None) -> torch.Tensor:
        """A large batch (prefill) wholly on the device: the hot rows and the cold rows (copied
        over; for many tokens the copy is cheaper than the CPU compute) dequantised into ONE set
        of matrices [n_hot + n_cold, d], then three matmuls. x [n, d] -> [n, d]. Row order does
        not matter to an FFN, so no scatter: the hot rows first, then the cold. One set of n_ff
        rows keeps the matmuls' shapes aligned (n_ff, not an odd n_hot: the H100 profile had
        cuBLAS fall back to sm75/sm80 kernels at 5x the time for odd hot counts); q4_0 hot and
        cold rows dequantise in one launch (kernels.gpu.ffn_matrices). mask: bool [n_ff] on the
        device (predictor mode), or None (every row).
        rows: the packed cold rows [3, n_cold, row] already on the device (ColdPrefetch), else
        copied here."""
        from .kernels.gpu import ffn_matrices
        c, h = self.cold, self.hot
        if rows is None:
            rows = self.copy_cold(x.device)
        parts = ([(h.stacked(), h.fmt, h.GPU_LAYOUT)] if h is not None else []) + [(rows, c.fmt, False)]
        w = ffn_matrices(parts, c.d_model, x.dtype)               # [3, n_hot + n_cold, d]
        if mask is not None:                                # [n_ff] -> the rows' order
            mask = mask.to(x.device, non_blocking=True)     # a predictor kept on the CPU
            if self._row_ids is None:
                cold = self.cold_ids.to(x.device)
                self._row_ids = cold if h is None else torch.cat([self.hot_ids, cold])
            mask = mask[self._row_ids]
        return gated_rows(x, w, self.activation, self.threshold, mask)


class HybridMoE(nn.Module):
    """Router on the GPU side; each selected expert's hot half on the GPU, and for one token the
    cold halves of all selected experts in one CPU kernel call."""

    def __init__(self, router: torch.Tensor, experts: list[HybridFFN], top_k: int):
        super().__init__()
        self.router = router
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k

    route = MoE.route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.route(x)
        if x.shape[0] != 1:                                # prefill / batches: expert by expert
            tok, ws, counts = expert_groups(w, ids, len(self.experts))
            pre = None
            if x.is_cuda:                                  # streamed experts: copies overlap compute
                pre = ColdPrefetch(self.experts, [e for e, c in enumerate(counts)
                                                  if c and self.experts[e].streams(c)], x.device)
            return grouped_sum(x, tok, ws, counts, lambda e, xe: self.experts[e](
                xe, cold_rows=pre.take(e) if pre is not None else None))
        return self._decode(x, w[0], ids[0].tolist())      # one sync: the expert ids

    def _decode(self, x, w, sel: list[int]) -> torch.Tensor:
        """One token: the selected experts' masks and x go to the host in one copy; the hot
        halves run on the device while one CPU kernel call computes every cold half."""
        from .kernels import cpu, gpu
        experts = [self.experts[e] for e in sel]
        masks = [ex.predict(x) for ex in experts]
        cold = [k for k, ex in enumerate(experts) if ex.cold is not None]
        host = None
        if cold:
            extra = (torch.stack([masks[k] for k in cold]),) if masks[0] is not None else ()
            host = gpu.to_host(x, w, *extra)
        y = torch.zeros_like(x)
        for k, (ex, m) in enumerate(zip(experts, masks)):
            part = ex.gpu_half(x, m)
            if part is not None:
                y = y + w[k] * part
        if not cold:
            return y
        x_cpu, w_cpu = host[0].float().contiguous(), host[1].float()
        rows = [experts[k].cold_rows(host[2][i] if len(host) > 2 else None) for i, k in enumerate(cold)]
        ex0 = experts[cold[0]]
        y_cpu = cpu.ffn_sparse_multi([experts[k].cold for k in cold], x_cpu, rows, w_cpu[cold],
                                     ex0.activation, ex0.threshold, exact=ex0.sparsity == "exact")
        return y + gpu.to_device(y_cpu, x.device, x.dtype)


class ColdPrefetch:
    """Prefill of an MoE layer on a GPU: while one streamed expert computes, the next one's packed
    cold rows are copied on a side stream (double buffering: at most two experts' cold rows on the
    device at once; page-locked rows make the copies DMA that overlaps the matmuls)."""

    _streams: dict = {}                                    # device -> its copy stream (made once)

    def __init__(self, experts, todo: list[int], device: torch.device):
        self.experts, self.todo, self.device, self.ready = experts, list(todo), device, {}
        key = torch.device(device).index
        if key not in ColdPrefetch._streams:
            ColdPrefetch._streams[key] = torch.cuda.Stream(device)
        self.stream = ColdPrefetch._streams[key]
        # the compute stream, looked up once a layer (torch.cuda.current_stream(device) and the
        # torch.cuda.stream context cost ~20-30 us of host time each, per expert)
        self.compute = torch.cuda.current_stream(device)
        self.stream.wait_stream(self.compute)
        self._start_next()

    def _start_next(self) -> None:
        """Copy the next expert's packed cold rows [3, n_cold, row_bytes] on the copy stream
        (allocated there), and record the copy's event."""
        if not self.todo:
            return
        e = self.todo.pop(0)
        torch.cuda.set_stream(self.stream)
        try:
            rows = self.experts[e].copy_cold(self.device)
            ev = torch.cuda.Event()
            ev.record(self.stream)
        finally:
            torch.cuda.set_stream(self.compute)
        self.ready[e] = rows, ev

    def take(self, e: int):
        """Expert e's cold rows on the device (the compute stream waits for their copy), or None
        when e does not stream; starts the next expert's copy."""
        if e not in self.ready:
            return None
        rows, ev = self.ready.pop(e)
        self.compute.wait_event(ev)
        rows.record_stream(self.compute)                   # allocated on the copy stream, used here
        self._start_next()
        return rows
