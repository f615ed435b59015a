"""The data half of `shoal check`: one streaming pass over both splits (memory flat whatever their size)
that counts what is wrong with the samples, and an even sample for the model probes and plots.

Per split: per-feature count/sum/sum of squares/min/max (float64), non-finite samples, labels or token
ids out of range, class counts. Across splits: a 64-bit hash of every sample's input bytes, for
duplicates inside the training split and validation samples also present in it (leakage). Past
`check.max_hashes` samples only hashes in a fixed 1/k of the hash space are kept: equal samples hash
equally, so the counts in that share are exact and scaled by k (and marked estimated).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from shoal.config import JobConfig
from shoal.data.memory import splitmix64
from shoal.data.spec import DataSpec
from shoal.errors import DataError

CHUNK = 4096  # samples per read of in-memory data
MAX_FEATURES_STATS = 1 << 16  # per-feature statistics up to this many input elements per sample
KEYS_SHOWN = 5


def row_hashes(x: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row's bytes (vectorised over rows, one pass per 8-byte word)."""
    raw = np.ascontiguousarray(x).reshape(len(x), -1).view(np.uint8)
    pad = -raw.shape[1] % 8
    if pad:
        raw = np.concatenate([raw, np.zeros((len(raw), pad), dtype=np.uint8)], axis=1)
    words = raw.view(np.uint64)
    h = np.full(len(words), 0x243F6A8885A308D3, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words.shape[1]):
            h = splitmix64(h ^ (words[:, j] + np.uint64(j) * np.uint64(0x9E3779B97F4A7C15)))
    return h


@dataclass
class Block:
    where: str  # shard name (or the in-memory data set)
    start: int  # index of the first sample in that shard
    first_id: int  # its index in the split
    x: np.ndarray
    y: np.ndarray


def blocks(source: Any, name: str) -> Iterator[Block | tuple[str, int, DataError]]:
    """A split's samples in order, in blocks: a shard source's own blocks, or chunks of in-memory data."""
    if hasattr(source, "scan"):
        first = 0
        for item in source.scan():
            if len(item) == 3:
                yield item
                continue
            where, start, x, y = item
            yield Block(where, start, first, x.numpy(), y.numpy())
            first += len(x)
        return
    for lo in range(0, len(source), CHUNK):
        x, y = source.get_batch(np.arange(lo, min(lo + CHUNK, len(source)), dtype=np.int64))[:2]
        yield Block(name, lo, lo, x.numpy(), y.numpy())


@dataclass
class Hashes:
    """Sample hashes (and where each sample is) within the tracked share of the hash space."""

    keep_every: int  # 1: every hash; k: those with hash % k == 0
    hashes: list[np.ndarray] = field(default_factory=list)
    places: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (shard, index in shard) per kept hash

    def add(self, h: np.ndarray, where: str, start: int) -> None:
        keep = (h % np.uint64(self.keep_every)) == 0 if self.keep_every > 1 else slice(None)
        idx = np.arange(start, start + len(h), dtype=np.int64)
        self.hashes.append(h[keep])
        self.places.append((where, idx[keep]))

    def merged(self) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """(hashes, shard index of each, shard names, index within its shard)."""
        names = [w for w, _ in self.places]
        h = np.concatenate(self.hashes) if self.hashes else np.zeros(0, np.uint64)
        owner = np.concatenate([np.full(len(i), k) for k, (_, i) in enumerate(self.places)]) if self.places else h
        within = np.concatenate([i for _, i in self.places]) if self.places else np.zeros(0, np.int64)
        return h, owner.astype(np.int64), names, within


def _places(b: Block, rows: np.ndarray, shown: list[str]) -> list[str]:
    """shard#index of the block's rows, as many as KEYS_SHOWN leaves room for after those already shown."""
    return [f"{b.where}#{b.start + i}" for i in rows[: KEYS_SHOWN - len(shown)]]


