"""One-token decode with the GPU segments of every layer captured as CUDA graphs.

Eager decode launches ~80 small kernels per layer from Python; at batch 1 that overhead, not the
GPU, sets the token time. Here each layer's GPU work is cut where the host must act, the pieces
are captured once and replayed:

  A[l]      (prev layer's merge) + attention + ffn norm + router / predictor; D2H of what the host
            needs (the FFN input u, the expert ids and weights, the predicted masks)
  P[l, g]   MoE, predictors on the GPU: the predictors of the chosen experts g (one graph per
            possible choice, e.g. the 28 pairs of top-2 of 8); D2H of their masks
  H[l, g]   the chosen experts' hot halves (Triton), accumulated into y_acc[l] with the router
            weights
  F         the last merge, final norm, lm_head

Host, per layer: replay A; (MoE) one sync for the expert ids; replay P[g]; replay H[g] (async);
one sync for the masks; one native call (kernels.cpu_step.ColdStep, bound to the pinned buffers)
turns the masks into cold-row ids and runs the CPU kernel over them (GIL released) into a pinned buffer
that A[l+1] copies to the device (H2D inside the graph). When the choices are too many to capture
(C(E, k) > MAX_GROUPS), P and H are captured per expert instead. Buffers are static; the KV cache
is a static [capacity] cache; attention reads its live positions (kernels.gpu.attend_cached: the
Triton kernels on cuda; masked matmuls over all of it elsewhere).

Fused MoE layers (select_on_device, the default where every predictor is on the device): the
experts are chosen on the device, so A, the chosen experts' predictors and hot halves are ONE
segment (seg_layer): the kernels read the router's ids and find the experts' rows through address
tables (kernels.gpu.HotSlots, the predictors' `slots`); the k chosen masks go to the host and an
event recorded inside the graph (external) marks that point. Host, per layer: one replay; with
cold rows, one wait on that event and ColdStep (masks per slot); without, nothing: the host
replays the next layer at once.

Warm tier (fused layers; warm=None: on unless HYBRIDINFER_NO_WARM=1): each expert's first n_warm
cold rows (HybridFFN.n_warm, page-locked, GGUF q4_0) are computed by the GPU, reading them from
host memory over PCIe (a second HotSlots over kernels.gpu.WarmRows, on a side stream beside the
hot halves), and the layer's ColdStep gets only the rows after them.

Chained step (the default where no layer needs a host decision mid-token: every MoE layer fused,
no predictor on the CPU): the host does not stand between two layers at all. Layers without
cold rows copy nothing to the host and nothing back (no flag, no copy nodes). The device writes a
host flag ready[l] once layer l's inputs for its cold half are on the host (a kernel after the
D2H copies), and before layer l+1 adds the CPU half it waits on the device for done[l]
(kernels.gpu.flag_signal / flag_await, captured into the graphs). The whole token (every layer
and the final merge) is ONE graph the host launches once, while a native service thread
(kernels.cpu_step.ColdChain) waits for each ready[l], runs ColdStep l and sets done[l]. Critical
path per layer: GPU work -> flag -> CPU half -> flag -> GPU work; no launch and no Python between
layers. HYBRIDINFER_NO_CHAIN=1 or chain=False keep the per-layer host loop below.

Run-ahead (stream(): chained, the embedding table and lm_head on the device): the next token is
chosen on the device (a `select` function of the logits: argmax, sampling with host-drawn
uniforms, the benchmark's spread) and written into the graph's input, so token i+1's graph is
launched before the host reads token i; the host's launch and bookkeeping then overlap the
device's work instead of adding to it. The ColdChain serves up to two tokens in flight.

The same code runs without capture (graphs=False): on the cpu device that is how CI tests the
logic against the plain decode path (chained: the calling thread plays the device, the service
thread the host).

Shapes: d hidden, E experts, k top-k, C cache capacity, H/KV heads, hd head dim, V vocab.
"""
from __future__ import annotations

import math
import os
import warnings
from functools import partial
from itertools import combinations
from typing import Iterator

import torch

from .ffn import HybridFFN, HybridMoE, MoE, route
from .generate import step_stream
from .model import KVCache, Transformer, apply_rope, linear, qkv_projections, rms_norm
from .kernels.cpu import PackedLinear
from .kernels.gpu import SyncCounter, attend_cached, flag_await, flag_signal
from .predictor import host_active, predictor_device

