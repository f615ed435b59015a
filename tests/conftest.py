"""Shared fixtures: one real local Ray cluster per test session, tiny configs, clean environments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _no_leaked_dist_env():
    """A test must not leave torchrun variables behind (they would turn later tests distributed)."""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    leaked = {k: os.environ.get(k) for k in DIST_ENV if os.environ.get(k) != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"test leaked distributed environment variables: {leaked}"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster on 127.0.0.1 for the whole session; only this one is ever stopped."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    temp_dir = tempfile.mkdtemp(prefix="shoal-rt-")
    ctx = ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="WARNING",
    )
    yield ctx.address_info["gcs_address"]
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """Overrides that make any job small and quiet."""
    base = {
        "run.dir": str(run_dir),
        "log.progress": "lines",
        "log.tensorboard": "false",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def shoal_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `python -m shoal ARGS` in a real subprocess."""
    full_env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args], cwd=cwd or REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
