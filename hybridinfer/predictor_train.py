"""Training and scoring activation predictors (predictor.py holds the predictor itself, its files
and its threshold config): record a model's FFN inputs and firing masks on text, fit one low-rank
predictor per FFN, score it on held-out tokens, and calibrate the score threshold to a recall
target. Used by `hybridinfer train-predictors` and `hybridinfer calibrate-predictors`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import HybridInferError
from .predictor import Predictor, PredictorScore, predictor_names


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
