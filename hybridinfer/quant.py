"""Weight formats for the CPU kernels: f32, f16, bf16 and GGUF's q8_0 / q4_0 blocks.

Pure torch (no native code). A packed matrix is a uint8 tensor [rows, row_bytes(cols, fmt)]:
each row is the bytes of that row in the format, so one neuron is one contiguous row.

Block formats (byte-compatible with GGUF / llama.cpp), 32 values per block:
  q8_0: f16 scale d, then 32 int8 q;            value = q * d              (34 bytes)
  q4_0: f16 scale d, then 16 bytes of nibbles;  value = (nibble - 8) * d   (18 bytes)
        byte j holds element j in its low nibble and element j + 16 in its high nibble.
Scales are chosen as llama.cpp's reference quantisers do:
  q8_0: d = amax / 127,  q = roundf(v / d) (half away from zero)
  q4_0: d = m / -8 where m is the first value of largest |v| (signed), q = min(15, trunc(v/d + 8.5))
"""
from __future__ import annotations

import torch

FORMATS = ("f32", "f16", "bf16", "q8_0", "q4_0")
QK = 32  # values per block in q8_0 / q4_0
_BLOCK_BYTES = {"q8_0": 2 + QK, "q4_0": 2 + QK // 2}
BLOCK_FORMATS = tuple(_BLOCK_BYTES)   # GGUF block formats: the C++ kernels' integer dot paths
_ELEM_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
_FLOAT_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; expected one of {FORMATS}")


def row_bytes(cols: int, fmt: str) -> int:
    """Bytes of one packed row of `cols` values."""
    _check_fmt(fmt)
    if fmt in _ELEM_BYTES:
        return cols * _ELEM_BYTES[fmt]
    if cols % QK:
        raise ValueError(f"{fmt} needs a column count divisible by {QK}, got {cols}")
    return cols // QK * _BLOCK_BYTES[fmt]


def _as_tensor(a) -> torch.Tensor:
    return a if isinstance(a, torch.Tensor) else torch.as_tensor(a)


def _f16_bytes(d: torch.Tensor) -> torch.Tensor:
    """[..., nb] float32 scales -> [..., nb, 2] uint8 (f16, little-endian, round-to-nearest-even)."""
    return d.to(torch.float16).contiguous().view(torch.uint8).reshape(*d.shape, 2)


def pack(w, fmt: str, device=None) -> torch.Tensor:
    """w [rows, cols] float -> uint8 [rows, row_bytes(cols, fmt)]. device: where the result
    lives and a block format is computed (default: block formats on the CPU, float formats on
    w's device); pass w's device to pack a GPU tensor where it is."""
    _check_fmt(fmt)
    w = _as_tensor(w)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"pack expects a 2-D float tensor, got shape {tuple(w.shape)} dtype {w.dtype}")
    rows, cols = w.shape
    rb = row_bytes(cols, fmt)  # raises for bad cols in block formats
    if fmt in _FLOAT_DTYPES:
        out = w.to(_FLOAT_DTYPES[fmt]).contiguous().view(torch.uint8).reshape(rows, rb)
        return out if device is None else out.to(device)
    nb = cols // QK
    out = torch.empty(rows, nb, _BLOCK_BYTES[fmt], dtype=torch.uint8, device=device or "cpu")
    step = max(1, (1 << 22) // max(cols, 1))  # ~4M values per slice keeps temporaries small
    for r0 in range(0, rows, step):
        blk = w[r0:r0 + step].to(torch.float32).reshape(-1, nb, QK)  # [r, nb, 32]
        if fmt == "q8_0":
            d = blk.abs().amax(dim=-1) / 127.0                       # [r, nb]
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            v = blk * inv[..., None]
            q = torch.sign(v) * torch.floor(v.abs() + 0.5)           # roundf: half away from zero
            qb = q.to(torch.int8).view(torch.uint8)
        else:
            # The signed value of largest magnitude; first occurrence on ties (as llama.cpp).
            idx = blk.abs().argmax(dim=-1, keepdim=True)
            m = torch.gather(blk, -1, idx).squeeze(-1)
            d = m / -8.0
            inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
            v = blk * inv[..., None] + 8.5
            q = torch.clamp(torch.trunc(v), max=15).to(torch.uint8)  # v >= 0.5, so trunc = floor
            qb = q[..., :QK // 2] | (q[..., QK // 2:] << 4)
        out[r0:r0 + step, :, :2] = _f16_bytes(d)
        out[r0:r0 + step, :, 2:] = qb
    return out.reshape(rows, rb)


def unpack(packed, fmt: str, cols: int) -> torch.Tensor:
    """uint8 [rows, row_bytes(cols, fmt)] -> float32 [rows, cols] (the values the kernels use)."""
    _check_fmt(fmt)
    p = _as_tensor(packed)
    rb = row_bytes(cols, fmt)
    if p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] != rb:
        raise ValueError(f"unpack expects uint8 [rows, {rb}] for {fmt} x {cols}, "
                         f"got {p.dtype} {tuple(p.shape)}")
    rows = p.shape[0]
    p = p.contiguous()
    if fmt in _FLOAT_DTYPES:
        return p.view(_FLOAT_DTYPES[fmt]).reshape(rows, cols).to(torch.float32)
    nb = cols // QK
    blk = p.reshape(rows, nb, _BLOCK_BYTES[fmt])
    d = blk[..., :2].contiguous().view(torch.float16).to(torch.float32)  # [rows, nb, 1]
    qb = blk[..., 2:]
    if fmt == "q8_0":
        q = qb.contiguous().view(torch.int8).to(torch.float32)
    else:
        q = torch.cat([qb & 0x0F, qb >> 4], dim=-1).to(torch.float32) - 8.0
    return (q * d).reshape(rows, cols)


# q4_0 "grouped" rows (csrc/kernels.h, Q4_0G): the same bytes per row, the first 8 * (nb // 8)
# blocks regrouped 8 at a time as [8 f16 scales][for v < 4, k < 8: nibble bytes 4v..4v+3 of
# block k]; the nb % 8 last blocks stay GGUF blocks. The AVX2 dot then needs no horizontal sums.
GROUP_BLOCKS = 8
GROUP_BYTES = GROUP_BLOCKS * 18      # 144: a group is as long as its 8 GGUF blocks


def group_q4_0(packed: torch.Tensor) -> torch.Tensor:
    """GGUF q4_0 rows uint8 [rows, nb * 18] -> the same rows grouped (a new tensor)."""
    return _regroup(packed, True)


def ungroup_q4_0(grouped: torch.Tensor) -> torch.Tensor:
    """The inverse of group_q4_0: grouped rows -> GGUF q4_0 rows (a new tensor)."""
    return _regroup(grouped, False)


def _regroup(packed, to_grouped: bool) -> torch.Tensor:
    p = _as_tensor(packed)
    if p.dtype != torch.uint8 or p.dim() != 2 or p.shape[1] % 18:
        raise ValueError(f"q4_0 (un)grouping expects uint8 [rows, nb * 18], got {p.dtype} {tuple(p.shape)}")
    rows, ng = p.shape[0], p.shape[1] // GROUP_BYTES
    out = p.clone()
    if ng:
        g = p[:, :ng * GROUP_BYTES].reshape(rows, ng, GROUP_BYTES)
        if to_grouped:   # [8 blocks][2 + 16] -> [8 x 2 scales][v: 4][k: 8][4 bytes]
            g = g.reshape(rows, ng, GROUP_BLOCKS, 18)
            parts = [g[..., :2].reshape(rows, ng, 16),
                     g[..., 2:].reshape(rows, ng, GROUP_BLOCKS, 4, 4).transpose(2, 3).reshape(rows, ng, 128)]
        else:
            parts = [g[..., :16].reshape(rows, ng, GROUP_BLOCKS, 2),
                     g[..., 16:].reshape(rows, ng, 4, GROUP_BLOCKS, 4).transpose(2, 3).reshape(rows, ng, GROUP_BLOCKS, 16)]
        out[:, :ng * GROUP_BYTES] = torch.cat(parts, dim=-1).reshape(rows, ng * GROUP_BYTES)
    return out


def stacked3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor | None:
    """An FFN's gate, up and down_t as ONE [3, *a.shape] view when they are consecutive equal
    contiguous thirds of one storage (then one copy moves all three: prefill streams cold rows
    to the GPU once per expert, and each copy costs host time), else None."""
    if not (a.is_contiguous() and b.is_contiguous() and c.is_contiguous()
            and a.shape == b.shape == c.shape and a.dtype == b.dtype == c.dtype):
        return None
    ptr = a.untyped_storage().data_ptr()
    if b.untyped_storage().data_ptr() != ptr or c.untyped_storage().data_ptr() != ptr:
        return None
    step = a.numel() * a.element_size()
    if b.data_ptr() - a.data_ptr() != step or c.data_ptr() - b.data_ptr() != step:
        return None
    return a.as_strided((3, *a.shape), (a.numel(), *a.stride()))


class PackedRows:
    """Mixin of a linear layer's weight held as packed rows (`weight` uint8 [out_features,
    row_bytes(in_features, fmt)]: kernels.cpu.PackedLinear, kernels.gpu.DeviceLinear). device /
    shape / nbytes mirror a torch weight's, so code that only asks where a weight lives or what
    shape it has need not care which kind it holds."""
    weight: torch.Tensor
    in_features: int
    out_features: int

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    @property
    def nbytes(self) -> int:
        return self.weight.numel()

    @classmethod
    def stacked(cls, parts: list, in_features: int, fmt: str, whole: torch.Tensor, pack,
                **fields) -> tuple:
        """Linear layers on the same input (attention's q, k, v) as ONE layer of this kind whose
        rows are theirs stacked, each part a view of its rows (one kernel call reads all three).
        parts: (get, out_features) with get() the float weight [out, in_features]; whole: the
        uint8 [sum out, row_bytes] allocation; pack(w) -> w's packed rows; `fields`: further
        fields of every layer made (PackedLinear's grouped). The parts are fetched
        and packed one at a time into `whole` (transient copies of the others fragmented a full
        VRAM budget). -> (the whole layer, [the parts' views])."""
        views, r = [], 0
        for get, n in parts:
            w = get()
            if tuple(w.shape) != (n, in_features):
                raise ValueError(f"stacked_linears: expected [{n}, {in_features}], got {tuple(w.shape)}")
            whole[r:r + n] = pack(w)
            del w
            views.append(cls(fmt, in_features, n, whole[r:r + n], **fields))
            r += n
        return cls(fmt, in_features, r, whole, **fields), views
