"""Experiment tracking: MLflow and Weights & Biases, fed by rank 0 with what Shoal already writes (the
resolved config, every metrics record, tags, summary.json, the doctor and check reports, optionally the
checkpoints). Each tracker runs behind a background Sender, so training never waits for it. The run's
tracker ids are kept in RUN_DIR/tracking.json: a resumed run continues the same tracked run.

At the end of the run the trackers get what is still queued, together: the end waits at most FLUSH_DOWN_S for
trackers that do not answer, and at most FLUSH_TIMEOUT_S for ones that answer but are still sending (checkpoints);
what is left then is dropped, with one warning line per tracker saying how much and why.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from shoal import rundir
from shoal.config import JobConfig
from shoal.tracking.mlflow_backend import MLflowBackend, parent_run
from shoal.tracking.runinfo import (
    FLUSH_DOWN_S,
    FLUSH_TIMEOUT_S,
    IDS_FILE,
    flatten,
    git_commit,
    read_ids,
    save_id,
    tags,
)
from shoal.tracking.wandb_backend import WandbBackend

__all__ = [
    "FLUSH_DOWN_S",
    "FLUSH_TIMEOUT_S",
    "IDS_FILE",
    "Tracker",
    "build",
    "flatten",
    "git_commit",
    "group",
    "read_ids",
    "save_id",
    "tags",
]

log = logging.getLogger("shoal")


class Tracker:
    """Every tracker the config asks for, behind one interface (rank 0)."""

    def __init__(self, backends: list[Any]):
        self.backends = backends

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        numbers = {
            k: float(v)
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for b in self.backends:
            b.log(step, numbers)

    def finish(self, run_dir: Path, summary: dict[str, Any] | None) -> None:
        """Summary, reports and plots (and checkpoints when asked) as artifacts; the run marked ended. Waits for the
        trackers together: at most FLUSH_DOWN_S for those that do not answer, FLUSH_TIMEOUT_S in any case."""
        files = _artifacts(run_dir, summary)
        start = time.monotonic()
        for b in self.backends:
            b.finish(summary, run_dir, files)
        for b in self.backends:
            b.sender.stop()
        for b in self.backends:
            b.close(start)


def build(cfg: JobConfig, run_dir: Path, world_size: int, resumed: bool) -> Tracker | None:
    """The trackers log.mlflow and log.wandb name (None when neither is set)."""
    backends: list[Any] = []
    if cfg.log.mlflow is not None:
        backends.append(MLflowBackend(cfg, run_dir, world_size, resumed))
    if cfg.log.wandb is not None:
        backends.append(WandbBackend(cfg, run_dir, world_size, resumed))
    return Tracker(backends) if backends else None


ARTIFACT_FILES = ("summary.json", "summary.rank0.json", "config.yaml", "health.jsonl", "metrics.jsonl")


def _artifacts(run_dir: Path, summary: dict[str, Any] | None) -> list[tuple[Path, str]]:
    """(file, folder in the tracker) for what the run left: summary, config, doctor report, check report."""
    if summary is not None and not (run_dir / rundir.SUMMARY).exists():
        # under Ray the controller writes it after this: send ours
        (run_dir / "summary.rank0.json").write_text(json.dumps(summary, indent=2, default=str))
    _write_doctor_report(run_dir)
    out = [(run_dir / name, "") for name in ARTIFACT_FILES if (run_dir / name).exists()]
    for folder in ("doctor", "check"):
        d = run_dir / folder
        if d.is_dir():
            out += [(p, folder) for p in sorted(d.iterdir()) if p.is_file()]
    return out


def _write_doctor_report(run_dir: Path) -> None:
    try:
        from shoal.health.doctor import diagnose  # loads torch: sweep, compare import this in the driver

        diagnose(run_dir)
    except Exception as e:  # a report that cannot be drawn never fails the run
        log.warning("tracking: the doctor report could not be written (%s)", e)


def group(cfg: JobConfig, name: str) -> JobConfig:
    """For `shoal sweep` / `shoal compare`: a parent MLflow run (children nest under it) and a W&B group."""
    updates: dict[str, Any] = {}
    if cfg.log.mlflow is not None:
        parent = parent_run(cfg, name)
        if parent:
            updates["log.mlflow.parent_run_id"] = parent
    if cfg.log.wandb is not None:
        updates["log.wandb.group"] = cfg.log.wandb.group or name
    return cfg.replace(updates) if updates else cfg
