"""The external shuffle of `shoal shard`: a uniform permutation of any number of rows in bounded memory.

Pass 1 (`Spill.add`) appends each row to one of K bucket files on disk, the bucket a hash of the
seed and the row's position in the source, (piece, row within the piece) (so the assignment depends
neither on how the source was chunked nor on which process read the piece). Each reader (a process,
a Ray task) spills into files of its own. Pass 2 (`segment`) takes one bucket at a time, its readers'
files concatenated in piece order, permutes it with a generator seeded by (seed, bucket) and hands it
on in chunks: the same rows in the same order however many read the source. Sorting by a uniformly
random key is a uniform permutation, and (bucket, place in the permuted bucket) is such a key, so the
whole order is uniform. A bucket bigger than the memory allowed (K was estimated before the rows were
counted) is split again the same way, so memory stays bounded whatever the estimate.

Rows are fixed-size records of a structured dtype (fields x and y), written and read as raw bytes.
Each part (train and validation, when a key column splits them) has its own buckets.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

MAX_BUCKETS = 256  # open files per part; a larger source splits its buckets again in pass 2
CHUNK_BYTES = 8 << 20  # rows handed on per chunk in pass 2
BUCKET_BYTES = 16 << 20  # a bucket's size at most, below MAX_BUCKETS of them


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-mixed uint64 hash of each uint64 value."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bucket_count(estimated_bytes: int, memory: int) -> int:
    """Buckets so that each holds about half the memory allowed (room for the estimate to be low), and at most
    BUCKET_BYTES: pass 2's tasks share out buckets, so even a source far smaller than the memory has a few."""
    wanted = max(2 * estimated_bytes / max(1, memory), estimated_bytes / BUCKET_BYTES)
    return int(min(MAX_BUCKETS, max(1, math.ceil(wanted))))


PIECE_SHIFT = np.uint64(40)  # a row's position: piece << 40 | row within the piece (a piece holds < 2**40 rows)


def positions(piece: int, start: int, n: int) -> np.ndarray:
    """The positions of rows start .. start + n - 1 of a piece."""
    return (np.uint64(piece) << PIECE_SHIFT) | np.arange(start, start + n, dtype=np.uint64)


