"""Wrong labels found, not guessed: confident learning on out-of-sample predicted probabilities.

The check sample's probabilities come from K-fold cross-validation of the linear baseline (logistic
regression on the standardised features), so no sample is judged by a model that saw its label. A
class's threshold is the average probability its own samples give it (self-confidence); a sample counts
towards the confident joint at (given label, the most probable class at or above its threshold); the
joint is calibrated to the class counts, and the noise rate is its off-diagonal mass. Suspects are the
samples off the diagonal, least self-confident first. (Northcutt, Jiang and Chuang, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 2021; written here from the paper.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from shoal.check.findings import Finding

FOLDS = 5
SUSPECTS_KEPT = 200  # in report.json (report.md shows the first SHOWN)
SHOWN = 20
Z95 = 1.96
REGULARISATION = (1.0, 0.1, 0.01)  # the inverse strengths C tried
ITERATIONS = 200  # lbfgs iterations per fit
SAMPLE = 2000  # samples the estimate is made on (spread evenly over the check sample): 8 fits of them


@dataclass
class Noise:
    rate: float  # estimated share of wrong labels
    low: float  # 95% interval from the sample size (Wilson)
    high: float
    samples: int
    pairs: list[tuple[int, int, int]]  # (given, likely, estimated count), most first
    suspects: list[tuple[int, int, float]]  # (row in the sample, likely class, self-confidence), least first


def spread(n: int) -> np.ndarray:
    """Up to SAMPLE row numbers spread evenly over n (the check sample is itself spread over every shard)."""
    return np.unique(np.linspace(0, n - 1, num=min(n, SAMPLE)).astype(np.int64))


def out_of_sample(x: np.ndarray, y: np.ndarray, classes: int, seed: int) -> np.ndarray | None:
    """Each sample's class probabilities from a model fitted on the other folds (None: too few per class)."""
    counts = np.bincount(y, minlength=classes)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < FOLDS:
        return None
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    folds = StratifiedKFold(FOLDS, shuffle=True, random_state=seed)
    model = LogisticRegression(max_iter=ITERATIONS, C=_regularisation(x, y, seed))
    probs = cross_val_predict(model, x, y, cv=folds, method="predict_proba")
    full = np.zeros((len(y), classes))
    full[:, np.flatnonzero(counts)] = probs  # classes absent from the sample keep probability 0
    return full


