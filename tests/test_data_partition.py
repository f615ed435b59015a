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


# ------------------------------------------------------------------ elastic: units of the configured global batch


def unit_plans(n, world, unit, batch, shards=None):
    ids = partition.shard_ids(shards, 0, 16, True) if shards else partition.memory_ids(n, 0, True)
    return [partition.UnitPlan(n, ids, unit, r, world, batch) for r in range(world)]


def take_steps(plans, consumed, steps, units_per_step):
    """The sample ids of each step on the ranks of `plans` from `consumed`, and the position after them."""
    its = [p.batches(0, consumed, 0) for p in plans]
    per_step, sizes = [], []
    for _ in range(steps):
        got = []
        for it in its:
            for _ in range(units_per_step * plans[0].pieces):
                ids = next(it)
                got.extend(ids.tolist())
                sizes.append(len(ids))
        per_step.append(sorted(got))
    taken = steps * units_per_step * plans[0].pieces
    return per_step, plans[0].after(0, consumed, taken, 0), sizes


@pytest.mark.parametrize("shards", [None, [40, 7, 90, 33, 61]])
@pytest.mark.parametrize("worlds", [[3, 2, 1, 3], [2, 1, 2], [4, 3, 2, 1]])
def test_unit_plan_same_steps_at_every_world_and_each_sample_once(shards, worlds):
    """Resized at step boundaries to any world in turn: every step holds the samples the configured world's step
    holds, no sample is read twice, and none is left but the tail shorter than a unit."""
    n = sum(shards) if shards else 231
    batch, configured, k = 6, worlds[0], 2  # unit = 6 x configured ranks; 2 units (accumulation) per step
    unit = batch * configured
    steps_per_epoch = n // unit // k
    reference, _, _ = take_steps(unit_plans(n, configured, unit, batch, shards), [], steps_per_epoch, k)
    got, consumed, rng = [], [], np.random.default_rng(0)
    cuts = sorted(rng.choice(np.arange(1, steps_per_epoch), size=len(worlds) - 1, replace=False).tolist())
    for world, (lo, hi) in zip(worlds, zip([0, *cuts], [*cuts, steps_per_epoch])):
        steps, consumed, sizes = take_steps(unit_plans(n, world, unit, batch, shards), consumed, hi - lo, k)
        got.extend(steps)
        assert max(sizes) <= batch and max(sizes) - min(sizes) <= 1  # uneven only by one sample, never above batch
    assert got == reference
    flat = [i for step in got for i in step]
    assert len(flat) == len(set(flat)) == steps_per_epoch * k * unit
    assert n - len(flat) < k * unit


def test_unit_plan_consumed_inside_a_unit_counts_each_ranks_pieces():
    plans = unit_plans(100, 2, 12, 4)  # unit 12 over 2 ranks of batch 4: 2 pieces of 3 each per rank
    assert plans[0].pieces == 2
    first = [next(plans[r].batches(0, [], 0)).tolist() for r in range(2)]
    consumed = plans[0].after(0, [], 1, 0)  # every rank took one piece of the first unit
    rest = [i for r in range(2) for b in plans[r].batches(0, consumed, 0) for i in b.tolist()]
    assert sum(hi - lo for lo, hi in consumed) == 6 and not set(rest) & {i for b in first for i in b}


def test_a_count_position_is_read_as_its_prefix():
    assert partition.as_intervals(36) == [(0, 36)]
    assert partition.as_count([(0, 12), (12, 36)]) == 36
    with pytest.raises(ValueError, match="not a prefix"):
        partition.as_count([(0, 5), (9, 12)])
