"""The check report's figures: data.png (input features, class balance), model.png (gradient norm per
layer, the overfit-one-batch curve) and, for images with label noise, suspects.png (the suspects with their
given and likely labels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shoal import plots


def figures(out: Path, scanned: Any, probed: Any, thumbs: list | None = None) -> list[Path]:
    """The figures there is something to draw in, written under out."""
    made = [_data_figure(out, scanned), _model_figure(out, probed), _suspects_figure(out, thumbs or [])]
    return [p for p in made if p is not None]


def _suspects_figure(out: Path, thumbs: list) -> Path | None:
    """A grid of suspected wrong labels: each image (C, H, W) titled with its place and given -> likely label."""
    if not thumbs:
        return None
    cols = min(5, len(thumbs))
    rows = -(-len(thumbs) // cols)
    fig, ax = plots.figure(rows, cols, (2.4 * cols, 2.6 * rows))
    for i, a in enumerate(a for line in ax for a in line):
        a.axis("off")
        if i < len(thumbs):
            image, s = thumbs[i]
            a.imshow(image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1), cmap="gray")
            a.set_title(f"{s['at']}\n{s.get('given')} -> {s['likely']}", fontsize=7)
    return plots.save(fig, out / "suspects.png")


def _data_figure(out: Path, scanned: Any) -> Path | None:
    feats = scanned.train.features()
    classes = scanned.train.classes
    if feats is None and classes is None:
        return None
    fig, ax = plots.figure(1, 2, (12, 4))
    if feats is not None:
        _features(ax[0][0], feats)
    if classes is not None:
        _balance(ax[0][1], classes, scanned.val)
    return plots.save(fig, out / "data.png")


def _features(a: Any, feats: dict[str, np.ndarray]) -> None:
    i = np.arange(len(feats["mean"]))
    a.fill_between(i, feats["min"], feats["max"], alpha=0.2, label="min..max")
    a.errorbar(i, feats["mean"], yerr=feats["std"], fmt=".", ms=3, lw=0.6, label="mean +/- std")
    a.set_xlabel("input feature")
    a.set_title("input features (training split)")
    a.legend(fontsize=8)


def _balance(a: Any, classes: np.ndarray, val: Any) -> None:
    k = np.arange(len(classes))
    a.bar(k - 0.2, classes / max(1, classes.sum()), width=0.4, label="train")
    if val is not None and val.classes is not None:
        v = val.classes
        a.bar(k + 0.2, v / max(1, v.sum()), width=0.4, label="val")
    a.set_xlabel("class")
    a.set_ylabel("share of samples")
    a.set_title("class balance")
    a.legend(fontsize=8)


def _model_figure(out: Path, probed: Any) -> Path | None:
    if not (probed.layers or probed.overfit_curve):
        return None
    fig, ax = plots.figure(1, 2, (12, 4))
    rows = [r for r in probed.layers if r.get("grad_norm")]
    if rows:
        _grad_norms(ax[0][0], rows)
    if probed.overfit_curve:
        _overfit(ax[0][1], probed.overfit_curve)
    return plots.save(fig, out / "model.png")


def _grad_norms(a: Any, rows: list[dict[str, Any]]) -> None:
    a.bar(range(len(rows)), [r["grad_norm"] for r in rows])
    a.set_yscale("log")
    a.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=60, ha="right", fontsize=7)
    a.set_title("gradient norm per layer, first batch")


def _overfit(a: Any, curve: list[float]) -> None:
    a.plot(curve)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("loss")
    a.set_title("overfit one batch")
