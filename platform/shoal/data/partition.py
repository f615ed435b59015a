"""Which samples each rank reads, step by step: pure functions of (n, seed, epoch, position, world).

The order of an epoch is one global permutation. Consumption advances in global batches of
world_size x batch_size samples; rank r takes the r-th slice of each. The position saved in a
checkpoint is therefore one global number (samples consumed this epoch), valid for any world size:
a job resumed with more or fewer ranks continues with exactly the samples not yet seen.

Guarantee: every rank gets the same number of batches; within an epoch every sample is used at
most once and at most world_size x batch_size - 1 samples are left out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
    """Validation indices of one rank: a contiguous share, every sample exactly once across ranks."""
    return np.arange(n * rank // world_size, n * (rank + 1) // world_size, dtype=np.int64)


# ------------------------------------------------------------------ shard plans
#
# For shards the epoch is a sequence of positions 0..N-1. Position p names one sample id through a
# seeded, per-epoch mapping: shards in permuted order (shard-major, so a stream reads each shard
# front to back), then samples shuffled inside windows of `window` consecutive positions (the
# shuffle buffer: exact, so it can be resumed). The ranks split the positions not yet consumed
# into equal contiguous spans of whole batches; each DataLoader worker reads a contiguous part of
# its rank's span. A reader therefore touches each shard region once, and the consumed set after
# c batches on every rank is a pure function of the layout: checkpoints store it as intervals of
# positions, valid for any world size or number of loader workers.

Intervals = list[tuple[int, int]]


class EpochOrder:
    """Position -> sample id for one epoch of a sharded data set (pure, O(shards + window) memory)."""

    def __init__(self, shard_counts: list[int], seed: int, epoch: int, window: int, shuffle: bool = True):
        counts = np.asarray(shard_counts, dtype=np.int64)
        self.n = int(counts.sum())
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])  # id of each shard's first sample
        rng = np.random.Generator(np.random.PCG64([seed, epoch, 0x5AAD]))
        order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
        self.shard_starts = starts[order]
        self.cum = np.concatenate([[0], np.cumsum(counts[order])])  # position where each permuted shard begins
        self.window = max(1, window) if shuffle else 0
        self.seed, self.epoch = seed, epoch
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _base(self, positions: np.ndarray) -> np.ndarray:
        shard = np.searchsorted(self.cum, positions, side="right") - 1
        return self.shard_starts[shard] + (positions - self.cum[shard])

    def _window_perm(self, w: int) -> np.ndarray:
        if self._perm_cache is None or self._perm_cache[0] != w:
            size = min(self.window, self.n - w * self.window)
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch, w, 0x0B0F]))
            self._perm_cache = (w, rng.permutation(size))
        return self._perm_cache[1]

    def ids(self, positions: np.ndarray) -> np.ndarray:
        """Sample ids at these positions of the epoch."""
        positions = np.asarray(positions, dtype=np.int64)
        if not self.window:
            return self._base(positions)
        windows = positions // self.window
        if len(windows) and windows.min() == windows.max():  # a batch's positions are a span: usually one window
            w = int(windows[0])
            return self._base(w * self.window + self._window_perm(w)[positions - w * self.window])
        out = np.empty_like(positions)
        for w in np.unique(windows):
            sel = windows == w
            out[sel] = w * self.window + self._window_perm(int(w))[positions[sel] - w * self.window]
        return self._base(out)


def complement(n: int, consumed: Intervals) -> Intervals:
    """The positions of [0, n) not in `consumed` (sorted, disjoint intervals)."""
    out: Intervals = []
    cur = 0
    for lo, hi in merge(consumed):
        if lo > cur:
            out.append((cur, lo))
        cur = max(cur, hi)
    if cur < n:
        out.append((cur, n))
    return out


def merge(intervals: Intervals) -> Intervals:
    """Sorted union of half-open intervals."""
    out: Intervals = []
    for lo, hi in sorted((int(a), int(b)) for a, b in intervals if b > a):
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


class _Remaining:
    """The positions of an epoch not yet consumed, indexed 0.. in order, without materialising them."""

    def __init__(self, n: int, consumed: Intervals):
        self.remaining = complement(n, consumed)
        lengths = np.array([hi - lo for lo, hi in self.remaining], dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(lengths)])

    @property
    def left(self) -> int:
        return int(self.cum[-1])

    def _positions(self, lo: int, hi: int) -> np.ndarray:
        """Global positions of remaining-index range [lo, hi)."""
        parts = [np.arange(a, b, dtype=np.int64) for a, b in self._intervals(lo, hi)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def _intervals(self, lo: int, hi: int) -> Intervals:
        """Global position intervals of remaining-index range [lo, hi)."""
        out: Intervals = []
        k = int(np.searchsorted(self.cum, lo, side="right")) - 1
        while lo < hi and k < len(self.remaining):
            start, end = self.remaining[k]
            a = start + (lo - int(self.cum[k]))
            b = min(end, a + (hi - lo))
            out.append((a, b))
            lo += b - a
            k += 1
        return out


class SpanLayout(_Remaining):
    """Where each rank's and loader worker's batches lie among the positions left this epoch."""

    def __init__(self, n: int, consumed: Intervals, world_size: int, batch_size: int, loader_workers: int):
        super().__init__(n, consumed)
        self.world, self.batch = world_size, batch_size
        self.nw = max(1, loader_workers)
        self.batches_per_rank = self.left // (world_size * batch_size)
        per = self.batches_per_rank
        self.worker_counts = [per // self.nw + (1 if w < per % self.nw else 0) for w in range(self.nw)]
        self.worker_starts = np.concatenate([[0], np.cumsum(self.worker_counts)])

    def _batch_range(self, rank: int, worker: int, j: int) -> tuple[int, int]:
        start = (rank * self.batches_per_rank + int(self.worker_starts[worker]) + j) * self.batch
        return start, start + self.batch

    def order(self) -> list[tuple[int, int]]:
        """(worker, j) of the rank's batches in the order a DataLoader hands them out (round robin)."""
        out = []
        for j in range(max(self.worker_counts, default=0)):
            out.extend((w, j) for w in range(self.nw) if j < self.worker_counts[w])
        return out

    def rank_batches(self, rank: int) -> Iterator[np.ndarray]:
        """Positions of this rank's batches, in DataLoader order (batch i goes to worker i % workers)."""
        for w, j in self.order():
            yield self._positions(*self._batch_range(rank, w, j))

    def consumed_after(self, taken: int) -> Intervals:
        """Positions consumed when every rank has taken `taken` batches (union over ranks)."""
        done: Intervals = []
        taken_per_worker = [0] * self.nw
        for w, _ in self.order()[:taken]:
            taken_per_worker[w] += 1
        for rank in range(self.world):
            for w, t in enumerate(taken_per_worker):
                if t:
                    lo = self._batch_range(rank, w, 0)[0]
                    done.extend(self._intervals(lo, lo + t * self.batch))
        return merge(done)