def _regularisation(x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """The inverse regularisation C whose probabilities score best on a held-out fifth (log-loss): wrong labels
    make an unregularised model confident in them, and its estimate of their share too high."""
    fit, held = next(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(x, y))
    labels = np.unique(y)

    def score(c: float) -> float:
        model = LogisticRegression(max_iter=ITERATIONS, C=c).fit(x[fit], y[fit])
        return -log_loss(y[held], model.predict_proba(x[held]), labels=labels)

    return max(REGULARISATION, key=score)


def estimate(probs: np.ndarray, given: np.ndarray) -> Noise:
    """The noise rate, the confused pairs and the suspects from out-of-sample probabilities."""
    n, k = probs.shape
    counts = np.bincount(given, minlength=k)
    own = probs[np.arange(n), given]
    thresholds = np.array([own[given == j].mean() if counts[j] else np.inf for j in range(k)])
    above = probs >= thresholds
    likely = np.where(above, probs, -1.0).argmax(1)
    counted = above.any(1)
    joint = np.zeros((k, k))
    np.add.at(joint, (given[counted], likely[counted]), 1.0)
    calibrated = joint / np.maximum(joint.sum(1, keepdims=True), 1.0) * counts[:, None]
    q = calibrated / max(calibrated.sum(), 1.0)
    rate = float(1.0 - np.trace(q))
    off = np.flatnonzero(counted & (likely != given))
    order = off[np.argsort(own[off], kind="stable")]
    pairs = [(int(i), int(j), round(float(q[i, j] * n))) for i, j in zip(*np.nonzero(q * (1 - np.eye(k))))]
    pairs.sort(key=lambda p: -p[2])
    low, high = _wilson(rate, n)
    suspects = [(int(r), int(likely[r]), float(own[r])) for r in order[:SUSPECTS_KEPT]]
    return Noise(rate, low, high, n, [p for p in pairs if p[2] > 0][:10], suspects)


def _wilson(p: float, n: int) -> tuple[float, float]:
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / (1 + Z95**2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def finding(noise: Noise, threshold: float, names: list[str] | None) -> Finding | None:
    """label_noise above check.label_noise_threshold; below it the estimate is only reported (numbers, report.md)."""

    def name(c: int) -> str:
        return names[c] if names and c < len(names) else str(c)

    if noise.rate <= threshold:
        return None
    pairs = ", ".join(f"{name(g)} given where {name(t)} is likely (~{c})" for g, t, c in noise.pairs[:3])
    share = f"{noise.rate:.1%} (95% interval {noise.low:.1%}-{noise.high:.1%} on {noise.samples:,} samples)"
    return Finding(
        "label_noise",
        "data",
        f"an estimated {share} of the labels are wrong (confident learning on out-of-sample predictions), above "
        f"check.label_noise_threshold={threshold:g}; most confused: {pairs or 'no single pair'}; the suspects are "
        "listed in the report",
        "relabel or drop the suspects (report.json label_noise.suspects), or train with train.label_smoothing: 0.1",
        numbers=_numbers(noise),
    )


def _numbers(noise: Noise) -> dict[str, Any]:
    return {"rate": noise.rate, "low": noise.low, "high": noise.high, "samples": noise.samples}


def report(noise: Noise, places: list[str], names: list[str] | None, given: np.ndarray | None = None) -> dict[str, Any]:
    """What report.json keeps: the estimate, the pairs and the suspects by place (shard#index)."""

    def name(c: int) -> Any:
        return names[c] if names and c < len(names) else c

    return {
        **_numbers(noise),
        "pairs": [{"given": name(g), "likely": name(t), "count": c} for g, t, c in noise.pairs],
        "suspects": [
            {
                "at": places[r] if r < len(places) else r,
                **({"given": name(int(given[r]))} if given is not None else {}),
                "likely": name(t),
                "self_confidence": round(s, 4),
            }
            for r, t, s in noise.suspects
        ],
    }


def markdown(noise: dict[str, Any]) -> list[str]:
    """The suspects of a report (report() output), least self-confident first, and the pairs most confused."""
    if not noise["suspects"]:
        return [
            f"Estimated wrong labels: {noise['rate']:.1%} ({noise['low']:.1%}-{noise['high']:.1%}); no suspects",
            "",
        ]
    lines = [
        f"## Suspected wrong labels ({noise['rate']:.1%} estimated, {noise['low']:.1%}-{noise['high']:.1%})",
        "",
        "| sample | given | likely | confidence in the given label |",
        "|---|---|---|---|",
    ]
    for s in noise["suspects"][:SHOWN]:
        lines.append(f"| {s['at']} | {s.get('given', '')} | {s['likely']} | {s['self_confidence']:.3f} |")
    pairs = "; ".join(f"{p['given']} -> {p['likely']} (~{p['count']})" for p in noise["pairs"][:5])
    return lines + ["", f"Most confused (given -> likely): {pairs}", ""]


def after_training(run_dir: Any) -> tuple[Finding | None, dict[str, Any]]:
    """`shoal doctor RUN_DIR --labels`: the same estimate from the trained model's view of the validation
    split (samples it never trained on), its suspects by shard and index."""
    import torch  # the trained model: only this command needs it here

    from shoal.data.loaders import open_splits
    from shoal.errors import ShoalError
    from shoal.trained import load

    trained = load(run_dir)
    if trained.spec.task != "classification":
        raise ShoalError(f"--labels: {run_dir} trained a {trained.spec.task} model; label noise needs classes")
    val = open_splits(trained.cfg)[1]
    if val is None or len(val) < 2:
        raise ShoalError("--labels: the run has no validation split to judge its labels on (data.val_fraction > 0)")
    probs, given = [], []
    with torch.inference_mode():
        for start in range(0, len(val), 256):
            x, y, *_ = val.get_batch(np.arange(start, min(start + 256, len(val))))
            probs.append(torch.softmax(trained.model(x).float(), dim=-1).numpy())
            given.append(y.numpy())
    y = np.concatenate(given).astype(np.int64)
    noise = estimate(np.concatenate(probs), y)
    names = (getattr(val, "manifest", None) or {}).get("classes")
    found = finding(noise, trained.cfg.check.label_noise_threshold, names)
    return found, report(noise, _places(val), names, y)


def _places(source: Any) -> list[str]:
    """shard#index of every sample of a split read in order (val#index for in-memory data)."""
    shards = getattr(source, "shards", None)
    if shards is None:
        return [f"val#{i}" for i in range(len(source))]
    return [f"{s.name}#{i}" for s in shards for i in range(s.samples)]
