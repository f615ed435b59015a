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

from shoal.check.findings import NOTE, Finding
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


@dataclass
class SplitStats:
    """What one streaming pass over a split counts."""

    name: str
    spec: DataSpec
    samples: int = 0
    unreadable: list[str] = field(default_factory=list)
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
        flat = x.reshape(len(x), -1).astype(np.float64, copy=False)
        targets = y.reshape(len(y), -1).astype(np.float64, copy=False)
        finite = np.isfinite(flat).all(axis=1) & np.isfinite(targets).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            self.nonfinite += len(bad)
            self.nonfinite_at += [f"{b.where}#{b.start + i}" for i in bad[: KEYS_SHOWN - len(self.nonfinite_at)]]
            flat, targets, y = flat[finite], targets[finite], y[finite]
        if flat.shape[1] <= MAX_FEATURES_STATS and len(flat):
            self._moments(flat)
        if self.spec.task == "classification":
            self._range(b, y.reshape(len(y), 1), self.spec.num_classes)
            labels = y.astype(np.int64).reshape(-1)
            labels = labels[(labels >= 0) & (labels < self.spec.num_classes)]
            counts = np.bincount(labels, minlength=self.spec.num_classes)
            self.classes = counts if self.classes is None else self.classes + counts
        else:
            self.target_sum += float(targets.sum())
            self.target_squares += float((targets**2).sum())

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
            self.out_of_range_at += [f"{b.where}#{b.start + i}" for i in rows[: KEYS_SHOWN - len(self.out_of_range_at)]]

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
    xs, ys = [], []
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
        lo, hi = np.searchsorted(want, [b.first_id, b.first_id + len(b.x)])
        if hi > lo:
            rows = want[lo:hi] - b.first_id
            xs.append(torch.from_numpy(b.x[rows].copy()))
            ys.append(torch.from_numpy(b.y[rows].copy()))
    if not xs:
        empty = torch.zeros((0, *spec.input_shape))
        return stats, (empty, torch.zeros(0))
    return stats, (torch.cat(xs), torch.cat(ys))


def scan(cfg: JobConfig, train_source: Any, val_source: Any, spec: DataSpec) -> Scan:
    """One pass over the validation split (hashes kept), then one over the training split."""
    limit = cfg.check.max_hashes
    n_train, n_val = len(train_source), len(val_source) if val_source is not None else 0
    keep_every = max(1, math.ceil(max(n_train, n_val) / limit))
    val_stats, val_sample, val_hashes = None, None, None
    if val_source is not None and n_val:
        vh = Hashes(keep_every)
        val_stats, val_sample = _scan_split(val_source, "val", spec, vh, cfg.check.sample_size)
        val_hashes = vh.merged()
    seen = np.zeros(len(val_hashes[0]) if val_hashes else 0, dtype=bool)
    order = np.argsort(val_hashes[0]) if val_hashes else np.zeros(0, np.int64)
    sorted_val = val_hashes[0][order] if val_hashes else np.zeros(0, np.uint64)
    leaked_train_at: list[str] = []

    def find_leaks(h: np.ndarray, b: Block) -> None:
        if not len(sorted_val):
            return
        pos = np.searchsorted(sorted_val, h).clip(0, len(sorted_val) - 1)
        hit = sorted_val[pos] == h
        if hit.any():
            # every val sample equal to a hit is marked (equal values sit next to each other once sorted)
            for v in np.unique(h[hit]):
                a, z = np.searchsorted(sorted_val, [v, v], side="left")[0], np.searchsorted(sorted_val, v, side="right")
                seen[order[a:z]] = True
            rows = np.flatnonzero(hit)[: KEYS_SHOWN - len(leaked_train_at)]
            leaked_train_at.extend(f"{b.where}#{b.start + i}" for i in rows)

    th = Hashes(keep_every)
    train_stats, sample = _scan_split(train_source, "train", spec, th, cfg.check.sample_size, find_leaks)
    h, owner, names, within = th.merged()
    dup_count, dup_at = _duplicates(h, owner, names, within)
    leaked_val_at = []
    if val_hashes is not None:
        _, v_owner, v_names, v_within = val_hashes
        leaked_val_at = [f"{v_names[v_owner[i]]}#{v_within[i]}" for i in np.flatnonzero(seen)[:KEYS_SHOWN]]
    return Scan(
        train=train_stats,
        val=val_stats,
        duplicates=dup_count * keep_every,
        duplicate_at=dup_at,
        leaked=int(seen.sum()) * keep_every,
        leaked_val_at=leaked_val_at,
        leaked_train_at=leaked_train_at,
        estimated=keep_every > 1,
        sample=sample,
        val_sample=val_sample,
    )


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


# ---------------------------------------------------------------- findings


