"""Activation predictors: which FFN neurons will fire for a given input. Load, run, train, save.

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
    """x [n, d] -> scores [n, n_ff]."""

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, threshold: float = 0.0):
        super().__init__()
        self.fc1 = fc1  # [rank, d]
        self.fc2 = fc2  # [n_ff, rank]
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(F.relu(linear(x, self.fc1)), self.fc2)

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


# ---- training -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PredictorScore:
    """Held-out quality of one FFN's predictor."""
    layer: int
    expert: int           # -1 for a dense FFN
    tokens: int           # held-out tokens that reached the FFN
    recall: float         # predicted & fired / fired
    precision: float      # predicted & fired / predicted
    predicted_ratio: float  # predicted / fired (the target is <= 2)


def score(pred: torch.Tensor, true: torch.Tensor) -> tuple[float, float, float]:
    """(recall, precision, predicted/true) of boolean masks [n, n_ff]."""
    tp = (pred & true).sum().item()
    npred, ntrue = pred.sum().item(), true.sum().item()
    return tp / max(ntrue, 1), tp / max(npred, 1), npred / max(ntrue, 1)


@torch.inference_mode()
def record(llm, windows: list[list[int]]) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Run the model densely; per FFN the inputs X [n, d] (float16, CPU) and fired masks Y [n, n_ff]."""
    from .profile import ActivationTap

    xs: dict = {}

    def keep(key, x, a):
        xs.setdefault(key, []).append((x.to("cpu", torch.float16), (a != 0).cpu()))

    model = llm.model
    with ActivationTap(model, keep):
        for w in windows:
            model(torch.tensor([w], device=model.device), model.new_cache(len(w)), last_only=True)
    return {k: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for k, v in xs.items()}


def _fit(X: torch.Tensor, Y: torch.Tensor, rank: int, steps: int, lr: float, gen: torch.Generator,
         device) -> tuple[torch.Tensor, torch.Tensor]:
    """fc1 [rank, d], fc2 [n_ff, rank] minimising class-weighted BCE(fc2 relu(fc1 x), y)."""
    X, Y = X.to(device, torch.float32), Y.to(device, torch.float32)
    n, d = X.shape
    fc1 = (torch.randn(rank, d, generator=gen) / math.sqrt(d)).to(device).requires_grad_()
    fc2 = (torch.randn(Y.shape[1], rank, generator=gen) / math.sqrt(rank)).to(device).requires_grad_()
    pos = Y.mean(0).clamp(1e-3, 1 - 1e-3)
    weight = ((1 - pos) / pos).clamp(max=50.0)   # balance each neuron's classes
    opt = torch.optim.Adam([fc1, fc2], lr=lr)
    batch = min(n, 1024)
    for step in range(steps):
        idx = torch.randint(0, n, (batch,), generator=gen).to(device) if batch < n else slice(None)
        logits = F.linear(F.relu(F.linear(X[idx], fc1)), fc2)
        loss = F.binary_cross_entropy_with_logits(logits, Y[idx], pos_weight=weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return fc1.detach(), fc2.detach()


def _predict_all(d: int, n_ff: int, rank: int, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """A predictor that calls every neuron active: relu(u·x) + relu(-u·x) = |u·x| > 0."""
    u = torch.randn(d, generator=gen)
    fc1 = torch.zeros(rank, d)
    fc2 = torch.zeros(n_ff, rank)
    fc1[0], fc2[:, 0] = u, 1.0
    if rank > 1:
        fc1[1], fc2[:, 1] = -u, 1.0
    return fc1, fc2


def train_predictors(llm, texts: list[str], rank: int, max_tokens: int = 16384, holdout: float = 0.2,
                     steps: int = 300, lr: float = 1e-2, threshold: float = 0.0, device=None,
                     seed: int = 0, progress: bool = True) -> tuple[dict[str, torch.Tensor], list[PredictorScore]]:
    """Low-rank predictors (fc1 -> ReLU -> fc2) for every FFN, fitted on the FFN inputs and fired
    masks recorded from texts; scored on the last `holdout` share of the tokens. Returns the
    tensors (TurboSparse names, the model's dtype, CPU) and a score per FFN."""
    from .profile import token_windows

    cfg = llm.config
    if not 1 <= rank:
        raise HybridInferError(f"predictor rank must be >= 1, got {rank}")
    if not 0.0 < holdout < 1.0:
        raise HybridInferError(f"holdout must be in (0, 1), got {holdout}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    window = max(2, min(512, cfg.max_position_embeddings))
    windows = token_windows(llm.tokenizer, texts, max_tokens, window)
    n_test = int(round(len(windows) * holdout))
    if len(windows) < 2 or n_test < 1:
        windows = [w for ww in windows for w in (ww[:len(ww) // 2], ww[len(ww) // 2:])]
        n_test = max(1, int(round(len(windows) * holdout)))
    if len(windows) < 2:
        raise HybridInferError("the corpus has too little text to train predictors on")
    train, test = record(llm, windows[:-n_test]), record(llm, windows[-n_test:])
    flush = torch.set_flush_denormal(True)   # Adam's tiny updates hit x86 denormals: 5x slower
    try:
        tensors, scores = _train_all(llm, train, test, rank, steps, lr, threshold, device, seed, progress)
    finally:
        if flush:
            torch.set_flush_denormal(False)
    return tensors, scores


def _train_all(llm, train, test, rank, steps, lr, threshold, device, seed, progress):
    from tqdm import tqdm

    cfg = llm.config
    gen = torch.Generator().manual_seed(seed)
    names = predictor_names(cfg)
    dtype = llm.model.embed.dtype
    tensors, scores = {}, []
    for key in tqdm(list(names), desc="train predictors", disable=not progress, unit="ffn"):
        n1, n2 = names[key]
        if key not in train:   # no training token reached this expert: predict every neuron
            fc1, fc2 = _predict_all(cfg.hidden_size, cfg.intermediate_size, rank, gen)
        else:
            fc1, fc2 = (t.cpu() for t in _fit(*train[key], rank, steps, lr, gen, device))
        tensors[n1], tensors[n2] = fc1.to(dtype), fc2.to(dtype)
        if key in test:
            X, Y = test[key]
            p = Predictor(tensors[n1].float(), tensors[n2].float(), threshold)
            r, pr, ratio = score(p.active(X.float()), Y)
            scores.append(PredictorScore(key[0], key[1], X.shape[0], r, pr, ratio))
    return tensors, scores


def report_table(scores: list[PredictorScore]) -> str:
    """Per-FFN held-out recall / precision, and the token-weighted totals."""
    lines = [f"{'layer':>5} {'expert':>6} {'tokens':>7} {'recall':>7} {'precision':>9} {'pred/true':>9}"]
    for s in scores:
        lines.append(f"{s.layer:>5} {s.expert if s.expert >= 0 else '-':>6} {s.tokens:>7} "
                     f"{s.recall:>7.3f} {s.precision:>9.3f} {s.predicted_ratio:>9.2f}")
    w = sum(s.tokens for s in scores) or 1
    lines.append(f"{'all':>5} {'':>6} {w:>7} {sum(s.recall * s.tokens for s in scores) / w:>7.3f} "
                 f"{sum(s.precision * s.tokens for s in scores) / w:>9.3f} "
                 f"{sum(s.predicted_ratio * s.tokens for s in scores) / w:>9.2f}")
    return "\n".join(lines)


def scores_json(scores: list[PredictorScore]) -> str:
    from dataclasses import asdict
    return json.dumps([asdict(s) for s in scores], indent=1)


# ---- the score threshold: calibration and predictor_config.json ---------------------------------

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


@torch.inference_mode()
def record_scores(llm, windows: list[list[int]]) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """Run the model densely; per FFN its predictor's scores S [n, n_ff] (float32, CPU) and the fired
    masks Y [n, n_ff] (activation != 0), on the tokens that reached it."""
    from .profile import ActivationTap, model_ffns

    model = llm.model
    ffns = model_ffns(model)
    missing = [k for k, m in ffns.items() if getattr(m, "predictor", None) is None]
    if missing:
        layer, e = missing[0]
        raise HybridInferError(f"no predictor for layer {layer}" + (f" expert {e}" if e >= 0 else "")
                               + ": train them with `hybridinfer train-predictors` first")
    out: dict = {}

    def keep(key, x, a):
        pred = ffns[key].predictor
        s = pred(pred.input(x)).float().cpu()
        out.setdefault(key, []).append((s, (a != 0).cpu()))

    with ActivationTap(model, keep):
        for w in windows:
            model(torch.tensor([w], device=model.device), model.new_cache(len(w)), last_only=True)
    return {k: (torch.cat([s for s, _ in v]), torch.cat([y for _, y in v])) for k, v in out.items()}


def _pooled(rec, t: float) -> tuple[float, float, float]:
    tp = npred = ntrue = 0
    for s, y in rec.values():
        p = s > t
        tp += (p & y).sum().item()
        npred += p.sum().item()
        ntrue += y.sum().item()
    return tp / max(ntrue, 1), tp / max(npred, 1), npred / max(ntrue, 1)


def calibrate_threshold(llm, texts: list[str], target_recall: float = 0.95, max_ratio: float = 2.0,
                        max_tokens: int = 16384, skip_tokens: int = 0, corpus: str = "",
                        window: int = 512, decimals: int = 3) -> tuple[float, dict]:
    """The largest score threshold t (one for the whole model, on a 10**-decimals grid) whose
    recall -- fired neurons with score > t, pooled over every FFN and token -- is >= target_recall,
    provided the neurons predicted active are then <= max_ratio x those that fire.

    llm: loaded with sparsity="dense" (its FFNs carry the predictors to calibrate). texts: held-out
    text; the first skip_tokens tokens are skipped (e.g. the ones an evaluation scores), then at
    most max_tokens are run in windows of `window`. Memory: tokens x n_ff x 5 bytes per FFN reached.
    Returns (t, report): report holds the pooled recall / precision / ratio at t and at 0
    ("threshold_0"), and "per_ffn" (PredictorScore per FFN at t). Raises HybridInferError when no
    threshold meets both."""
    if not 0.0 < target_recall <= 1.0:
        raise HybridInferError(f"target recall must be in (0, 1], got {target_recall}")
    if not max_ratio >= 1.0:
        raise HybridInferError(f"max ratio (predicted / true active) must be >= 1, got {max_ratio}")
    if max_tokens < 2 or skip_tokens < 0:
        raise HybridInferError("calibration needs max_tokens >= 2 and skip_tokens >= 0")
    window = max(2, min(window, llm.config.max_position_embeddings))
    ids = [i for text in texts for i in llm.tokenizer.encode(text)][skip_tokens:skip_tokens + max_tokens]
    windows = [ids[s:s + window] for s in range(0, len(ids), window) if len(ids[s:s + window]) >= 2]
    if not windows:
        raise HybridInferError(f"the calibration text has no tokens left after skipping {skip_tokens}")
    rec = record_scores(llm, windows)
    pos = torch.cat([s[y] for s, y in rec.values()])
    if pos.numel() == 0:
        raise HybridInferError("no neuron fired on the calibration text: nothing to calibrate")
    n_pos = pos.numel()
    k = min(n_pos, max(1, math.ceil(target_recall * n_pos - 1e-9)))
    s_k = float(pos.kthvalue(n_pos - k + 1).values)         # the k-th largest score of a fired neuron
    step = 10.0 ** -decimals
    t = round(math.floor(s_k / step) * step, decimals)
    while (pos > t).sum().item() < k:                       # float32 comparison, as the runtime's
        t = round(t - step, decimals)
    recall, precision, ratio = _pooled(rec, t)
    r0, p0, q0 = _pooled(rec, 0.0)
    n_tok = sum(len(w) for w in windows)
    if ratio > max_ratio:
        allsc = torch.cat([s.flatten() for s, _ in rec.values()])
        m = int(max_ratio * n_pos)
        t_r = float(allsc.kthvalue(allsc.numel() - m + 1).values) if 0 < m <= allsc.numel() else float("-inf")
        best = (pos > t_r).sum().item() / n_pos
        raise HybridInferError(
            f"no threshold gives recall >= {target_recall} with predicted <= {max_ratio}x true active: "
            f"recall {target_recall} needs threshold {t} ({ratio:.2f}x); within {max_ratio}x the best "
            f"recall is {best:.3f} (at threshold 0: recall {r0:.3f}, {q0:.2f}x; {n_tok} tokens)")
    per = []
    for (layer, e), (s, y) in sorted(rec.items()):
        r, pr, q = score(s > t, y)
        per.append(PredictorScore(layer, e, s.shape[0], r, pr, q))
    report = {"threshold": t, "target_recall": target_recall, "max_ratio": max_ratio, "recall": recall,
              "precision": precision, "ratio": ratio, "tokens": n_tok,
              "corpus": (corpus + (f" (tokens {skip_tokens}..{skip_tokens + n_tok})" if skip_tokens else "")).strip(),
              "threshold_0": {"recall": r0, "precision": p0, "ratio": q0}, "per_ffn": per}
    return t, report
