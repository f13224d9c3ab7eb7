"""The decode step's bound native objects: one native call per layer and token over buffers
bound once (csrc/attention.h, cold_step.h, cold_chain.h). kernels.cpu holds the kernels these
call and their checking wrappers; here are the per-step objects built on them:

  AttnStep   a layer's attention half for one float32 token on the CPU (CPU-only decode)
  ColdStep   a layer's cold FFN half: the router's choice + masks -> cold-row ids -> fused FFNs
  ColdChain  the chained GPU decode step's service thread: ColdSteps run on device flags
  wait_flag  the host side of a device's wait on a ColdChain flag (the cpu device)
"""
from __future__ import annotations

import torch

from .cpu import PackedFFN, PackedLinear, _FMT_CODE, _act, _call, _f32, _native, _tensor


class AttnStep:
    """One decoder layer's attention half for one token (batch 1, float32), bound once to its
    weights and KV cache (csrc/attention.h): run(x [d], pos, lo, cos [hd], sin [hd], add=None)
    -> (x_out, h) with s = x (+ add), x_out = s + o(attention(rms_norm(s) * norm1)),
    h = rms_norm(x_out) * norm2; attention as attend_one (RoPE, k / v written at pos). One
    native call instead of four and the Python between them.
    qkv: q, k, v stacked (stacked_linears); k_cache / v_cache [1, KV, cap, hd] float32."""

    def __init__(self, norm1, qkv: PackedLinear, o: PackedLinear, norm2, eps: float,
                 k_cache, v_cache, n_heads: int):
        kc, vc = _f32(k_cache, "k_cache"), _f32(v_cache, "v_cache")
        if kc.dim() != 4 or kc.shape[0] != 1 or tuple(vc.shape) != tuple(kc.shape):
            raise ValueError(f"AttnStep: caches must be [1, KV, cap, hd], got {tuple(kc.shape)}, "
                             f"{tuple(vc.shape)}")
        _, KV, cap, hd = kc.shape
        d = qkv.in_features
        n1, n2 = _f32(norm1, "norm1", d), _f32(norm2, "norm2", d)
        if not (isinstance(qkv, PackedLinear) and isinstance(o, PackedLinear)):
            raise ValueError("AttnStep: qkv and o must be PackedLinear")
        self._keep = (n1, n2, qkv, o, kc, vc)
        self.d, self.hd, self.cap = d, hd, cap
        self._a = _call(_native().attn_step, n1.data_ptr(), qkv.code, d, qkv.out_features,
                        qkv.weight.data_ptr(), o.code, o.in_features, o.weight.data_ptr(),
                        n2.data_ptr(), float(eps), kc.data_ptr(), vc.data_ptr(), int(n_heads), KV,
                        hd, cap)

    def run(self, x: torch.Tensor, pos: int, lo: int, cos: torch.Tensor, sin: torch.Tensor,
            add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        for t in (x, add, cos, sin):
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu"):
                raise ValueError("AttnStep.run: tensors must be contiguous float32 on the CPU")
        if x.numel() != self.d or add is not None and add.numel() != self.d \
                or cos.numel() != self.hd or sin.numel() != self.hd:
            raise ValueError(f"AttnStep.run: x / add need {self.d} values, cos / sin {self.hd}")
        if not 0 <= lo <= pos < self.cap:
            raise ValueError(f"AttnStep.run: need 0 <= lo ({lo}) <= pos ({pos}) < capacity ({self.cap})")
        return self.run_trusted(x, pos, lo, cos, sin, add)

    def run_trusted(self, x, pos, lo, cos, sin, add=None):
        """run() without its checks, for a caller that made the inputs itself (the model's
        decode step: each check is microseconds of Python a layer on a small CPU)."""
        x_out, h = torch.empty(self.d), torch.empty(self.d)
        self._a.run(x.data_ptr(), 0 if add is None else add.data_ptr(), pos, lo, cos.data_ptr(),
                    sin.data_ptr(), x_out.data_ptr(), h.data_ptr())
        return x_out, h


class ColdStep:
    """One layer's cold half per decode step, bound once to static host buffers (the CUDA-graph
    decoder's pinned copies): run() reads the router's choice and each chosen expert's mask and
    writes y = sum over the chosen experts of weight * (their cold rows' FFN of x), all natively.

    ffns[e]: PackedFFN of expert e's compact cold rows, or None (no cold rows);
    neurons[e]: int [n_cold] neuron id of each cold row; masks[e]: bool [n_ff] or None (every
    cold row); slot_masks: bool [k, n_ff] instead, row s the mask of the s-th chosen expert
    (experts chosen on the device); sel int64 [k] / w float32 [k]: the router's buffers, or None for a dense layer
    (one FFN, weight 1); x float32 [d], y float32 [d]. The buffers must outlive this object
    (it keeps references to them)."""

    def __init__(self, ffns, neurons, masks, x, y, sel=None, w=None, act: str = "drelu",
                 threshold: float = 0.0, exact: bool = False, slot_masks=None):
        ffns, neurons, masks = list(ffns), list(neurons), list(masks)
        if slot_masks is not None:
            slot_masks = _tensor(slot_masks, "slot_masks")
            if (slot_masks.dtype != torch.bool or slot_masks.dim() != 2 or not slot_masks.is_contiguous()
                    or any(m is not None for m in masks)):
                raise ValueError("ColdStep: slot_masks must be a contiguous bool [k, n_ff] and "
                                 "replaces the per-expert masks (pass None for each)")
        if not ffns or not len(ffns) == len(neurons) == len(masks):
            raise ValueError("ColdStep: need one (ffn, neurons, mask) per expert")
        if sel is None and len(ffns) != 1:
            raise ValueError("ColdStep: a layer without a router has exactly one FFN")
        d = next((f.d_model for f in ffns if f is not None), None)
        x, y = _tensor(x, "x"), _tensor(y, "y")
        for name, t in (("x", x), ("y", y)):
            if t.dtype != torch.float32 or not t.is_contiguous() or d is not None and t.numel() != d:
                raise ValueError(f"ColdStep: {name} must be contiguous float32 [{d}]")
        d = x.numel()
        k = 1
        if sel is not None:
            sel, w = _tensor(sel, "sel"), _tensor(w, "w")
            if sel.dtype != torch.int64 or w.dtype != torch.float32 or sel.numel() != w.numel() \
                    or not (sel.is_contiguous() and w.is_contiguous()):
                raise ValueError("ColdStep: sel must be int64 [k] and w float32 [k], contiguous")
            k = sel.numel()
        if slot_masks is not None and slot_masks.shape[0] != k:
            raise ValueError(f"ColdStep: slot_masks has {slot_masks.shape[0]} rows for {k} slots")
        keep = [x, y, sel, w, slot_masks]
        fmts, n_colds, gates, ups, downs, nptr, mptr = [], [], [], [], [], [], []
        for e, (f, nr, m) in enumerate(zip(ffns, neurons, masks)):
            if f is None:
                for lst in (n_colds, gates, ups, downs, nptr, mptr):
                    lst.append(0)
                fmts.append(-1)
                continue
            if not isinstance(f, PackedFFN) or f.d_model != d:
                raise ValueError(f"ColdStep: expert {e}: expected a PackedFFN with d_model {d}")
            nr = _tensor(nr, f"neurons[{e}]").to(torch.int32).contiguous()
            if nr.numel() != f.n_ff:
                raise ValueError(f"ColdStep: expert {e}: {nr.numel()} neuron ids for {f.n_ff} cold rows")
            if m is not None:
                m = _tensor(m, f"masks[{e}]")
                if m.dtype != torch.bool or not m.is_contiguous():
                    raise ValueError(f"ColdStep: masks[{e}] must be a contiguous bool tensor")
                if nr.numel() and (int(nr.min()) < 0 or int(nr.max()) >= m.numel()):
                    raise ValueError(f"ColdStep: expert {e}: neuron ids outside the mask's {m.numel()}")
            keep += [f, nr, m]
            fmts.append(_FMT_CODE[f.fmt])
            n_colds.append(f.n_ff)
            gates.append(f.gate.data_ptr())
            ups.append(f.up.data_ptr())
            downs.append(f.down_t.data_ptr())
            nptr.append(nr.data_ptr())
            mptr.append(0 if m is None else m.data_ptr())
        self._keep = keep
        self.y = y
        self._c = _call(_native().cold_step, fmts, d, n_colds, gates, ups, downs, nptr, mptr,
                        0 if sel is None else sel.data_ptr(), 0 if w is None else w.data_ptr(),
                        k, x.data_ptr(), y.data_ptr(), _act(act), float(threshold), bool(exact),
                        0 if slot_masks is None else slot_masks.data_ptr(),
                        0 if slot_masks is None else slot_masks.shape[1])

    def run(self) -> None:
        """One step: one native call (GIL released) over the bound buffers."""
        self._c.run()

    @property
    def last_rows(self) -> int:
        """Cold rows the last run() computed (all chosen experts)."""
        return self._c.last_rows()


def _flag(t: torch.Tensor, name: str) -> int:
    """The address of a one-element int32 host tensor (a view into a flag array)."""
    t = _tensor(t, name)
    if t.dtype != torch.int32 or t.numel() != 1:
        raise ValueError(f"{name}: expected one int32 element of host memory")
    return t.data_ptr()


class ColdChain:
    """A decode step's cold halves served by a native host thread while the device runs ahead
    (csrc/cold_chain.h): for link i, the device sets ready[i] = 1 once ColdStep i's inputs are
    on the host; the thread resets it, runs the step and sets done[i] = 1, which the device
    waits for (and resets) before it reads the step's y. begin() starts a token (at most two in
    flight: a run-ahead decode begins token t+1 before it ends token t), end() waits for all the
    links of the oldest token in flight and raises its first error (RuntimeError / ValueError);
    after an error the caller must bring the flags back to 0 once the device is idle.

    steps: ColdStep [n]; ready, done: int32 one-element views of host memory [n] each
    (page-locked where a GPU writes/reads them). Class-level totals for benchmarks: busy_s
    (seconds inside the steps), waits (flags waited for), summed over every chain at end()."""

    busy_s = 0.0
    waits = 0

    def __init__(self, steps, ready, done, timeout: float = 10.0):
        steps, ready, done = list(steps), list(ready), list(done)
        if not steps or not len(steps) == len(ready) == len(done):
            raise ValueError("ColdChain: need one ready and one done flag per step")
        if not all(isinstance(s, ColdStep) for s in steps):
            raise ValueError("ColdChain: steps must be ColdStep objects")
        d = steps[0].y.numel()
        if any(s.y.numel() != d for s in steps):
            raise ValueError("ColdChain: the steps differ in d_model")
        self._keep = (steps, ready, done)
        self._c = _call(_native().cold_chain, [s._c for s in steps],
                        [_flag(t, "ready") for t in ready], [_flag(t, "done") for t in done],
                        [s.y.data_ptr() for s in steps], d, float(timeout))
        self._seen = (0.0, 0)

    def begin(self) -> None:
        self._c.begin()

    def end(self, cancel: bool = False) -> None:
        """Wait for the oldest token's links (GIL released); cancel: end every token in flight,
        not waiting for flags the device will not set (the rest get a zero y and done = 1);
        errors are then not raised."""
        try:
            self._c.end(bool(cancel))
        finally:
            busy, waits = self._c.busy_s(), self._c.waits()
            ColdChain.busy_s += busy - self._seen[0]
            ColdChain.waits += waits - self._seen[1]
            self._seen = (busy, waits)


def wait_flag(flag: torch.Tensor, timeout: float = 10.0, reset: bool = True) -> bool:
    """Spin (GIL released) until the int32 host element `flag` is 1; then set it to 0 when
    reset. False when `timeout` seconds pass first. The host side of a device's wait on a
    ColdChain's done flag (the cpu device runs the segments on the calling thread)."""
    return bool(_call(_native().wait_flag, _flag(flag, "flag"), float(timeout), bool(reset)))