def findings(result: Scan, spec: DataSpec, cfg: JobConfig) -> tuple[list[Finding], dict[str, Any]]:
    """Data findings and the numbers the report shows."""
    out: list[Finding] = []
    numbers: dict[str, Any] = {"train_samples": result.train.samples}
    for stats in (result.train, result.val):
        if stats is not None:
            out += _split_findings(stats, spec)
    feats = result.train.features()
    if feats is not None:
        out += _feature_findings(feats)
        numbers["features"] = {k: _summary(v) for k, v in feats.items()}
        numbers["constant_features"] = int((feats["max"] == feats["min"]).sum())
    if result.train.classes is not None:
        out += _balance(result.train.classes, numbers)
    if spec.task == "regression" and result.train.samples:
        n = result.train.samples
        mean = result.train.target_sum / (n * spec.target_dim)
        std = math.sqrt(max(result.train.target_squares / (n * spec.target_dim) - mean**2, 0.0))
        numbers["target"] = {"mean": mean, "std": std}
        if abs(mean) > 10 or std > 10:
            out.append(
                Finding(
                    "unscaled_targets",
                    "data",
                    f"regression targets have mean {mean:.3g} and std {std:.3g}: mse starts huge and the first "
                    "steps chase the scale",
                    "standardise the targets before `shoal shard` ((y - mean) / std; invert at prediction time)",
                    numbers={"mean": mean, "std": std},
                )
            )
    est = " (estimated from a share of the hash space)" if result.estimated else ""
    train_n = max(1, result.train.samples)
    numbers["duplicates"] = result.duplicates
    if result.duplicates:
        share = result.duplicates / train_n
        out.append(
            Finding(
                "duplicates",
                "data",
                f"{result.duplicates:,} training samples ({share:.1%}) repeat another training sample{est}, "
                f"e.g. {'; '.join(result.duplicate_at[:3])}",
                "de-duplicate the source before `shoal shard` (repeats weigh those samples more and inflate "
                "training accuracy)",
                severity="problem" if share > 0.01 else NOTE,
                numbers={"count": result.duplicates, "share": share},
            )
        )
    if result.val is not None:
        n_val = result.val.samples
        numbers["val_samples"] = n_val
        numbers["leaked"] = result.leaked
        numbers["val_accuracy_standard_error"] = accuracy_error(n_val)
        if result.leaked:
            share = result.leaked / max(1, n_val)
            out.append(
                Finding(
                    "leakage",
                    "data",
                    f"{result.leaked:,} of {n_val:,} validation samples ({share:.1%}) are also in the training "
                    f"split{est}: validation {', '.join(result.leaked_val_at[:3])} equal training "
                    f"{', '.join(result.leaked_train_at[:3])}; validation scores will be too good",
                    "split the source before de-duplicating it, then write the shards again "
                    "(`shoal shard` splits by sample; keep copies of a sample in one split)",
                    numbers={"count": result.leaked, "share": share, "val_samples": n_val},
                )
            )
        out += _val_size(n_val, result.train.classes)
    elif cfg.train.eval_every or cfg.train.early_stopping:
        out.append(
            Finding(
                "no_validation",
                "data",
                "there is no validation split: evaluations, early stopping and overfitting alerts have nothing to use",
                "data.val_fraction: 0.1 (memory data) or `shoal shard --val-fraction 0.1` / data.val_path (shards)",
                severity=NOTE,
            )
        )
    return out, numbers


def _split_findings(stats: SplitStats, spec: DataSpec) -> list[Finding]:
    out = []
    if stats.unreadable:
        out.append(
            Finding(
                "unreadable",
                "data",
                f"{len(stats.unreadable)} blocks of the {stats.name} split cannot be read: {stats.unreadable[0]}",
                "write the shards again (`shoal shard`), or data.on_error: skip to train without them",
                numbers={"blocks": len(stats.unreadable)},
            )
        )
    if stats.nonfinite:
        out.append(
            Finding(
                "nonfinite_samples",
                "data",
                f"{stats.nonfinite:,} {stats.name} samples hold NaN or Inf in inputs or targets, e.g. "
                f"{', '.join(stats.nonfinite_at[:3])}: one reaches the loss and the step is lost (or the run)",
                "drop or impute them before `shoal shard` (data.on_error: skip does not catch NaN values)",
                numbers={"count": stats.nonfinite},
            )
        )
    if stats.out_of_range:
        n = spec.classes
        lo, hi = stats.range_seen
        what, key = (
            ("token ids", "vocab_size (manifest) / data.vocab_size")
            if spec.task == "lm"
            else ("labels", "num_classes (manifest) / data.num_classes")
        )
        fix = (
            f"set {key} to {int(hi) + 1} if those are real classes, or fix the labels (negative ids are never valid)"
            if lo >= 0
            else "fix the labels: ids must be in [0, classes)"
        )
        out.append(
            Finding(
                "labels_out_of_range",
                "data",
                f"{stats.out_of_range:,} {stats.name} samples have {what} outside [0, {n}) (seen {lo:g}..{hi:g}), "
                f"e.g. {', '.join(stats.out_of_range_at[:3])}",
                fix,
                numbers={"count": stats.out_of_range, "min": lo, "max": hi, "classes": n},
            )
        )
    return out


