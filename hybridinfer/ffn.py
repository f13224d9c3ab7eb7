"""FFN variants behind one interface: forward(x [n, d]) -> [n, d].

DenseFFN computes every neuron. MoE routes each token to its top-k experts (Mixtral's rule:
softmax over all experts in float32, top-k, renormalise) and sums their FFNs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .predictor import Predictor


def activate(g: torch.Tensor, u: torch.Tensor, kind: str, threshold: float = 0.0) -> torch.Tensor:
    """Gated activation a = act(g, u), elementwise; g, u: [n, n_ff]."""
    if kind == "drelu":      # TurboSparse: relu on both branches
        return F.relu(g) * F.relu(u)
    if kind == "relu":       # ReluLLaMA: relu(gate) * up
        return F.relu(g) * u
    if kind == "fatrelu":    # ProSparse: gate kept where above the threshold
        return torch.where(g > threshold, g, torch.zeros_like(g)) * u
    if kind == "silu":
        return F.silu(g) * u
    raise ValueError(f"unknown activation {kind!r}")


class DenseFFN(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor,
                 activation: str, threshold: float = 0.0, predictor: Predictor | None = None):
        super().__init__()
        self.gate = gate          # W1 [n_ff, d]
        self.up = up              # W3 [n_ff, d]
        self.down = down          # W2 [d, n_ff]
        self.activation = activation
        self.threshold = threshold
        self.predictor = predictor  # kept for the sparse modes; dense mode ignores it

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        """a [n, n_ff]: the neuron activations (zeros are the sparsity the runtime exploits)."""
        return activate(F.linear(x, self.gate), F.linear(x, self.up), self.activation, self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.activations(x), self.down)


class MoE(nn.Module):
    def __init__(self, router: torch.Tensor, experts: list[DenseFFN], top_k: int):
        super().__init__()
        self.router = router      # [n_experts, d]
        self.experts = nn.ModuleList(experts)
        self.top_k = top_k

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [n, d] -> (weights [n, k] in x's dtype, expert ids [n, k])."""
        probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)
        w, ids = torch.topk(probs, self.top_k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
        return w.to(x.dtype), ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, ids = self.route(x)
        out = torch.zeros_like(x)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            out.index_add_(0, tok, self.experts[e](x[tok]) * w[tok, slot, None])
        return out
