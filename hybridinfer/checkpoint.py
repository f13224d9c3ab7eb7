"""Checkpoint readers: safetensors (single file or sharded, memory-mapped, lazy), PyTorch .bin
(weights_only), and PowerInfer's separate predictor / activation-count folders.

A tensor is read only when asked for; safetensors tensors are views of a copy-on-write mmap, so
loading costs the bytes actually kept (a dtype conversion makes the one copy that is kept).
"""
from __future__ import annotations

import json
import mmap
import re
import struct
from pathlib import Path

import torch

from .errors import HybridInferError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class SafetensorsFile:
    """One .safetensors file: header parsed eagerly, data mapped lazily."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                size = path.stat().st_size
                raw = f.read(8)
                if len(raw) < 8:
                    raise HybridInferError(f"{path} is truncated (no safetensors header)")
                (n,) = struct.unpack("<Q", raw)
                if n > size - 8 or n > 100 * 2**20:
                    raise HybridInferError(f"{path} is truncated or not a safetensors file")
                header = json.loads(f.read(n))
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + n else None
        except OSError as e:
            raise HybridInferError(f"cannot read {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise HybridInferError(f"{path} has a corrupt safetensors header") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._base = 8 + n
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            try:
                dtype = _ST_DTYPES[e["dtype"]]
                start, end = (int(v) for v in e["data_offsets"])
                shape = tuple(int(s) for s in e["shape"])
            except (KeyError, TypeError, ValueError):
                raise HybridInferError(f"{path}: bad header entry for tensor {name!r}") from None
            numel = 1
            for s in shape:
                numel *= s
            if end - start != numel * dtype.itemsize or start < 0:
                raise HybridInferError(f"{path}: tensor {name!r} has inconsistent offsets")
            if self._base + end > size:
                raise HybridInferError(
                    f"{path} is truncated: tensor {name!r} ends at byte {self._base + end}, file has {size}")
            self.entries[name] = (dtype, shape, start, end)

    def get(self, name: str) -> torch.Tensor:
        dtype, shape, start, end = self.entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        t = torch.frombuffer(self._mm, dtype=dtype, count=(end - start) // dtype.itemsize,
                             offset=self._base + start)
        return t.view(shape)

    def release(self, name: str) -> None:
        """Drop the mapped pages of `name` once a converted copy is kept (bounds peak memory)."""
        if self._mm is None or not hasattr(self._mm, "madvise"):
            return
        _, _, start, end = self.entries[name]
        page = mmap.PAGESIZE
        lo = -(-(self._base + start) // page) * page
        hi = (self._base + end) // page * page
        if hi > lo:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps freed multi-MB blocks otherwise, so
    per-FFN temporaries would pile up in RSS while a model is built)."""
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 - glibc only
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


class Checkpoint:
    """All weight files of one model folder behind one name -> tensor lookup."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._where: dict[str, object] = {}
        index = self.folder / "model.safetensors.index.json"
        st_files = sorted(self.folder.glob("*.safetensors"))
        bin_files = sorted(self.folder.glob("pytorch_model*.bin"))
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise HybridInferError(f"{index} is not a valid safetensors index") from None
            files = {}
            for name, fname in weight_map.items():
                if fname not in files:
                    p = self.folder / fname
                    if not p.is_file():
                        raise HybridInferError(f"shard {fname} named in {index.name} is missing from {self.folder}")
                    files[fname] = SafetensorsFile(p)
                if name not in files[fname].entries:
                    raise HybridInferError(f"{fname} lacks tensor {name!r} that {index.name} places there")
                self._where[name] = files[fname]
        elif st_files:
            for p in st_files:
                f = SafetensorsFile(p)
                for name in f.entries:
                    self._where[name] = f
        elif bin_files:
            for p in bin_files:  # PyTorch pickles: never without weights_only
                try:
                    sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
                except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
                    raise HybridInferError(f"cannot read {p.name}: {str(e).splitlines()[0]}") from None
                for name, t in sd.items():
                    self._where[name] = t
        else:
            raise HybridInferError(f"{self.folder} has no *.safetensors or pytorch_model*.bin weights")

    def overlay(self, tensors: dict[str, torch.Tensor]) -> None:
        """Serve these tensors by name, over the folder's (e.g. trained predictors)."""
        self._where.update(tensors)

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        src = self._where[name]
        return src.entries[name][1] if isinstance(src, SafetensorsFile) else tuple(src.shape)

    def nbytes(self, name: str) -> int:
        src = self._where[name]
        if isinstance(src, SafetensorsFile):
            _, _, start, end = src.entries[name]
            return end - start
        return src.numel() * src.element_size()

    def release(self, name: str) -> None:
        src = self._where.get(name)
        if isinstance(src, SafetensorsFile):
            src.release(name)

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """The tensor `name` (a lazy CPU view); `shape` is what config.json implies, checked."""
        src = self._where.get(name)
        if src is None:
            raise HybridInferError(f"{self.folder}: missing tensor {name!r}")
        t = src.get(name) if isinstance(src, SafetensorsFile) else src
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise HybridInferError(
                f"{self.folder}: tensor {name!r} has shape {list(t.shape)}, config.json implies {list(shape)}")
        return t


