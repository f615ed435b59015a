"""What every tracker backend is told about the run and keeps for it: tags, the config flattened to parameters,
the trackers' ids in RUN_DIR/tracking.json (a resumed run continues the same tracked run), and how long the
end of a run waits for them (FLUSH_*). Kept apart from the package so the backends and the package that builds
them depend on it, not on each other."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any

from shoal import __version__
from shoal.config import JobConfig

IDS_FILE = "tracking.json"
FLUSH_DOWN_S = 3.0  # the end of a run waits at most this long for trackers that do not answer
FLUSH_TIMEOUT_S = 30.0  # ... and at most this long in all, for trackers that answer (uploads)
_IDS_LOCK = threading.Lock()  # each tracker's sender thread writes its id


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 128}} -> {"model.width": 128}; lists and None kept as values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def git_commit(where: Path | None = None) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def read_ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS_FILE
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}


def save_id(run_dir: Path, key: str, value: str) -> None:
    with _IDS_LOCK:
        ids = read_ids(run_dir)
        ids[key] = value
        tmp = run_dir / f".{IDS_FILE}.tmp"
        tmp.write_text(json.dumps(ids, indent=2))
        tmp.replace(run_dir / IDS_FILE)  # a reader never sees half a file


def tags(cfg: JobConfig, world_size: int) -> dict[str, str]:
    out = {
        "shoal.version": __version__,
        "shoal.strategy": cfg.strategy,
        "shoal.world_size": str(world_size),
        "shoal.job": cfg.name,
    }
    commit = git_commit()
    if commit:
        out["git.commit"] = commit
    return out
