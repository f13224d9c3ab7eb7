"""Activation predictors: which FFN neurons will fire for a given input. Load, run, save (training: predictor_train.py).

What the TurboSparse predictor computes (docs/PREDICTORS.md has the sources):
    score = fc2 · relu(fc1 · x)        fc1 [rank, d], fc2 [n_ff, rank], no biases
    TurboSparse: mask = round(sigmoid(score)), i.e. neuron i is kept when score_i > 0;
    PowerInfer's model_{L}.pt: the same MLP without the sigmoid, kept when score_i > threshold.
So one rule serves both: active = score > threshold, threshold 0.0 by default (a probability
threshold p is the logit log(p / (1 - p)): see logit_threshold).
Input x: TurboSparse-Mixtral's predictor sees the FFN input (the normalised hidden state), and so do
the predictors train_predictors makes. TurboSparse-Mistral's may see the residual before the norm
(third-party source, open question): shipped_input(cfg) says which.
All predictors are held under TurboSparse tensor names, whatever file they came from:
    model.layers.N.mlp.predictor.fc{1,2}.weight / model.layers.N.block_sparse_moe.experts.E.predictor.fc{1,2}.weight
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_path
from .errors import HybridInferError
from .linear import linear

PREDICTOR_FILE = "predictors.safetensors"


class Predictor(nn.Module):
    """x [n, d] -> scores [n, n_ff].
    fc2t: for the CPU kernels, fc2 stored transposed (kernels.cpu.PackedLinear of plain rows
    [rank, n_ff], in place of fc2, which is then None): the scores are the rows of fc2^T weighted
    by relu(fc1 x), and a row whose weight is zero (about half of them) is never read; one
    token is one native call (relu_mlp_t). fc2 as a GEMV reads every row."""

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor | None, threshold: float = 0.0,
                 fc2t=None):
        super().__init__()
        if (fc2 is None) == (fc2t is None):
            raise ValueError("Predictor: give fc2 [n_ff, rank] or fc2t [rank, n_ff], one of them")
        self.fc1 = fc1  # [rank, d]
        self.fc2 = fc2  # [n_ff, rank]
        self.fc2t = fc2t
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc2t is None:
            return linear(F.relu(linear(x, self.fc1)), self.fc2)
        from .kernels import cpu
        x2 = x.reshape(-1, x.shape[-1]).float().contiguous()
        if x2.shape[0] == 1:
            y = cpu.relu_mlp_t(x2[0], self.fc1, self.fc2t)[None]
        else:
            y = cpu.rows_axpy(F.relu(cpu.linear(x2, self.fc1)), self.fc2t)
        return y.view(*x.shape[:-1], y.shape[-1])

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the dtype the predictor computes in: its weights' (float32 for packed CPU rows)."""
        return x.to(self.fc1.dtype) if isinstance(self.fc1, torch.Tensor) else x.float()

    def active(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask [n, n_ff] of the neurons predicted to fire."""
        return self(x) > self.threshold

    @staticmethod
    def slots(preds: list["Predictor"], k: int, device) -> "PredictorSlots":
        """The masks of a layer's experts' predictors with the experts chosen on the device."""
        return PredictorSlots(preds, k, device)


_FLOAT_FMT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


class PredictorSlots:
    """masks(x, sel, out): out[s] = predictor sel[s]'s mask of x (bool [k, n_ff]), with sel the
    router's choice on the device (the graph decoder's fused layer). CUDA, float weights: two
    device-selected GEMV launches (Triton, address tables) for all slots, fc1 [rank, d] then fc2
    [n_ff, rank] over relu; elsewhere (the cpu device, packed CPU rows) a loop over the slots."""

    def __init__(self, preds: list[Predictor], k: int, device):
        self.preds = preds
        self.tk = None
        p0 = preds[0]
        fmt = _FLOAT_FMT.get(getattr(p0.fc1, "dtype", None))
        if torch.device(device).type == "cuda" and fmt is not None:
            from .kernels import triton_ffn as tk
            self.tk, self.fmt = tk, fmt
            rank, d = p0.fc1.shape
            self.d, self.rank = d, rank
            self.t1 = tk.RowTable.build(fmt, d, [p.fc1 for p in preds], device)
            self.t2 = tk.RowTable.build(fmt, rank, [p.fc2 for p in preds], device)
            self.h = torch.zeros(k, rank, device=device)
            self.s = torch.zeros(k, p0.fc2.shape[0], device=device)
            self.thr = torch.tensor([p.threshold for p in preds], device=device)

    def masks(self, x: torch.Tensor, sel: torch.Tensor, out: torch.Tensor) -> None:
        """x [1, d] (any float dtype), sel int64 [k], out bool [k, n_ff] (written)."""
        if self.tk is None:
            for s, e in enumerate(sel.tolist()):                 # the cpu device: no sync
                p = self.preds[e]
                out[s] = host_active(p, x.float())[0]
            return
        self.tk.matvec_slots(self.fmt, self.d, self.t1, x[0], 0, self.h, sel)
        self.h.relu_()
        self.tk.matvec_slots(self.fmt, self.rank, self.t2, self.h, self.rank, self.s, sel)
        torch.gt(self.s, self.thr.index_select(0, sel)[:, None], out=out)


def predictor_device(pred, default: torch.device) -> torch.device:
    """Where a predictor computes: its weights' device (fc1), its `device` attribute, or `default`."""
    fc1 = getattr(pred, "fc1", None)
    if fc1 is not None:
        return fc1.device
    dev = getattr(pred, "device", None)
    if dev is None:
        return default
    dev = torch.device(dev)
    if dev.type == "cuda" and dev.index is None:   # "cuda" names the current device: say which
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def host_active(pred, x_host: torch.Tensor) -> torch.Tensor:
    """The mask of a predictor kept on the CPU, for a float32 host vector x [n, d]."""
    return pred.active(pred.input(x_host) if isinstance(pred, Predictor) else x_host)


