"""Which samples each rank reads, step by step: pure functions of (n, seed, epoch, position, world).

The order of an epoch is one global permutation. Consumption advances in global batches of
world_size x batch_size samples; rank r takes the r-th slice of each. The position saved in a
checkpoint is therefore one global number (samples consumed this epoch), valid for any world size:
a job resumed with more or fewer ranks continues with exactly the samples not yet seen.

Guarantee: every rank gets the same number of batches; within an epoch every sample is used at
most once and at most world_size x batch_size - 1 samples are left out.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global sample order of one epoch, seeded by (seed, epoch)."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x5EED]))
    return rng.permutation(n).astype(np.int64)


def batches_per_epoch(n: int, world_size: int, batch_size: int, consumed: int = 0) -> int:
    """Batches each rank still reads this epoch from a global position."""
    return max(0, (n - consumed) // (world_size * batch_size))


def rank_batches(
    order: np.ndarray, rank: int, world_size: int, batch_size: int, consumed: int = 0
) -> Iterator[np.ndarray]:
    """Yield this rank's index batches for the rest of the epoch from global position `consumed`."""
    step = world_size * batch_size
    for start in range(consumed, len(order) - step + 1, step):
        lo = start + rank * batch_size
        yield order[lo : lo + batch_size]


def shard_for_eval(n: int, rank: int, world_size: int) -> np.ndarray:
    """Validation indices of one rank: every sample exactly once across ranks (counts may differ by 1)."""
    return np.arange(rank, n, world_size, dtype=np.int64)
