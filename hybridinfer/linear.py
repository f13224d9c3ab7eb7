"""The one dispatch point for a linear layer (attention projections, lm_head, predictors).

A weight is either a torch tensor [out, in] (F.linear, on whatever device it lives) or a
kernels.cpu.PackedLinear (packed rows read by the C++ kernels on the CPU, e.g. q4_0 as llama.cpp
reads them: torch's float matmuls are slow on CPUs without bf16 units).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import cpu as cpu_kernels


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] = x W^T (+ bias): the one dispatch point for a linear layer.
    w is a torch tensor [out, in] (F.linear, on any device) or a kernels.cpu.PackedLinear (the
    C++ kernels over packed rows, e.g. q4_0 on the CPU: x must be on the CPU; computed in
    float32, returned in x's dtype)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = cpu_kernels.linear(x.reshape(-1, x.shape[-1]).float().contiguous(), w)
    y = y.view(*x.shape[:-1], w.out_features)
    if bias is not None:
        y = y + bias
    return y if x.dtype == torch.float32 else y.to(x.dtype)