# ---- PowerInfer's separate files --------------------------------------------------------------

def _numbered(folder: Path, pattern: str) -> list[tuple[int, Path]]:
    """Files matching `prefix{N}.pt`, ordered by N as a number (not as text: 10 after 2)."""
    rx = re.compile(pattern)
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := rx.fullmatch(p.name))]
    found.sort()
    nums = [n for n, _ in found]
    if nums != list(range(len(nums))):
        raise HybridInferError(f"{folder}: expected layers 0..{len(nums) - 1}, found {nums}")
    return found


def _torch_load(p: Path) -> object:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a bad file
        raise HybridInferError(f"cannot read {p}: {str(e).splitlines()[0]}") from None


def load_powerinfer_predictors(folder: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """PowerInfer's predictor folder: model_{L}.pt with fc1.weight [rank, d], fc2.weight [n_ff, rank]."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HybridInferError(f"predictor folder {folder} does not exist")
    out = []
    for layer, p in _numbered(folder, r"model_(\d+)\.pt"):
        sd = _torch_load(p)
        if not isinstance(sd, dict) or "fc1.weight" not in sd or "fc2.weight" not in sd:
            raise HybridInferError(f"{p} lacks fc1.weight / fc2.weight")
        fc1, fc2 = sd["fc1.weight"], sd["fc2.weight"]
        if fc1.dim() != 2 or fc2.dim() != 2 or fc2.shape[1] != fc1.shape[0]:
            raise HybridInferError(f"{p}: fc1 {list(fc1.shape)} and fc2 {list(fc2.shape)} do not chain")
        out.append((fc1, fc2))
    if not out:
        raise HybridInferError(f"{folder} has no model_{{L}}.pt predictor files")
    return out


def load_activation_counts(folder: str | Path) -> list[torch.Tensor]:
    """PowerInfer's activation/activation_{L}.pt: one 1-D count tensor [n_ff] per layer, by L."""
    folder = Path(folder)
    if (folder / "activation").is_dir():
        folder = folder / "activation"
    if not folder.is_dir():
        raise HybridInferError(f"activation folder {folder} does not exist")
    out = []
    for layer, p in _numbered(folder, r"activation_(\d+)\.pt"):
        t = _torch_load(p)
        if not isinstance(t, torch.Tensor) or t.dim() != 1:
            raise HybridInferError(f"{p} is not a 1-D count tensor")
        out.append(t)
    if not out:
        raise HybridInferError(f"{folder} has no activation_{{L}}.pt files")
    return out


# ---- tensor names per architecture (HF layout; TurboSparse adds predictors) -------------------

def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def ffn_names(family: str, layer: int, expert: int | None = None) -> dict[str, str]:
    """Names of one FFN's gate/up/down (W1/W3/W2) and its predictor's fc1/fc2."""
    p = layer_prefix(layer)
    if expert is None:
        m = p + "mlp."
        return {"gate": m + "gate_proj.weight", "up": m + "up_proj.weight",
                "down": m + "down_proj.weight",
                "fc1": m + "predictor.fc1.weight", "fc2": m + "predictor.fc2.weight"}
    e = f"{p}block_sparse_moe.experts.{expert}."
    return {"gate": e + "w1.weight", "up": e + "w3.weight", "down": e + "w2.weight",
            "fc1": e + "predictor.fc1.weight", "fc2": e + "predictor.fc2.weight"}


def router_name(layer: int) -> str:
    return layer_prefix(layer) + "block_sparse_moe.gate.weight"


# ---- writing (the default model, tests, synthetic benchmarks) ---------------------------------

def save_checkpoint(folder: str | Path, config: dict, tensors: dict[str, torch.Tensor],
                    shard_bytes: int | None = None, extra_files: dict[str, str] | None = None) -> Path:
    """Write config.json + safetensors (one file, or shards + model.safetensors.index.json when
    shard_bytes is given) atomically: a temp folder beside `folder`, renamed into place."""
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if shard_bytes is None:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            shards, cur, size = [], {}, 0
            for k, v in tensors.items():
                nb = v.numel() * v.element_size()
                if cur and size + nb > shard_bytes:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[k] = v
                size += nb
            shards.append(cur)
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({k: fname for k in shard})
            total = sum(v.numel() * v.element_size() for v in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
