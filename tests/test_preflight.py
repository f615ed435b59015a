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


STATIC_MISTAKES = [  # found by the driver before anything starts: `shoal train` and `shoal validate` alike
    (["parallel.pipeline_stages=3"], "parallel.pipeline_stages: 3 must divide scaling.num_workers=2"),
    (["data.augment=[{no_such_transform: {}}]"], "data.augment[0]: unknown transform 'no_such_transform'"),
    (["data.augment=[token_mask]"], "data.augment[0]: token_mask is for lm data"),
    (["data.format=shards", "data.path=/nonexistent/shards"], "data.path"),
    (
        ["checkpoint.resume_from=/nonexistent/step-000010"],
        "checkpoint.resume_from: /nonexistent/step-000010: not found",
    ),
]
MODEL_MISTAKES = [  # found where the model is built: by the ranks, and by `shoal validate` on the meta device
    (["model.freeze=[nope.*]"], "model.freeze: pattern 'nope.*' matches no parameter"),
    (["strategy=fsdp", "fsdp.units=[NoSuchBlock]"], "fsdp.units: ['NoSuchBlock'] match no module"),
    (["model.target=helpers:wrong_outputs"], "model.target: the model gives 3 outputs per sample"),
]


def _one_error(proc, needle: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("shoal: error")]
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.mark.parametrize("overrides, needle", STATIC_MISTAKES)
def test_validate_refuses_what_train_refuses_before_it_starts(tmp_path, overrides, needle):
    args = [str(QUICKSTART), *tiny_overrides(tmp_path / "run"), *overrides]
    said = _one_error(shoal_cli("validate", *args), needle)
    assert _one_error(shoal_cli("train", *args), needle) == said  # the same check, from the same place


@pytest.mark.parametrize("overrides, needle", MODEL_MISTAKES)
def test_validate_builds_the_model_as_the_ranks_do(tmp_path, overrides, needle):
    args = [str(QUICKSTART), *tiny_overrides(tmp_path / "run"), *overrides]
    said = _one_error(shoal_cli("validate", *args), needle)
    assert _one_error(shoal_cli("worker", *args), needle) == said


def test_validate_checks_a_pipeline_split_as_the_stages_make_it(tmp_path):
    """The ranks split with the same function (tests/test_pipeline.py runs them on Ray with these keys)."""
    args = [str(QUICKSTART), *tiny_overrides(tmp_path / "run"), "parallel.pipeline_stages=2"]
    _one_error(shoal_cli("validate", *args, "parallel.split_points=[layers.9]"), "name no layer of the chain")
    _one_error(shoal_cli("validate", *args, "model.depth=0"), "model.depth")
    assert shoal_cli("validate", *args, "parallel.split_points=[layers.1]").returncode == 0


def test_validate_passes_a_good_job_and_what_it_passes_trains(tmp_path):
    args = [str(QUICKSTART), *tiny_overrides(tmp_path / "run", **{"train.max_steps": 3})]
    proc = shoal_cli("validate", *args, "data.augment=[noise]", "model.freeze=[layers.0.*]")
    assert proc.returncode == 0, proc.stderr
    assert "noise" in proc.stdout and "layers.0.*" in proc.stdout
    assert shoal_cli("worker", *args, "data.augment=[noise]", "model.freeze=[layers.0.*]").returncode == 0


def test_validate_of_a_run_that_exists_needs_resume_as_train_does(tmp_path):
    args = [str(QUICKSTART), *tiny_overrides(tmp_path / "run", **{"train.max_steps": 3})]
    assert shoal_cli("worker", *args).returncode == 0
    _one_error(shoal_cli("validate", *args), "already holds a run; pass --resume")
    assert shoal_cli("validate", *args, "--resume").returncode == 0
