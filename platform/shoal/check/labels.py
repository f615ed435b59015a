"""Wrong labels found, not guessed: confident learning on out-of-sample predicted probabilities.

The check sample's probabilities come from K-fold cross-validation of the linear baseline (logistic
regression on the standardised features), so no sample is judged by a model that saw its label. A
class's threshold is the average probability its own samples give it (self-confidence); a sample counts
towards the confident joint at (given label, the most probable class at or above its threshold); the
joint is calibrated to the class counts, and the noise rate is its off-diagonal mass. Suspects are the
samples off the diagonal, least self-confident first. (Northcutt, Jiang and Chuang, "Confident Learning:
Estimating Uncertainty in Dataset Labels", JAIR 2021; written here from the paper.)

Rows of token ids (text classification) are no magnitudes to standardise: the same K-fold logistic
regression is fitted on their bag of tokens instead (bag_of_tokens: TF-IDF of each row's ids, pads left
out, rows of unit length).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from threadpoolctl import threadpool_limits

from shoal.check.findings import Finding
from shoal.errors import ShoalError

FOLDS = 5
SUSPECTS_KEPT = 200  # in report.json (report.md shows the first SHOWN)
SHOWN = 20
Z95 = 1.96
REGULARISATION = (1.0, 0.1, 0.01)  # the inverse strengths C tried
ITERATIONS = 200  # lbfgs iterations per fit
SAMPLE = 2000  # samples the estimate is made on (spread evenly over the check sample): 8 fits of them
BUCKETS = 4096  # most bag-of-tokens columns: past it the ids are hashed into this many
# unit-length TF-IDF rows need a weaker penalty than standardised features to fit (all three were chosen
# on planted-noise text: 100 at 0%, 10 at 10%, 1 at 30%)
TEXT_REGULARISATION = (100.0, 10.0, 1.0)


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


def out_of_sample(
    x: Any, y: np.ndarray, classes: int, seed: int, folds: int = FOLDS, grid: tuple[float, ...] = REGULARISATION
) -> np.ndarray | None:
    """Each sample's class probabilities from a model fitted on the other folds (None: too few per class).
    Dense features are standardised first; a sparse x (bag_of_tokens) is taken as it is."""
    counts = np.bincount(y, minlength=classes)
    present = counts[counts > 0]
    if len(present) < 2 or present.min() < max(folds, FOLDS):
        return None
    if not sparse.issparse(x):
        x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    # one BLAS thread: the matrices are small, and threads that wait for a busy core (torch's, other jobs')
    # made the eight fits 40x slower on a loaded 2-core machine (0.3 s against 12 s)
    with threadpool_limits(1, user_api="blas"):
        model = LogisticRegression(max_iter=ITERATIONS, C=_regularisation(x, y, seed, grid))
        probs = cross_val_predict(model, x, y, cv=split, method="predict_proba")
    full = np.zeros((len(y), classes))
    full[:, np.flatnonzero(counts)] = probs  # classes absent from the sample keep probability 0
    return full


def _regularisation(x: Any, y: np.ndarray, seed: int, grid: tuple[float, ...]) -> float:
    """The inverse regularisation C whose probabilities score best on a held-out fifth (log-loss): wrong labels
    make an unregularised model confident in them, and its estimate of their share too high."""
    fit, held = next(StratifiedKFold(FOLDS, shuffle=True, random_state=seed).split(x, y))
    labels = np.unique(y)

    def score(c: float) -> float:
        model = LogisticRegression(max_iter=ITERATIONS, C=c).fit(x[fit], y[fit])
        return -log_loss(y[held], model.predict_proba(x[held]), labels=labels)

    return max(grid, key=score)


def bag_of_tokens(ids: np.ndarray, pad_id: int | None) -> sparse.csr_matrix:
    """Rows of token ids as TF-IDF rows of unit length (sublinear counts, smoothed idf), pads left out: a
    column per id of the sample while they number at most BUCKETS, else the ids hashed into BUCKETS."""
    keep = ids != pad_id if pad_id is not None else np.ones(ids.shape, dtype=bool)
    rows = np.repeat(np.arange(len(ids)), keep.sum(1))
    cols, width = _columns(ids[keep].astype(np.int64))
    counts = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(ids), width))
    counts.sum_duplicates()
    counts.data = 1.0 + np.log(counts.data)
    df = np.bincount(counts.indices, minlength=width)
    weighted = counts @ sparse.diags(1.0 + np.log((1.0 + len(ids)) / (1.0 + df)))
    norms = np.sqrt(np.asarray(weighted.multiply(weighted).sum(1))).ravel()
    return sparse.csr_matrix(sparse.diags(1.0 / np.maximum(norms, 1e-12)) @ weighted)


def _columns(ids: np.ndarray) -> tuple[np.ndarray, int]:
    """Each id's column and the width: the ids present numbered in order, or hashed when too many (a
    multiplicative hash: tokenizers number ids by frequency, and a plain modulo would pile up neighbours)."""
    present, at = np.unique(ids, return_inverse=True)
    if len(present) <= BUCKETS:
        return at.reshape(-1), max(len(present), 1)
    return (ids * 2654435761 % 2**32) % BUCKETS, BUCKETS


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


def after_training(
    run_dir: Path, split: str | None = None, kfold: int | None = None
) -> tuple[Finding | None, dict[str, Any]]:
    """`shoal doctor RUN_DIR --labels`: the same estimate from the trained model's view of one split, its
    suspects by shard and index; report() plus `split` and `method` (and `folds`).

    Validation (the default): the model's own predictions, out-of-sample since it never trained on them.
    Training (`--split train`, or the default when the run has no validation split): the model's predictions
    there are in-sample (it fitted those very labels), so the view is K-fold logistic regression on its
    penultimate features (the input of the last module with parameters the forward calls) of a spread sample
    of up to SAMPLE rows: each row judged by a head that never saw its label. `--kfold K` asks for that on
    the validation split too."""
    import torch  # the trained model: only this command needs it here

    from shoal.data.loaders import open_splits

    trained = _trained(run_dir)
    train, val = open_splits(trained.cfg)
    split = split or ("val" if val is not None else "train")
    source = train if split == "train" else val
    if source is None or len(source) < 2:
        raise ShoalError("--labels: the run has no validation split to judge its labels on (data.val_fraction > 0)")
    folds = kfold or (FOLDS if split == "train" else None)
    rows = spread(len(source)) if folds else np.arange(len(source))
    with torch.inference_mode():
        seen, given = _views(trained.model, source, rows, penultimate=bool(folds))
    names = (getattr(source, "manifest", None) or getattr(train, "manifest", None) or {}).get("classes")
    if folds:
        classes = max(trained.spec.num_classes, int(given.max()) + 1)
        probs = out_of_sample(seen, given, classes, trained.cfg.seed, folds)
        if probs is None:
            raise ShoalError(f"--labels: too few samples of some class in the {split} split for {folds}-fold")
    else:
        probs = torch.softmax(torch.from_numpy(seen).float(), dim=-1).numpy()
    noise = estimate(probs, given)
    found = finding(noise, trained.cfg.check.label_noise_threshold, names)
    method = {"method": "kfold", "folds": folds} if folds else {"method": "predictions"}
    return found, {"split": split, **method, **report(noise, _places(source, rows, split), names, given)}


def _trained(run_dir: Path) -> Any:
    """The run's trained classifier (its latest checkpoint); ShoalError when there is none or no classes."""
    from shoal.checkpoint import find_latest
    from shoal.trained import load

    if find_latest(run_dir) is None:
        raise ShoalError(
            f"--labels: {run_dir} has no complete checkpoint to load the trained model from "
            "(checkpoint.at_end: true saves one when training ends)"
        )
    trained = load(run_dir)
    if trained.spec.task != "classification":
        raise ShoalError(f"--labels: {run_dir} trained a {trained.spec.task} model; label noise needs classes")
    return trained


