"""Activation predictors: which FFN neurons will fire for a given input.

TurboSparse / PowerInfer shape: score = fc2 · relu(fc1 · x), no biases; a neuron is predicted
active when score > threshold (TurboSparse applies sigmoid and rounds, i.e. score > 0).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Predictor(nn.Module):
    """x [n, d] -> scores [n, n_ff]."""

    def __init__(self, fc1: torch.Tensor, fc2: torch.Tensor, threshold: float = 0.0):
        super().__init__()
        self.fc1 = fc1  # [rank, d]
        self.fc2 = fc2  # [n_ff, rank]
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.relu(F.linear(x, self.fc1)), self.fc2)

    def active(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask [n, n_ff] of the neurons predicted to fire."""
        return self(x) > self.threshold
