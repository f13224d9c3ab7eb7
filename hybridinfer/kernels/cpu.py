"""CPU sparse FFN kernels: a thin, checking wrapper over the native module hybridinfer._C.

Everything here validates its inputs (dtype, device, contiguity, shapes) and passes raw data
pointers to C++; ids are checked natively (range, duplicates). Any bad input raises ValueError
with one line saying what is wrong. Native calls release the GIL and run on a persistent thread
pool (set_num_threads). Results come back as torch tensors for torch inputs, numpy for numpy.

Activations (g = W1 x, u = W3 x):
  "drelu"   relu(g) * relu(u)                  (TurboSparse)
  "relu"    relu(g) * u                        (ReLU-gated, ReluLLaMA)
  "fatrelu" g * u where g > threshold, else 0  (ProSparse; "relu" is fatrelu at threshold 0)
  "silu"    silu(g) * u                        (SwiGLU; never zero, so exact == dense work)
`threshold` is used by "fatrelu" only.

exact=False reads all three rows of every given id (a fixed cost: what the benchmark measures).
exact=True computes the gate for every given id, then up only where the gate can fire and down
only where the activation is non-zero: the same result, fewer bytes.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np
import torch

from .. import quant

try:
    from .. import _C
except ImportError as e:  # pragma: no cover - only without a build
    _C = None
    _IMPORT_ERROR = e

ACTIVATIONS = {"drelu": 0, "relu": 1, "fatrelu": 2, "silu": 3}
_FMT_CODE = {f: i for i, f in enumerate(quant.FORMATS)}  # matches hi::Fmt in csrc/kernels.h
_GROUPED_CODE = len(quant.FORMATS)                         # hi::Fmt::Q4_0G (PackedLinear.grouped)


def _native():
    if _C is None:
        raise ImportError(f"hybridinfer._C is not built: {_IMPORT_ERROR}")
    return _C


def _tensor(a, name: str) -> torch.Tensor:
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, torch.Tensor):
        raise ValueError(f"{name}: expected a torch tensor or numpy array, got {type(a).__name__}")
    if a.device.type != "cpu":
        raise ValueError(f"{name}: must be on the CPU, got device {a.device}")
    return a


@dataclass(frozen=True, eq=False)
class PackedFFN:
    """One FFN (or MoE expert) packed for the CPU kernels; one neuron = one row in all three.

    gate [n_ff, rb] = pack(W1), up [n_ff, rb] = pack(W3), down_t [n_ff, rb] = pack(W2.T),
    rb = quant.row_bytes(d_model, fmt). Built once; calls never copy weights.
    """
    fmt: str
    d_model: int
    n_ff: int
    gate: torch.Tensor
    up: torch.Tensor
    down_t: torch.Tensor

    def __post_init__(self):
        if self.fmt not in quant.FORMATS:
            raise ValueError(f"unknown weight format {self.fmt!r}; expected one of {quant.FORMATS}")
        rb = quant.row_bytes(self.d_model, self.fmt)
        for name in ("gate", "up", "down_t"):
            t = _tensor(getattr(self, name), f"PackedFFN.{name}")
            object.__setattr__(self, name, t)
            if t.dtype != torch.uint8 or tuple(t.shape) != (self.n_ff, rb) or not t.is_contiguous():
                raise ValueError(f"PackedFFN.{name}: expected contiguous uint8 [{self.n_ff}, {rb}] "
                                 f"({self.fmt}, d_model={self.d_model}), got {t.dtype} "
                                 f"{tuple(t.shape)}{'' if t.is_contiguous() else ' non-contiguous'}")

    @classmethod
    def from_weights(cls, w1, w3, w2, fmt: str) -> "PackedFFN":
        """w1, w3: [n_ff, d_model]; w2: [d_model, n_ff] (nn.Linear layouts)."""
        w1, w3, w2 = (_tensor(w, n) for w, n in ((w1, "w1"), (w3, "w3"), (w2, "w2")))
        n_ff, d = w1.shape
        if tuple(w3.shape) != (n_ff, d) or tuple(w2.shape) != (d, n_ff):
            raise ValueError(f"from_weights: expected w1, w3 [n_ff, d] and w2 [d, n_ff], got "
                             f"{tuple(w1.shape)}, {tuple(w3.shape)}, {tuple(w2.shape)}")
        rows = _alloc3(n_ff, quant.row_bytes(d, fmt))
        for i, w in enumerate((w1, w3, w2.t())):
            rows[i] = quant.pack(w, fmt)
        return cls(fmt, d, n_ff, *rows.unbind(0))

    def take(self, ids: torch.Tensor) -> "PackedFFN":
        """Rows ids (int64, in that order) copied into one allocation as from_weights makes it
        (huge pages, gate / up / down_t as thirds: stacked()): e.g. the benchmark's cold rows."""
        rows = _alloc3(ids.numel(), self.gate.shape[1])
        for i, t in enumerate((self.gate, self.up, self.down_t)):
            torch.index_select(t, 0, ids, out=rows[i])
        return PackedFFN(self.fmt, self.d_model, ids.numel(), *rows.unbind(0))

    @property
    def nbytes(self) -> int:
        return 3 * self.gate.numel()

    def stacked(self) -> torch.Tensor | None:
        """gate, up, down_t as one [3, n_ff, rb] view where they share one allocation
        (from_weights makes them so), else None."""
        return quant.stacked3(self.gate, self.up, self.down_t)

    def rows(self, start: int, stop: int | None = None) -> "PackedFFN":
        """Rows [start, stop) as a PackedFFN of views (no copy): e.g. the cold rows after the
        warm tier, which the GPU reads instead."""
        stop = self.n_ff if stop is None else stop
        if not 0 <= start <= stop <= self.n_ff:
            raise ValueError(f"PackedFFN.rows: [{start}, {stop}) is outside 0..{self.n_ff}")
        return PackedFFN(self.fmt, self.d_model, stop - start, self.gate[start:stop],
                         self.up[start:stop], self.down_t[start:stop])


