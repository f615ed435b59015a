"""`shoal shard SOURCE OUT_DIR`: write a data set as webdataset tar shards plus manifest.json, in bounded memory.

The source (sources.py) is read once, front to back, as chunks of rows; pass 1 spills them into the
external shuffle's buckets on disk (shuffle.py) as they arrive, pass 2 reads the buckets back as a
uniform permutation and hands the rows to one sink per split (sink.py), which packs them
`block_size` to a tar key. Memory holds a chunk, a bucket (at most --shuffle-memory) and a block,
never the data set. The validation split is the first --val-fraction of the shuffled order (the
last of the source's order with --no-shuffle), or, with --split-key, the rows whose key hashes
below the fraction, so a record stays in its split as the data set grows. The manifest is written
last: a directory without one was not finished.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress

from shoal import __version__
from shoal.data.locate import MANIFEST, PACKED
from shoal.data.shuffle import Spill, bucket_count
from shoal.data.sink import ShardSink
from shoal.data.sources import load_source
from shoal.data.stream import Chunk, Stream
from shoal.errors import ConfigError, DataError

__all__ = ["ShardOptions", "Stream", "Table", "load_source", "parse_bytes", "write_shards"]
Table = Stream  # the name this module's callers knew


@dataclass
class ShardOptions:
    samples_per_shard: int | None = 10_000
    bytes_per_shard: int | None = None
    block_size: int = 64
    shuffle: bool = True
    seed: int = 0
    val_fraction: float = 0.1
    overwrite: bool = False
    shuffle_memory: int = 256 << 20  # bytes of rows the shuffle's pass 2 holds at once


def write_shards(
    stream: Stream, out_dir: Path, opts: ShardOptions, source: str, progress: bool = True
) -> dict[str, Any]:
    """Read, shuffle, split and write the stream; returns the manifest."""
    _prepare_out_dir(out_dir, opts)
    bar = _Progress(progress)
    spill = None
    try:
        spill = _pass_one(stream, out_dir / f".spill-{os.getpid()}", opts, bar, source)
        lut, classes, names = stream.labels.finish() if stream.labels else (None, stream.num_classes, None)
        manifest = _manifest(stream, opts, source, spill.dtype, classes, names)
        manifest["splits"] = _pass_two(spill, out_dir, opts, lut, bar)
    finally:
        if spill is not None:
            spill.close()
        bar.close()
    _write_manifest(out_dir, manifest)
    return manifest


def _pass_one(stream: Stream, root: Path, opts: ShardOptions, bar: _Progress, source: str) -> Spill:
    """Every row of the source in the spill's buckets (validation rows in part 1 when split by key)."""
    spill, done = None, 0
    bar.phase("reading", stream.rows)
    threshold = np.uint64(min(2**64 - 1, int(opts.val_fraction * 2**64)))
    try:
        for chunk in stream.chunks():
            if spill is None:
                dtype = _row_dtype(chunk)
                estimate = stream.rows * dtype.itemsize if stream.rows else stream.nbytes
                buckets = bucket_count(estimate, opts.shuffle_memory)
                spill = Spill(root, dtype, buckets, opts.seed, opts.shuffle, opts.shuffle_memory)
            rows, positions = _rows(chunk, spill.dtype, source), np.arange(done, done + len(chunk.x), dtype=np.uint64)
            if chunk.keys is None:
                spill.add(rows, positions)
            else:
                val = chunk.keys < threshold
                spill.add(rows[~val], positions[~val], 0)
                spill.add(rows[val], positions[val], 1)
            done += len(rows)
            bar.advance(len(rows))
    except BaseException:
        if spill is not None:
            spill.close()
        shutil.rmtree(root, ignore_errors=True)
        raise
    if spill is None or not done:
        raise DataError(f"{source}: holds no samples")
    return spill


def _row_dtype(chunk: Chunk) -> np.dtype:
    """One row as a record: x and y of the first chunk's dtypes and shapes."""
    return np.dtype([("x", chunk.x.dtype, chunk.x.shape[1:]), ("y", chunk.y.dtype, chunk.y.shape[1:])])


def _rows(chunk: Chunk, dtype: np.dtype, source: str) -> np.ndarray:
    if len(chunk.x) != len(chunk.y):
        raise DataError(f"{source}: x has {len(chunk.x)} samples, y has {len(chunk.y)}")
    if chunk.x.shape[1:] != dtype["x"].shape:
        raise DataError(
            f"{source}: samples of shape {list(chunk.x.shape[1:])} after samples of {list(dtype['x'].shape)}; "
            "every sample needs the same shape"
        )
    rows = np.empty(len(chunk.x), dtype=dtype)
    rows["x"], rows["y"] = chunk.x, chunk.y
    return rows


def _pass_two(spill: Spill, out_dir: Path, opts: ShardOptions, lut: np.ndarray | None, bar: _Progress) -> dict:
    """The spilled rows, permuted, into the train and val sinks; returns the manifest's splits."""
    per_shard = _samples_per_shard(opts, spill.dtype.itemsize)
    sinks = {s: ShardSink(out_dir, s, per_shard, opts.block_size, spill.dtype) for s in ("train", "val")}
    bar.phase("writing shards", spill.rows(0) + spill.rows(1))
    try:
        for split, rows in _routed(spill, opts):
            if lut is not None:
                rows["y"] = lut[rows["y"]]
            sinks[split].write(rows)
            bar.advance(len(rows))
    except BaseException:
        for sink in sinks.values():
            sink.abort()
        raise
    splits = {}
    for split, sink in sinks.items():
        shards = sink.close()
        if shards:
            splits[split] = {"samples": sum(s["samples"] for s in shards), "shards": shards}
    return splits


def _routed(spill: Spill, opts: ShardOptions) -> Iterator[tuple[str, np.ndarray]]:
    """(split, rows) in write order: by key, part 0 then part 1; by position, cut at the val count."""
    if 1 in spill.counts:  # split by key: part 1 is the validation split, however small
        yield from (("train", rows) for rows in spill.read(0))
        yield from (("val", rows) for rows in spill.read(1))
        return
    n = spill.rows(0)
    n_val = int(round(n * opts.val_fraction))
    first, cut = ("val", n_val) if opts.shuffle else ("train", n - n_val)
    second = "train" if first == "val" else "val"
    done = 0
    for rows in spill.read(0):
        k = max(0, min(len(rows), cut - done))
        if k:
            yield first, rows[:k]
        if k < len(rows):
            yield second, rows[k:]
        done += len(rows)


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Written last and renamed into place: a directory without one was not finished."""
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out_dir / MANIFEST)


def _prepare_out_dir(out_dir: Path, opts: ShardOptions) -> None:
    if opts.block_size < 1:
        raise ConfigError("--block-size must be >= 1")
    if (out_dir / MANIFEST).exists() and not opts.overwrite:
        raise DataError(f"{out_dir}: already holds shards ({MANIFEST}); pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)
    # the old manifest goes first: a conversion that fails midway must not leave it naming half-written shards
    (out_dir / MANIFEST).unlink(missing_ok=True)


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
        if self.enabled and self.bar is None:
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
