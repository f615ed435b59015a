"""The two passes of `shoal shard` as tasks: what one process (the driver itself, a local process or a Ray
task) does with its share of a conversion. writer.py plans them and shard_run.py runs them.

Pass 1 (`spill`): a unit, a run of consecutive pieces of the source, read and spilled into the unit's own
bucket files (shuffle.py) under the spill folder. Pass 2 (`write`): a run of consecutive segments (a
bucket, its units' files in piece order) permuted and packed into shards of the task's own names
(`train-007-000000.tar`, or `train-000000.tar` when one task writes them all). A task's input and result
are plain, picklable values; a user's mistake a task finds comes back as `Failed`, raised by the driver
as one line, so that it reads the same from a local process and from a Ray node.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shoal import errors
from shoal.data.shuffle import Spill, positions, segment
from shoal.data.sink import ShardSink
from shoal.data.stream import Chunk, LabelsSeen, Lengths, Stream
from shoal.errors import DataError, ShoalError

MARKER = "driver"  # a file the driver writes in the spill folder: a task that cannot see it cannot see OUT_DIR

Report = Callable[[int], None]  # rows done since the last call


@dataclass(frozen=True)
class Layout:
    """What every task of one conversion shares."""

    root: str  # the spill folder, under OUT_DIR
    out_dir: str
    source: str
    dtype: np.dtype
    buckets: int
    seed: int
    shuffle: bool
    memory: int  # --shuffle-memory: the most rows' bytes a task holds at once
    val_below: int | None  # split by key: a row whose key hashes below this is a validation row
    per_shard: int
    block_size: int

    def unit_dir(self, unit: int) -> Path:
        return Path(self.root) / f"u{unit:04d}"


@dataclass(frozen=True)
class SpillTask:
    unit: int
    pieces: tuple[int, int]  # [start, stop)
    layout: Layout
    open_stream: Callable[[], Stream]  # picklable where the task runs in another process


@dataclass(frozen=True)
class Spilled:
    unit: int
    counts: dict[int, list[int]]  # part -> rows per bucket
    labels: LabelsSeen | None
    lengths: dict[int, Lengths] | None = None  # padded rows' lengths by piece


@dataclass(frozen=True)
class Segment:
    """A bucket of a part, as its units' files in piece order (unit, rows), and which of its rows, in the
    order pass 2 gives them, are validation rows: [val_from, val_to)."""

    part: int
    bucket: int
    units: tuple[tuple[int, int], ...]
    val_from: int
    val_to: int

    @property
    def rows(self) -> int:
        return sum(n for _, n in self.units)


@dataclass(frozen=True)
class WriteTask:
    index: int
    named: bool  # several write tasks: the index is in the shard names
    segments: tuple[Segment, ...]
    layout: Layout
    luts: tuple[np.ndarray | None, ...]  # per unit: its label ids -> the final ones


@dataclass(frozen=True)
class Failed:
    """A user's mistake found by a task: the error's class name and its one line."""

    kind: str
    message: str

    def error(self) -> ShoalError:
        cls = getattr(errors, self.kind, None)
        return cls(self.message) if isinstance(cls, type) and issubclass(cls, ShoalError) else DataError(self.message)


# ---------------------------------------------------------------- pass 1


def spill(task: SpillTask, report: Report) -> Spilled:
    """The unit's pieces read and spilled into its bucket files; returns their counts, the labels seen and
    (padded rows) their lengths."""
    lay = task.layout
    stream = task.open_stream()
    out = Spill(lay.unit_dir(task.unit), lay.dtype, lay.buckets, lay.seed, lay.shuffle, lay.memory)
    piece, row0 = -1, 0
    for i, chunk in stream.read(range(*task.pieces)):
        piece, row0 = i, (row0 if i == piece else 0)
        check_chunk(chunk, lay.dtype, lay.source)
        where = positions(i, row0, len(chunk.x))
        if chunk.keys is None:
            out.add_fields(chunk.x, chunk.y, where)
        else:
            val = chunk.keys < np.uint64(lay.val_below)
            out.add_fields(chunk.x[~val], chunk.y[~val], where[~val], 0)
            out.add_fields(chunk.x[val], chunk.y[val], where[val], 1)
        row0 += len(chunk.x)
        report(len(chunk.x))
    out.finish()
    labels = stream.labels.seen() if stream.labels is not None else None
    return Spilled(task.unit, {p: c.tolist() for p, c in out.counts.items()}, labels, stream.lengths)


def check_chunk(chunk: Chunk, dtype: np.dtype, source: str) -> None:
    """A chunk must fit the conversion's row dtype (x and y of the first chunk's shapes)."""
    if len(chunk.x) != len(chunk.y):
        raise DataError(f"{source}: x has {len(chunk.x)} samples, y has {len(chunk.y)}")
    if chunk.x.shape[1:] != dtype["x"].shape:
        raise DataError(
            f"{source}: samples of shape {list(chunk.x.shape[1:])} after samples of {list(dtype['x'].shape)}; "
            "every sample needs the same shape"
        )


# ---------------------------------------------------------------- pass 2


def write(task: WriteTask, report: Report) -> dict[str, list[dict[str, Any]]]:
    """The task's segments permuted and written to its own shards; returns each split's manifest entries."""
    lay = task.layout
    sinks = {
        s: ShardSink(
            Path(lay.out_dir), f"{s}-{task.index:03d}" if task.named else s, lay.per_shard, lay.block_size, lay.dtype
        )
        for s in ("train", "val")
    }
    try:
        for seg in task.segments:
            files = [(Spill.file(lay.unit_dir(u), seg.part, seg.bucket), task.luts[u]) for u, _ in seg.units]
            done = 0
            for rows in segment(files, lay.dtype, lay.seed, seg.bucket, lay.shuffle, lay.memory):
                for split, part in routed(rows, done, seg.val_from, seg.val_to):
                    sinks[split].write(part)
                done += len(rows)
                report(len(rows))
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    return {split: sink.close() for split, sink in sinks.items()}


def routed(rows: np.ndarray, at: int, val_from: int, val_to: int) -> Iterator[tuple[str, np.ndarray]]:
    """(split, rows) of rows at positions at, at + 1, ... of a segment whose [val_from, val_to) are validation."""
    lo, hi = np.clip([val_from - at, val_to - at], 0, len(rows))
    for split, part in (("train", rows[:lo]), ("val", rows[lo:hi]), ("train", rows[hi:])):
        if len(part):
            yield split, part


# ---------------------------------------------------------------- in another process


def run_elsewhere(fn: Callable[[Any, Report], Any], task: Any, progress: str, marker: str) -> Any:
    """A task in a local process or on a Ray node: its progress written to a file the driver reads, a user's
    mistake returned as Failed."""
    try:
        if not Path(marker).exists():
            raise DataError(
                f"{Path(marker).parent.parent}: not visible from {socket.gethostname()} (a Ray node); with --ray, "
                "OUT_DIR must be on storage every node of the cluster sees"
            )
        counter = _FileCount(Path(progress))
        try:
            return fn(task, counter)
        finally:
            counter.flush()
    except ShoalError as e:
        return Failed(type(e).__name__, str(e).splitlines()[0] if str(e) else type(e).__name__)


class _FileCount:
    """Rows done, written to a file at most every half second (the driver polls it for the progress bar)."""

    def __init__(self, path: Path):
        self.path, self.done, self.last = path, 0, 0.0

    def __call__(self, n: int) -> None:
        self.done += n
        if time.monotonic() - self.last > 0.5:
            self.flush()

    def flush(self) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        tmp.write_text(str(self.done))
        tmp.replace(self.path)  # whole, never half-written
        self.last = time.monotonic()


def read_count(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0
