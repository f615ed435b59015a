"""Random access to tar shards in object storage: one ranged GET per span of blocks, never the whole shard.

A shard `shoal shard` wrote has a layout its manifest fixes: per block of `block_size` samples, one
512-byte ustar header and the padded bytes of each field, in the manifest's field order. So the byte
range of every block is known without a request. Each fetched range is still checked against the tar
headers it holds (name, size, checksum); a shard whose layout differs (another writer, pax headers) or
shards without a manifest get their member index the tar way instead: the headers scanned once per
reader through a read-ahead file (a request per header at most, never the members' data).

Consecutive blocks are fetched together, up to the blocks of one shuffle window (the reader's plan needs
all of them within the window anyway) and at most MAX_SPAN bytes, so a request carries about a window's
bytes, and a reader holds at most two spans.
"""

from __future__ import annotations

import math
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.data.storage import Store
from shoal.errors import DataError

BLOCK = 512
SCAN_READ_AHEAD = 64 << 10  # bytes per request of a header scan
MAX_SPAN = 16 << 20  # bytes one request fetches at most


@dataclass(frozen=True)
class Layout:
    """Where the blocks of a packed shard lie: every block's [start, end) in the tar file."""

    starts: np.ndarray  # [blocks + 1] byte offsets


def packed_layout(samples: int, block_size: int, fields: dict[str, dict[str, Any]]) -> Layout:
    """The layout of a shard of `samples` samples as `shoal shard` writes it (see sink.py)."""
    sizes = []
    for b in range(math.ceil(samples / block_size)):
        count = min(block_size, samples - b * block_size)
        sizes.append(sum(BLOCK + _padded(count * _sample_bytes(spec)) for spec in fields.values()))
    return Layout(np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64))


def _sample_bytes(spec: dict[str, Any]) -> int:
    return np.dtype(spec["dtype"]).itemsize * math.prod(spec["shape"])


def _padded(n: int) -> int:
    return n + (-n % BLOCK)


class _LayoutMismatch(Exception):
    """The fetched bytes are not the blocks the layout promised: read the shard's own index instead."""


Group = tuple[str, dict[str, bytes]]


class RangedShard:
    """The key groups of one shard behind an s3:// URL, fetched by byte range a span at a time.

    Spans are aligned (span k holds blocks [k * n, (k + 1) * n)), so the blocks of a window, which lie in
    at most two spans of a shard, are fetched once each; the reader holds its last two spans."""

    def __init__(self, url: str, name: str, store: Store, layout: Layout | None, span_blocks: int):
        self.url, self.name, self.store = url, name, store
        self.layout, self.span_blocks = layout, max(1, span_blocks)
        self.index: list[tuple[str, dict[str, tuple[int, int]]]] | None = None
        self.held: OrderedDict[int, dict[int, Group]] = OrderedDict()  # span -> its groups, the latest last

    def group(self, i: int) -> Group:
        for groups in self.held.values():
            if i in groups:
                return groups[i]
        groups = self._fetch(i)
        self.held[i // self.span_blocks] = groups
        while len(self.held) > 2:
            self.held.popitem(last=False)
        return groups[i]

    def _fetch(self, i: int) -> dict[int, Group]:
        if self.index is None and self.layout is not None:
            try:
                return self._fetch_packed(i)
            except _LayoutMismatch:
                self.layout = None  # a shard laid out otherwise: its own index from here on
        if self.index is None:
            self.index = scan_index(self.store, self.url, self.name)
        return self._fetch_indexed(i)

    def _span(self, i: int, count: int, sizes: Callable[[int, int], int]) -> tuple[int, int]:
        """Blocks [b, e) of the aligned span holding block i, fewer where the span would pass MAX_SPAN bytes."""
        n = self.span_blocks
        b, e = i // n * n, min(count, (i // n + 1) * n)
        if sizes(b, e) > MAX_SPAN:  # oversized blocks: a span of one, still aligned
            b, e = i, i + 1
        return b, e

    def _fetch_packed(self, i: int) -> dict[int, Group]:
        assert self.layout is not None
        starts = self.layout.starts
        if i >= len(starts) - 1:
            raise _LayoutMismatch
        b, e = self._span(i, len(starts) - 1, lambda b, e: int(starts[e] - starts[b]))
        lo = int(starts[b])
        try:
            data = memoryview(self.store.read(self.url, lo, int(starts[e])))
        except DataError:  # past the object's end, say: the scan says truncated, or fails again on a real error
            raise _LayoutMismatch from None
        return {k: parse_group(data[int(starts[k]) - lo : int(starts[k + 1]) - lo]) for k in range(b, e)}

    def _fetch_indexed(self, i: int) -> dict[int, Group]:
        index = self.index
        assert index is not None
        if i >= len(index):
            raise DataError(f"shard {self.name}: holds {len(index)} entries, the manifest promises more (truncated?)")
        b, e = self._span(i, len(index), lambda b, e: _end(index[e - 1]) - _start(index[b]))
        lo = _start(index[b])
        data = memoryview(self.store.read(self.url, lo, _end(index[e - 1])))
        out = {}
        for k in range(b, e):
            key, members = index[k]
            out[k] = key, {ext: bytes(data[off - lo : off - lo + size]) for ext, (off, size) in members.items()}
            for ext, (_, size) in members.items():
                if len(out[k][1][ext]) != size:
                    raise DataError(
                        f"shard {self.name}, sample {key}: truncated ({len(out[k][1][ext])} of {size} bytes of .{ext})"
                    )
        return out


def _start(entry: tuple[str, dict[str, tuple[int, int]]]) -> int:
    return min(off for off, _ in entry[1].values())


def _end(entry: tuple[str, dict[str, tuple[int, int]]]) -> int:
    return max(off + size for off, size in entry[1].values())


def parse_group(data: memoryview) -> Group:
    """The members of one block's bytes (headers and data), checked against the tar headers they hold."""
    key, members, pos = None, {}, 0
    while pos < len(data):
        try:
            info = tarfile.TarInfo.frombuf(bytes(data[pos : pos + BLOCK]), "utf-8", "surrogateescape")
        except tarfile.HeaderError:
            raise _LayoutMismatch from None
        k, _, ext = os.path.basename(info.name).partition(".")
        start, end = pos + BLOCK, pos + BLOCK + info.size
        if not info.isfile() or (key is not None and k != key) or end > len(data):
            raise _LayoutMismatch
        key, members[ext] = k, bytes(data[start:end])
        pos = start + _padded(info.size)
    if key is None or pos != len(data):
        raise _LayoutMismatch
    return key, members


def scan_index(store: Store, url: str, name: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {extension: (offset, size)}) of each group of consecutive members sharing a key, from the
    tar headers alone: the file seeks past every member's data."""
    groups: list[tuple[str, dict[str, tuple[int, int]]]] = []
    try:
        with store.errors(url), store.open(url, SCAN_READ_AHEAD) as f, tarfile.open(fileobj=f, mode="r:") as tf:
            for member in filter(tarfile.TarInfo.isfile, tf):
                k, _, ext = os.path.basename(member.name).partition(".")
                if not groups or groups[-1][0] != k:
                    groups.append((k, {}))
                groups[-1][1][ext] = (member.offset_data, member.size)
    except tarfile.TarError as e:
        after = groups[-1][0] if groups else None
        raise DataError(f"shard {name}, after sample {after}: corrupt or truncated tar ({e})") from None
    return groups