def _summary(v: np.ndarray) -> dict[str, float]:
    return {"min": float(v.min()), "max": float(v.max()), "median": float(np.median(v))}


def _feature_findings(f: dict[str, np.ndarray]) -> list[Finding]:
    out = []
    mean, std, low, high = f["mean"], f["std"], f["min"], f["max"]
    big_mean, big_std = float(np.abs(mean).max()), float(std.max())
    if big_mean > 10 or big_std > 10:
        worst = int(np.argmax(np.maximum(np.abs(mean), std)))
        out.append(
            Finding(
                "unnormalised_inputs",
                "data",
                f"inputs are not normalised: feature {worst} has mean {mean[worst]:.4g} and std {std[worst]:.4g} "
                f"(largest |mean| {big_mean:.4g}, largest std {big_std:.4g}); networks train best on inputs near "
                "mean 0 and std 1",
                "standardise each feature before `shoal shard` ((x - mean) / std, the statistics in "
                "check/report.json), or in data.decode",
                numbers={"max_abs_mean": big_mean, "max_std": big_std, "feature": worst},
            )
        )
    spread = high - low
    constant = spread == 0
    share = float(constant.mean())
    if share > 0.5:  # a few constant features (an image's empty border) are normal and harmless
        out.append(
            Finding(
                "constant_features",
                "data",
                f"{int(constant.sum())} of {len(spread)} input features never change (e.g. feature "
                f"{int(np.flatnonzero(constant)[0])}): they carry no information",
                "check the data pipeline (a feature that never varies is often a column lost or zero-filled upstream)",
                numbers={"count": int(constant.sum()), "share": share},
            )
        )
    varying = spread[~constant]
    if len(varying) > 1 and not out:
        ratio = float(varying.max() / varying.min())
        if ratio > 1000:
            out.append(
                Finding(
                    "mixed_scales",
                    "data",
                    f"input features span wildly different ranges (largest range / smallest = {ratio:.3g}): the "
                    "large ones dominate the first layer's gradients",
                    "standardise each feature before `shoal shard` ((x - mean) / std, statistics in check/report.json)",
                    numbers={"range_ratio": ratio},
                )
            )
    return out


def _balance(classes: np.ndarray, numbers: dict[str, Any]) -> list[Finding]:
    total = int(classes.sum())
    if not total:
        return []
    present = classes[classes > 0]
    majority = float(classes.max() / total)
    ratio = float(present.max() / present.min())
    numbers["classes"] = classes.tolist()
    numbers["majority_accuracy"] = majority
    numbers["imbalance_ratio"] = ratio
    out = []
    missing = np.flatnonzero(classes == 0)
    if len(missing):
        out.append(
            Finding(
                "missing_classes",
                "data",
                f"{len(missing)} of {len(classes)} classes never appear in the training split (e.g. class "
                f"{int(missing[0])}): the model cannot learn them",
                "check the labels, or lower the class count (num_classes in the manifest / data.num_classes)",
                severity=NOTE if len(missing) < len(classes) / 2 else "problem",
                numbers={"missing": len(missing)},
            )
        )
    if ratio > 10:
        out.append(
            Finding(
                "class_imbalance",
                "data",
                f"classes are imbalanced: the largest is {ratio:.1f}x the smallest; always predicting the majority "
                f"class already scores {majority:.1%} accuracy",
                "rebalance when sharding (oversample rare classes) and judge the model by per-class accuracy, "
                f"not against 0 but against the {majority:.1%} floor",
                numbers={"ratio": ratio, "majority_accuracy": majority},
            )
        )
    return out


def _val_size(n_val: int, classes: np.ndarray | None) -> list[Finding]:
    """The standard error of an accuracy measured on n_val samples, at the worst case p = 0.5."""
    if classes is None or not n_val:
        return []
    se = accuracy_error(n_val)
    if n_val >= 100:
        return []
    return [
        Finding(
            "small_validation",
            "data",
            f"the validation split has {n_val} samples: an accuracy measured on it is uncertain by about "
            f"+/-{se:.1%} (one standard error), so differences below {2 * se:.0%} are noise",
            "a larger validation split: data.val_fraction (memory data) or `shoal shard --val-fraction`",
            numbers={"val_samples": n_val, "standard_error": se},
        )
    ]


def accuracy_error(n_val: int, accuracy: float = 0.5) -> float:
    """One standard error of an accuracy measured on n_val samples (worst case at p = 0.5)."""
    return math.sqrt(accuracy * (1 - accuracy) / max(1, n_val))
