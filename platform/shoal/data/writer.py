"""`shoal shard SOURCE OUT_DIR`: write a data set as webdataset tar shards plus manifest.json, in bounded memory,
in one process, in N local processes or as Ray tasks.

The source (sources.py) is cut into pieces it alone defines (stream.py). Pass 1 reads them, in units of
consecutive pieces, each unit spilling its rows into the external shuffle's buckets on disk (shuffle.py)
by a hash of the seed and the row's position (piece, row in the piece); pass 2 takes the buckets, in runs
of consecutive buckets, each bucket's units' files in piece order, permutes each by (seed, bucket) and
hands the rows to one sink per split (sink.py), which packs them `block_size` to a tar key. The tasks
(shard_tasks.py) run in this process, in local processes or on Ray (shard_run.py); the rows and their
order are the same however many run them, only the shard names and boundaries differ. Memory per
process holds a chunk, a bucket (at most --shuffle-memory) and a block, never the data set. The
validation split is the first --val-fraction of the shuffled order (the last of the source's order with
--no-shuffle), cut by this driver from the counts pass 1 returns, or, with --split-key, the rows whose key
hashes below the fraction, so a record stays in its split as the data set grows. String labels get their
class ids once every unit has reported the names it saw (sorted). The manifest is written last, by this
driver: a directory without one was not finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from shoal import __version__
from shoal.data.columns import merge_labels
from shoal.data.locate import MANIFEST, PACKED
from shoal.data.shard_run import InDriver, Runner, runner
from shoal.data.shard_tasks import MARKER, Layout, Segment, Spilled, SpillTask, WriteTask, spill, write
from shoal.data.shuffle import bucket_count
from shoal.data.sources import load_source
from shoal.data.stream import Chunk, Lengths, Stream
from shoal.errors import ConfigError, DataError

__all__ = ["ShardOptions", "Stream", "Table", "check_options", "load_source", "parse_bytes", "write_shards"]
Table = Stream  # the name this module's callers knew
SHARD_NAME = re.compile(r"(train|val)(-\d{3,})?-\d{6}\.tar")  # the names sinks write (shard_tasks.write)


@dataclass
class ShardOptions:
    samples_per_shard: int | None = 10_000
    bytes_per_shard: int | None = None
    block_size: int = 64
    shuffle: bool = True
    seed: int = 0
    val_fraction: float = 0.1
    overwrite: bool = False
    shuffle_memory: int = 256 << 20  # bytes of rows a task of the shuffle's pass 2 holds at once
    workers: int | None = None  # processes (or Ray tasks at once); None: 1, or the Ray cluster's CPUs
    ray: str | None = None  # None: no Ray; "": the local cluster (or RAY_ADDRESS); else the address to join


def write_shards(
    stream: Stream,
    out_dir: Path,
    opts: ShardOptions,
    source: str,
    progress: bool = True,
    reopen: Callable[[], Stream] | None = None,
) -> dict[str, Any]:
    """Read, shuffle, split and write the stream; returns the manifest. `reopen` opens the same stream again
    in another process (a picklable callable): needed with more than one worker or with Ray. Local workers
    are spawned: a script that calls this with workers > 1 runs it under `if __name__ == "__main__":`."""
    check_options(opts)
    if (out_dir / MANIFEST).exists() and not opts.overwrite:
        raise DataError(f"{out_dir}: already holds shards ({MANIFEST}); pass --overwrite to replace them")
    assert reopen is not None or (opts.ray is None and (opts.workers or 1) == 1), "other processes reopen the source"
    root = out_dir / f".spill-{os.getpid()}"
    tasks = runner(opts.workers, opts.ray, root)  # local processes start now; Ray is joined once the source is read
    bar = _Progress(progress)
    try:
        lay = _layout(stream, out_dir, root, opts, source)  # a bad source fails here, before OUT_DIR is touched
        _prepare_out_dir(out_dir, opts)
        root.mkdir()
        (root / MARKER).write_text(f"{os.getpid()}\n")
        spilled = _pass_one(tasks, stream, reopen, lay, bar)
        luts, classes, names = _labels(stream, spilled)
        manifest = _manifest(stream, opts, source, lay.dtype, classes, names)
        if stream.lengths is not None:
            manifest["lengths"] = _lengths(spilled)
        manifest["splits"] = _pass_two(tasks, _segments(spilled, lay, opts), luts, lay, bar)
    finally:
        tasks.close()
        shutil.rmtree(root, ignore_errors=True)
        bar.close()
    _write_manifest(out_dir, manifest)
    return manifest


def check_options(opts: ShardOptions) -> None:
    """The options' own mistakes, before the source is opened."""
    if opts.block_size < 1:
        raise ConfigError("--block-size must be >= 1")
    if opts.workers is not None and opts.workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {opts.workers})")