_HUGE_PAGE = 2 << 20


def alloc_weights(rows: int, row_bytes: int) -> torch.Tensor:
    """An uninitialised uint8 [rows, row_bytes] for packed weights, backed by transparent huge
    pages where the OS allows (madvise): a sparse id set touches rows all over the matrix, and
    with 4 KiB pages nearly every row costs a TLB miss per matrix. The matrix starts on a 2 MiB
    boundary (the mapping is 2 MiB longer, never touched beyond the matrix): an mmap's own start
    is only page-aligned and huge pages cover whole aligned 2 MiB, so 3.4 MB of a 9.4 MB
    attention matrix had sat on 4 KiB pages (benchmarks/linear_m7.py, 2 threads, separate
    processes: one cold 6144 x 4096 call 0.91-1.13 -> 0.74-0.80 ms; the 829 MB sweep 34.6-38.0 ->
    34.2-34.4 ms; the benchmark workload's FFN rows moved here too, a scratch A/B in one M7
    cpu-sparse decode: level)."""
    n = rows * row_bytes
    if n >= (8 << 20) and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            m = mmap.mmap(-1, n + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.madvise(mmap.MADV_HUGEPAGE)
            buf = torch.frombuffer(m, dtype=torch.uint8)     # (the view keeps the mapping)
            off = -buf.data_ptr() % _HUGE_PAGE
            return buf[off:off + n].view(rows, row_bytes)
        except (OSError, ValueError):
            pass
    return torch.empty(rows, row_bytes, dtype=torch.uint8)


def _alloc3(n: int, row_bytes: int) -> torch.Tensor:
    """uint8 [3, n, row_bytes] in one alloc_weights() allocation: an FFN's gate, up, down_t."""
    return alloc_weights(3 * n, row_bytes).view(3, n, row_bytes)


def to_weights(packed: torch.Tensor) -> torch.Tensor:
    """A copy of a packed matrix in alloc_weights() memory."""
    out = alloc_weights(*packed.shape)
    out.copy_(packed)
    return out


def _x2d(x, d: int, name: str = "x"):
    """x [d] or [b, d] float32 contiguous -> (2-D tensor, was_1d, was_numpy)."""
    was_np = isinstance(x, np.ndarray)
    t = _tensor(x, name)
    if t.dtype != torch.float32:
        raise ValueError(f"{name}: expected float32, got {t.dtype}")
    if t.dim() not in (1, 2) or t.shape[-1] != d:
        raise ValueError(f"{name}: expected shape [{d}] or [b, {d}], got {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: must be contiguous")
    one = t.dim() == 1
    t = t.reshape(1, d) if one else t
    if t.shape[0] < 1:
        raise ValueError(f"{name}: needs at least one token")
    return t, one, was_np


def _ids(ids, name: str = "ids") -> torch.Tensor:
    t = _tensor(ids, name)
    if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D int32/int64 tensor, got {t.dtype} {tuple(t.shape)}")
    if t.dtype == torch.int64 and t.numel():
        lo, hi = torch.aminmax(t)
        if int(lo) < -(2 ** 31) or int(hi) >= 2 ** 31:  # would wrap in int32
            raise ValueError(f"{name}: neuron id {int(hi) if int(hi) >= 2 ** 31 else int(lo)} "
                             f"is out of range")
    return t.to(torch.int32).contiguous()  # range and duplicates are checked natively


def _act(act: str) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; expected one of {tuple(ACTIVATIONS)}")
    return ACTIVATIONS[act]


def _out(y: torch.Tensor, one: bool, was_np: bool):
    y = y[0] if one else y
    return y.numpy() if was_np else y


def _call(fn, *args):
    try:
        return fn(*args)
    except ValueError as e:  # native checks (ids) -> one clear line
        raise ValueError(str(e)) from None


def ffn_sparse(ffn: PackedFFN, x, ids, act: str = "drelu", threshold: float = 0.0,
               exact: bool = False):
    """y = FFN(x) restricted to neurons `ids`: sum_i a_i(x) W2[:, i]. x [d] or [b, d] f32."""
    return ffn_sparse_multi([ffn], x, [ids], None, act, threshold, exact)


def ffn_sparse_multi(ffns, x, ids, scales=None, act: str = "drelu", threshold: float = 0.0,
                     exact: bool = False):
    """sum_e scales[e] * FFN_e(x)[ids[e]] in one native call (e.g. the cold half of top-2 MoE).

    scales: None (all 1), E floats, a tensor [E], or [E, b] / E tensors [b] (per-token weights).
    """
    ffns = list(ffns)
    ids = list(ids)
    if not ffns or len(ids) != len(ffns):
        raise ValueError(f"ffn_sparse_multi: need one id set per FFN, got {len(ffns)} FFNs and "
                         f"{len(ids)} id sets")
    for f in ffns:
        if not isinstance(f, PackedFFN):
            raise ValueError(f"expected PackedFFN, got {type(f).__name__}")
        if f.d_model != ffns[0].d_model:
            raise ValueError("all FFNs in one call must share d_model")
    d = ffns[0].d_model
    xt, one, was_np = _x2d(x, d)
    b, E = xt.shape[0], len(ffns)
    idt = [_ids(i, f"ids[{e}]") for e, i in enumerate(ids)]
    sc = None
    if scales is not None:
        if isinstance(scales, (list, tuple)):
            scales = [s if isinstance(s, torch.Tensor) else torch.as_tensor(np.asarray(s, np.float32))
                      for s in scales]
            scales = torch.stack([s.to(torch.float32).reshape(-1) for s in scales])
        s = _tensor(scales, "scales").to(torch.float32)
        if s.dim() == 1:
            s = s.reshape(E, 1)
        if s.dim() != 2 or s.shape[0] != E or s.shape[1] not in (1, b):
            raise ValueError(f"scales: expected [{E}] or [{E}, {b}], got {tuple(s.shape)}")
        sc = s.expand(E, b).contiguous()
    y = torch.empty(b, d, dtype=torch.float32)
    _call(_native().ffn_sparse_multi,
          [_FMT_CODE[f.fmt] for f in ffns], d, [f.n_ff for f in ffns],
          [f.gate.data_ptr() for f in ffns], [f.up.data_ptr() for f in ffns],
          [f.down_t.data_ptr() for f in ffns], xt.data_ptr(), b,
          [i.data_ptr() for i in idt], [i.numel() for i in idt],
          0 if sc is None else sc.data_ptr(), _act(act), float(threshold), bool(exact),
          y.data_ptr())
    return _out(y, one, was_np)


def gate_up_sparse(ffn: PackedFFN, x, ids, act: str = "drelu", threshold: float = 0.0,
                   exact: bool = False):
    """a [b, k] (or [k]) = act(W1[ids] x, W3[ids] x); exact: up skipped (a = 0) where the gate
    cannot fire."""
    xt, one, was_np = _x2d(x, ffn.d_model)
    idt = _ids(ids)
    a = torch.empty(xt.shape[0], idt.numel(), dtype=torch.float32)
    _call(_native().gate_up_sparse, _FMT_CODE[ffn.fmt], ffn.d_model, ffn.n_ff,
          ffn.gate.data_ptr(), ffn.up.data_ptr(), xt.data_ptr(), xt.shape[0], idt.data_ptr(),
          idt.numel(), _act(act), float(threshold), bool(exact), a.data_ptr())
    return _out(a, one, was_np)


def down_sparse(ffn: PackedFFN, a, ids, skip_zero: bool = False):
    """y [b, d] (or [d]) = sum_j a[:, j] W2[:, ids[j]]. a: [k] or [b, k] float32."""
    return _axpy_rows(ffn.fmt, ffn.d_model, ffn.n_ff, ffn.down_t, a, _ids(ids), skip_zero)


def _axpy_rows(fmt: str, d: int, n: int, rows: torch.Tensor, a, idt: torch.Tensor,
               skip_zero: bool):
    """y [b, d] = sum_j a[:, j] * rows[idt[j]] (rows: n packed rows of d values; the native
    down_sparse): down_sparse's and rows_axpy's one call."""
    at, one, was_np = _x2d(a, idt.numel(), "a")
    y = torch.empty(at.shape[0], d, dtype=torch.float32)
    _call(_native().down_sparse, _FMT_CODE[fmt], d, n, rows.data_ptr(), at.data_ptr(), at.shape[0],
          idt.data_ptr(), idt.numel(), bool(skip_zero), y.data_ptr())
    return _out(y, one, was_np)


@dataclass(frozen=True, eq=False)
class PackedLinear(quant.PackedRows):
    """A dense linear layer's weight packed for the CPU kernels: weight uint8 [out_features,
    row_bytes(in_features, fmt)], row r = W[r, :] of nn.Linear's W [out, in]. Built once; calls
    never copy it.

    grouped (q4_0 only): each row's bytes are permuted for the AVX2 dot (quant.group_q4_0,
    csrc/kernels.h Q4_0G; ~2x less arithmetic per block). from_weight and stacked_linears group
    q4_0 rows; the constructor takes `weight` as given (GGUF rows unless grouped=True). Grouped
    rows are read by `linear` only (not as relu_mlp_t's fc2t); `rows()` gives GGUF bytes."""
    fmt: str
    in_features: int
    out_features: int
    weight: torch.Tensor
    grouped: bool = False

    def __post_init__(self):
        if self.fmt not in quant.FORMATS:
            raise ValueError(f"unknown weight format {self.fmt!r}; expected one of {quant.FORMATS}")
        if self.grouped and self.fmt != "q4_0":
            raise ValueError(f"PackedLinear: grouped rows exist for q4_0 only, not {self.fmt}")
        rb = quant.row_bytes(self.in_features, self.fmt)
        t = _tensor(self.weight, "PackedLinear.weight")
        object.__setattr__(self, "weight", t)
        if t.dtype != torch.uint8 or tuple(t.shape) != (self.out_features, rb) or not t.is_contiguous():
            raise ValueError(f"PackedLinear.weight: expected contiguous uint8 [{self.out_features}, {rb}] "
                             f"({self.fmt}, in_features={self.in_features}), got {t.dtype} "
                             f"{tuple(t.shape)}{'' if t.is_contiguous() else ' non-contiguous'}")

    @classmethod
    def from_weight(cls, w, fmt: str, grouped: bool | None = None) -> "PackedLinear":
        """w: [out_features, in_features] float (nn.Linear's layout), packed in `fmt`; q4_0 rows
        grouped unless grouped=False (rows another kernel reads as GGUF, e.g. relu_mlp_t's fc2t)."""
        w = _tensor(w, "w")
        if w.dim() != 2:
            raise ValueError(f"from_weight: expected w [out, in], got {tuple(w.shape)}")
        g = fmt == "q4_0" if grouped is None else bool(grouped)
        return cls(fmt, w.shape[1], w.shape[0], to_weights(_pack_rows(w, fmt, g)), g)

    @property
    def code(self) -> int:
        """The native format code of these rows (Q4_0G for grouped q4_0)."""
        return _GROUPED_CODE if self.grouped else _FMT_CODE[self.fmt]

    def rows(self) -> torch.Tensor:
        """The weight as GGUF / plain packed rows (a copy when grouped, else `weight` itself)."""
        return quant.ungroup_q4_0(self.weight) if self.grouped else self.weight


def _pack_rows(w: torch.Tensor, fmt: str, grouped: bool) -> torch.Tensor:
    """w [out, in] float -> its packed rows, q4_0 grouped when `grouped`."""
    p = quant.pack(w, fmt)
    return quant.group_q4_0(p) if grouped else p


def stacked_linears(parts: list, in_features: int, fmt: str) -> tuple[PackedLinear, list[PackedLinear]]:
    """q, k, v in ONE PackedLinear, each a view of its rows (quant.PackedRows.stacked): one
    native call (one pool hand-off, one ramp of the row streams) instead of three."""
    whole = alloc_weights(sum(n for _, n in parts), quant.row_bytes(in_features, fmt))
    g = fmt == "q4_0"                        # grouped, as from_weight packs q4_0 rows
    return PackedLinear.stacked(parts, in_features, fmt, whole,
                                lambda w: _pack_rows(_tensor(w, "w"), fmt, g), grouped=g)


def linear(x, m: PackedLinear):
    """y = x W^T over every row: x [in] or [b, in] float32 -> y [out] or [b, out] float32.
    Block formats quantise x to q8 blocks once per call (as ffn_sparse does)."""
    if not isinstance(m, PackedLinear):
        raise ValueError(f"expected PackedLinear, got {type(m).__name__}")
    xt, one, was_np = _x2d(x, m.in_features)
    y = torch.empty(xt.shape[0], m.out_features, dtype=torch.float32)
    _call(_native().linear, m.code, m.in_features, m.out_features, m.weight.data_ptr(),
          xt.data_ptr(), xt.shape[0], y.data_ptr())
    return _out(y, one, was_np)


def relu_mlp_t(x: torch.Tensor, fc1: PackedLinear, fc2t: PackedLinear) -> torch.Tensor:
    """y [n2] = sum_j relu(fc1 x)_j * fc2t[j, :] in one native call (one token): a low-rank
    predictor's scores with its second layer stored transposed (fc2t [r, n2] as packed rows);
    rows whose activation is zero are not read. x [d] float32 contiguous."""
    if not isinstance(fc1, PackedLinear) or not isinstance(fc2t, PackedLinear) \
            or fc2t.out_features != fc1.out_features:
        raise ValueError("relu_mlp_t: fc1 [r, d] and fc2t [r, n2] must be PackedLinear with the same r")
    if fc2t.grouped:
        raise ValueError("relu_mlp_t: fc2t must be plain rows (grouped rows are read by linear only)")
    x = _f32(x, "x", fc1.in_features)
    h, y = torch.empty(fc1.out_features), torch.empty(fc2t.in_features)
    _call(_native().relu_mlp_t, fc1.code, fc1.in_features, fc1.out_features,
          fc1.weight.data_ptr(), _FMT_CODE[fc2t.fmt], fc2t.in_features, fc2t.weight.data_ptr(),
          x.data_ptr(), h.data_ptr(), y.data_ptr())
    return y


def rows_axpy(a, m: PackedLinear) -> torch.Tensor:
    """y [b, n] = sum_j a[:, j] * m[j, :] over m's rows (m [r, n] plain packed rows: a matrix
    stored transposed, e.g. a predictor's fc2^T), rows whose coefficients are all zero unread.
    a [b, r] float32 (relu's output: about half of it zero). The batch form of relu_mlp_t's
    second half."""
    if not isinstance(m, PackedLinear) or m.grouped:
        raise ValueError("rows_axpy: m must be a PackedLinear of plain rows")
    return _axpy_rows(m.fmt, m.in_features, m.out_features, m.weight, a,
                      torch.arange(m.out_features, dtype=torch.int32), True)


def _f32(t, name: str, numel: int | None = None) -> torch.Tensor:
    t = _tensor(t, name)
    if t.dtype != torch.float32 or not t.is_contiguous() or numel is not None and t.numel() != numel:
        raise ValueError(f"{name}: expected contiguous float32" + (f" of {numel} values" if numel else "")
                         + f", got {t.dtype} {tuple(t.shape)}{'' if t.is_contiguous() else ' non-contiguous'}")
    return t


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """y = w * x / sqrt(mean(x^2) + eps) over the last axis, natively (one call instead of ~7
    torch ops). x [..., d] float32 contiguous, w [d] float32. With `residual` (like x): s =
    residual + x is normalised instead and (s, y) returned (a decoder layer's residual add and
    FFN norm in one pass)."""
    x = _f32(x, "x")
    d = x.shape[-1] if x.dim() else 0
    w = _f32(w, "w", d)
    r = None if residual is None else _f32(residual, "residual", x.numel())
    y = torch.empty_like(x)
    s = None if r is None else torch.empty_like(x)
    _native().rms_norm(x.data_ptr() if r is None else r.data_ptr(), 0 if r is None else x.data_ptr(),
                       w.data_ptr(), x.numel() // max(d, 1), d, float(eps),
                       0 if s is None else s.data_ptr(), y.data_ptr())
    return y if r is None else (s, y)


def attend_one(q, k, v, k_cache, v_cache, pos: int, cos, sin, lo: int = 0,
               scale: float | None = None) -> torch.Tensor:
    """One new token's attention (batch 1, float32), natively: RoPE on q and k (rotate-half, the
    row cos / sin [hd] of position pos), k and v written at position pos of the caches, then
    y[h] = softmax(q_h . K[lo..pos]^T * scale) V[lo..pos] with query head h reading KV head
    h // (H / KV). q [H*hd], k / v [KV*hd]; or k = v = None and q the three stacked [H*hd +
    2*KV*hd] (the output of q, k, v stacked in one PackedLinear: no views to make). k_cache /
    v_cache [1, KV, cap, hd] or [KV, cap, hd] (written); scale defaults to hd**-0.5. Returns
    y [H*hd]."""
    kc, vc = _f32(k_cache, "k_cache"), _f32(v_cache, "v_cache")
    if kc.dim() == 4 and kc.shape[0] == 1:
        kc, vc = kc[0], vc[0]
    if kc.dim() != 3 or tuple(vc.shape) != tuple(kc.shape[-3:]):
        raise ValueError(f"attend_one: caches must be [KV, cap, hd] (batch 1), got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    KV, cap, hd = kc.shape
    cos, sin = _f32(cos, "cos", hd), _f32(sin, "sin", hd)
    q = _f32(q, "q")
    if k is None and v is None:                         # q holds [q | k | v]
        nq = q.numel() - 2 * KV * hd
        qp, kp, vp = q.data_ptr(), q.data_ptr() + 4 * nq, q.data_ptr() + 4 * (nq + KV * hd)
    else:
        k, v = _f32(k, "k", KV * hd), _f32(v, "v", KV * hd)
        nq, qp, kp, vp = q.numel(), q.data_ptr(), k.data_ptr(), v.data_ptr()
    if nq <= 0 or nq % (KV * hd):
        raise ValueError(f"attend_one: q has {nq} values, not a multiple of KV*hd = {KV * hd}")
    H = nq // hd
    if not 0 <= lo <= pos < cap:
        raise ValueError(f"attend_one: need 0 <= lo ({lo}) <= pos ({pos}) < capacity ({cap})")
    y = torch.empty(H * hd, dtype=torch.float32)
    _call(_native().attend_one, qp, kp, vp, kc.data_ptr(),
          vc.data_ptr(), H, KV, hd, cap, int(pos), int(lo), cos.data_ptr(), sin.data_ptr(),
          float(hd ** -0.5 if scale is None else scale), y.data_ptr())
    return y


def read_sum(buf) -> float:
    """Sum of a contiguous float32 buffer on the pool: the read-bandwidth probe."""
    t = _tensor(buf, "buf")
    if t.dtype != torch.float32 or not t.is_contiguous():
        raise ValueError("read_sum: expected a contiguous float32 tensor")
    return _native().read_sum(t.data_ptr(), t.numel())


def set_num_threads(n: int) -> None:
    """Resize the kernels' persistent pool (n < 1: one thread per hardware thread)."""
    _native().set_num_threads(int(n))


def get_num_threads() -> int:
    return _native().get_num_threads()


def isa() -> str:
    """'avx2' or 'scalar': the kernels the next call will use."""
    return _native().isa()


def force_reference(on: bool) -> None:
    """Use the scalar reference kernels (on) or the fastest available (off).
    HYBRIDINFER_FORCE_REF=1 sets this at import."""
    _native().force_reference(bool(on))


def reference_forced() -> bool:
    return _native().reference_forced()
