"""What a `shoal shard` source is to the writer: a stream of chunks of (x, y) rows, read front to back.

Every source (a columnar file, CSV, text, images, a built-in set) becomes a Stream; the writer
(writer.py) spills it through the external shuffle (shuffle.py) into sinks (sink.py). A Stream is
iterated once; what only the whole pass can tell (the class count, string labels' ids) is asked of
`labels` after it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, TypeVar

import numpy as np


class Chunk(NamedTuple):
    """Consecutive rows of a source: x [n, *shape], y [n, *shape], and a uint64 hash of each row's key
    column when the split goes by key (else None)."""

    x: np.ndarray
    y: np.ndarray
    keys: np.ndarray | None = None


class LabelIds(Protocol):
    def finish(self) -> tuple[np.ndarray | None, int, list[str] | None]:
        """(old id -> final id table or None, class count, class names or None), after the pass."""
        ...


@dataclass
class Stream:
    """A source read once, front to back, and what the manifest says about it."""

    chunks: Callable[[], Iterator[Chunk]]
    task: str
    num_classes: int = 0
    vocab_size: int = 0
    x_scale: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None  # when known before the pass (sizes the shuffle's buckets)
    nbytes: int = 0  # the source's size on disk, the estimate when rows is not known
    labels: LabelIds | None = None


def random_access(
    n: int, fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], chunk: int = 4096
) -> Callable[[], Iterator[Chunk]]:
    """The chunks of a source read by index (built-in sets, arrays, image files), in index order."""

    def chunks() -> Iterator[Chunk]:
        for start in range(0, n, chunk):
            x, y = fetch(np.arange(start, min(n, start + chunk)))
            yield Chunk(x, y)

    return chunks


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