MAX_GROUPS = 64        # expert choices per layer captured as one graph each (else per expert)


def attn_step(hp, ya, yc, an_w, fn_w, eps: float, q, k, v, o, qb, kb, vb, ob, qkv, cos_t, sin_t,
              pos, kpos, K, V, router, top_k: int, H: int, KV: int, hd: int, window: int,
              h_out, u_out, yacc_out, wfull_out):
    """Segment A's arithmetic for one token, a pure function of tensors (so torch.compile fuses
    its ~60 small kernels into a few, and one compilation serves every layer):
    x = hp + ya + yc (the previous layer's residual, GPU half, CPU half; [1, d], the halves in f32), attention over
    the static cache K/V [1, KV, C, hd] (position pos [1], kpos = arange(C); kernels.gpu.attend_cached:
    on cuda only the live positions are read), the FFN norm and,
    with a router [E, d], the expert choice. Writes h_out, u_out [1, d], zeroes yacc_out and
    (router) sets wfull_out [E] (f32: the weight of each chosen expert, 0 elsewhere).
    Returns u as float32 [1, d] and (router) ids [k], weights f32 [k] for the host copies.
    wfull_out None: no [E] weight vector (fused layers read ids and weights directly)."""
    x = (hp.float() + ya + yc).to(hp.dtype)
    xn = rms_norm(x, an_w, eps)
    qq, kk, vv = qkv_projections(xn, q, k, v, qb, kb, vb, qkv)
    qq, kk, vv = qq.reshape(1, H, 1, hd), kk.reshape(1, KV, 1, hd), vv.reshape(1, KV, 1, hd)
    cos, sin = cos_t.index_select(0, pos), sin_t.index_select(0, pos)                  # [1, hd]
    qq, kk = apply_rope(qq, cos, sin), apply_rope(kk, cos, sin)
    K.index_copy_(2, pos, kk)
    V.index_copy_(2, pos, vv)
    y = attend_cached(qq, K, V, pos, kpos, window)                                   # [1, H*hd]
    h = x + linear(y, o, ob)
    u = rms_norm(h, fn_w, eps)
    h_out.copy_(h)
    u_out.copy_(u)
    yacc_out.zero_()
    if router is None:
        return u.float(), None, None
    w, ids = route(u, router, top_k)                                                   # [1, k]
    if wfull_out is not None:
        wfull_out.zero_().scatter_(0, ids[0], w[0].float())
    return u.float(), ids[0], w[0].float()


