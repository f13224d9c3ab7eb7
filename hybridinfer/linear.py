"""The one dispatch point for a linear layer (attention projections, lm_head, predictors).

A weight is a torch tensor [out, in] (F.linear, on whatever device it lives), a
kernels.cpu.PackedLinear (packed rows read by the C++ kernels on the CPU, e.g. q4_0 as llama.cpp
reads them: torch's float matmuls are slow on CPUs without bf16 units) or a
kernels.gpu.DeviceLinear (q4_0 rows on the GPU side, read by a Triton GEMV at decode).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .kernels import cpu as cpu_kernels
from .kernels import gpu as gpu_kernels


def linear(x: torch.Tensor, w, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] -> [..., out] = x W^T (+ bias), in x's dtype: the one dispatch point for a
    linear layer. w: a torch tensor [out, in] (F.linear, on any device); a kernels.gpu.DeviceLinear
    (x on its device); a kernels.cpu.PackedLinear (x on the CPU; computed in float32)."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    if isinstance(w, gpu_kernels.DeviceLinear):
        y = gpu_kernels.device_linear(x, w)
        return y if bias is None else y + bias
    y = cpu_kernels.linear(x.reshape(-1, x.shape[-1]).float().contiguous(), w)
    y = y.view(*x.shape[:-1], w.out_features)
    if bias is not None:
        y = y + bias
    return y if x.dtype == torch.float32 else y.to(x.dtype)
