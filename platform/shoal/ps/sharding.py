"""Pure: split parameters into shards balanced by bytes; one flat buffer per shard."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shoal.errors import ConfigError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    decay: bool  # in the weight-decayed group

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


def balance(sizes: list[int], num_shards: int) -> list[list[int]]:
    """Tensor indices per shard: largest first onto the lightest shard (each shard's list sorted)."""
    if num_shards < 1 or num_shards > len(sizes):
        raise ConfigError(
            f"must be between 1 and the number of trainable parameter tensors ({len(sizes)}); got {num_shards}",
            key="ps.num_shards",
        )
    loads = [0] * num_shards
    shards: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = min(range(num_shards), key=lambda s: (loads[s], s))
        shards[k].append(i)
        loads[k] += sizes[i]
    return [sorted(s) for s in shards]


def offsets(specs: list[TensorSpec]) -> list[int]:
    """Start of each tensor in its shard's flat buffer."""
    return [int(x) for x in np.concatenate([[0], np.cumsum([s.numel for s in specs])])[:-1]]


def flatten(arrays: list[np.ndarray]) -> np.ndarray:
    """One contiguous float32 buffer."""
    return (
        np.concatenate([np.asarray(a, dtype=np.float32).ravel() for a in arrays]) if arrays else np.zeros(0, np.float32)
    )
