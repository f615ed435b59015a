"""The data half of `shoal check`'s findings, from one scan of both splits (check.data): what is wrong with
the samples, each with the data step or config key that fixes it, and the numbers the report shows."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from shoal.check.data import Scan, SplitStats
from shoal.check.findings import NOTE, Finding
from shoal.config import JobConfig
from shoal.data.spec import DataSpec


def findings(result: Scan, spec: DataSpec, cfg: JobConfig) -> tuple[list[Finding], dict[str, Any]]:
    """Data findings and the numbers the report shows."""
    return [f for check in DATA_FINDINGS for f in check(result, spec, cfg)], _numbers(result, spec)


def _numbers(result: Scan, spec: DataSpec) -> dict[str, Any]:
    numbers: dict[str, Any] = {"train_samples": result.train.samples}
    feats = result.train.features()
    if feats is not None:
        numbers["features"] = {k: _summary(v) for k, v in feats.items()}
        numbers["constant_features"] = int((feats["max"] == feats["min"]).sum())
    numbers.update(_class_numbers(result.train.classes))
    target = _target_moments(result.train, spec)
    if target is not None:
        numbers["target"] = {"mean": target[0], "std": target[1]}
    numbers["duplicates"] = result.duplicates
    if result.val is not None:
        n_val = result.val.samples
        numbers.update(val_samples=n_val, leaked=result.leaked, val_accuracy_standard_error=accuracy_error(n_val))
    return numbers


def _summary(v: np.ndarray) -> dict[str, float]:
    return {"min": float(v.min()), "max": float(v.max()), "median": float(np.median(v))}


def _estimated(result: Scan) -> str:
    return " (estimated from a share of the hash space)" if result.estimated else ""


def _in_splits(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    """Unreadable blocks, non-finite samples and labels out of range, split by split."""
    checks = (_unreadable, _nonfinite, _out_of_range)
    return [f for stats in (result.train, result.val) if stats is not None for c in checks if (f := c(stats, spec))]


def _unreadable(stats: SplitStats, spec: DataSpec) -> Finding | None:
    if not stats.unreadable:
        return None
    return Finding(
        "unreadable",
        "data",
        f"{len(stats.unreadable)} blocks of the {stats.name} split cannot be read: {stats.unreadable[0]}",
        "write the shards again (`shoal shard`), or data.on_error: skip to train without them",
        numbers={"blocks": len(stats.unreadable)},
    )


def _nonfinite(stats: SplitStats, spec: DataSpec) -> Finding | None:
    if not stats.nonfinite:
        return None
    return Finding(
        "nonfinite_samples",
        "data",
        f"{stats.nonfinite:,} {stats.name} samples hold NaN or Inf in inputs or targets, e.g. "
        f"{', '.join(stats.nonfinite_at[:3])}: one reaches the loss and the step is lost (or the run)",
        "drop or impute them before `shoal shard` (data.on_error: skip does not catch NaN values)",
        numbers={"count": stats.nonfinite},
    )


def _out_of_range(stats: SplitStats, spec: DataSpec) -> Finding | None:
    if not stats.out_of_range:
        return None
    n = spec.classes
    lo, hi = stats.range_seen
    what, bound = ("token ids", f"vocab_size={n}") if spec.task == "lm" else ("labels", str(n))
    return Finding(
        "labels_out_of_range",
        "data",
        f"{stats.out_of_range:,} {stats.name} samples have {what} outside [0, {bound}) (seen {lo:g}..{hi:g}), "
        f"e.g. {', '.join(stats.out_of_range_at[:3])}",
        _out_of_range_fix(spec, lo, hi),
        numbers={"count": stats.out_of_range, "min": lo, "max": hi, "classes": n},
    )


def _out_of_range_fix(spec: DataSpec, lo: float, hi: float) -> str:
    if not lo >= 0:
        return "fix the labels: ids must be in [0, classes)"
    key = (
        "vocab_size (manifest) / data.vocab_size" if spec.task == "lm" else "num_classes (manifest) / data.num_classes"
    )
    return f"set {key} to {int(hi) + 1} if those are real classes, or fix the labels (negative ids are never valid)"


def _input_features(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    """Inputs far from mean 0 and std 1, mostly constant, or (when neither) on wildly different scales."""
    feats = result.train.features()
    if feats is None:
        return []
    found = [f for f in (_unnormalised(feats), _constant(feats)) if f is not None]
    mixed = None if found else _mixed_scales(feats)
    return found + ([mixed] if mixed is not None else [])


def _unnormalised(f: dict[str, np.ndarray]) -> Finding | None:
    mean, std = f["mean"], f["std"]
    big_mean, big_std = float(np.abs(mean).max()), float(std.max())
    if not (big_mean > 10 or big_std > 10):
        return None
    worst = int(np.argmax(np.maximum(np.abs(mean), std)))
    return Finding(
        "unnormalised_inputs",
        "data",
        f"inputs are not normalised: feature {worst} has mean {mean[worst]:.4g} and std {std[worst]:.4g} "
        f"(largest |mean| {big_mean:.4g}, largest std {big_std:.4g}); networks train best on inputs near "
        "mean 0 and std 1",
        "standardise each feature before `shoal shard` ((x - mean) / std, the statistics in "
        "check/report.json), or in data.decode",
        numbers={"max_abs_mean": big_mean, "max_std": big_std, "feature": worst},
    )


def _constant(f: dict[str, np.ndarray]) -> Finding | None:
    spread = f["max"] - f["min"]
    constant = spread == 0
    share = float(constant.mean())
    if not share > 0.5:  # a few constant features (an image's empty border) are normal and harmless
        return None
    return Finding(
        "constant_features",
        "data",
        f"{int(constant.sum())} of {len(spread)} input features never change (e.g. feature "
        f"{int(np.flatnonzero(constant)[0])}): they carry no information",
        "check the data pipeline (a feature that never varies is often a column lost or zero-filled upstream)",
        numbers={"count": int(constant.sum()), "share": share},
    )


def _mixed_scales(f: dict[str, np.ndarray]) -> Finding | None:
    spread = f["max"] - f["min"]
    varying = spread[spread != 0]
    if len(varying) <= 1:
        return None
    ratio = float(varying.max() / varying.min())
    if not ratio > 1000:
        return None
    return Finding(
        "mixed_scales",
        "data",
        f"input features span wildly different ranges (largest range / smallest = {ratio:.3g}): the "
        "large ones dominate the first layer's gradients",
        "standardise each feature before `shoal shard` ((x - mean) / std, statistics in check/report.json)",
        numbers={"range_ratio": ratio},
    )


def _class_shares(classes: np.ndarray | None) -> tuple[float, float] | None:
    """(majority class share, largest / smallest present class), None without labels."""
    if classes is None or not int(classes.sum()):
        return None
    present = classes[classes > 0]
    return float(classes.max() / int(classes.sum())), float(present.max() / present.min())


def _class_numbers(classes: np.ndarray | None) -> dict[str, Any]:
    shares = _class_shares(classes)
    if shares is None:
        return {}
    return {"classes": classes.tolist(), "majority_accuracy": shares[0], "imbalance_ratio": shares[1]}


def _missing_classes(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    classes = result.train.classes
    if _class_shares(classes) is None or not (classes == 0).any():
        return []
    missing = np.flatnonzero(classes == 0)
    finding = Finding(
        "missing_classes",
        "data",
        f"{len(missing)} of {len(classes)} classes never appear in the training split (e.g. class "
        f"{int(missing[0])}): the model cannot learn them",
        "check the labels, or lower the class count (num_classes in the manifest / data.num_classes)",
        severity=NOTE if len(missing) < len(classes) / 2 else "problem",
        numbers={"missing": len(missing)},
    )
    return [finding]


def _class_imbalance(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    shares = _class_shares(result.train.classes)
    if shares is None or not shares[1] > 10:
        return []
    majority, ratio = shares
    finding = Finding(
        "class_imbalance",
        "data",
        f"classes are imbalanced: the largest is {ratio:.1f}x the smallest; always predicting the majority "
        f"class already scores {majority:.1%} accuracy",
        "rebalance when sharding (oversample rare classes) and judge the model by per-class accuracy, "
        f"not against 0 but against the {majority:.1%} floor",
        numbers={"ratio": ratio, "majority_accuracy": majority},
    )
    return [finding]


def _target_moments(train: SplitStats, spec: DataSpec) -> tuple[float, float] | None:
    """A regression split's target mean and std (None for other tasks or an empty split)."""
    if not (spec.task == "regression" and train.samples):
        return None
    n = train.samples * spec.target_dim
    mean = train.target_sum / n
    return mean, math.sqrt(max(train.target_squares / n - mean**2, 0.0))


