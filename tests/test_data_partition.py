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
    rest = [
        x
        for r in range(world_after)
        for b in partition.rank_batches(order, r, world_after, batch, consumed)
        for x in b.tolist()
    ]
    assert not seen & set(rest)
    assert len(rest) == len(set(rest))
    assert n - consumed - len(rest) <= world_after * batch - 1


def test_eval_split_covers_every_sample_once():
    parts = [partition.shard_for_eval(11, r, 3) for r in range(3)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(11))


SHARDS = [[5, 17, 3, 29, 11, 8, 40], [100], [1, 1, 1], [64] * 9]


def shard_epoch(plan_counts, world, batch, workers, window, consumed=None, epoch=0):
    plans = [partition.ShardPlan(plan_counts, 0, True, window, r, world, batch) for r in range(world)]
    return [list(p.batches(epoch, consumed or [], workers)) for p in plans]


@pytest.mark.parametrize("counts", SHARDS)
@pytest.mark.parametrize("world, batch, workers, window", [(1, 4, 0, 8), (2, 3, 2, 5), (3, 2, 4, 1000), (4, 5, 3, 16)])
def test_shard_plan_equal_batches_each_sample_once(counts, world, batch, workers, window):
    per_rank = shard_epoch(counts, world, batch, workers, window)
    assert len({len(b) for b in per_rank}) == 1
    used = [i for batches in per_rank for b in batches for i in b.tolist()]
    assert len(used) == len(set(used))
    assert sum(counts) - len(used) <= world * batch - 1
    assert set(used) <= set(range(sum(counts)))


def test_epoch_order_is_a_permutation_that_depends_on_seed_and_epoch():
    o = partition.EpochOrder([5, 17, 3, 29], seed=1, epoch=0, window=7)
    ids = o.ids(np.arange(54))
    assert sorted(ids.tolist()) == list(range(54))
    assert not np.array_equal(ids, partition.EpochOrder([5, 17, 3, 29], 1, 1, 7).ids(np.arange(54)))
    assert np.array_equal(partition.EpochOrder([5, 17], 0, 0, 4, shuffle=False).ids(np.arange(22)), np.arange(22))


@pytest.mark.parametrize(
    "world_before, world_after, workers_before, workers_after", [(2, 2, 2, 2), (2, 3, 0, 1), (3, 1, 4, 0), (1, 4, 1, 3)]
)
@pytest.mark.parametrize("taken", [1, 3, 7])
def test_shard_plan_resume_any_layout_reads_only_unseen(
    world_before, world_after, workers_before, workers_after, taken
):
    counts, batch, window = [5, 17, 3, 29, 11, 8, 40, 60], 3, 8
    before = shard_epoch(counts, world_before, batch, workers_before, window)
    seen = {i for batches in before for b in batches[:taken] for i in b.tolist()}
    plan = partition.ShardPlan(counts, 0, True, window, 0, world_before, batch)
    consumed = plan.after(0, [], taken, workers_before)
    assert sum(hi - lo for lo, hi in consumed) == len(seen) == taken * world_before * batch
    # resume twice over: the second resume builds on intervals from the first
    after = shard_epoch(counts, world_after, batch, workers_after, window, consumed)
    rest = [i for batches in after for b in batches for i in b.tolist()]
    assert not seen & set(rest) and len(rest) == len(set(rest))
    assert sum(counts) - len(seen) - len(rest) <= world_after * batch - 1
    plan2 = partition.ShardPlan(counts, 0, True, window, 0, world_after, batch)
    consumed2 = plan2.after(0, consumed, 2, workers_after)
    seen2 = seen | {i for batches in after for b in batches[:2] for i in b.tolist()}
    again = shard_epoch(counts, 2, batch, 1, window, consumed2)
    rest2 = [i for batches in again for b in batches for i in b.tolist()]
    assert not seen2 & set(rest2)
