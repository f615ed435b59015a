"""The run a rank trains in (run.py), in one process without training: who prepares the directory, who
writes summary.json, what a failure leaves, and the hooks' first step."""

from __future__ import annotations

import json

import pytest

from shoal.config import load_config
from shoal.dist import WorldInfo
from shoal.errors import RunDirError
from shoal.run import Hooks, Run

from conftest import REPO, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_a_run_of_its_own_prepares_its_directory_and_records_a_failure(tmp_path):
    run = Run(load_config(QUICKSTART, tiny_overrides(tmp_path / "run")))
    with pytest.raises(RuntimeError), run.open(WorldInfo()):
        assert (tmp_path / "run" / "config.yaml").exists()
        raise RuntimeError("boom")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom" and summary["restarts"] == 0


def test_a_directory_holding_another_run_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1}\n')
    run = Run(load_config(QUICKSTART, tiny_overrides(tmp_path / "run")))
    with pytest.raises(RunDirError, match="already holds a run"), run.open(WorldInfo()):
        pass
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl"]


def test_under_the_controller_rank_0_records_metrics_and_leaves_the_summary_to_it(tmp_path):
    (tmp_path / "run").mkdir()
    reported: list[dict] = []
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "run"))
    run = Run(cfg, hooks=Hooks(report=reported.append), under_controller=True)
    with run.open(WorldInfo()):
        run.open_record(0)
        run.log({"step": 10, "loss": 0.5})
        summary = run.finish({"status": "completed", **run.names()})
    assert summary == {"status": "completed", "run_dir": str(tmp_path / "run"), "name": cfg.name}
    assert reported == [{"step": 10, "loss": 0.5}]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == '{"step": 10, "loss": 0.5}\n'
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_only_rank_0_records_and_only_the_first_step_is_marked(tmp_path):
    run = Run(load_config(QUICKSTART, tiny_overrides(tmp_path / "run")), under_controller=True)
    run.open(WorldInfo(rank=1, world_size=2))
    run.open_record(0)
    run.log({"step": 1})
    assert run.writer is None and not (tmp_path / "run").exists()
    marks: list[str] = []
    steps: list[int] = []
    hooks = Hooks(on_step=steps.append, mark=marks.append)
    for step in (1, 2, 3):
        hooks.step_done(step)
    assert marks == ["first_step"] and steps == [1, 2, 3]