class GraphDecoder:
    def __init__(self, model: Transformer, capacity: int, graphs: bool | None = None,
                 fuse: bool | None = None, select_on_device: bool | None = None,
                 chain: bool | None = None, warm: bool | None = None):
        """graphs: capture CUDA graphs (default: on cuda). fuse: torch.compile segment A's
        arithmetic (attn_step; default: with graphs, unless HYBRIDINFER_NO_COMPILE=1); a failed
        compilation falls back to the plain function with a warning. select_on_device: MoE
        layers whose predictors are on the device (or absent) run as one segment, the experts
        chosen on the device (default on, unless HYBRIDINFER_HOST_SELECT=1). chain: the chained
        step where possible (default on, unless HYBRIDINFER_NO_CHAIN=1; see the module doc).
        warm: fused layers' GPU reads their experts' warm rows over PCIe (default on, unless
        HYBRIDINFER_NO_WARM=1; where it cannot, kernels.gpu.WarmRows.usable, the CPU computes them)."""
        self.m, cfg = model, model.cfg
        # the device as tensors report it (cuda:0, not cuda): compared with weights' devices
        self.dev, self.dt = model.blocks[0].attn.q.device, model.embed.dtype
        self.graphs = self.dev.type == "cuda" if graphs is None else graphs
        self.cache: KVCache = model.new_cache(capacity)     # static: graphs hold its addresses
        self.C = capacity
        dev, dt, d, L = self.dev, self.dt, cfg.hidden_size, cfg.num_layers
        pin = self.dev.type == "cuda"

        def host(*shape, dtype=torch.float32):
            return torch.zeros(*shape, dtype=dtype, pin_memory=pin)

        self.tok = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.kpos = torch.arange(capacity, device=dev)
        self.x0 = torch.zeros(1, d, dtype=dt, device=dev)        # embedding row, when on the CPU
        self.x0_host = host(1, d, dtype=dt)
        self.h = [torch.zeros(1, d, dtype=dt, device=dev) for _ in range(L)]     # after attention
        self.u = [torch.zeros(1, d, dtype=dt, device=dev) for _ in range(L)]     # FFN input
        self.yacc = [torch.zeros(1, d, device=dev) for _ in range(L)]            # GPU halves, summed, f32
        self.u_host = [host(1, d) for _ in range(L)]                             # FFN input, f32
        self.ycpu_host = [host(1, d) for _ in range(L)]                          # CPU halves, summed
        self.ycpu_dev = [torch.zeros(1, d, device=dev) for _ in range(L)]
        self.logits = torch.zeros(cfg.vocab_size, device=dev)
        self.tok_host = host(2, dtype=torch.long)     # stream(): the tokens in flight, a ring of 2
        self.xf_host = host(1, d, dtype=dt)                      # final hidden, when lm_head is on the CPU
        self.moe = [isinstance(b.ffn, (HybridMoE, MoE)) for b in model.blocks]
        k = cfg.experts_per_token
        self.ids_host = [host(k, dtype=torch.long) if self.moe[i] else None for i in range(L)]
        self.w_host = [host(k) if self.moe[i] else None for i in range(L)]
        # per-layer tables, so that a step does lookups, not isinstance/device checks
        self._fm = [dict(self._ffns(l)) for l in range(L)]
        if select_on_device is None:
            select_on_device = os.environ.get("HYBRIDINFER_HOST_SELECT", "") in ("", "0")
        self._fused = [select_on_device and self._can_fuse(l) for l in range(L)]
        if warm is None:
            warm = os.environ.get("HYBRIDINFER_NO_WARM", "") in ("", "0")
        self._warm = warm
        # the host-selected path's [E] router weights (a fused layer reads ids and weights)
        self.w_full = [None if self._fused[l] else torch.zeros(max(cfg.num_experts, 1), device=dev)
                       for l in range(L)]
        self.mask, self.mask_host = {}, {}
        self.mslot, self.mslot_host = {}, {}            # fused layers: the chosen experts' masks
        self._hs, self._ps, self._ws = {}, {}, {}     # hot halves, predictors, warm rows (fused)
        for l, blk in enumerate(model.blocks):
            if self._fused[l]:
                self._fuse(l, host)
                continue
            for e, f in self._ffns(l):
                if isinstance(f, HybridFFN) and f.sparsity == "predictor":
                    self.mask[(l, e)] = torch.zeros(f.n_ff, dtype=torch.bool, device=dev)
                    self.mask_host[(l, e)] = host(f.n_ff, dtype=torch.bool)
        self._gpu_pred = {k for k in self.mask if self._pred_on_gpu(self._fm[k[0]][k[1]])}
        self._cpu_pred = set(self.mask) - self._gpu_pred
        # FFNs with rows the CPU computes (cold, less the warm tier where the GPU reads it)
        self._cold = {(l, e) for l in range(L) for e, f in self._fm[l].items()
                      if isinstance(f, HybridFFN) and f.cold is not None
                      and f.cold.n_ff > self._n_warm(l, f)}
        self._grouped = [self.moe[l] and math.comb(len(self._fm[l]), k) <= MAX_GROUPS for l in range(L)]
        self._coldstep = [self._cold_step(l) for l in range(L)]
        if chain is None:
            chain = os.environ.get("HYBRIDINFER_NO_CHAIN", "") in ("", "0")
        self._links = [l for l in range(L) if self._coldstep[l] is not None]
        # one graph a token where no layer needs a host decision mid-token (a ColdChain serves
        # the cold halves, if any)
        self._chained = bool(chain and not self._cpu_pred
                             and all(self._fused[l] or not self.moe[l] for l in range(L)))
        # layers whose FFN input, choice or masks the host reads: a cold half, a host-made
        # choice (MoE not fused) or a predictor on the CPU; the others copy nothing to the host
        self._to_host = [self._coldstep[l] is not None or (self.moe[l] and not self._fused[l])
                         or any(k[0] == l for k in self._cpu_pred) for l in range(L)]
        self.flags = host(2, L, dtype=torch.int32)      # [ready, done] per layer, host memory
        self._chain = None
        if self._chained and self._links:
            from .kernels import cpu_step
            self._chain = cpu_step.ColdChain([self._coldstep[l] for l in self._links],
                                             [self.flags[0, l] for l in self._links],
                                             [self.flags[1, l] for l in self._links])
        cuda = self.dev.type == "cuda"
        # (expert ids, ready). A fused layer records `ready` inside its graph once u, the choice
        # and the masks are on the host (external: an event record node; the host waits for that
        # point while the hot halves go on)
        self._ev = [(torch.cuda.Event(), torch.cuda.Event(external=self._fused[l])) if cuda
                    else (None, None) for l in range(L)]
        self._ev_out = torch.cuda.Event() if cuda else None      # xf on the host (lm_head on the CPU)
        self._ev_tok = [torch.cuda.Event() if cuda else None for _ in range(2)]   # tok_host slots
        # the warm rows' kernels run on a side stream, concurrent with the hot halves' (a fork and
        # a join in the captured graph): they wait on PCIe, the hot ones on HBM
        self._warm_stream = torch.cuda.Stream(self.dev) if cuda and self._ws else None
        # layer 0's "previous GPU/CPU halves": two distinct zero buffers (aliased arguments would
        # make torch.compile specialise layer 0 apart from the others)
        self._zeros = (torch.zeros(1, d, device=dev), torch.zeros(1, d, device=dev))
        self._attn = attn_step
        if fuse is None:
            fuse = self.graphs and os.environ.get("HYBRIDINFER_NO_COMPILE", "") in ("", "0")
        if fuse and not any(isinstance(b.attn.q, PackedLinear) for b in model.blocks):
            self._attn = torch.compile(attn_step, dynamic=False)
            try:                                         # compile now; fall back if it cannot
                with torch.inference_mode():
                    self.seg_attn(0)
            except Exception as e:                       # noqa: BLE001 - any compiler failure
                warnings.warn(f"graph decoder: torch.compile of the attention step failed "
                              f"({type(e).__name__}: {e}); running it uncompiled")
                self._attn = attn_step
            self._clear()
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._segs = list(self._segments())     # (key, segment, args); chained: in token order
        if self.graphs:
            self._capture()
        self._A = [self._call(("A", l), self.seg_layer if self._fused[l] else self.seg_attn, l)
                   for l in range(L)]
        self._F = self._call(("F",), self.seg_final)
        self._plans: list[dict] = [{} for _ in range(L)]

    @property
    def warm_layers(self) -> int:
        """Layers whose GPU reads their experts' warm rows over PCIe (benchmarks report it)."""
        return len(self._ws)

    # ---- structure ----------------------------------------------------------------------------
    def _ffns(self, l):
        f = self.m.blocks[l].ffn
        return list(enumerate(f.experts)) if isinstance(f, (HybridMoE, MoE)) else [(-1, f)]

    def _pred_on_gpu(self, f) -> bool:
        return predictor_device(f.predictor, self.dev) == self.dev

    def _groups(self, l: int, sel: list[int]) -> list[tuple[int, ...]]:
        """The P/H segments that serve the chosen experts `sel` of layer l."""
        if self._grouped[l]:
            return [tuple(sorted(sel))]
        return [(e,) for e in sel]

    def _all_groups(self, l: int):
        if not self.moe[l]:
            return [(-1,)]
        es = sorted(self._fm[l])
        if self._grouped[l]:
            return list(combinations(es, self.m.cfg.experts_per_token))
        return [(e,) for e in es]

    def _can_fuse(self, l: int) -> bool:
        """Whether MoE layer l can choose its experts on the device: hybrid experts, every
        predictor (if any) on the device with a device-selected form, hot halves likewise."""
        from .kernels.gpu import HotSlots
        fs = list(self._fm[l].values())
        if not self.moe[l] or not all(isinstance(f, HybridFFN) for f in fs):
            return False
        preds = [f.predictor for f in fs if f.sparsity == "predictor"]
        if preds and (len(preds) != len(fs) or not all(self._pred_on_gpu(f) for f in fs)
                      or not hasattr(type(preds[0]), "slots")
                      or len({type(p) for p in preds}) != 1):
            return False
        return HotSlots.supported([f.hot for f in fs], self.dev)

    def _fuse(self, l: int, host) -> None:
        """Layer l's device-selected parts: hot halves, warm rows (read over PCIe), predictors,
        per-slot mask buffers."""
        from .kernels.gpu import HotSlots, WarmRows
        fs = [self._fm[l][e] for e in sorted(self._fm[l])]
        k, f0 = self.m.cfg.experts_per_token, fs[0]
        self._hs[l] = HotSlots([f.hot for f in fs], k, f0.activation, f0.threshold, self.dev)
        if self._warm and WarmRows.usable(fs, self.dev):
            self._ws[l] = HotSlots([WarmRows.of(f, self.dev) for f in fs], k, f0.activation,
                                   f0.threshold, self.dev, gguf=True)
        if f0.sparsity == "predictor":
            self._ps[l] = type(f0.predictor).slots([f.predictor for f in fs], k, self.dev)
            self.mslot[l] = torch.zeros(k, f0.n_ff, dtype=torch.bool, device=self.dev)
            self.mslot_host[l] = host(k, f0.n_ff, dtype=torch.bool)

    def _n_warm(self, l: int, f) -> int:
        """Cold rows of FFN f in layer l that the GPU reads (the warm tier), not the CPU."""
        return f.n_warm if l in self._ws else 0

    def _cold_step(self, l: int):
        """The native per-step cold half of layer l, bound to its pinned buffers (None: no cold
        rows): each FFN's cold rows after its warm tier (views)."""
        from .kernels import cpu_step
        ffns = self._fm[l]
        cold = {e: f for e, f in ffns.items() if (l, e) in self._cold}
        if not cold:
            return None
        f0 = next(iter(cold.values()))
        keys = range(len(ffns)) if self.moe[l] else [-1]
        nw = {e: self._n_warm(l, f) for e, f in cold.items()}
        items = [(cold[e].cold.rows(nw[e]), cold[e].cold_ids[nw[e]:], self.mask_host.get((l, e)))
                 if e in cold else (None, None, None) for e in keys]
        ffn, neurons, masks = zip(*items)
        sel, w = (self.ids_host[l], self.w_host[l]) if self.moe[l] else (None, None)
        return cpu_step.ColdStep(ffn, neurons, masks, self.u_host[l][0], self.ycpu_host[l][0], sel,
                                 w, f0.activation, f0.threshold, exact=f0.sparsity == "exact",
                                 slot_masks=self.mslot_host.get(l))

    # ---- the segments (plain functions of the static buffers) ---------------------------------
    def seg_attn(self, l: int):
        """Segment A of layer l (attn_step on the static buffers) and its host copies; returns
        u f32 [1, d] and (MoE) the expert ids and weights, still on the device."""
        m, cfg, blk = self.m, self.m.cfg, self.m.blocks[l]
        if l == 0:                  # x0: a static buffer (not an inference tensor: one compilation)
            if m.embed.device == self.dev:
                torch.index_select(m.embed, 0, self.tok, out=self.x0)                  # [1, d]
            parts = (self.x0, *self._zeros)
        else:
            self._cpu_half_in(l - 1)
            parts = (self.h[l - 1], self.yacc[l - 1], self.ycpu_dev[l - 1])
        a, f = blk.attn, blk.ffn
        router = f.router if self.moe[l] else None
        uf, ids, w = self._attn(
            *parts, blk.attn_norm.weight, blk.ffn_norm.weight, blk.attn_norm.eps, a.q, a.k, a.v,
            a.o, a.qb, a.kb, a.vb, a.ob, a.qkv, m.cos, m.sin, self.pos, self.kpos, self.cache.k[l],
            self.cache.v[l], router, cfg.experts_per_token, cfg.num_heads, cfg.num_kv_heads,
            cfg.head_dim, cfg.sliding_window or 0, self.h[l], self.u[l], self.yacc[l],
            self.w_full[l])
        if self._to_host[l]:
            self.u_host[l].copy_(uf, non_blocking=True)                                # D2H
            if self.moe[l]:
                self.ids_host[l].copy_(ids, non_blocking=True)
                self.w_host[l].copy_(w, non_blocking=True)
        if not self.moe[l]:
            if (l, -1) in self._gpu_pred:
                self.seg_predict(l, (-1,))
            self._signal_cold(l)
        return uf, ids, w

    def seg_layer(self, l: int) -> None:
        """A fused MoE layer: segment A, then the chosen experts' predictors and hot halves with
        the choice read on the device (no host round trip); the masks go to the host before the
        hot halves, and the layer's ready event marks that point for the host's cold half."""
        uf, ids, w = self.seg_attn(l)
        mask = self.mslot.get(l)
        if mask is not None:
            self._ps[l].masks(uf, ids, mask)
            if self._to_host[l]:
                self.mslot_host[l].copy_(mask, non_blocking=True)                      # D2H
        if self._chained:
            self._signal_cold(l)
        elif self._to_host[l]:
            self._mark(self._ev[l][1])
        ws, side = self._ws.get(l), self._warm_stream
        if ws is not None and side is not None:       # the warm rows, over PCIe, beside the hot
            cur = torch.cuda.current_stream(self.dev)   # halves (both add into yacc[l] atomically)
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                ws.run(self.u[l], ids, w, mask, self.yacc[l])
        self._hs[l].run(self.u[l], ids, w, mask, self.yacc[l])
        if ws is not None:
            if side is not None:
                cur.wait_stream(side)
            else:
                ws.run(self.u[l], ids, w, mask, self.yacc[l])

    def seg_predict(self, l: int, g: tuple[int, ...]) -> None:
        """The masks of the experts in g whose predictor is on the GPU."""
        for e in g:
            if (l, e) not in self._gpu_pred:
                continue
            mask = self._fm[l][e].predictor.active(self.u[l])[0]
            self.mask[(l, e)].copy_(mask)
            if self._to_host[l]:
                self.mask_host[(l, e)].copy_(mask, non_blocking=True)                  # D2H

    def seg_hot(self, l: int, g: tuple[int, ...]) -> None:
        """The hot halves of the experts in g (or the dense FFN, g = (-1,)) into yacc[l]."""
        for e in g:
            f = self._fm[l][e]
            if isinstance(f, HybridFFN):
                mask = None
                if (l, e) in self.mask:
                    if (l, e) in self._cpu_pred:                   # mask made on the host
                        self.mask[(l, e)].copy_(self.mask_host[(l, e)], non_blocking=True)
                    mask = self.mask[(l, e)]
                part = f.gpu_half(self.u[l], mask)
            else:                                                  # a dense FFN on the device
                part = f(self.u[l])
            if part is None:
                continue
            if e >= 0:                                             # one kernel: yacc += w_e * part
                self.yacc[l].addcmul_(part, self.w_full[l][e])
            else:
                self.yacc[l].add_(part)

    def _signal_cold(self, l: int) -> None:
        """Chained: layer l's cold-half inputs are on the host (the copies above, in stream order)."""
        if self._chained and self._coldstep[l] is not None:
            flag_signal(self.flags[0, l], self.dev)

    def _cpu_half_in(self, l: int) -> None:
        """Layer l's CPU half onto the device (ycpu_dev[l]), chained: once the device saw it
        done. A layer without cold rows has none: ycpu_dev[l] stays 0, no copy."""
        if self._coldstep[l] is None:
            return
        if self._chained:
            flag_await(self.flags[1, l], self.dev)
        self.ycpu_dev[l].copy_(self.ycpu_host[l], non_blocking=True)                    # H2D

    def seg_final(self) -> None:
        L = self.m.cfg.num_layers
        self._cpu_half_in(L - 1)
        x = (self.h[L - 1].float() + self.yacc[L - 1] + self.ycpu_dev[L - 1]).to(self.dt)
        xf = self.m.norm(x)
        if self.m.lm_head.device == self.dev:
            self.logits.copy_(linear(xf, self.m.lm_head)[0].float())
        else:
            self.xf_host.copy_(xf, non_blocking=True)

    # ---- replay (or call) ---------------------------------------------------------------------
    def _call(self, key, fn, *args):
        """A zero-argument callable: the graph's replay, or the segment itself."""
        g = self._graphs.get(key)
        return g.replay if g is not None else partial(fn, *args)

    def _plan(self, l: int, sel: tuple[int, ...]):
        """(P calls, H calls, experts with a CPU predictor) for layer l when `sel` (sorted) is
        chosen; made once per choice, so a step does one dict lookup per layer."""
        plan = self._plans[l].get(sel)
        if plan is None:
            groups = self._groups(l, list(sel))
            P = [self._call(("P", l, g), self.seg_predict, l, g) for g in groups
                 if self.moe[l] and any((l, e) in self._gpu_pred for e in g)]
            H = [self._call(("H", l, g), self.seg_hot, l, g) for g in groups]
            plan = self._plans[l][sel] = (P, H, [e for e in sel if (l, e) in self._cpu_pred])
        return plan

    def _mark(self, ev):
        """Record `ev` after the work enqueued so far; None on the cpu device."""
        if ev is None:
            return None
        ev.record()
        return ev

    @staticmethod
    def _wait(ev) -> None:
        """Block the host until `ev` (a host-device synchronisation; counted)."""
        if ev is not None:
            ev.synchronize()
            SyncCounter.syncs += 1

    @torch.inference_mode()
    def step(self, token: int) -> torch.Tensor:
        """Logits [V] (float32) for `token` at position cache.length; advances the cache.
        Host-device synchronisations per layer: chained, none on the main thread (one wait for
        the whole token) and one flag wait of the service thread per layer with cold rows;
        otherwise a fused MoE layer 1 (when it has cold rows), MoE 1 (expert ids) + 1 (masks,
        when there are cold rows), dense FFN 1 (when there are cold rows)."""
        m, cache = self.m, self.cache
        p = cache.length
        if p >= self.C:
            raise RuntimeError("graph decoder: the static cache is full")
        self.tok.fill_(token)
        self.pos.fill_(p)
        if m.embed.device != self.dev:
            self.x0_host.copy_(m.embed[token])
            self.x0.copy_(self.x0_host, non_blocking=True)
        if self._chained:
            self._step_chained()
        else:
            self._step_layers()
            self._F()
        cache.length = p + 1
        if m.lm_head.device != self.dev:
            self._wait(self._mark(self._ev_out))
            return linear(self.xf_host, m.lm_head)[0].float()
        return self.logits

    def _step_chained(self) -> None:
        """The token's GPU work enqueued at once and waited for (the chain, if any, serves the
        cold halves meanwhile)."""
        self._enqueue_token()
        if self._chain is not None:
            try:
                self._join_chain(self._chain)
            except Exception:
                self._reset_flags()
                raise

    def _enqueue_token(self) -> None:
        """Captured: ONE graph for every layer and the final merge, one launch a token; else the
        same segments, in order. The chain (if any) begins the token first."""
        if self._chain is not None:
            self._chain.begin()
        try:
            token = self._graphs.get(("T",))
            if token is not None:
                token.replay()
            else:
                for _, fn, args in self._segs:
                    fn(*args)
        except BaseException:
            if self._chain is not None:
                self._chain.end(cancel=True)
            self._reset_flags()
            raise

    @property
    def can_run_ahead(self) -> bool:
        """stream() enqueues the next token before the host reads this one: the token is one
        graph (chained) and the embedding table and lm_head are on the device."""
        return (self._chained and self.m.embed.device == self.dev
                and self.m.lm_head.device == self.dev)

    @torch.inference_mode()
    def stream(self, token: int, n: int, select) -> Iterator[int]:
        """Decode from `token` at position cache.length; yields the n tokens that follow, each
        chosen on the device by select(logits [V] f32, i) -> the i-th token id, a long tensor of
        one element on the logits' device (made without reading anything back to the host).
        Run-ahead (can_run_ahead): token i+1's work is enqueued before the host reads token i,
        so the host's launch and its caller's work overlap the device's; otherwise step() a
        token at a time. Closing the generator early waits for the token in flight, whose
        position stays in the cache (cache.length counts it)."""
        if not self.can_run_ahead:
            yield from step_stream(self.step, token, n, select)
            return
        pending: list[int] = []           # ring slots of tokens enqueued and not yet read
        self.tok.fill_(token)
        try:
            for i in range(n):
                p = self.cache.length
                if p >= self.C:
                    raise RuntimeError("graph decoder: the static cache is full")
                self.pos.fill_(p)
                self._enqueue_token()
                self.cache.length = p + 1
                self.tok.copy_(select(self.logits, i).reshape(1))     # the next input, on the device
                slot = i % 2
                self.tok_host[slot:slot + 1].copy_(self.tok, non_blocking=True)   # D2H
                self._mark(self._ev_tok[slot])
                pending.append(slot)
                if len(pending) == 2:
                    yield self._read_token(pending.pop(0))
            while pending:
                yield self._read_token(pending.pop(0))
        finally:                          # closed early or failed: finish what is in flight
            while pending:
                self._read_token(pending.pop(0))

    def _read_token(self, slot: int) -> int:
        """The oldest token in flight (ring slot `slot`): wait for it (a sync; counted), end its
        chain (served by then: the device waited for every cold half of it)."""
        self._wait(self._ev_tok[slot])
        if self._chain is not None:
            try:
                self._chain.end()
            except Exception:
                self._chain.end(cancel=True)
                self._reset_flags()
                raise
        return int(self.tok_host[slot])

    @staticmethod
    def _join_chain(chain) -> None:
        """Block the host until the chain served the token's cold halves (a host-device
        synchronisation; counted)."""
        chain.end()
        SyncCounter.syncs += 1

    def _step_layers(self) -> None:
        """The per-layer host loop: replays, waits for the device, the cold halves in between."""
        for l in range(self.m.cfg.num_layers):
            if self._fused[l]:                  # one replay; a wait only when there are cold rows
                self._A[l]()
                cs = self._coldstep[l]
                if cs is not None:
                    self._wait(self._ev[l][1])
                    cs.run()
                continue
            ev_ids, ev_ready = self._ev[l]
            self._A[l]()
            synced = False
            if self.moe[l]:
                self._wait(self._mark(ev_ids))                      # the expert ids (and u)
                synced = True
                sel = tuple(sorted(self.ids_host[l].tolist()))
            else:
                sel = (-1,)
            P, H, cpu_pred = self._plan(l, sel)
            for call in P:
                call()
                synced = False
            ready = self._mark(ev_ready)                            # u and the GPU-made masks
            if cpu_pred:                                            # predictors kept on the CPU
                if not synced:
                    self._wait(ready)
                    synced = True
                for e in cpu_pred:
                    self.mask_host[(l, e)].copy_(host_active(self._fm[l][e].predictor, self.u_host[l])[0])
            for call in H:                                          # async on the GPU
                call()
            cs = self._coldstep[l]
            if cs is not None:                                      # else ycpu_host[l] stays 0
                if not synced:
                    self._wait(ready)                               # not the hot halves: overlap
                cs.run()

    # ---- capture ------------------------------------------------------------------------------
    def _segments(self):
        for l in range(self.m.cfg.num_layers):
            if self._fused[l]:
                yield ("A", l), self.seg_layer, (l,)
                continue
            yield ("A", l), self.seg_attn, (l,)
            fm = self._fm[l]
            for g in self._all_groups(l):
                if self.moe[l] and any((l, e) in self._gpu_pred for e in g):
                    yield ("P", l, g), self.seg_predict, (l, g)
                if any(not (isinstance(fm[e], HybridFFN) and fm[e].hot is None) for e in g):
                    yield ("H", l, g), self.seg_hot, (l, g)    # no hot rows: nothing to replay
        yield ("F",), self.seg_final, ()

    def _capture(self) -> None:
        """Warm up every segment on a side stream (Triton compiles, cuBLAS sets up), then capture
        each into a graph; all graphs share one memory pool (they never run concurrently).
        Chained: the segments, in token order, are ONE graph (no host step between layers: the
        launches of ~32 graphs were a fifth of the host's time a token)."""
        segs = self._segs
        side = torch.cuda.Stream(self.dev)
        side.wait_stream(torch.cuda.current_stream(self.dev))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(2):
                if self._chain is not None:      # chained segments wait for the cold halves
                    self._chain.begin()
                try:
                    for _, fn, args in segs:
                        fn(*args)
                finally:
                    if self._chain is not None:
                        self._chain.end()
        torch.cuda.current_stream(self.dev).wait_stream(side)
        torch.cuda.synchronize(self.dev)
        pool = None
        with torch.inference_mode():
            if self._chained:                   # _segments yields them in token order
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for _, fn, args in segs:
                        fn(*args)
                self._graphs[("T",)] = g
            else:
                for key, fn, args in segs:
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        fn(*args)
                    pool = g.pool() if pool is None else pool
                    self._graphs[key] = g
        self._clear()

    def _reset_flags(self) -> None:
        """Every flag back to 0 once the device is idle (after a failed chained step, and after
        warm-ups that signalled with no one serving)."""
        if self.dev.type == "cuda":
            torch.cuda.synchronize(self.dev)
        self.flags.zero_()

    def _clear(self) -> None:
        """The warm-ups wrote position 0: start clean."""
        self._reset_flags()
        for t in self.cache.k + self.cache.v:
            t.zero_()
        self.cache.length = 0