@dataclass
class SplitStats:
    """What one streaming pass over a split counts."""

    name: str
    spec: DataSpec
    samples: int = 0
    unreadable: list[str] = field(default_factory=list)
    places: list[str] = field(default_factory=list)  # where each sampled sample is (shard#index)
    nonfinite: int = 0
    nonfinite_at: list[str] = field(default_factory=list)
    out_of_range: int = 0
    range_seen: tuple[float, float] = (math.inf, -math.inf)
    out_of_range_at: list[str] = field(default_factory=list)
    classes: np.ndarray | None = None
    count: np.ndarray | None = None
    total: np.ndarray | None = None
    squares: np.ndarray | None = None
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    target_sum: float = 0.0
    target_squares: float = 0.0

    def add(self, b: Block) -> None:
        self.samples += len(b.x)
        x, y = b.x, b.y
        if self.spec.task == "lm":
            self._range(b, np.concatenate([x.reshape(len(x), -1), y.reshape(len(y), -1)], axis=1), self.spec.vocab_size)
            return
        if self.spec.token_ids:  # rows of token ids: no feature statistics or NaN (the reader checks the ids)
            self._labels(b, y)
            return
        flat = x.reshape(len(x), -1).astype(np.float64, copy=False)
        targets = y.reshape(len(y), -1).astype(np.float64, copy=False)
        flat, targets, y = self._finite(b, flat, targets, y)
        if flat.shape[1] <= MAX_FEATURES_STATS and len(flat):
            self._moments(flat)
        if self.spec.task == "classification":
            self._labels(b, y)
        else:
            self.target_sum += float(targets.sum())
            self.target_squares += float((targets**2).sum())

    def _finite(
        self, b: Block, flat: np.ndarray, targets: np.ndarray, y: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The block's rows without NaN or Inf in inputs or targets (those counted, the first few named)."""
        finite = np.isfinite(flat).all(axis=1) & np.isfinite(targets).all(axis=1)
        if finite.all():
            return flat, targets, y
        bad = np.flatnonzero(~finite)
        self.nonfinite += len(bad)
        self.nonfinite_at += _places(b, bad, self.nonfinite_at)
        return flat[finite], targets[finite], y[finite]

    def _labels(self, b: Block, y: np.ndarray) -> None:
        self._range(b, y.reshape(len(y), 1), self.spec.num_classes)
        labels = y.astype(np.int64).reshape(-1)
        labels = labels[(labels >= 0) & (labels < self.spec.num_classes)]
        counts = np.bincount(labels, minlength=self.spec.num_classes)
        self.classes = counts if self.classes is None else self.classes + counts

    def _moments(self, flat: np.ndarray) -> None:
        if self.total is None:
            d = flat.shape[1]
            self.count = np.zeros(1)
            self.total, self.squares = np.zeros(d), np.zeros(d)
            self.low, self.high = np.full(d, np.inf), np.full(d, -np.inf)
        self.count += len(flat)
        self.total += flat.sum(axis=0)
        self.squares += (flat**2).sum(axis=0)
        np.minimum(self.low, flat.min(axis=0), out=self.low)
        np.maximum(self.high, flat.max(axis=0), out=self.high)

    def _range(self, b: Block, values: np.ndarray, n: int) -> None:
        if not n or not values.size:
            return
        lo, hi = float(values.min()), float(values.max())
        self.range_seen = (min(self.range_seen[0], lo), max(self.range_seen[1], hi))
        bad = ((values < 0) | (values >= n)).any(axis=1)
        if bad.any():
            rows = np.flatnonzero(bad)
            self.out_of_range += len(rows)
            self.out_of_range_at += _places(b, rows, self.out_of_range_at)

    def features(self) -> dict[str, np.ndarray] | None:
        if self.total is None or not self.count:
            return None
        n = float(self.count[0])
        mean = self.total / n
        std = np.sqrt(np.maximum(self.squares / n - mean**2, 0.0))
        return {"mean": mean, "std": std, "min": self.low, "max": self.high}


@dataclass
class Scan:
    train: SplitStats
    val: SplitStats | None
    duplicates: int
    duplicate_at: list[str]
    leaked: int
    leaked_val_at: list[str]
    leaked_train_at: list[str]
    estimated: bool
    sample: tuple[torch.Tensor, torch.Tensor]
    val_sample: tuple[torch.Tensor, torch.Tensor] | None


def _sampler(n: int, size: int) -> np.ndarray:
    """Sample ids spread evenly over the split: every shard gives its share, from all along it."""
    return np.unique(np.linspace(0, n - 1, num=min(n, size)).astype(np.int64)) if n else np.zeros(0, np.int64)


def _scan_split(
    source: Any, name: str, spec: DataSpec, hashes: Hashes, sample_size: int, on_block: Any = None
) -> tuple[SplitStats, tuple[torch.Tensor, torch.Tensor]]:
    stats = SplitStats(name, spec)
    want = _sampler(len(source), sample_size)
    picked, places = [], []
    for b in blocks(source, name):
        if not isinstance(b, Block):
            where, start, err = b
            stats.unreadable.append(f"{where}#{start}: {err}")
            continue
        stats.add(b)
        h = row_hashes(b.x)
        hashes.add(h, b.where, b.start)
        if on_block is not None:
            on_block(h, b)
        picked.append(_picked(b, want))
        places += [f"{b.where}#{b.start + r}" for r in _rows(b, want)]
    stats.places = places
    return stats, _sample([p for p in picked if p is not None], spec)


def _rows(b: Block, want: np.ndarray) -> np.ndarray:
    """The block's rows among the wanted sample ids."""
    lo, hi = np.searchsorted(want, [b.first_id, b.first_id + len(b.x)])
    return want[lo:hi] - b.first_id


def _picked(b: Block, want: np.ndarray) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The block's samples among the wanted sample ids (None when there are none)."""
    rows = _rows(b, want)
    if not len(rows):
        return None
    return torch.from_numpy(b.x[rows].copy()), torch.from_numpy(b.y[rows].copy())


def _sample(picked: list[tuple[torch.Tensor, torch.Tensor]], spec: DataSpec) -> tuple[torch.Tensor, torch.Tensor]:
    if not picked:
        return torch.zeros((0, *spec.input_shape)), torch.zeros(0)
    return torch.cat([x for x, _ in picked]), torch.cat([y for _, y in picked])


@dataclass
class Leaks:
    """Validation samples equal to a training sample, marked as the training split streams past."""

    val: tuple[np.ndarray, np.ndarray, list[str], np.ndarray] | None  # the validation split's Hashes.merged()
    order: np.ndarray = field(init=False)  # sorts the validation hashes
    sorted_val: np.ndarray = field(init=False)
    seen: np.ndarray = field(init=False)  # per validation hash: equal to some training sample
    train_at: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        h = self.val[0] if self.val is not None else np.zeros(0, np.uint64)
        self.order = np.argsort(h)
        self.sorted_val = h[self.order]
        self.seen = np.zeros(len(h), dtype=bool)

    def add(self, h: np.ndarray, b: Block) -> None:
        if not len(self.sorted_val):
            return
        pos = np.searchsorted(self.sorted_val, h).clip(0, len(self.sorted_val) - 1)
        hit = self.sorted_val[pos] == h
        if not hit.any():
            return
        # every val sample equal to a hit is marked (equal values sit next to each other once sorted)
        for v in np.unique(h[hit]):
            lo, hi = np.searchsorted(self.sorted_val, v, side="left"), np.searchsorted(self.sorted_val, v, side="right")
            self.seen[self.order[lo:hi]] = True
        self.train_at.extend(_places(b, np.flatnonzero(hit), self.train_at))

    def val_at(self) -> list[str]:
        """A few of the leaked validation samples, as shard#index."""
        if self.val is None:
            return []
        _, owner, names, within = self.val
        return [f"{names[owner[i]]}#{within[i]}" for i in np.flatnonzero(self.seen)[:KEYS_SHOWN]]


def scan(cfg: JobConfig, train_source: Any, val_source: Any, spec: DataSpec) -> Scan:
    """One pass over the validation split (hashes kept), then one over the training split."""
    n_val = len(val_source) if val_source is not None else 0
    keep_every = max(1, math.ceil(max(len(train_source), n_val) / cfg.check.max_hashes))
    val_stats, val_sample, leaks = _scan_val(val_source if n_val else None, spec, keep_every, cfg.check.sample_size)
    th = Hashes(keep_every)
    train_stats, sample = _scan_split(train_source, "train", spec, th, cfg.check.sample_size, leaks.add)
    dup_count, dup_at = _duplicates(*th.merged())
    return Scan(
        train=train_stats,
        val=val_stats,
        duplicates=dup_count * keep_every,
        duplicate_at=dup_at,
        leaked=int(leaks.seen.sum()) * keep_every,
        leaked_val_at=leaks.val_at(),
        leaked_train_at=leaks.train_at,
        estimated=keep_every > 1,
        sample=sample,
        val_sample=val_sample,
    )


def _scan_val(
    source: Any, spec: DataSpec, keep_every: int, sample_size: int
) -> tuple[SplitStats | None, tuple[torch.Tensor, torch.Tensor] | None, Leaks]:
    """The validation split's pass (none without one), and the leak finder its hashes make."""
    if source is None:
        return None, None, Leaks(None)
    hashes = Hashes(keep_every)
    stats, sample = _scan_split(source, "val", spec, hashes, sample_size)
    return stats, sample, Leaks(hashes.merged())


def _duplicates(h: np.ndarray, owner: np.ndarray, names: list[str], within: np.ndarray) -> tuple[int, list[str]]:
    """Samples that repeat an earlier one, and a few of them (shard#index = the first copy)."""
    if not len(h):
        return 0, []
    order = np.argsort(h, kind="stable")
    s = h[order]
    repeat = np.r_[False, s[1:] == s[:-1]]
    count = int(repeat.sum())
    shown = []
    for i in np.flatnonzero(repeat)[:KEYS_SHOWN]:
        j, first = order[i], order[i - 1]
        shown.append(f"{names[owner[j]]}#{within[j]} = {names[owner[first]]}#{within[first]}")
    return count, shown
