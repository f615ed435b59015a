"""`shoal batch-find` on the CPU: the size it returns trains within the memory given; throughput rises then flattens."""

from __future__ import annotations

import json

from conftest import REPO, shoal_cli

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
MODEL = ["data.dataset=synthetic", "data.input_shape=[256]", "model.width=1024"]


def test_batch_find_size_trains_within_the_given_memory(tmp_path):
    r = shoal_cli(
        "batch-find", QUICKSTART, *MODEL, "--max-memory", "64GB", "--max-batch", "4096", "--out", str(tmp_path / "a")
    )
    assert r.returncode == 0, r.stderr
    free = json.loads((tmp_path / "a" / "report.json").read_text())
    rows = {row["batch"]: row for row in free["tried"]}
    assert free["largest_batch"] == 4096 and sorted(rows) == [2**i for i in range(13)]
    speed = [rows[b]["samples_per_s"] for b in sorted(rows)]
    assert max(speed) > 5 * speed[0]  # rises ...
    assert max(speed[-3:]) < 3 * speed[-4]  # ... then flattens: 8x the batch over the last three sizes, far below 8x
    # a budget between what 1024 and 2048 need: 1024 is the answer, and training at it stays inside the budget
    budget_mb = (rows[1024]["peak_mb"] + rows[2048]["peak_mb"]) / 2 / 0.9
    r = shoal_cli(
        "batch-find",
        QUICKSTART,
        *MODEL,
        "--max-memory",
        f"{budget_mb:.0f}MB",
        "--target-batch",
        "4096",
        "--out",
        str(tmp_path / "b"),
    )
    assert r.returncode == 0, r.stderr
    found = json.loads((tmp_path / "b" / "report.json").read_text())
    size = found["largest_batch"]  # 1024 by the first run's figures; a process's RSS varies by some MiB
    assert size in (512, 1024, 2048)
    tried = {row["batch"]: row for row in found["tried"]}
    assert tried[size]["peak_mb"] <= 0.9 * budget_mb and tried[2 * size]["status"] == "over --max-memory"
    accum = 2048 // size  # 4096 over 2 ranks: 2048 samples per rank per step
    assert (found["data.batch_size"], found["train.grad_accum_steps"]) == (size, accum)
    assert f"data.batch_size={size} train.grad_accum_steps={accum}" in r.stdout
    assert (tmp_path / "b" / "batch_find.png").stat().st_size > 10_000
    run = tmp_path / "run"
    train = [f"data.batch_size={size}", "train.max_steps=5", "train.eval_every=0", "log.tensorboard=false"]
    r = shoal_cli("worker", QUICKSTART, *MODEL, *train, f"run.dir={run}")
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["memory"]["peak_mb"][0] <= budget_mb


def test_batch_find_on_the_cpu_defaults_to_the_memory_this_process_may_use(tmp_path):
    import psutil

    r = shoal_cli("batch-find", QUICKSTART, "--max-batch", "4", "--out", str(tmp_path / "o"))
    assert r.returncode == 0, r.stderr
    assert "no --max-memory given: searching under" in r.stderr and "rank(s) per node" in r.stderr
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    per_node = 2  # the quickstart's two ranks on this machine's cores
    expected = psutil.virtual_memory().available / 2**20 / per_node
    assert abs(report["max_memory_mb"] - expected) < 0.15 * expected  # available memory moves a little meanwhile
    assert report["max_memory_from"].endswith("/ 2 rank(s) per node")
    assert [row["status"] for row in report["tried"]] == ["fits"] * 3


def test_batch_find_usage_errors(tmp_path):
    r = shoal_cli("batch-find", QUICKSTART, "--max-memory", "lots")
    assert r.returncode == 2 and "--max-memory: expected a size" in r.stderr
