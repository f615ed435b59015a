"""Where `shoal shard`'s rows go: one split's packed tar shards, written as the rows arrive.

A sink takes rows (a structured array with fields x and y) in their final order, packs them
`block_size` to a tar key (`<key>.x.bin`, `<key>.y.bin`: the raw bytes of a [count, *shape] array,
see shards.py) and starts a new shard every `per_shard` samples. It holds at most one block of rows.
The tar files are written with the standard library (what webdataset's TarWriter writes, without
loading torch). A sink knows nothing of where its rows come from, so a writer that runs in several
processes gives each its own sink and shard names.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np


class ShardSink:
    """One split's shards, `{prefix}-{n:06d}.tar` in out_dir; close() returns their manifest entries."""

    def __init__(self, out_dir: Path, prefix: str, per_shard: int, block_size: int, dtype: np.dtype):
        assert per_shard % block_size == 0, "shards hold whole blocks"
        self.out_dir, self.prefix, self.per_shard, self.block_size = out_dir, prefix, per_shard, block_size
        self.pending = np.empty(0, dtype=dtype)
        self.written = 0  # samples in finished blocks, so the next block's key
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.mtime = time.time()

    def write(self, rows: np.ndarray) -> None:
        if len(self.pending):
            rows = np.concatenate([self.pending, rows])
        whole = len(rows) - len(rows) % self.block_size
        for start in range(0, whole, self.block_size):
            self._block(rows[start : start + self.block_size])
        self.pending = rows[whole:].copy()

    def close(self) -> list[dict[str, Any]]:
        if len(self.pending):
            self._block(self.pending)
            self.pending = self.pending[:0]
        if self.tar is not None:
            self.tar.close()
            self.tar = None
        return self.shards

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None

    def _block(self, rows: np.ndarray) -> None:
        if self.tar is None or self.shards[-1]["samples"] >= self.per_shard:
            self._next_shard()
        key = f"{self.written:012d}"
        for field in ("x", "y"):
            self._member(f"{key}.{field}.bin", np.ascontiguousarray(rows[field]).tobytes())
        self.shards[-1]["samples"] += len(rows)
        self.written += len(rows)

    def _next_shard(self) -> None:
        if self.tar is not None:
            self.tar.close()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.tar = tarfile.open(self.out_dir / name, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "samples": 0})

    def _member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), self.mtime, 0o444
        assert self.tar is not None
        self.tar.addfile(info, io.BytesIO(data))