def logit_threshold(p: float) -> float:
    """The score threshold equivalent to sigmoid(score) > p (p = 0.5 gives TurboSparse's 0.0)."""
    if not 0.0 < p < 1.0:
        raise HybridInferError(f"a probability threshold must be in (0, 1), got {p}")
    return math.log(p / (1.0 - p))


def shipped_input(cfg) -> str:
    """What the model's own predictors read: "ffn_input" (after post_attention_layernorm) or
    "residual" (before it; TurboSparse-Mistral per a third-party port, unverified)."""
    return "residual" if cfg.family == "bamboo" else "ffn_input"


# ---- names, loading, saving ---------------------------------------------------------------------

def predictor_names(cfg) -> dict[tuple[int, int], tuple[str, str]]:
    """(layer, expert|-1) -> (fc1 name, fc2 name) in TurboSparse naming."""
    from .checkpoint import ffn_names
    from .profile import ffn_keys

    out = {}
    for layer, e in ffn_keys(cfg):
        n = ffn_names(cfg.family, layer, None if e < 0 else e)
        out[(layer, e)] = (n["fc1"], n["fc2"])
    return out


def predictor_numel(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for name, t in tensors.items() if ".predictor." in name)


def _check(tensors: dict[str, torch.Tensor], cfg, where: str) -> dict[str, torch.Tensor]:
    names = predictor_names(cfg)
    out = {}
    for (layer, e), (n1, n2) in names.items():
        if n1 not in tensors or n2 not in tensors:
            raise HybridInferError(f"{where} has no predictor for layer {layer}"
                                   + (f" expert {e}" if e >= 0 else "") + f" ({n1})")
        fc1, fc2 = tensors[n1], tensors[n2]
        if (fc1.dim() != 2 or fc2.dim() != 2 or fc1.shape[1] != cfg.hidden_size
                or fc2.shape != (cfg.intermediate_size, fc1.shape[0])):
            raise HybridInferError(f"{where}: predictor {n1} {list(fc1.shape)} / {list(fc2.shape)} does not fit "
                                   f"d={cfg.hidden_size}, n_ff={cfg.intermediate_size}")
        out[n1], out[n2] = fc1, fc2
    return out


def load_predictors(source: str | os.PathLike, cfg) -> dict[str, torch.Tensor]:
    """Predictor tensors in TurboSparse naming from: a .safetensors file, a folder holding
    predictors.safetensors (train-predictors' output), or PowerInfer's model_{L}.pt folder."""
    from .checkpoint import load_powerinfer_predictors

    p = Path(source)
    if p.is_dir() and (p / PREDICTOR_FILE).is_file():
        p = p / PREDICTOR_FILE
    if p.is_file():
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(p))
        except Exception:  # noqa: BLE001 - any parse failure is a bad file
            raise HybridInferError(f"{p} is not a valid safetensors predictor file") from None
        return _check(tensors, cfg, str(p))
    if p.is_dir():
        if cfg.is_moe:
            raise HybridInferError(f"{p}: PowerInfer predictor folders are per layer; {cfg.architecture} "
                                   "needs one predictor per expert")
        pairs = load_powerinfer_predictors(p)
        names = predictor_names(cfg)
        if len(pairs) != cfg.num_layers:
            raise HybridInferError(f"{p} has {len(pairs)} predictor files, the model has {cfg.num_layers} layers")
        tensors = {}
        for layer, (fc1, fc2) in enumerate(pairs):
            n1, n2 = names[(layer, -1)]
            tensors[n1], tensors[n2] = fc1, fc2
        return _check(tensors, cfg, str(p))
    raise HybridInferError(f"predictors {p} do not exist")