def _layout(stream: Stream, out_dir: Path, root: Path, opts: ShardOptions, source: str) -> Layout:
    """What every task shares: the row dtype (of the source's first rows) and the buckets it sizes."""
    dtype = _row_dtype(_first_chunk(stream, source))
    estimate = stream.rows * dtype.itemsize if stream.rows else stream.nbytes
    return Layout(
        root=str(root),
        out_dir=str(out_dir),
        source=source,
        dtype=dtype,
        buckets=bucket_count(estimate, opts.shuffle_memory) if opts.shuffle else 1,
        seed=opts.seed,
        shuffle=opts.shuffle,
        memory=opts.shuffle_memory,
        val_below=min(2**64 - 1, int(opts.val_fraction * 2**64)) if "split_key" in _columns(stream) else None,
        per_shard=_samples_per_shard(opts, dtype.itemsize),
        block_size=opts.block_size,
    )


def _columns(stream: Stream) -> dict[str, Any]:
    return stream.extra.get("columns", {})


def _first_chunk(stream: Stream, source: str) -> Chunk:
    """The source's first rows, read before anything is written (a bad source fails here, in the driver)."""
    chunks = stream.read(range(stream.pieces))
    try:
        for _, chunk in chunks:
            if len(chunk.x):
                return chunk
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # stops a reader's prefetching thread
    raise DataError(f"{source}: holds no samples")


def _row_dtype(chunk: Chunk) -> np.dtype:
    """One row as a record: x and y of the first chunk's dtypes and shapes."""
    return np.dtype([("x", chunk.x.dtype, chunk.x.shape[1:]), ("y", chunk.y.dtype, chunk.y.shape[1:])])


def _pass_one(
    tasks: Runner, stream: Stream, reopen: Callable[[], Stream] | None, lay: Layout, bar: _Progress
) -> list[Spilled]:
    """Every row of the source in the units' buckets (validation rows in part 1 when split by key)."""
    in_driver = isinstance(tasks, InDriver)
    # units of pieces: two per worker elsewhere, so one slowed down (a shared machine, a busy node) is caught up
    units = balanced(stream.sizes(), 1 if in_driver else 2 * tasks.workers)
    opened = (lambda: stream) if in_driver else reopen
    bar.phase("reading", stream.rows)
    return tasks.run(spill, [SpillTask(u, r, lay, opened) for u, r in enumerate(units)], bar)


def _labels(stream: Stream, spilled: list[Spilled]) -> tuple[list[np.ndarray | None], int, list[str] | None]:
    """Per unit its label ids -> the final ones, the class count and the class names, from every unit's labels."""
    seen = [s.labels for s in spilled]
    if stream.labels is None or any(s is None for s in seen):
        return [None] * len(spilled), stream.num_classes, None
    return merge_labels(seen)  # type: ignore[arg-type]


def _lengths(spilled: list[Spilled]) -> dict[str, Any]:
    """The manifest's `lengths` of padded rows, from every unit's counts by piece."""
    by_piece: dict[int, Lengths] = {}
    for s in spilled:
        by_piece.update(s.lengths or {})
    return Lengths.total(by_piece.values()).entry()


def _segments(spilled: list[Spilled], lay: Layout, opts: ShardOptions) -> list[Segment]:
    """Pass 2's work in write order: each part's buckets (a unit's rows in order, unshuffled), the validation
    rows marked: a whole part when split by key, else the first (last, unshuffled) val_fraction of part 0."""
    by_key = lay.val_below is not None
    segs = [
        Segment(part, b, units, 0, 0)
        for part in ((0, 1) if by_key else (0,))
        for b, units in _buckets(spilled, part, lay)
    ]
    n = sum(s.rows for s in segs if s.part == 0)
    n_val = int(round(n * opts.val_fraction))
    out, before = [], 0
    for s in segs:
        if by_key:
            lo, hi = (0, s.rows) if s.part == 1 else (0, 0)
        elif lay.shuffle:
            lo, hi = 0, int(np.clip(n_val - before, 0, s.rows))
        else:
            lo, hi = int(np.clip(n - n_val - before, 0, s.rows)), s.rows
        out.append(Segment(s.part, s.bucket, s.units, lo, hi))
        before += s.rows if s.part == 0 else 0
    return out


def _buckets(spilled: list[Spilled], part: int, lay: Layout) -> list[tuple[int, tuple[tuple[int, int], ...]]]:
    """(bucket, its (unit, rows) in piece order) of a part; unshuffled, each unit's rows are a segment."""
    counts = [(s.unit, s.counts.get(part, [0] * lay.buckets)) for s in spilled]
    if not lay.shuffle:
        return [(0, ((u, c[0]),)) for u, c in counts if c[0]]
    found = [(b, tuple((u, c[b]) for u, c in counts if c[b])) for b in range(lay.buckets)]
    return [(b, units) for b, units in found if units]


