"""The GPU half of a hybrid FFN: the hot rows of one FFN (or expert), compact, on the GPU side.

"GPU side" is a torch.device: cuda on a GPU machine, cpu in CI, so the same code is tested
everywhere. One token on CUDA runs the Triton kernels of kernels/triton_ffn over the packed rows;
batches (prefill) dequantise (`dequant`: q4_0 on CUDA in one Triton pass, else quant.unpack) and
use matmuls. q8_0 rows are in GGUF layout; q4_0 rows in the GPU row layout of kernels/triton_ffn
(the same bytes permuted: all nibble bytes, then all scales; q4_rows_to_gpu / q4_rows_from_gpu),
which HotFFN.build repacks them into.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .. import quant
from . import pinned
from ..footprint import LINEAR_FORMATS, ffn_rows_bytes

_FLOAT = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def q4_rows_to_gpu(p: torch.Tensor) -> torch.Tensor:
    """GGUF q4_0 rows uint8 [n, nb*18] -> the GPU row layout [n, nb*16 nibble bytes | nb*2 scale
    bytes] (same bytes, same size; any device)."""
    blk = p.reshape(p.shape[0], p.shape[1] // 18, 18)                    # [n, nb, 18]
    n, nb = blk.shape[:2]
    return torch.cat([blk[..., 2:].reshape(n, nb * 16), blk[..., :2].reshape(n, nb * 2)],
                     dim=1).contiguous()


def q4_rows_from_gpu(p: torch.Tensor) -> torch.Tensor:
    """The inverse of q4_rows_to_gpu: GPU row layout -> GGUF q4_0 rows."""
    n, nb = p.shape[0], p.shape[1] // 18
    qs, d = p[:, :nb * 16].reshape(n, nb, 16), p[:, nb * 16:].reshape(n, nb, 2)
    return torch.cat([d, qs], dim=2).reshape(n, nb * 18).contiguous()


@dataclass(frozen=True, eq=False)
class FFNRows:
    """Compact rows of one FFN the GPU side computes (HotFFN: in its memory; WarmRows: read over
    PCIe): gate, up, down_t [n, d] in a float dtype, or uint8 [n, row_bytes] packed rows; ids int32
    [n] the neuron id of each row. GPU_LAYOUT: packed q4_0 rows are in the GPU row layout (else
    GGUF's)."""
    fmt: str
    d_model: int
    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor
    ids: torch.Tensor
    GPU_LAYOUT: ClassVar[bool] = True

    @property
    def n_hot(self) -> int:
        return int(self.ids.numel())

    def _weights(self, dtype):
        """gate, up, down_t as ONE float tensor [3, n, d] in dtype (batches: prefill's matmuls;
        the cpu device): block formats dequantised; float rows as they are (stacked(): a view,
        no copy where the dtype matches)."""
        if self.gate.dtype != torch.uint8:
            return self.stacked().to(dtype)
        return ffn_matrices([(self.stacked(), self.fmt, self.GPU_LAYOUT)], self.d_model, dtype)

    def stacked(self) -> torch.Tensor:
        """gate, up, down_t as one tensor [3, n, row]: a view where they share one allocation
        (HotFFN.to makes them so), else a stacked copy."""
        st = quant.stacked3(self.gate, self.up, self.down_t)
        return st if st is not None else torch.stack([self.gate, self.up, self.down_t])


@dataclass(frozen=True, eq=False)
class HotFFN(FFNRows):
    """The hot rows, on the device: float rows in a float dtype, or uint8 rows for q8_0/q4_0;
    ids sorted. Constructed from quant.pack rows (GGUF layout); q4_0 rows are held in the GPU
    row layout (repacked in __post_init__)."""

    def __post_init__(self):
        if self.fmt == "q4_0":      # a permutation of the same bytes: nbytes is unchanged
            for name in ("gate", "up", "down_t"):
                object.__setattr__(self, name, q4_rows_to_gpu(getattr(self, name)))

    def to(self, device) -> "HotFFN":
        """The same rows on `device`, not repacked again. Build on the CPU, then move: a repack
        on the device makes a transient copy of every matrix, and those holes fragmented a full
        VRAM budget (M47 at 16 GiB: out of memory with 0.75 GB reserved but unallocated)."""
        h = object.__new__(HotFFN)
        for name in ("fmt", "d_model", "ids"):
            v = getattr(self, name)
            object.__setattr__(h, name, v.to(device) if isinstance(v, torch.Tensor) else v)
        # the three matrices in one allocation [3, n, row] (same bytes): a prefill dequantises
        # them in one launch (stacked())
        st = torch.empty((3, *self.gate.shape), dtype=self.gate.dtype, device=device)
        for i, name in enumerate(("gate", "up", "down_t")):
            st[i].copy_(getattr(self, name))
            object.__setattr__(h, name, st[i])
        return h

    @property
    def nbytes(self) -> int:
        """What this object holds on the device: must equal footprint.ffn_rows_bytes."""
        return sum(t.numel() * t.element_size() for t in (self.gate, self.up, self.down_t, self.ids))

    @classmethod
    def build(cls, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, ids, fmt: str,
              device: torch.device) -> "HotFFN":
        """w1, w3 [n_ff, d], w2 [d, n_ff] (CPU, any float dtype); ids: the hot neuron ids."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        d = w1.shape[1]

        def rows(w):  # [n_hot, d] in fmt (CPU; repacked there, moved once: HotFFN.to)
            if fmt in _FLOAT:
                return w.to(_FLOAT[fmt]).contiguous()
            return quant.pack(w, fmt)

        h = cls(fmt, d, rows(w1[ids]), rows(w3[ids]), rows(w2[:, ids].t()),
                ids.to(torch.int32)).to(device)
        expect = ffn_rows_bytes(h.n_hot, d, fmt)
        if h.nbytes != expect:  # the planner budgets with footprint: the two must agree exactly
            raise AssertionError(f"HotFFN holds {h.nbytes} bytes, footprint says {expect}")
        return h


@dataclass(frozen=True, eq=False)
class WarmRows(FFNRows):
    """The warm tier of one FFN (or expert): the first n_warm rows of its cold PackedFFN (views,
    no copy: packed GGUF layout, in page-locked host memory), which the GPU reads in place over
    PCIe (zero-copy, UVA addresses) during decode while the CPU computes the other cold rows;
    ids int32 [n_warm] their neuron ids, on the device (the kernels' mask lookups). Computed by
    HotSlots (gguf=True) and hot_ffn (the cpu device: torch over the dequantised rows)."""
    GPU_LAYOUT: ClassVar[bool] = False

    @classmethod
    def of(cls, ffn, device) -> "WarmRows | None":
        """ffn: a HybridFFN; None when it has no warm rows."""
        if not ffn.n_warm:
            return None
        c = ffn.cold.rows(0, ffn.n_warm)
        ids = ffn.cold_ids[:ffn.n_warm].to(torch.int32).to(device)
        return cls(c.fmt, c.d_model, c.gate, c.up, c.down_t, ids)

    @staticmethod
    def usable(ffns: list, device) -> bool:
        """Whether the GPU can read these FFNs' warm rows in place: on cuda, q4_0 rows (the only
        GGUF layout the Triton kernels read) in page-locked memory (pin_host can be refused:
        then the CPU keeps them); the cpu device always (CI runs the same logic there)."""
        warm = [f for f in ffns if f is not None and f.n_warm]
        if not warm or torch.device(device).type != "cuda":
            return bool(warm)
        return _triton() is not None and all(
            f.cold.fmt == "q4_0" and all(pinned.page_locked(t) for t in (f.cold.gate, f.cold.up, f.cold.down_t))
            for f in warm)



class HotSlots:
    """The hot halves of one MoE layer's experts with the experts chosen on the device (the
    graph decoder's fused layer: no host round trip between the router and the hot halves).
    gguf: the rows are WarmRows (GGUF layout, read over PCIe from host memory), not HotFFN.
    run(x, sel, w, masks, y): y [1, d] f32 += sum over slots s of w[s] * hot_ffn(hots[sel[s]], x)
    with expert sel[s]'s rows masked by masks[s] (bool [k, n_ff] over neurons, or None: all).
    CUDA: two Triton launches for all slots (address tables, triton_ffn.RowTable); elsewhere
    (the cpu device, how CI tests the decoder) a loop over the slots with hot_ffn."""

    def __init__(self, hots: list, k: int, activation: str, threshold: float, device,
                 gguf: bool = False):
        if not HotSlots.supported(hots, device):
            raise ValueError("HotSlots: no device-selected kernels for these rows here")
        self.hots, self.act, self.thr = hots, activation, threshold
        real = [h for h in hots if h is not None]
        self.empty = not real
        self.fmt = real[0].fmt if real else None
        self.tk = None
        if real and torch.device(device).type == "cuda":
            self.tk = _triton()
            d = self.d = real[0].d_model
            rows = lambda name: [None if h is None else getattr(h, name) for h in hots]
            self.gt, self.ut, self.dt = (self.tk.RowTable.build(self.fmt, d, rows(n), device, gguf)
                                         for n in ("gate", "up", "down_t"))
            self.it = self.tk.RowTable.build(None, d, [None if h is None else h.ids for h in hots], device)
            self.a = torch.zeros(k, self.gt.n_max, device=device)     # activations per slot

    @staticmethod
    def supported(hots: list, device) -> bool:
        """Whether these experts' hot halves can run device-selected on `device`."""
        real = [h for h in hots if h is not None]
        if not real or torch.device(device).type != "cuda":
            return True
        tk = _triton()
        return tk is not None and tk.supported(real[0].fmt) and len({h.fmt for h in real}) == 1

    def run(self, x: torch.Tensor, sel: torch.Tensor, w: torch.Tensor, masks: torch.Tensor | None,
            y: torch.Tensor) -> None:
        if self.empty:
            return
        if self.tk is not None:
            self.tk.gate_up_slots(self.fmt, self.d, self.gt, self.ut, self.it, x[0], self.act,
                                  self.thr, masks, sel, self.a)
            self.tk.down_slots(self.fmt, self.d, self.dt, self.a, self.a.shape[1], y[0], 0, sel, w)
            return
        for s, e in enumerate(sel.tolist()):                     # the cpu device: no sync
            h = self.hots[e]
            if h is None:
                continue
            m = None if masks is None else masks[s][h.ids.long()]
            y.add_(hot_ffn(h, x, self.act, self.thr, m).float() * w[s])


def dequant(rows: torch.Tensor, fmt: str, d: int, dtype: torch.dtype,
            gpu_layout: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed rows uint8 [n, row_bytes] (or float rows [n, d]) -> [n, d] in dtype, on rows'
    device; written into `out` when given (a contiguous [n, d] slice: prefill assembles one
    matrix from several row sets). q4_0 on CUDA: one Triton pass (kernels.triton_dequant);
    otherwise quant.unpack. gpu_layout: q4_0 rows in the GPU row layout (HotFFN), else GGUF's
    (PackedFFN)."""
    if rows.dtype != torch.uint8:                      # float rows: a cast
        w = rows.to(dtype)
    elif fmt == "q4_0" and rows.is_cuda and _triton() is not None:
        from .triton_dequant import dequant_q4_0
        return dequant_q4_0(rows, d, "gpu" if gpu_layout else "gguf", dtype, out=out)
    else:
        w = quant.unpack(q4_rows_from_gpu(rows) if fmt == "q4_0" and gpu_layout else rows, fmt, d).to(dtype)
    return w if out is None else out.copy_(w)


def ffn_matrices(parts: list, d: int, dtype: torch.dtype) -> torch.Tensor:
    """An FFN's gate, up and down_t from row sets -> float [3, n, d] in dtype: each part
    (rows [3, n_i, row_bytes] (or float [3, n_i, d]), fmt, gpu_layout) contributes its rows, in
    order (row order does not matter to an FFN); the parts may differ in format (hot rows bf16
    on the GPU, cold rows q4_0 from the CPU). All q4_0 on CUDA, at most two parts: one Triton
    launch (prefill: the hot rows and the streamed cold rows of an expert)."""
    dev = parts[0][0].device
    n = sum(r.shape[1] for r, _, _ in parts)
    if (dev.type == "cuda" and len(parts) <= 2 and _triton() is not None
            and all(f == "q4_0" and r.dtype == torch.uint8 for r, f, _ in parts)):
        from .triton_dequant import dequant_q4_0
        (a, _, ga), (b, _, gb) = parts[0], parts[-1]
        return dequant_q4_0(a, d, "gpu" if ga else "gguf", dtype, rows_b=b if len(parts) == 2 else None,
                            layout_b="gpu" if gb else "gguf")
    out = torch.empty(3, n, d, dtype=dtype, device=dev)
    start = 0
    for rows, fmt, gpu_layout in parts:
        for k in range(3):
            dequant(rows[k], fmt, d, dtype, gpu_layout=gpu_layout, out=out[k, start:start + rows.shape[1]])
        start += rows.shape[1]
    return out


def _triton():
    """The Triton kernels when they can run here (CUDA and triton importable), else None."""
    try:
        from . import triton_ffn
    except ImportError:
        return None
    return triton_ffn


def hot_ffn(h: HotFFN, x: torch.Tensor, activation: str, threshold: float = 0.0,
            mask: torch.Tensor | None = None, use_triton: bool | None = None) -> torch.Tensor:
    """x [n, d] -> y [n, d]: sum over hot rows j of mask_j * a_j(x) * W2[:, ids_j].

    mask: bool [n_hot] (rows to keep) or None (all). One dispatch: a single token on CUDA goes
    to the Triton gather-GEMV / transposed-axpy kernels (masked and zero rows never read);
    batches (prefill) and the cpu device use torch matmuls over the compact rows."""
    from ..ffn import gated_rows
    if use_triton is None:
        use_triton = x.is_cuda and x.shape[0] == 1
    tk = _triton() if use_triton else None
    if tk is not None and tk.supported(h.fmt):
        y = tk.hot_ffn_one_token(h.fmt, h.d_model, h.gate, h.up, h.down_t, x[0], activation,
                                 threshold, mask)
        return y.to(x.dtype)[None]
    return gated_rows(x, h._weights(x.dtype), activation, threshold, mask)


# ---- dense linear layers in a block format on the GPU side (attention projections, lm_head) ----

@dataclass(frozen=True, eq=False)
class DeviceLinear(quant.PackedRows):
    """A dense linear layer's weight kept on the GPU side in a block format, as llama.cpp keeps
    a q4_0 model's attention: weight uint8 [out_features, row_bytes(in_features)], row r = W[r, :]
    of nn.Linear's W [out, in], q4_0 in the GPU row layout (HotFFN's). 0.56 bytes a weight
    instead of bf16's 2: decode reads attention and lm_head every token. Computed by
    `device_linear`."""
    fmt: str
    in_features: int
    out_features: int
    weight: torch.Tensor

    def __post_init__(self):
        if self.fmt not in LINEAR_FORMATS:
            raise ValueError(f"DeviceLinear holds {LINEAR_FORMATS}, not {self.fmt!r}")
        rb = quant.row_bytes(self.in_features, self.fmt)
        t = self.weight
        if t.dtype != torch.uint8 or tuple(t.shape) != (self.out_features, rb) or not t.is_contiguous():
            raise ValueError(f"DeviceLinear.weight: expected contiguous uint8 [{self.out_features}, {rb}], "
                             f"got {t.dtype} {tuple(t.shape)}")

    @classmethod
    def from_weight(cls, w: torch.Tensor, fmt: str, device) -> "DeviceLinear":
        """w [out, in] float (any device: packed where it is, then moved) -> on `device`."""
        if w.dim() != 2:
            raise ValueError(f"DeviceLinear.from_weight: expected w [out, in], got {tuple(w.shape)}")
        rows = quant.pack(w, fmt, device=w.device)      # repacked where it is, moved once
        return cls(fmt, w.shape[1], w.shape[0], q4_rows_to_gpu(rows).to(device))


def stacked_linears(parts: list, in_features: int, fmt: str,
                    device) -> tuple[DeviceLinear, list[DeviceLinear]]:
    """q, k, v in ONE DeviceLinear, each a view of its rows (quant.PackedRows.stacked): one GEMV
    launch reads all three (k and v alone are too few rows to fill the GPU: 0.15 of its copy
    bandwidth at 1024 x 4096). get() may return a host or device weight."""
    whole = torch.empty(sum(n for _, n in parts), quant.row_bytes(in_features, fmt),
                        dtype=torch.uint8, device=device)
    return DeviceLinear.stacked(parts, in_features, fmt, whole,
                                lambda w: DeviceLinear.from_weight(w, fmt, device).weight)


def device_linear(x: torch.Tensor, m: DeviceLinear) -> torch.Tensor:
    """x [..., in] -> [..., out] = x W^T in x's dtype. One row on CUDA: the Triton GEMV over the
    packed rows (a custom op, so torch.compile and CUDA graphs take it whole); more rows
    (prefill) or the cpu device: W dequantised once for the call, then a matmul."""
    lead = x.shape[:-1]
    if x.is_cuda and x.numel() == m.in_features and _triton() is not None:
        y = torch.ops.hybridinfer.matvec_q4(m.weight, x.reshape(-1).contiguous(), m.in_features)
        return y.to(x.dtype).view(*lead, m.out_features)
    w = dequant(m.weight, m.fmt, m.in_features, x.dtype, gpu_layout=True)
    return F.linear(x, w)


@torch.library.custom_op("hybridinfer::matvec_q4", mutates_args=())
def _matvec_q4(w: torch.Tensor, x: torch.Tensor, d: int) -> torch.Tensor:
    """float32 [n] = w x: q4_0 rows w [n, d/32*18] (GPU row layout), x [d]."""
    return _triton().matvec("q4_0", d, w, x)


@_matvec_q4.register_fake
def _(w: torch.Tensor, x: torch.Tensor, d: int) -> torch.Tensor:
    return w.new_empty(w.shape[0], dtype=torch.float32)


def route_one(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple | None:
    """One token's MoE routing (ffn.route's arithmetic) in one Triton launch on CUDA: x [1, d],
    router [E, d] -> (w [1, k] in x's dtype, ids [1, k] int64); a custom op, so torch.compile
    and CUDA graphs take it whole. None where it cannot run (then ffn.route computes it)."""
    if not x.is_cuda or x.shape[0] != 1 or x.dtype != router.dtype or _triton() is None:
        return None
    from .triton_route import MAX_EXPERTS        # imports triton: only where it can run
    if router.shape[0] > MAX_EXPERTS:
        return None
    return torch.ops.hybridinfer.route_one(x, router, k)


@torch.library.custom_op("hybridinfer::route_one", mutates_args=())
def _route_one(x: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_route import route_one
    return route_one(x, router, k)


@_route_one.register_fake
def _(x, router, k):
    return x.new_empty(1, k), x.new_empty(1, k, dtype=torch.int64)


def attend_cached(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, pos: torch.Tensor,
                  kpos: torch.Tensor, window: int) -> torch.Tensor:
    """One token's GQA attention over a static cache: q [1, H, 1, hd] (RoPE applied), K, V
    [1, KV, C, hd] with this token's row written, pos int64 [1] (device), kpos = arange(C);
    live positions (pos - window, pos] (window 0: [0, pos]). -> y [1, H * hd] in q's dtype.
    CUDA: the position-split Triton kernels (kernels/triton_attention.py, a custom op so that
    torch.compile and CUDA graphs take it whole), which read only the live positions; else (or
    HYBRIDINFER_TORCH_ATTN=1) masked matmuls over all C positions."""
    _, H, _, hd = q.shape
    KV = K.shape[1]
    if q.is_cuda and _triton() is not None and os.environ.get("HYBRIDINFER_TORCH_ATTN", "") in ("", "0"):
        y = torch.ops.hybridinfer.decode_attn(q.reshape(H, hd), K[0], V[0], pos, int(window),
                                              hd ** -0.5)
        return y.reshape(1, H * hd)
    ok = kpos <= pos                                                                   # [C]
    if window:
        ok = ok & (kpos > pos - window)
    qg = q.view(KV, H // KV, hd)
    sc = torch.matmul(qg, K[0].transpose(1, 2)).float() / math.sqrt(hd)               # [KV, rep, C]
    sc = sc.masked_fill(~ok, float("-inf"))
    y = torch.matmul(torch.softmax(sc, dim=-1).to(q.dtype), V[0])                     # [KV, rep, hd]
    return y.reshape(1, H * hd)


@torch.library.custom_op("hybridinfer::decode_attn", mutates_args=())
def _decode_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                 window: int, scale: float) -> torch.Tensor:
    """[H, hd] in q's dtype: triton_attention.decode_attention (q [H, hd], k, v [KV, C, hd])."""
    from .triton_attention import decode_attention
    return decode_attention(q.contiguous(), k.contiguous(), v.contiguous(), pos, window, scale)


@_decode_attn.register_fake
def _(q, k, v, pos, window, scale):
    return q.new_empty(q.shape)


# ---- host <-> device traffic of the hybrid split: pinned buffers, one sync per copy-out ---------

def flag_signal(flag: torch.Tensor, device: torch.device) -> None:
    """`device` sets the host int32 `flag` (one element of page-locked memory) to 1, in stream
    order (kernels/triton_flags.py); on the cpu device the calling thread stores it."""
    if device.type == "cuda":
        from . import triton_flags
        triton_flags.signal(flag.data_ptr())
    else:
        flag.fill_(1)


def flag_await(flag: torch.Tensor, device: torch.device, timeout: float = 60.0) -> None:
    """`device` waits until the host int32 `flag` is 1, then resets it to 0 (on cuda: a kernel
    in stream order, the host never blocks; on the cpu device the calling thread spins)."""
    if device.type == "cuda":
        from . import triton_flags
        triton_flags.await_(flag.data_ptr())
        return
    from . import cpu_step
    if not cpu_step.wait_flag(flag, timeout):
        raise RuntimeError(f"flag_await: no signal within {timeout} s")


class SyncCounter:
    """Counts the host-device synchronisations the runtime makes (reported by benchmarks)."""
    syncs = 0


def to_host(*ts: torch.Tensor) -> list[torch.Tensor]:
    """Copy device tensors into pinned host memory with ONE synchronisation (D2H).
    Tensors already on the CPU pass through; with none on a GPU: no copy, no sync."""
    dev = next((t.device for t in ts if t.device.type != "cpu"), None)
    if dev is None:
        return list(ts)
    outs = []
    for t in ts:
        if t.device.type == "cpu":
            outs.append(t)
            continue
        o = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        o.copy_(t, non_blocking=True)
        outs.append(o)
    torch.cuda.current_stream(dev).synchronize()
    SyncCounter.syncs += 1
    return outs


def to_device(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host -> device without blocking the host (through a pinned staging buffer)."""
    if device.type == "cpu":
        return t.to(dtype)
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    pinned.copy_(t)
    return pinned.to(device, non_blocking=True).to(dtype)