def budget_predictor_numel(cfg, ckpt, predictors: str | os.PathLike | None = None) -> int:
    """Predictor parameters the runtime will hold: from `predictors` when given, else the
    checkpoint's own (headers only)."""
    if predictors is not None:
        return predictor_numel(load_predictors(predictors, cfg))
    return sum(math.prod(ckpt.shape(n)) for pair in predictor_names(cfg).values() for n in pair if n in ckpt)


def default_predictor_dir(cfg) -> Path:
    """Where train-predictors writes by default: the user cache, by model identity."""
    import hashlib

    from .default_model import cache_root
    from .profile import model_identity
    return cache_root() / "predictors" / hashlib.sha256(model_identity(cfg).encode()).hexdigest()[:16]


def save_predictors(tensors: dict[str, torch.Tensor], out_dir: str | os.PathLike, cfg, corpus: str = "",
                    rank: int = 0, scores: list | None = None) -> Path:
    """out_dir/predictors.safetensors (atomic; metadata: model_id, rank, input, corpus) and, with
    scores, out_dir/report.json (held-out recall / precision per FFN). A predictor_config.json
    left there was calibrated for the predictors replaced: it is removed."""

    from safetensors.torch import save_file

    from .profile import model_identity

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", "model_id": model_identity(cfg), "rank": str(rank), "input": "ffn_input",
            "corpus": corpus, "naming": "turbosparse"}
    with atomic_path(out / PREDICTOR_FILE) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=meta)
    (out / CONFIG_FILE).unlink(missing_ok=True)
    if scores is not None:
        (out / "report.json").write_text(scores_json(scores))
    return out / PREDICTOR_FILE


# ---- held-out scores (made by predictor_train, saved beside the predictors) -----------------------

@dataclass(frozen=True)
class PredictorScore:
    """Held-out quality of one FFN's predictor."""
    layer: int
    expert: int           # -1 for a dense FFN
    tokens: int           # held-out tokens that reached the FFN
    recall: float         # predicted & fired / fired
    precision: float      # predicted & fired / predicted
    predicted_ratio: float  # predicted / fired (the target is <= 2)


def scores_json(scores: list[PredictorScore]) -> str:
    from dataclasses import asdict
    return json.dumps([asdict(s) for s in scores], indent=1)


# ---- the score threshold: predictor_config.json (calibrated by predictor_train) -------------------

CONFIG_FILE = "predictor_config.json"


def config_path(model_folder: str | os.PathLike, predictor_source: str | os.PathLike | None) -> Path:
    """Where the threshold for the predictors in use lives: beside them. Trained predictors
    (a file or folder overlaid on the checkpoint) -> their folder; the checkpoint's own -> the
    model folder. A threshold is calibrated for one set of predictors, so the model folder's file
    is never applied to predictors from elsewhere."""
    if predictor_source is None:
        return Path(model_folder) / CONFIG_FILE
    p = Path(predictor_source)
    return (p if p.is_dir() else p.parent) / CONFIG_FILE


def read_predictor_config(path: str | os.PathLike) -> dict:
    """A predictor_config.json, checked: a JSON object whose "threshold" is a finite number."""
    p = Path(path)
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HybridInferError(f"{p} is not a readable JSON predictor config ({type(e).__name__}); "
                               "delete it or rewrite it with `hybridinfer calibrate-predictors`") from None
    t = cfg.get("threshold") if isinstance(cfg, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
        raise HybridInferError(f"{p} needs a finite number under \"threshold\", got {t!r}; "
                               "rewrite it with `hybridinfer calibrate-predictors`")
    return cfg


def write_predictor_config(path: str | os.PathLike, report: dict) -> Path:
    """predictor_config.json from a calibrate_threshold report (the summary, not the per-FFN rows)."""
    from .atomic import write_json

    keys = ("threshold", "target_recall", "max_ratio", "recall", "precision", "ratio", "tokens",
            "corpus", "threshold_0")
    return write_json(path, {k: report[k] for k in keys if k in report})
