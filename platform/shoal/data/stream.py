"""What a `shoal shard` source is to the writer: chunks of (x, y) rows, in pieces read independently.

Every source (a columnar file, CSV, text, images, a built-in set) becomes a Stream; the writer
(writer.py) spills it through the external shuffle (shuffle.py) into sinks (sink.py). A stream is
cut into pieces that the source alone defines (parquet row groups, byte ranges of a CSV cut at line
ends, index ranges of an array; a source that cannot be cut is one piece), so that processes or Ray
tasks can each read some of them, and a row's position, (piece, row within the piece), is the same
whoever reads it. What only the whole pass can tell (the class count, string labels' ids, padded rows'
lengths) is asked of `labels` and `lengths` after it, in each process that read some pieces, and merged
(columns.merge_labels, Lengths.total).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np


class Chunk(NamedTuple):
    """Consecutive rows of a source: x [n, *shape], y [n, *shape], and a uint64 hash of each row's key
    column when the split goes by key (else None)."""

    x: np.ndarray
    y: np.ndarray
    keys: np.ndarray | None = None


class LabelsSeen(NamedTuple):
    """What one reader's pass saw of the labels: string names in the order it gave them ids, the largest
    integer label, and the names a data set declares (Hugging Face's ClassLabel)."""

    task: str
    names: list[str]
    max: int
    preset: list[str] | None


@dataclass
class Lengths:
    """Rows of ids padded to one length, as a reader counted them: the ids kept in each row, and its
    length before the cut (a row longer than the length is truncated)."""

    rows: int = 0
    kept: int = 0  # ids kept, pads left out
    max: int = 0  # the longest row kept
    truncated: int = 0
    longest: int = 0  # the longest row before the cut

    def add(self, kept: np.ndarray, full: np.ndarray) -> None:
        if len(kept):
            self.rows += len(kept)
            self.kept += int(kept.sum())
            self.max = max(self.max, int(kept.max()))
            self.truncated += int((full > kept).sum())
            self.longest = max(self.longest, int(full.max()))

    @staticmethod
    def total(parts: Iterable[Lengths]) -> Lengths:
        out = Lengths()
        for p in parts:
            out.rows, out.kept, out.truncated = out.rows + p.rows, out.kept + p.kept, out.truncated + p.truncated
            out.max, out.longest = max(out.max, p.max), max(out.longest, p.longest)
        return out

    def entry(self) -> dict[str, Any]:
        """The manifest's `lengths`: ids per row (pads left out), and the rows cut to the length."""
        mean = round(self.kept / self.rows, 3) if self.rows else 0.0
        return {"mean": mean, "max": self.max, "truncated": self.truncated, "longest": self.longest}


class LabelIds(Protocol):
    def seen(self) -> LabelsSeen:
        """The labels this reader has seen so far (see LabelsSeen)."""
        ...


PieceReader = Callable[[Sequence[int]], Iterator[tuple[int, Chunk]]]


@dataclass
class Stream:
    """A source, its pieces, and what the manifest says about it."""

    chunks: Callable[[], Iterator[Chunk]] | None  # the whole source in order, for a source of one piece
    task: str
    num_classes: int = 0
    vocab_size: int = 0
    x_scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None  # when known before the pass (sizes the shuffle's buckets)
    nbytes: int = 0  # the source's size on disk, the estimate when rows is not known
    labels: LabelIds | None = None
    pieces: int = 1
    piece_reader: PieceReader | None = None  # (pieces, in order) -> (piece, chunk), for a source of several
    piece_sizes: list[int] | None = None  # each piece's size in any unit (bytes, rows), for balancing
    # padded rows' lengths by piece, as the piece reader counts them (each piece's counted anew when it is
    # read from its start again, as the driver reads the first rows before pass 1)
    lengths: dict[int, Lengths] | None = None

    def read(self, pieces: Sequence[int]) -> Iterator[tuple[int, Chunk]]:
        """The chunks of these pieces, each with its piece, rows in the source's order within a piece."""
        if self.piece_reader is not None:
            return self.piece_reader(pieces)
        assert self.chunks is not None and list(pieces) in ([], [0]), "a source of one piece"
        return ((0, c) for c in self.chunks()) if pieces else iter(())

    def sizes(self) -> list[int]:
        return self.piece_sizes or [1] * self.pieces


def random_access(
    n: int, fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], chunk: int = 4096
) -> dict[str, Any]:
    """A source read by index (built-in sets, arrays, image files): pieces of `chunk` consecutive indices,
    as the fields of a Stream."""

    def read(pieces: Sequence[int]) -> Iterator[tuple[int, Chunk]]:
        for i in pieces:
            x, y = fetch(np.arange(i * chunk, min(n, (i + 1) * chunk)))
            yield i, Chunk(x, y)

    count = max(1, -(-n // chunk))
    return {"chunks": None, "pieces": count, "piece_reader": read, "piece_sizes": None}


T = TypeVar("T")
_END = object()


def prefetch(items: Iterator[T], depth: int = 3) -> Iterator[T]:
    """The items, produced by a thread up to `depth` ahead: pyarrow decodes with the GIL released, so
    parsing the next batch overlaps this thread's work on the last. An error is raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if not _put(q, item, stop):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            _put(q, _Raised(e), stop)
            return
        _put(q, _END, stop)

    thread = threading.Thread(target=produce, name="shoal-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put unless the consumer has gone; False once it has."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False
