"""A model for the benchmarks (model.target): Shoal's built-in MLP whose forward pass sleeps on one
rank, a slow worker. Test and benchmark hooks live here, not in the training step."""

from __future__ import annotations

import os
import time

from torch import nn

from shoal.config import ModelConfig
from shoal.models import MLP, init_weights


class Straggler(nn.Module):
    def __init__(self, model: nn.Module, rank: int, delay_s: float):
        super().__init__()
        self.model = model
        self.slow = delay_s if os.environ.get("RANK") == str(rank) else 0.0

    def forward(self, x):
        if self.slow and self.training:
            time.sleep(self.slow)
        return self.model(x)


def slow_mlp(
    in_features: int, classes: int, width: int = 128, depth: int = 2, rank: int = 1, delay_s: float = 0.05
) -> nn.Module:
    """The quickstart's MLP (he init) on in_features -> classes; rank `rank` sleeps delay_s per micro-batch."""
    cfg = ModelConfig(width=width, depth=depth, init="he")
    model = MLP(in_features, classes, cfg)
    init_weights(model, cfg)
    return Straggler(model, rank, delay_s)