# ------------------------------------------------------------------ plans: what TrainStream asks
#
# A plan turns (epoch, consumed) into this rank's batches of sample ids and says what is consumed
# after `taken` batches on every rank. MemoryPlan's `consumed` is a count of global samples;
# ShardPlan's is a list of position intervals.


class MemoryPlan:
    """In-memory data: one global permutation per epoch, global batches dealt across ranks."""

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int, world_size: int, batch_size: int):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world, self.batch = rank, world_size, batch_size

    def fresh(self) -> int:
        return 0

    def batches(self, epoch: int, consumed: int | Intervals, loader_workers: int) -> Iterator[np.ndarray]:
        order = epoch_order(self.n, self.seed, epoch, self.shuffle)
        return rank_batches(order, self.rank, self.world, self.batch, as_count(consumed))

    def after(self, epoch: int, consumed: int | Intervals, taken: int, loader_workers: int) -> int:
        return as_count(consumed) + taken * self.world * self.batch

    def num_batches(self, consumed: int | Intervals) -> int:
        return batches_per_epoch(self.n, self.world, self.batch, as_count(consumed))


def as_count(consumed: int | Intervals) -> int:
    """An in-memory plan's position: a count, or (from an elastic run's checkpoint) the one prefix interval it was."""
    if isinstance(consumed, int):
        return consumed
    spans = merge(list(consumed))
    if not spans:
        return 0
    if len(spans) > 1 or spans[0][0] != 0:
        # an elastic run stopped inside a unit: its consumed set is no prefix of the order
        raise ValueError("the data position is not a prefix of the epoch; resume with scaling.min_workers as saved")
    return spans[0][1]


class ShardPlan:
    """Sharded data: contiguous per-rank spans of the epoch's positions (see EpochOrder, SpanLayout)."""

    def __init__(
        self,
        shard_counts: list[int],
        seed: int,
        shuffle: bool,
        window: int,
        rank: int,
        world_size: int,
        batch_size: int,
    ):
        self.counts = list(shard_counts)
        self.n = sum(self.counts)
        self.seed, self.shuffle, self.window = seed, shuffle, window
        self.rank, self.world, self.batch = rank, world_size, batch_size

    def fresh(self) -> Intervals:
        return []

    def batches(self, epoch: int, consumed: Intervals, loader_workers: int) -> Iterator[np.ndarray]:
        order = EpochOrder(self.counts, self.seed, epoch, self.window, self.shuffle)
        layout = SpanLayout(self.n, consumed, self.world, self.batch, loader_workers)
        return (order.ids(pos) for pos in layout.rank_batches(self.rank))

    def after(self, epoch: int, consumed: Intervals, taken: int, loader_workers: int) -> Intervals:
        layout = SpanLayout(self.n, consumed, self.world, self.batch, loader_workers)
        return merge(list(consumed) + layout.consumed_after(taken))

    def num_batches(self, consumed: Intervals) -> int:
        return SpanLayout(self.n, consumed, self.world, self.batch, 1).batches_per_rank