class Spill:
    """One reader's rows on disk in buckets (pass 1); `read` hands back its own rows permuted (pass 2)."""

    def __init__(self, root: Path, dtype: np.dtype, buckets: int, seed: int, shuffle: bool, memory: int):
        self.root, self.dtype, self.seed, self.shuffle, self.memory = root, dtype, seed, shuffle, memory
        self.buckets = buckets if shuffle else 1
        self.root.mkdir(parents=True, exist_ok=True)
        self.files: dict[tuple[int, int], BinaryIO] = {}
        self.counts: dict[int, np.ndarray] = {}

    def add(self, rows: np.ndarray, positions: np.ndarray, part: int = 0) -> None:
        """Appends rows (their positions in the source pick the buckets) to a part."""
        if self.buckets == 1:
            self._append(part, rows, np.array([len(rows)]))
            return
        order, per = self._bucket_order(positions)
        self._append(part, rows[order], per)

    def add_fields(self, x: np.ndarray, y: np.ndarray, positions: np.ndarray, part: int = 0) -> None:
        """As add, for a chunk's x and y: gathered straight into bucket order as records (3x building the
        records first and then gathering them)."""
        x, y = (a.astype(self.dtype[f].base, copy=False) for a, f in ((x, "x"), (y, "y")))
        ordered = np.empty(len(x), dtype=self.dtype)
        if self.buckets == 1:
            ordered["x"], ordered["y"] = x, y
            self._append(part, ordered, np.array([len(x)]))
            return
        order, per = self._bucket_order(positions)
        np.take(x, order, axis=0, out=ordered["x"], mode="clip")  # clip: written in place, not buffered
        np.take(y, order, axis=0, out=ordered["y"], mode="clip")
        self._append(part, ordered, per)

    def _bucket_order(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the rows' order grouped by bucket, rows per bucket): the bucket a hash of seed and position."""
        salt = np.uint64(self.seed * 0x2545F4914F6CDD1D % 2**64)
        # uint16 keys (MAX_BUCKETS fits): numpy's stable sort of them is a radix sort, O(n)
        bucket = (mix64(positions.astype(np.uint64) ^ salt) % np.uint64(self.buckets)).astype(np.uint16)
        return np.argsort(bucket, kind="stable"), np.bincount(bucket, minlength=self.buckets)

    def _append(self, part: int, ordered: np.ndarray, per: np.ndarray) -> None:
        """Rows already in bucket order, `per` of them to each bucket, appended to the part's files."""
        counts = self.counts.setdefault(part, np.zeros(self.buckets, dtype=np.int64))
        for b, (start, n) in enumerate(zip(np.cumsum(per) - per, per)):
            if n:
                self._file(part, b).write(ordered[start : start + n])  # the records' bytes, not a copy
        counts += per

    def rows(self, part: int = 0) -> int:
        return int(self.counts[part].sum()) if part in self.counts else 0

    def path(self, part: int, b: int) -> Path:
        return Spill.file(self.root, part, b)

    @staticmethod
    def file(root: Path, part: int, b: int) -> Path:
        """A spill's file of bucket b of a part, under its root."""
        return root / f"part{part}-bucket{b:04d}.rows"

    def finish(self) -> None:
        """Pass 1 is over: the files are complete on disk."""
        for f in self.files.values():
            f.close()
        self.files.clear()

    def read(self, part: int = 0) -> Iterator[np.ndarray]:
        """Pass 2 of this spill alone: the part's rows, a uniform permutation of them (or in order), in chunks."""
        self.finish()
        for b in range(self.buckets):
            if part in self.counts and self.counts[part][b]:
                yield from segment([(self.path(part, b), None)], self.dtype, self.seed, b, self.shuffle, self.memory)

    def close(self) -> None:
        self.finish()
        shutil.rmtree(self.root, ignore_errors=True)

    def _file(self, part: int, b: int) -> BinaryIO:
        f = self.files.get((part, b))
        if f is None:
            f = self.files[(part, b)] = open(self.path(part, b), "wb", buffering=1 << 16)
        return f


Files = list[tuple[Path, "np.ndarray | None"]]  # spill files in piece order, each with its label id table


def segment(files: Files, dtype: np.dtype, seed: int, b: int, shuffle: bool, memory: int) -> Iterator[np.ndarray]:
    """Pass 2 of bucket b: its files' rows (labels mapped by each file's table) concatenated, then permuted
    by (seed, b) (in order, unshuffled), in chunks; each file is removed once read."""
    try:
        size = sum(path.stat().st_size for path, _ in files)
        if not shuffle:
            for path, lut in files:
                yield from _read_chunks(path, dtype, lut)
        elif size <= memory:
            rows = _load(files, dtype)
            perm = np.random.Generator(np.random.PCG64([seed, 0x5B0C, b])).permutation(len(rows))
            step = max(1, CHUNK_BYTES // dtype.itemsize)
            for i in range(0, len(rows), step):
                yield rows[perm[i : i + step]]
        else:
            yield from _split_again(files, dtype, seed, b, size, memory)
    finally:
        for path, _ in files:
            path.unlink(missing_ok=True)


def _load(files: Files, dtype: np.dtype) -> np.ndarray:
    """The files' rows in one array, each read straight into its place."""
    sizes = [path.stat().st_size // dtype.itemsize for path, _ in files]
    rows = np.empty(sum(sizes), dtype=dtype)
    at = 0
    for (path, lut), n in zip(files, sizes):
        with open(path, "rb") as f:
            f.readinto(memoryview(rows[at : at + n].view(np.uint8)))
        path.unlink()
        if lut is not None:
            rows["y"][at : at + n] = lut[rows["y"][at : at + n]]
        at += n
    return rows


def _split_again(files: Files, dtype: np.dtype, seed: int, b: int, size: int, memory: int) -> Iterator[np.ndarray]:
    """A bucket over the memory allowed, shuffled as a source of its own (a different seed per bucket)."""
    sub_seed = int(mix64(np.array([seed * 1_000_003 + b + 1], dtype=np.uint64))[0] >> np.uint64(1))
    sub = Spill(files[0][0].with_suffix(".sub"), dtype, bucket_count(size, memory), sub_seed, True, memory)
    try:
        done = 0
        for path, lut in files:
            for rows in _read_chunks(path, dtype, lut):
                sub.add(rows, np.arange(done, done + len(rows), dtype=np.uint64))
                done += len(rows)
            path.unlink()
        yield from sub.read()
    finally:
        sub.close()


def _read_chunks(path: Path, dtype: np.dtype, lut: np.ndarray | None = None) -> Iterator[np.ndarray]:
    """The rows of a spill file in order, CHUNK_BYTES at a time, labels mapped by lut."""
    step = max(1, CHUNK_BYTES // dtype.itemsize)
    with open(path, "rb") as f:
        while True:
            rows = np.fromfile(f, dtype=dtype, count=step)
            if not len(rows):
                return
            if lut is not None:
                rows["y"] = lut[rows["y"]]
            yield rows
