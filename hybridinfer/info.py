"""What a checkpoint holds, per component, read from headers alone (no weights loaded)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from .checkpoint import Checkpoint
from .config import ModelConfig

_COMPONENTS = [  # first match wins
    ("predictors", r"\.predictor\."),
    ("router", r"block_sparse_moe\.gate\."),
    ("experts", r"block_sparse_moe\.experts\."),
    ("ffn", r"\.mlp\."),
    ("attention", r"\.self_attn\."),
    ("norms", r"norm\.weight$"),
    ("embeddings", r"embed_tokens"),
    ("lm_head", r"^lm_head"),
]


@dataclass(frozen=True)
class ComponentSize:
    name: str
    params: int
    bytes: int


def component_sizes(ckpt: Checkpoint) -> list[ComponentSize]:
    params: dict[str, int] = {}
    nbytes: dict[str, int] = {}
    for name in ckpt.names():
        comp = next((c for c, rx in _COMPONENTS if re.search(rx, name)), "other")
        n = 1
        for s in ckpt.shape(name):
            n *= s
        params[comp] = params.get(comp, 0) + n
        nbytes[comp] = nbytes.get(comp, 0) + ckpt.nbytes(name)
    order = [c for c, _ in _COMPONENTS] + ["other"]
    return [ComponentSize(c, params[c], nbytes[c]) for c in order if c in params]


def active_params(cfg: ModelConfig, sizes: list[ComponentSize]) -> int:
    """Parameters touched per token when dense: all but the unrouted experts and predictors."""
    total = 0
    for s in sizes:
        if s.name == "experts":
            total += s.params * cfg.experts_per_token // cfg.num_experts
        elif s.name not in ("predictors", "embeddings"):
            total += s.params
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)