# ------------------------------------------------------------------ elastic plans
#
# With scaling.min_workers the world may change mid-epoch, and the run must stay the run it would have
# been: the same samples in every optimizer step whatever the world size. The positions left are cut
# into units of the configured global micro-batch (num_workers x batch_size samples, whatever the world
# now); step s takes the next k units (k = the accumulation count of that step). A unit is cut into
# pieces_per_rank x world pieces of sizes as even as possible (differing by at most one sample, none
# larger than batch_size); rank r takes pieces r x pieces_per_rank ... of every unit. What a step
# consumes is therefore a prefix of the positions left, the same set at any world size, so a resize at a
# step boundary reads exactly the positions not yet seen. Loader workers take batches round robin and
# leave the order as it is.


def pieces_per_rank(unit: int, world_size: int, batch_size: int) -> int:
    """Micro-batches each rank takes of one unit of `unit` samples, so that none exceeds batch_size."""
    return max(1, -(-unit // (world_size * batch_size)))


class UnitLayout(_Remaining):
    """Where each rank's pieces of every unit lie among the positions left this epoch."""

    def __init__(self, n: int, consumed: Intervals, unit: int, world_size: int, batch_size: int):
        super().__init__(n, consumed)
        self.unit, self.world = unit, world_size
        self.pieces = pieces_per_rank(unit, world_size, batch_size)
        self.units = self.left // unit

    def _piece(self, u: int, p: int) -> tuple[int, int]:
        """Remaining-index range of piece p of unit u."""
        total = self.pieces * self.world
        return u * self.unit + self.unit * p // total, u * self.unit + self.unit * (p + 1) // total

    def rank_batches(self, rank: int) -> Iterator[np.ndarray]:
        for u in range(self.units):
            for j in range(self.pieces):
                yield self._positions(*self._piece(u, rank * self.pieces + j))

    def consumed_after(self, taken: int) -> Intervals:
        """Positions consumed when every rank has taken `taken` pieces: whole units, then the same pieces of the next."""
        whole, part = divmod(taken, self.pieces)
        done = self._intervals(0, whole * self.unit)
        if whole < self.units:
            for rank in range(self.world):
                for j in range(part):
                    done.extend(self._intervals(*self._piece(whole, rank * self.pieces + j)))
        return merge(done)


def as_intervals(consumed: int | Intervals) -> Intervals:
    """A count of consumed positions (an in-memory plan's) as the interval it names."""
    return [(0, consumed)] if isinstance(consumed, int) else [tuple(c) for c in consumed]


class UnitPlan:
    """Elastic: units of the configured global micro-batch dealt to the ranks now present (see UnitLayout).
    `ids` maps (epoch, positions) to sample ids: the shard plan's EpochOrder, or an in-memory permutation."""

    def __init__(
        self,
        n: int,
        ids: Callable[[int, np.ndarray], np.ndarray],
        unit: int,
        rank: int,
        world_size: int,
        batch_size: int,
    ):
        self.n, self.ids, self.unit = n, ids, unit
        self.rank, self.world, self.batch = rank, world_size, batch_size
        self.pieces = pieces_per_rank(unit, world_size, batch_size)

    def fresh(self) -> Intervals:
        return []

    def _layout(self, consumed: int | Intervals) -> UnitLayout:
        return UnitLayout(self.n, as_intervals(consumed), self.unit, self.world, self.batch)

    def batches(self, epoch: int, consumed: int | Intervals, loader_workers: int) -> Iterator[np.ndarray]:
        return (self.ids(epoch, pos) for pos in self._layout(consumed).rank_batches(self.rank))

    def after(self, epoch: int, consumed: int | Intervals, taken: int, loader_workers: int) -> Intervals:
        return merge(as_intervals(consumed) + self._layout(consumed).consumed_after(taken))

    def num_batches(self, consumed: int | Intervals) -> int:
        return self._layout(consumed).units * self.pieces


def memory_ids(n: int, seed: int, shuffle: bool) -> Callable[[int, np.ndarray], np.ndarray]:
    """Positions -> sample ids of in-memory data (one permutation per epoch, kept for the epoch)."""
    cache: dict[int, np.ndarray] = {}

    def ids(epoch: int, positions: np.ndarray) -> np.ndarray:
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_order(n, seed, epoch, shuffle)
        return cache[epoch][positions]

    return ids


def shard_ids(
    shard_counts: list[int], seed: int, window: int, shuffle: bool
) -> Callable[[int, np.ndarray], np.ndarray]:
    """Positions -> sample ids of sharded data (EpochOrder, kept for the epoch)."""
    cache: dict[int, EpochOrder] = {}

    def ids(epoch: int, positions: np.ndarray) -> np.ndarray:
        if epoch not in cache:
            cache.clear()
            cache[epoch] = EpochOrder(shard_counts, seed, epoch, window, shuffle)
        return cache[epoch].ids(positions)

    return ids
