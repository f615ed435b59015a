"""What the model needs to know about the data: shapes, classes, task."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    task: str  # classification | regression | lm
    input_shape: tuple[int, ...]
    num_classes: int = 0  # classification
    target_dim: int = 1  # regression
    vocab_size: int = 0  # lm
    seq_len: int = 0  # lm
