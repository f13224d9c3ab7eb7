"""Bytes each part of a model takes on the GPU: the one formula the planner budgets with and the
builder allocates by (the builder checks its real allocation against these numbers).

fmt is the weight format of the rows kept on the GPU: "f16", "bf16", "f32", "q8_0", "q4_0".
"""
from __future__ import annotations

from .config import ModelConfig
from .quant import row_bytes

_ELT = {"f32": 4, "f16": 2, "bf16": 2}
ID_BYTES = 4   # int32 map from a compact GPU row to its neuron id


def ffn_rows_bytes(n_rows: int, d_model: int, fmt: str) -> int:
    """n_rows hot neurons of one FFN: gate, up and down^T rows [n_rows, d] + the int32 id map."""
    return n_rows * (3 * row_bytes(d_model, fmt) + ID_BYTES)


def dense_bytes(numel: int, dtype_bytes: int = 2) -> int:
    """Norms, attention, router, predictors, embeddings kept unquantised (f16/bf16 by default)."""
    return numel * dtype_bytes


def attention_numel(cfg: ModelConfig) -> int:
    """q, k, v, o projections of one layer."""
    d, hd = cfg.hidden_size, cfg.head_dim
    return d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 2, batch: int = 1) -> int:
    """K and V for every layer: [batch, kv_heads, context, head_dim] x 2 x layers."""
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * context * cfg.head_dim * dtype_bytes
