"""The run directory: where it is, that nothing already there is clobbered, what is in it.

Layout (rank 0 writes it):
    config.yaml      the resolved config
    metrics.jsonl    one JSON object per logged step
    events.*         TensorBoard event files
    summary.json     status and final figures, written at the end (also on failure)
    checkpoints/     one directory per checkpoint
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from shoal.config import JobConfig
from shoal.errors import RunDirError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
# files whose presence means a run already lives in the directory
RUN_MARKERS = (CONFIG, METRICS, SUMMARY, "checkpoints")


def resolve(cfg: JobConfig, cwd: Path | None = None) -> Path:
    """The absolute run directory: run.dir, or a new runs/<name>-<time> that does not exist yet."""
    base = cwd or Path.cwd()
    if cfg.run.dir:
        return (base / Path(cfg.run.dir).expanduser()).resolve()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = (base / "runs" / f"{cfg.name}-{stamp}").resolve()
    n = 1
    while path.exists():
        path = path.with_name(f"{cfg.name}-{stamp}-{n}")
        n += 1
    return path


def holds_run(path: Path) -> bool:
    """True if a run already wrote into this directory."""
    return path.is_dir() and any((path / m).exists() for m in RUN_MARKERS)


def check(path: Path, cfg: JobConfig, resume: bool = False) -> None:
    """Refuse a run directory that is a file, or that holds an earlier run we were not asked to continue."""
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run.dir: {path} exists and is not a directory")
    if holds_run(path) and not (resume or cfg.run.overwrite):
        raise RunDirError(
            f"run.dir: {path} already holds a run; pass --resume to continue it, "
            "set run.overwrite=true to write over it, or choose another run.dir"
        )


def prepare(path: Path, cfg: JobConfig, resume: bool = False) -> JobConfig:
    """Create the directory and save config.yaml; refuses to write over an earlier run unless asked.

    Returns the config with run.dir set to the absolute path, as saved.
    """
    check(path, cfg, resume)
    try:
        path.mkdir(parents=True, exist_ok=True)
        resolved = cfg.replace({"run.dir": str(path)})
        write_atomic(path / CONFIG, resolved.to_yaml())
    except OSError as e:
        raise RunDirError(f"run.dir: cannot write {path}: {e.strerror or e}") from None
    return resolved


def write_atomic(path: Path, text: str) -> None:
    """Write a file so readers see the old or the new content, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    """summary.json, atomically."""
    write_atomic(path / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def write_failure(path: Path, exc: BaseException, restarts: int = 0) -> None:
    """Best effort: say in summary.json that the run failed and why (never raises)."""
    try:
        if path.is_dir():
            write_summary(
                path,
                {
                    "status": "failed",
                    "error": f"{type(exc).__name__}: {exc}",
                    "restarts": restarts,
                    "traceback": traceback.format_exc(limit=20),
                },
            )
    except OSError:
        pass


def read_summary(path: Path) -> dict[str, Any] | None:
    """summary.json if present and readable."""
    try:
        return json.loads((path / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
