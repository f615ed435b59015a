"""Where `shoal shard`'s rows go: one split's packed tar shards, written as the rows arrive.

A sink takes rows (a structured array with fields x and y) in their final order, packs them
`block_size` to a tar key (`<key>.x.bin`, `<key>.y.bin`: the raw bytes of a [count, *shape] array,
see shards.py) and starts a new shard every `per_shard` samples. It holds at most one block of rows.
The tar files are plain POSIX ustar archives whose headers are built here (tarfile's own header
code took most of the writer's time: 0.2 ms a member); tarfile, webdataset and `tar` read them. A sink knows nothing of where its rows come from, so a writer that runs in several
processes gives each its own sink and shard names.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


class ShardSink:
    """One split's shards, `{prefix}-{n:06d}.tar` in out_dir; close() returns their manifest entries."""

    def __init__(self, out_dir: Path, prefix: str, per_shard: int, block_size: int, dtype: np.dtype):
        assert per_shard % block_size == 0, "shards hold whole blocks"
        self.out_dir, self.prefix, self.per_shard, self.block_size = out_dir, prefix, per_shard, block_size
        self.pending = np.empty(0, dtype=dtype)
        self.written = 0  # samples in finished blocks, so the next block's key
        self.shards: list[dict[str, Any]] = []
        self.tar: BinaryIO | None = None
        self.mtime = int(time.time())

    def write(self, rows: np.ndarray) -> None:
        if len(self.pending):  # complete the pending block only, not a copy of the whole chunk
            k = self.block_size - len(self.pending)
            head, rows = np.concatenate([self.pending, rows[:k]]), rows[k:]
            if len(head) < self.block_size:
                self.pending = head
                return
            self._block(head)
        whole = len(rows) - len(rows) % self.block_size
        for start in range(0, whole, self.block_size):
            self._block(rows[start : start + self.block_size])
        self.pending = rows[whole:].copy()

    def close(self) -> list[dict[str, Any]]:
        if len(self.pending):
            self._block(self.pending)
            self.pending = self.pending[:0]
        self._end_shard()
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
            self._member(f"{key}.{field}.bin", memoryview(np.ascontiguousarray(rows[field])).cast("B"))
        self.shards[-1]["samples"] += len(rows)
        self.written += len(rows)

    def _next_shard(self) -> None:
        self._end_shard()
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.tar = open(self.out_dir / name, "wb", buffering=1 << 20)
        self.shards.append({"name": name, "samples": 0})

    def _end_shard(self) -> None:
        """Two zero blocks end the archive, padded to whole 10 KiB records as tarfile pads them."""
        if self.tar is None:
            return
        end = self.tar.tell() + 1024
        self.tar.write(bytes(1024 + (-end) % RECORD))
        self.tar.close()
        self.tar = None

    def _member(self, name: str, data: memoryview) -> None:
        assert self.tar is not None
        self.tar.write(ustar_header(name, len(data), self.mtime))
        self.tar.write(data)
        self.tar.write(bytes(-len(data) % BLOCK))


BLOCK, RECORD = 512, 10240


def ustar_header(name: str, size: int, mtime: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular, read-only file."""
    raw = name.encode()
    assert len(raw) < 100, "member names are short keys"
    template, base_sum = _nameless_header(size, mtime)
    h = bytearray(template)
    h[0 : len(raw)] = raw
    h[148:156] = b"%06o\0 " % (base_sum + sum(raw))  # the checksum: every byte, its own field as spaces
    return bytes(h)


@functools.lru_cache(maxsize=16)
def _nameless_header(size: int, mtime: int) -> tuple[bytes, int]:
    """A header without its name, and the sum of its bytes: a shard's members share a few sizes, so only
    the name and the checksum are written per member (the whole header took 11 us, a fifth of the writer)."""
    h = bytearray(BLOCK)
    h[100:108] = b"0000444\0"  # mode
    h[108:116] = h[116:124] = b"0000000\0"  # uid, gid
    h[124:136] = b"%011o\0" % size
    h[136:148] = b"%011o\0" % mtime
    h[148:156] = b" " * 8
    h[156:157] = b"0"  # a regular file
    h[257:265] = b"ustar\x0000"
    return bytes(h), sum(h)