def _unscaled_targets(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    moments = _target_moments(result.train, spec)
    if moments is None or not (abs(moments[0]) > 10 or moments[1] > 10):
        return []
    mean, std = moments
    finding = Finding(
        "unscaled_targets",
        "data",
        f"regression targets have mean {mean:.3g} and std {std:.3g}: mse starts huge and the first "
        "steps chase the scale",
        "standardise the targets before `shoal shard` ((y - mean) / std; invert at prediction time)",
        numbers={"mean": mean, "std": std},
    )
    return [finding]


def _duplicate_samples(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    if not result.duplicates:
        return []
    share = result.duplicates / max(1, result.train.samples)
    finding = Finding(
        "duplicates",
        "data",
        f"{result.duplicates:,} training samples ({share:.1%}) repeat another training sample{_estimated(result)}, "
        f"e.g. {'; '.join(result.duplicate_at[:3])}",
        "de-duplicate the source before `shoal shard` (repeats weigh those samples more and inflate training accuracy)",
        severity="problem" if share > 0.01 else NOTE,
        numbers={"count": result.duplicates, "share": share},
    )
    return [finding]


def _leakage(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    if result.val is None or not result.leaked:
        return []
    n_val = result.val.samples
    share = result.leaked / max(1, n_val)
    finding = Finding(
        "leakage",
        "data",
        f"{result.leaked:,} of {n_val:,} validation samples ({share:.1%}) are also in the training "
        f"split{_estimated(result)}: validation {', '.join(result.leaked_val_at[:3])} equal training "
        f"{', '.join(result.leaked_train_at[:3])}; validation scores will be too good",
        "split the source before de-duplicating it, then write the shards again "
        "(`shoal shard` splits by sample; keep copies of a sample in one split)",
        numbers={"count": result.leaked, "share": share, "val_samples": n_val},
    )
    return [finding]


def _small_validation(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    return [] if result.val is None else _val_size(result.val.samples, result.train.classes)


def _no_validation(result: Scan, spec: DataSpec, cfg: JobConfig) -> list[Finding]:
    if result.val is not None or not (cfg.train.eval_every or cfg.train.early_stopping):
        return []
    finding = Finding(
        "no_validation",
        "data",
        "there is no validation split: evaluations, early stopping and overfitting alerts have nothing to use",
        "data.val_fraction: 0.1 (memory data) or `shoal shard --val-fraction 0.1` / data.val_path (shards)",
        severity=NOTE,
    )
    return [finding]


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


# in the order the findings are reported
DATA_FINDINGS: list[Callable[[Scan, DataSpec, JobConfig], list[Finding]]] = [
    _in_splits,
    _input_features,
    _missing_classes,
    _class_imbalance,
    _unscaled_targets,
    _duplicate_samples,
    _leakage,
    _small_validation,
    _no_validation,
]
