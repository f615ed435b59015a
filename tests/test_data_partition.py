"""The pure partition: equal batches per rank, every sample at most once, bounded leftovers,
resume by global position, for any world size."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from shoal.data import partition


@pytest.mark.parametrize("n, world, batch", list(itertools.product([1, 7, 64, 1001], [1, 2, 3, 8], [1, 4, 5])))
def test_equal_batches_no_repeats_bounded_leftover(n, world, batch):
    order = partition.epoch_order(n, seed=3, epoch=0)
    per_rank = [list(partition.rank_batches(order, r, world, batch)) for r in range(world)]
    counts = {len(b) for b in per_rank}
    assert len(counts) == 1, "ranks must read the same number of batches"
    assert counts.pop() == partition.batches_per_epoch(n, world, batch)
    used = np.concatenate([np.concatenate(b) for b in per_rank if b]) if any(per_rank) else np.array([], dtype=np.int64)
    assert len(used) == len(set(used.tolist()))
    assert n - len(used) <= world * batch - 1
    assert all(len(x) == batch for b in per_rank for x in b)


def test_order_depends_on_seed_and_epoch_only():
    a = partition.epoch_order(100, seed=1, epoch=0)
    assert np.array_equal(a, partition.epoch_order(100, seed=1, epoch=0))
    assert not np.array_equal(a, partition.epoch_order(100, seed=1, epoch=1))
    assert not np.array_equal(a, partition.epoch_order(100, seed=2, epoch=0))
    assert np.array_equal(partition.epoch_order(5, 0, 0, shuffle=False), np.arange(5))


@pytest.mark.parametrize("world_before, world_after", [(2, 2), (2, 3), (4, 1), (1, 2)])
def test_resume_from_global_position_reads_exactly_the_unseen_samples(world_before, world_after):
    n, batch = 200, 4
    order = partition.epoch_order(n, seed=0, epoch=0)
    consumed = 5 * world_before * batch  # five global batches done
    seen = set(order[:consumed].tolist())
    rest = [x for r in range(world_after) for b in partition.rank_batches(order, r, world_after, batch, consumed) for x in b.tolist()]
    assert not seen & set(rest)
    assert len(rest) == len(set(rest))
    assert n - consumed - len(rest) <= world_after * batch - 1


def test_eval_split_covers_every_sample_once():
    parts = [partition.shard_for_eval(11, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))
