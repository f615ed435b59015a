"""Mistakes found on the driver's machine before any cluster starts: paths, the run directory, the
checkpoint to resume from, and model.target found without importing it."""

from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pytest

from shoal.errors import ConfigError
from shoal.imports import locate_object

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def ray_processes() -> set[int]:
    import psutil

    names = ("gcs_server", "raylet")
    return {p.pid for p in psutil.process_iter(["name"]) if (p.info["name"] or "") in names}


@pytest.mark.parametrize(
    "setup, overrides, needle",
    [
        (None, {"data.format": "shards", "data.path": "{tmp}/nothing-{{000..003}}.tar"}, "data.path: pattern"),
        (None, {"data.format": "shards", "data.path": "{tmp}/empty"}, "has no manifest.json"),
        ("file", {"run.dir": "{tmp}/afile"}, "run.dir: {tmp}/afile exists and is not a directory"),
        (
            None,
            {"checkpoint.resume_from": "{tmp}/runs/x/checkpoints/step-000100"},
            "checkpoint.resume_from: {tmp}/runs/x/checkpoints/step-000100: not found",
        ),
        (
            None,
            {"model.target": "helpers:no_such_factory"},
            "model.target: cannot import 'helpers:no_such_factory': module 'helpers'",
        ),
        (
            None,
            {"model.target": "no_such_module:make"},
            "model.target: cannot import 'no_such_module:make': no module named 'no_such_module'",
        ),
    ],
)
def test_mistakes_fail_in_seconds_before_any_ray_process(tmp_path, setup, overrides, needle):
    (tmp_path / "empty").mkdir()
    if setup == "file":
        (tmp_path / "afile").write_text("mine")
    values = {k: v.format(tmp=tmp_path) for k, v in overrides.items()}
    values.setdefault("run.dir", str(tmp_path / "run"))
    before_ray, before_tmp = ray_processes(), set(glob.glob("/tmp/shoal-ray-*"))
    started = time.monotonic()
    proc = shoal_cli(
        "train", str(QUICKSTART), *tiny_overrides(Path(values.pop("run.dir")), **values), env={"RAY_ADDRESS": ""}
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert needle.format(tmp=tmp_path) in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert elapsed < 3.0, f"{elapsed:.1f}s"
    assert ray_processes() <= before_ray and set(glob.glob("/tmp/shoal-ray-*")) <= before_tmp  # no cluster was started
    assert "run directory" not in proc.stdout
    if setup == "file":
        assert (tmp_path / "afile").read_text() == "mine"


def test_locate_finds_targets_without_running_them(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('the package ran')\n")
    (pkg / "models.py").write_text(
        "raise RuntimeError('the module ran')\n"
        "def make():\n    pass\n"
        "try:\n    from x import other\nexcept ImportError:\n    other = None\n"
        "class Net:\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for target in ("userpkg.models:make", "userpkg.models:other", "userpkg.models:Net.build"):
        assert locate_object(target, "model.target") == pkg / "models.py"
    with pytest.raises(
        ConfigError,
        match="model.target: cannot import 'userpkg.models:absent': module 'userpkg.models' .* defines no 'absent'",
    ):
        locate_object("userpkg.models:absent", "model.target")
    with pytest.raises(ConfigError, match="no module named 'userpkg.nothing'"):
        locate_object("userpkg.nothing:make", "model.target")
    import sys

    assert "userpkg" not in sys.modules and "userpkg.models" not in sys.modules


def test_the_driver_loads_neither_torch_nor_the_model_module(ray_cluster, tmp_path):
    # helpers imports torch at top level, like every real model module
    proc = shoal_cli(
        "train",
        str(QUICKSTART),
        *tiny_overrides(
            tmp_path / "run",
            **{"scaling.address": ray_cluster, "model.target": "helpers:rms_mlp", "train.max_steps": 5},
        ),
        cwd=REPO / "tests",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    startup = json.loads((tmp_path / "run" / "startup.json").read_text())
    assert startup["driver_modules_at_rank_start"] == {"torch": False, "helpers": False}


@pytest.mark.parametrize(
    "target, needle",
    [
        (
            "helpers:raising_factory",
            "model.target: helpers:raising_factory(**model.kwargs) raised ValueError: planted: the factory cannot build this model",
        ),
        ("helpers:narrow_mlp", "model.target: the model gives 5 outputs per sample"),
    ],
)
def test_a_target_that_fails_in_the_ranks_is_a_config_error_within_seconds(ray_cluster, tmp_path, target, needle):
    started = time.monotonic()
    proc = shoal_cli(
        "train",
        str(QUICKSTART),
        *tiny_overrides(tmp_path / "run", **{"scaling.address": ray_cluster, "model.target": target}),
    )
    elapsed = time.monotonic() - started  # the whole command: driver, Ray job, ranks, the error
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
    # with the original bug the error took 22.8 s; 12 s, start-up included, leaves room for a loaded machine
    assert elapsed < 12.0, f"the error took {elapsed:.1f} s"
