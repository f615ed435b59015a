"""The external shuffle of `shoal shard`: a uniform permutation of any number of rows in bounded memory.

Pass 1 (`Spill.add`) appends each row to one of K bucket files on disk, the bucket a hash of the
seed and the row's position in the source (so the assignment does not depend on how the source
was chunked). Pass 2 (`Spill.read`) loads one bucket at a time, permutes it with a generator
seeded by (seed, bucket) and hands it on in chunks. Sorting by a uniformly random key is a uniform
permutation, and (bucket, place in the permuted bucket) is such a key, so the whole order is
uniform. A bucket bigger than the memory allowed (K was estimated before the rows were counted)
is split again the same way, so memory stays bounded whatever the estimate.

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


def mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-mixed uint64 hash of each uint64 value."""
    z = values.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        z += np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def bucket_count(estimated_bytes: int, memory: int) -> int:
    """Buckets so that each holds about half the memory allowed (room for the estimate to be low)."""
    return int(min(MAX_BUCKETS, max(1, math.ceil(2 * estimated_bytes / max(1, memory)))))


class Spill:
    """Rows on disk in buckets (pass 1), read back permuted bucket by bucket (pass 2)."""

    def __init__(self, root: Path, dtype: np.dtype, buckets: int, seed: int, shuffle: bool, memory: int):
        self.root, self.dtype, self.seed, self.shuffle, self.memory = root, dtype, seed, shuffle, memory
        self.buckets = buckets if shuffle else 1
        self.root.mkdir(parents=True, exist_ok=True)
        self.files: dict[tuple[int, int], BinaryIO] = {}
        self.counts: dict[int, np.ndarray] = {}

    def add(self, rows: np.ndarray, positions: np.ndarray, part: int = 0) -> None:
        """Appends rows (their positions in the source pick the buckets) to a part."""
        counts = self.counts.setdefault(part, np.zeros(self.buckets, dtype=np.int64))
        if self.buckets == 1:
            self._file(part, 0).write(np.ascontiguousarray(rows).tobytes())
            counts[0] += len(rows)
            return
        salt = np.uint64(self.seed * 0x2545F4914F6CDD1D % 2**64)
        # uint16 keys (MAX_BUCKETS fits): numpy's stable sort of them is a radix sort, O(n)
        bucket = (mix64(positions.astype(np.uint64) ^ salt) % np.uint64(self.buckets)).astype(np.uint16)
        order = np.argsort(bucket, kind="stable")
        per = np.bincount(bucket, minlength=self.buckets)
        ordered = rows[order]
        for b, (start, n) in enumerate(zip(np.cumsum(per) - per, per)):
            if n:
                self._file(part, b).write(ordered[start : start + n].tobytes())
        counts += per

    def rows(self, part: int = 0) -> int:
        return int(self.counts[part].sum()) if part in self.counts else 0

    def read(self, part: int = 0) -> Iterator[np.ndarray]:
        """Pass 2: the part's rows, a uniform permutation of them (or in order, unshuffled), in chunks."""
        for b in range(self.buckets):
            f = self.files.pop((part, b), None)
            if f is None:
                continue
            f.close()
            yield from self._bucket(self._path(part, b), b)

    def close(self) -> None:
        for f in self.files.values():
            f.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def _bucket(self, path: Path, b: int) -> Iterator[np.ndarray]:
        size = path.stat().st_size
        try:
            if not self.shuffle:
                yield from _read_chunks(path, self.dtype)
            elif size <= self.memory:
                rows = np.fromfile(path, dtype=self.dtype)
                path.unlink()
                perm = np.random.Generator(np.random.PCG64([self.seed, 0x5B0C, b])).permutation(len(rows))
                step = max(1, CHUNK_BYTES // self.dtype.itemsize)
                for i in range(0, len(rows), step):
                    yield rows[perm[i : i + step]]
            else:
                yield from self._split_again(path, b, size)
        finally:
            path.unlink(missing_ok=True)

    def _split_again(self, path: Path, b: int, size: int) -> Iterator[np.ndarray]:
        """A bucket over the memory allowed, shuffled as a source of its own (a different seed per bucket)."""
        seed = int(mix64(np.array([self.seed * 1_000_003 + b + 1], dtype=np.uint64))[0] >> np.uint64(1))
        sub = Spill(path.with_suffix(".sub"), self.dtype, bucket_count(size, self.memory), seed, True, self.memory)
        try:
            done = 0
            for rows in _read_chunks(path, self.dtype):
                sub.add(rows, np.arange(done, done + len(rows), dtype=np.uint64))
                done += len(rows)
            path.unlink()
            yield from sub.read()
        finally:
            sub.close()

    def _file(self, part: int, b: int) -> BinaryIO:
        f = self.files.get((part, b))
        if f is None:
            f = self.files[(part, b)] = open(self._path(part, b), "wb", buffering=1 << 16)
        return f

    def _path(self, part: int, b: int) -> Path:
        return self.root / f"part{part}-bucket{b:04d}.rows"


def _read_chunks(path: Path, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The rows of a bucket file in order, CHUNK_BYTES at a time."""
    step = max(1, CHUNK_BYTES // dtype.itemsize)
    with open(path, "rb") as f:
        while True:
            rows = np.fromfile(f, dtype=dtype, count=step)
            if not len(rows):
                return
            yield rows
