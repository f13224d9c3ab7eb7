"""Bytes each part of a model takes on the GPU: the one formula the planner budgets with and the
builder allocates by (the builder checks its real allocation against these numbers).

fmt is the weight format of the rows kept on the GPU: "f16", "bf16", "f32", "q8_0", "q4_0".
"""
from __future__ import annotations

from .config import ModelConfig
from .quant import QK, row_bytes

_ELT = {"f32": 4, "f16": 2, "bf16": 2}
ID_BYTES = 4   # int32 map from a compact GPU row to its neuron id


def ffn_rows_bytes(n_rows: int, d_model: int, fmt: str) -> int:
    """n_rows hot neurons of one FFN: gate, up and down^T rows [n_rows, d] + the int32 id map."""
    return n_rows * (3 * row_bytes(d_model, fmt) + ID_BYTES)


def warm_ids_bytes(n_warm: int) -> int:
    """n_warm warm neurons (rows in page-locked host memory the GPU reads over PCIe): only their
    int32 neuron ids live on the GPU, for the kernels' mask lookup."""
    return n_warm * ID_BYTES


def dense_bytes(numel: int, dtype_bytes: int = 2) -> int:
    """Norms, attention, router, predictors, embeddings kept unquantised (f16/bf16 by default)."""
    return numel * dtype_bytes


LINEAR_FORMATS = ("q4_0",)   # block formats the GPU side keeps dense linear layers in (a Triton GEMV reads them)


def linear_fmt(gpu_fmt: str) -> str | None:
    """The format of the dense linear layers (attention projections, lm_head) on the GPU side
    when its hot rows are in gpu_fmt: that block format where a GEMV kernel reads it (q4_0, as
    llama.cpp keeps a q4_0 model's attention), else None (2-byte floats)."""
    return gpu_fmt if gpu_fmt in LINEAR_FORMATS else None


def linear_bytes(out_features: int, in_features: int, fmt: str | None, dtype_bytes: int = 2) -> int:
    """One dense linear weight [out, in] on the GPU side: packed rows in fmt, or floats (fmt None,
    or rows that blocks do not fit: kept as floats)."""
    if fmt is None or in_features % QK:
        return out_features * in_features * dtype_bytes
    return out_features * row_bytes(in_features, fmt)


def attention_bytes(cfg: ModelConfig, fmt: str | None, dtype_bytes: int = 2) -> int:
    """q, k, v, o weights of one layer (no biases) on the GPU side."""
    d, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return (linear_bytes(q, d, fmt, dtype_bytes) + 2 * linear_bytes(kv, d, fmt, dtype_bytes)
            + linear_bytes(d, q, fmt, dtype_bytes))


def attention_numel(cfg: ModelConfig) -> int:
    """q, k, v, o projections of one layer."""
    d, hd = cfg.hidden_size, cfg.head_dim
    return d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype_bytes: int = 2, batch: int = 1) -> int:
    """K and V for every layer: [batch, kv_heads, context, head_dim] x 2 x layers."""
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * context * cfg.head_dim * dtype_bytes