def _views(model: Any, source: Any, rows: np.ndarray, penultimate: bool) -> tuple[np.ndarray, np.ndarray]:
    """The model's logits (or penultimate features) of these rows of a split, and their given labels."""
    out, given = [], []
    for start in range(0, len(rows), 256):
        x, y, *_ = source.get_batch(rows[start : start + 256])
        out.append((_penultimate(model, x) if penultimate else model(x)).float().numpy())
        given.append(y.numpy())
    if len({o.shape[1] for o in out}) > 1:  # padded token batches are cut to their longest row
        raise ShoalError(
            "--labels: the trained model's last layer takes each token apart, not one row a sample (its input's "
            "width changes with a batch's length), so there are no per-sample features to fit on; judge the "
            "validation split by the model's predictions instead (--split val)"
        )
    return np.concatenate(out), np.concatenate(given).astype(np.int64)


def _penultimate(model: Any, x: Any) -> Any:
    """The input of the last module with parameters of its own that the forward calls (a classifier's head):
    what the trained layers make of x, one row a sample (the logits when nothing was caught)."""
    caught: dict[str, Any] = {}

    def keep(module: Any, args: tuple) -> None:
        if args and hasattr(args[0], "flatten"):
            caught["x"] = args[0]

    owners = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    handles = [m.register_forward_pre_hook(keep) for m in owners]
    try:
        logits = model(x)
    finally:
        for h in handles:
            h.remove()
    return caught.get("x", logits).flatten(1)


def _places(source: Any, rows: np.ndarray, split: str) -> list[str]:
    """shard#index of these rows of a split read in order (split#index for in-memory data)."""
    shards = getattr(source, "shards", None)
    if shards is None:
        return [f"{split}#{r}" for r in rows]
    starts = np.cumsum([0] + [s.samples for s in shards])
    at = np.searchsorted(starts, rows, side="right") - 1
    return [f"{shards[k].name}#{r - starts[k]}" for k, r in zip(at, rows)]
