"""`shoal lr-find`: a learning-rate range test on all the job's workers (through the same launcher),
a loss-against-rate plot and a suggested rate."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from shoal import launcher, rundir
from shoal.config import JobConfig
from shoal.errors import ShoalError
from shoal.metrics import read_metrics
from shoal.plots import figure, save


def run(cfg: JobConfig, min_lr: float, max_lr: float, steps: int) -> dict[str, Any]:
    """Train `steps` steps with the rate growing exponentially; returns {suggested_lr, plot, ...}."""
    if not 0 < min_lr < max_lr:
        raise ShoalError(f"lr-find: need 0 < --min-lr < --max-lr (got {min_lr:g}, {max_lr:g})")
    out = rundir.resolve(cfg) / "lr-find"
    launcher.run(_range_test(cfg, min_lr, max_lr, steps, out))  # ends early, as "diverged", once the loss blows up
    lrs, losses = _finite_points(out)
    suggested, smooth = suggest(lrs, losses)
    result = {
        "suggested_lr": suggested,
        "min_loss_lr": float(lrs[int(np.argmin(smooth))]),
        "steps": len(lrs),
        "plot": str(out / "lr_find.png"),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(out / "lr_find.png", lrs, losses, smooth, suggested)
    return result


RANGE_TEST = {  # no evaluation or checkpoints; stopped once the loss diverges
    "schedule.name": "range_test",
    "schedule.warmup_steps": 0,
    "train.eval_every": 0,
    "train.early_stopping": None,
    "log.every": 1,
    "checkpoint.at_end": False,
    "checkpoint.every_steps": None,
    "checkpoint.every_minutes": None,
    "health.on_nonfinite": "stop",
    "health.divergence_factor": 4.0,
    "run.overwrite": True,
}


def _range_test(cfg: JobConfig, min_lr: float, max_lr: float, steps: int, out: Path) -> JobConfig:
    """The job as a range test: `steps` steps, the rate growing from min_lr to max_lr, run in `out`."""
    return cfg.replace(
        {
            **RANGE_TEST,
            "optim.lr": max_lr,
            "schedule.range_start_ratio": min_lr / max_lr,
            "train.max_steps": steps,
            "run.dir": str(out),
        }
    )


def _finite_points(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """(rates, losses) of the logged steps with a finite loss; at least 5 of them."""
    points = [
        (r["lr"], r["loss"]) for r in read_metrics(out) if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])
    ]
    if len(points) < 5:
        raise ShoalError(f"lr-find: only {len(points)} finite losses; lower --min-lr or raise --steps")
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def suggest(lrs: np.ndarray, losses: np.ndarray, beta: float = 0.9) -> tuple[float, np.ndarray]:
    """The rate of steepest descent of the smoothed loss (before it blows up), and that smoothing."""
    smooth = np.empty_like(losses)
    avg = 0.0
    for i, v in enumerate(losses):
        avg = beta * avg + (1 - beta) * v
        smooth[i] = avg / (1 - beta ** (i + 1))  # bias-corrected moving average
    best = int(np.argmin(smooth))
    end = best + 1
    if end < 3:
        return float(lrs[0]), smooth
    slope = np.gradient(smooth[:end], np.log10(lrs[:end]))
    return float(lrs[int(np.argmin(slope))]), smooth


def _plot(path: Path, lrs: np.ndarray, losses: np.ndarray, smooth: np.ndarray, suggested: float) -> None:
    fig, ax = figure(1, 1, (8, 4.5))
    a = ax[0][0]
    a.plot(lrs, losses, alpha=0.35, label="loss")
    a.plot(lrs, smooth, label="smoothed")
    a.axvline(suggested, color="tab:red", linestyle="--", label=f"suggested {suggested:.2g}")
    a.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="learning-rate range test")
    top = np.nanpercentile(losses, 90)
    a.set_ylim(top=top * 1.5 if np.isfinite(top) else None)
    a.legend()
    save(fig, path)