def _pass_two(
    tasks: Runner, segs: list[Segment], luts: list[np.ndarray | None], lay: Layout, bar: _Progress
) -> dict[str, Any]:
    """The spilled rows, permuted, into the train and val shards of each write task; returns the manifest's
    splits, each task's shards in task order."""
    groups = balanced([s.rows for s in segs], tasks.workers)
    work = [WriteTask(i, len(groups) > 1, tuple(segs[a:b]), lay, tuple(luts)) for i, (a, b) in enumerate(groups)]
    bar.phase("writing shards", sum(s.rows for s in segs))
    written = tasks.run(write, work, bar)
    splits = {}
    for split in ("train", "val"):
        shards = [s for w in written for s in w[split]]
        if shards:
            splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    return splits


def balanced(sizes: list[int], n: int) -> list[tuple[int, int]]:
    """[start, stop) of n runs of consecutive items, about equal in total size, none empty."""
    n = max(1, min(n, len(sizes)))
    cum = np.cumsum(sizes, dtype=np.float64)
    cuts = [0]
    for k in range(1, n):
        c = int(np.searchsorted(cum, cum[-1] * k / n)) + 1  # after the item that crosses k/n of the total
        cuts.append(min(max(c, cuts[-1] + 1), len(sizes) - (n - k)))
    return list(zip(cuts, [*cuts[1:], len(sizes)]))


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Written last and renamed into place: a directory without one was not finished."""
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out_dir / MANIFEST)


def _prepare_out_dir(out_dir: Path, opts: ShardOptions) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # the old manifest goes first: a conversion that fails midway must not leave it naming half-written shards
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for old in out_dir.iterdir():
        if old.name.startswith(".spill-") and old.is_dir():  # an earlier conversion's, stopped before its clean-up
            shutil.rmtree(old, ignore_errors=True)
        elif opts.overwrite and SHARD_NAME.fullmatch(old.name):  # replaced whole, whatever the number of workers
            old.unlink()


def _manifest(
    stream: Stream, opts: ShardOptions, source: str, dtype: np.dtype, classes: int, names: list[str] | None
) -> dict[str, Any]:
    """The manifest without its splits, which write_shards fills in once they are written."""
    fields = {
        "x": {
            "dtype": dtype["x"].base.str,
            "shape": list(dtype["x"].shape),
            **({"scale": stream.x_scale} if stream.x_scale else {}),
        },
        "y": {"dtype": dtype["y"].base.str, "shape": list(dtype["y"].shape)},
    }
    extra = dict(stream.extra)
    if names:
        extra["classes"] = names
    return {
        "format": PACKED,
        "source": source,
        "task": stream.task,
        "num_classes": (classes or stream.num_classes) if stream.task == "classification" else None,
        "vocab_size": stream.vocab_size or None,
        "block_size": opts.block_size,
        "fields": fields,
        "seed": opts.seed,
        "shuffled": opts.shuffle,
        "split": {
            "by": "key" if "split_key" in extra.get("columns", {}) else "position",
            "val_fraction": opts.val_fraction,
        },
        "shoal_version": __version__,
        "splits": {},
        **extra,
    }


def _samples_per_shard(opts: ShardOptions, per_sample: int) -> int:
    if opts.bytes_per_shard:
        samples = max(1, opts.bytes_per_shard // per_sample)
    else:
        samples = opts.samples_per_shard or 10_000
    return max(opts.block_size, samples // opts.block_size * opts.block_size)


class _Progress:
    """A bar on a terminal, a line every few seconds otherwise; one phase at a time."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None
        self.label, self.total, self.done, self.last = "", None, 0, time.monotonic()
        if enabled and sys.stdout.isatty():
            self.bar = Progress()
            self.bar.start()

    def phase(self, label: str, total: int | None) -> None:
        if self.label:
            self._line()
        self.label, self.total, self.done = label, total, 0
        if self.bar is not None:
            self.task = self.bar.add_task(label, total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.enabled and time.monotonic() - self.last > 5:
            self._line()

    def _line(self) -> None:
        if self.enabled and self.bar is None and self.label:  # no line before the first phase (a source refused)
            of = f"/{self.total:,}" if self.total else ""
            print(f"[shoal] {self.label}: {self.done:,}{of} samples", flush=True)
            self.last = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        else:
            self._line()


def parse_bytes(text: str, option: str = "--bytes-per-shard") -> int:
    """'64MB' -> 67108864 (KB, MB, GB are powers of 1024)."""
    units = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B?)\s*", text.upper())
    if not m or m.group(2) not in units or float(m.group(1)) <= 0:
        raise ConfigError(f"{option}: expected a size like 64MB (got {text!r})")
    return int(float(m.group(1)) * units[m.group(2)])
