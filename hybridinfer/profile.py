"""Offline profiler: how often each FFN neuron fires, per layer and per expert -> NeuronProfile.

The model runs densely over calibration text; a neuron "fires" on a token when its activation
act(gate·x, up·x) is non-zero (what the exact and predictor modes skip). MoE experts are counted
over the tokens routed to them only, so `ffn_tokens` also gives each expert's routing frequency.

Saved as safetensors (atomic: temp file + os.replace):
  counts      int64 [layers, experts or 1, n_ff]   times neuron i fired
  ffn_tokens  int64 [layers, experts or 1]         tokens that reached that FFN
  metadata    schema_version, model_id, corpus, tokens, shapes (JSON)
PowerInfer's activation/activation_{L}.pt folders are read as a profile too (from_powerinfer).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from .atomic import atomic_path
from .checkpoint import load_activation_counts
from .config import ModelConfig
from .errors import HybridInferError

SCHEMA_VERSION = 1
DEFAULT_CORPUS = "python-tutorial.txt"   # in hybridinfer/data/, see its README.md


def model_identity(cfg: ModelConfig) -> str:
    """A stable string naming the architecture and every shape a profile or a plan depends on."""
    s = (f"{cfg.architecture}/L{cfg.num_layers}/d{cfg.hidden_size}/ff{cfg.intermediate_size}"
         f"/h{cfg.num_heads}kv{cfg.num_kv_heads}hd{cfg.head_dim}/V{cfg.vocab_size}/{cfg.activation}")
    if cfg.is_moe:
        s += f"/E{cfg.num_experts}k{cfg.experts_per_token}"
    return s


def default_profile_path(cfg: ModelConfig) -> Path:
    """Where `hybridinfer profile` writes by default and the loader looks: the user cache."""
    import hashlib

    from .default_model import cache_root
    return cache_root() / "profiles" / (hashlib.sha256(model_identity(cfg).encode()).hexdigest()[:16] + ".safetensors")


def ffn_keys(cfg: ModelConfig) -> list[tuple[int, int]]:
    """(layer, expert) of every FFN in order; expert = -1 for a dense FFN."""
    experts = range(cfg.num_experts) if cfg.is_moe else [-1]
    return [(layer, e) for layer in range(cfg.num_layers) for e in experts]


# ---- the calibration corpus -------------------------------------------------------------------

def default_corpus() -> str:
    """The shipped calibration text (the Python tutorial, PSF licence; see hybridinfer/data)."""
    return (resources.files("hybridinfer") / "data" / DEFAULT_CORPUS).read_text(encoding="utf-8")


def read_corpus(path: str | os.PathLike | None) -> tuple[str, list[str]]:
    """(name, texts): the shipped corpus for None, a UTF-8 file, or every *.txt/*.md under a folder."""
    if path is None:
        return f"hybridinfer/data/{DEFAULT_CORPUS}", [default_corpus()]
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md") and f.is_file())
        if not files:
            raise HybridInferError(f"corpus folder {p} holds no .txt or .md files")
    elif p.is_file():
        files = [p]
    else:
        raise HybridInferError(f"corpus {p} does not exist")
    texts = []
    for f in files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise HybridInferError(f"corpus file {f} is not UTF-8 text") from None
    if not any(t.strip() for t in texts):
        raise HybridInferError(f"corpus {p} is empty")
    return str(p), texts


def token_windows(tokenizer, texts: list[str], max_tokens: int, window: int) -> list[list[int]]:
    """The texts' token ids, concatenated and cut into windows of `window`, max_tokens in all."""
    out, n = [], 0
    for text in texts:
        ids = tokenizer.encode(text)
        for s in range(0, len(ids), window):
            chunk = ids[s:s + window][:max_tokens - n]
            if len(chunk) >= 2:
                out.append(chunk)
                n += len(chunk)
            if n >= max_tokens:
                return out
    return out


# ---- the profile ------------------------------------------------------------------------------

@dataclass(frozen=True)
class NeuronProfile:
    schema_version: int
    model_id: str                                  # model_identity(cfg)
    corpus: str                                    # what was read (a path or the shipped name)
    tokens: int                                    # tokens run through the model
    counts: dict[tuple[int, int], torch.Tensor]    # (layer, expert|-1) -> int64 [n_ff] fire counts
    ffn_tokens: torch.Tensor                       # int64 [layers, experts or 1]: tokens per FFN

    def reached(self, layer: int, expert: int) -> int:
        """Tokens that reached FFN (layer, expert)."""
        return int(self.ffn_tokens[layer, max(expert, 0)])

    def frequency(self, layer: int, expert: int) -> torch.Tensor:
        """float32 [n_ff]: P(neuron fires | the token reached this FFN)."""
        return self.counts[(layer, expert)].float() / max(self.reached(layer, expert), 1)

    def token_frequency(self, layer: int, expert: int) -> torch.Tensor:
        """float32 [n_ff]: P(neuron fires) per token of the text (routing included)."""
        return self.counts[(layer, expert)].float() / max(self.tokens, 1)

    def sparsity(self) -> float:
        """Share of (token, neuron) pairs of FFNs reached that were zero."""
        fired = sum(int(c.sum()) for c in self.counts.values())
        n_ff = next(iter(self.counts.values())).numel()
        return 1.0 - fired / max(int(self.ffn_tokens.sum()) * n_ff, 1)

    # -- files --
    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        layers, cols = self.ffn_tokens.shape
        n_ff = next(iter(self.counts.values())).numel()
        counts = torch.zeros(layers, cols, n_ff, dtype=torch.int64)
        for (layer, e), c in self.counts.items():
            counts[layer, max(e, 0)] = c
        meta = {"schema_version": str(self.schema_version), "model_id": self.model_id,
                "corpus": self.corpus, "tokens": str(self.tokens),
                "moe": "1" if any(e >= 0 for _, e in self.counts) else "0",
                "shapes": json.dumps({"counts": list(counts.shape), "ffn_tokens": [layers, cols]})}
        with atomic_path(path) as tmp:
            save_file({"counts": counts, "ffn_tokens": self.ffn_tokens.to(torch.int64).contiguous()},
                      tmp, metadata=meta)
        return path

    @staticmethod
    def load(path: str | os.PathLike, expect_model_id: str | None = None) -> "NeuronProfile":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise HybridInferError(f"profile {path} does not exist")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                counts, ffn_tokens = f.get_tensor("counts"), f.get_tensor("ffn_tokens")
        except Exception:  # noqa: BLE001 - any parse failure means a bad file
            raise HybridInferError(f"{path} is not a valid hybridinfer profile (corrupt or not safetensors)") from None
        try:
            version, model_id = int(meta["schema_version"]), meta["model_id"]
            tokens, moe = int(meta["tokens"]), meta["moe"] == "1"
        except (KeyError, ValueError):
            raise HybridInferError(f"{path} lacks the profile metadata (schema_version, model_id, tokens)") from None
        if version != SCHEMA_VERSION:
            raise HybridInferError(f"{path} has profile schema {version}; this hybridinfer reads {SCHEMA_VERSION}")
        if (counts.dim() != 3 or ffn_tokens.shape != counts.shape[:2] or counts.dtype != torch.int64
                or ffn_tokens.dtype != torch.int64 or bool((counts < 0).any())):
            raise HybridInferError(f"{path}: counts {list(counts.shape)} / ffn_tokens {list(ffn_tokens.shape)} "
                                   "are not a consistent profile")
        if expect_model_id is not None and model_id != expect_model_id:
            raise HybridInferError(f"profile {path} was made for another model ({model_id}), not {expect_model_id}")
        layers, cols, _ = counts.shape
        d = {(layer, e if moe else -1): counts[layer, e].clone() for layer in range(layers) for e in range(cols)}
        return NeuronProfile(version, model_id, meta.get("corpus", ""), tokens, d, ffn_tokens)

    @staticmethod
    def from_powerinfer(folder: str | os.PathLike, cfg: ModelConfig) -> "NeuronProfile":
        """PowerInfer's activation/activation_{L}.pt (1-D counts per layer, dense models only).

        Those files do not say how many tokens were run: `tokens` is set to the largest count (a
        lower bound), so frequencies are relative; placement only needs their order and ratios."""
        if cfg.is_moe:
            raise HybridInferError("PowerInfer activation files hold one count vector per layer; "
                                   f"{cfg.architecture} is a mixture of experts: run `hybridinfer profile`")
        layers = load_activation_counts(folder)
        if len(layers) != cfg.num_layers:
            raise HybridInferError(f"{folder}: {len(layers)} activation files, the model has {cfg.num_layers} layers")
        counts = {}
        for i, t in enumerate(layers):
            if t.numel() != cfg.intermediate_size:
                raise HybridInferError(f"{folder}: activation_{i}.pt has {t.numel()} neurons, "
                                       f"the model has {cfg.intermediate_size}")
            if bool((t < 0).any()) or not bool(torch.isfinite(t.double()).all()):
                raise HybridInferError(f"{folder}: activation_{i}.pt holds negative or non-finite counts")
            counts[(i, -1)] = t.double().round().to(torch.int64)
        tokens = max(int(max(int(c.max()) for c in counts.values())), 1)
        ffn_tokens = torch.full((cfg.num_layers, 1), tokens, dtype=torch.int64)
        return NeuronProfile(SCHEMA_VERSION, model_identity(cfg), f"powerinfer:{folder}", tokens, counts, ffn_tokens)


# ---- profiling a loaded model -----------------------------------------------------------------

def model_ffns(model) -> dict[tuple[int, int], torch.nn.Module]:
    """(layer, expert|-1) -> the DenseFFN module of a dense Transformer (model.py)."""
    out = {}
    for layer, blk in enumerate(model.blocks):
        experts = getattr(blk.ffn, "experts", None)
        if experts is None:
            out[(layer, -1)] = blk.ffn
        else:
            out.update({(layer, e): m for e, m in enumerate(experts)})
    if not all(callable(getattr(m, "activations", None)) for m in out.values()):
        raise HybridInferError("profiling and predictor training need the dense model: load(..., sparsity='dense')")
    return out


class ActivationTap:
    """Context manager: wraps each FFN's `activations(x)` (an instance attribute shadows the method,
    model.py is untouched) and calls fn(key, x [n, d], a [n, n_ff]) on every call. MoE experts are
    called on their routed tokens only, so fn sees exactly the tokens that reached each FFN."""

    def __init__(self, model, fn):
        self.ffns, self.fn = model_ffns(model), fn

    def __enter__(self):
        for key, m in self.ffns.items():
            orig = m.activations

            def tapped(x, _orig=orig, _key=key):
                a = _orig(x)
                self.fn(_key, x, a)
                return a
            m.activations = tapped
        return self

    def __exit__(self, *exc):
        for m in self.ffns.values():
            m.__dict__.pop("activations", None)


@torch.inference_mode()
def profile_model(llm, texts: list[str], max_tokens: int, progress: bool = True,
                  corpus: str = "", window: int = 512) -> NeuronProfile:
    """Run llm's model densely over texts (at most max_tokens tokens) and count neuron firings."""
    from tqdm import tqdm

    cfg, model = llm.config, llm.model
    if max_tokens < 1:
        raise HybridInferError("the profile needs at least one token (--tokens)")
    window = max(2, min(window, cfg.max_position_embeddings))
    chunks = token_windows(llm.tokenizer, texts, max_tokens, window)
    if not chunks:
        raise HybridInferError("the corpus has too little text to profile")
    cols = cfg.num_experts if cfg.is_moe else 1
    dev = model.device
    counts = {k: torch.zeros(cfg.intermediate_size, dtype=torch.int64, device=dev) for k in ffn_keys(cfg)}
    ffn_tokens = torch.zeros(cfg.num_layers, cols, dtype=torch.int64)

    def count(key, x, a):
        counts[key] += (a != 0).sum(0)
        ffn_tokens[key[0], max(key[1], 0)] += a.shape[0]

    n = 0
    with ActivationTap(model, count), tqdm(total=sum(map(len, chunks)), unit="tok", disable=not progress,
                                            desc="profile") as bar:
        for chunk in chunks:
            cache = model.new_cache(len(chunk))
            model(torch.tensor([chunk], device=dev), cache, last_only=True)
            n += len(chunk)
            bar.update(len(chunk))
    return NeuronProfile(SCHEMA_VERSION, model_identity(cfg), corpus, n,
                         {k: v.cpu() for k, v in counts.items()}, ffn_tokens)
