"""Experiment tracking against real trackers: an MLflow server the test starts (SQLite backend, local artifact
store), W&B in offline mode read back with wandb's own tool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from shoal.tracking import flatten

from conftest import REPO, free_ports, shoal_cli, tiny_overrides

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def start_mlflow(root: Path) -> tuple[subprocess.Popen, str]:
    port = free_ports(1)[0]
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'db.sqlite'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=open(root / "server.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=1)
            return proc, url
        except OSError:
            time.sleep(0.3)
    stop_mlflow(proc)
    raise AssertionError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")


def stop_mlflow(proc: subprocess.Popen) -> None:
    """The server and the workers it started (its own process group), by PID."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    proc, url = start_mlflow(tmp_path_factory.mktemp("mlflow"))
    yield proc, url
    stop_mlflow(proc)


def metrics_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_run_logs_everything_to_mlflow_and_resumes_into_the_same_run(ray_cluster, mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    _, url = mlflow_server

    run = tmp_path / "run"
    common = [f"scaling.address={ray_cluster}", f"log.mlflow.tracking_uri={url}", "log.mlflow.experiment=t"]
    r = shoal_cli("train", QUICKSTART, *tiny_overrides(run, **{"train.max_steps": 60, "train.eval_every": 30}), *common)
    assert r.returncode == 0, r.stderr
    run_id = json.loads((run / "tracking.json").read_text())["mlflow_run_id"]
    client = MlflowClient(url)
    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert got.data.params == {k: str(v) for k, v in flatten(config).items()}
    assert got.data.tags["shoal.world_size"] == "2" and got.data.tags["shoal.strategy"] == "allreduce"
    records = metrics_of(run)
    for key in ("loss", "lr", "grad_norm", "val_loss", "samples_per_s"):
        want = [(r["step"], r[key]) for r in records if key in r]
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert [s for s, _ in history] == [s for s, _ in want], key
        assert all(abs(a - b) <= 1e-9 * max(1.0, abs(b)) for (_, a), (_, b) in zip(history, want)), key
    files = {a.path for a in client.list_artifacts(run_id)} | {a.path for a in client.list_artifacts(run_id, "doctor")}
    assert {"config.yaml", "metrics.jsonl", "doctor/report.md", "doctor/loss.png"} <= files
    assert files & {"summary.json", "summary.rank0.json"}
    # resumed: the same MLflow run continues
    r = shoal_cli(
        "train",
        QUICKSTART,
        *tiny_overrides(run, **{"train.max_steps": 80, "train.eval_every": 30}),
        *common,
        "--resume",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "tracking.json").read_text())["mlflow_run_id"] == run_id
    steps = {m.step for m in client.get_metric_history(run_id, "loss")}
    assert {60, 70, 80} <= steps
    assert client.get_run(run_id).info.status == "FINISHED"


def test_sweeps_and_comparisons_nest_their_runs_under_one_parent(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    from shoal import tracking
    from shoal.config import load_config

    _, url = mlflow_server
    cfg = load_config(QUICKSTART, [f"log.mlflow.tracking_uri={url}", "log.mlflow.experiment=grouped"])
    grouped = tracking.group(cfg, "sweep demo")
    parent = grouped.log.mlflow.parent_run_id
    assert parent
    run = tmp_path / "child"
    r = shoal_cli(
        "worker",
        QUICKSTART,
        *tiny_overrides(run, **{"train.max_steps": 20}),
        f"log.mlflow.tracking_uri={url}",
        "log.mlflow.experiment=grouped",
        f"log.mlflow.parent_run_id={parent}",
    )
    assert r.returncode == 0, r.stderr
    child = MlflowClient(url).get_run(json.loads((run / "tracking.json").read_text())["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert MlflowClient(url).get_run(parent).data.tags["shoal.group"] == "sweep demo"


def test_a_tracker_killed_mid_run_never_stops_training(mlflow_server, tmp_path):
    proc, url = mlflow_server  # the last test to use the server: it kills it
    run = tmp_path / "run"
    train = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "worker",
            QUICKSTART,
            *tiny_overrides(run, **{"train.max_steps": 3000, "train.eval_every": 0, "log.every": 10}),
            f"log.mlflow.tracking_uri={url}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
    )
    try:
        deadline = time.time() + 60
        while not (run / "tracking.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        assert (run / "tracking.json").exists()
        stop_mlflow(proc)  # the server dies while the run trains
        out, _ = train.communicate(timeout=180)
    finally:
        stop_mlflow(proc)
        if train.poll() is None:
            train.kill()
    assert train.returncode == 0, out[-3000:]
    assert "status completed" in out and "steps 3000" in out
    assert "log.mlflow: the tracking server" in out and "training goes on" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 3000


def test_wandb_offline_holds_the_metrics(tmp_path):
    run = tmp_path / "run"
    r = shoal_cli(
        "worker",
        QUICKSTART,
        *tiny_overrides(run, **{"train.max_steps": 40}),
        "log.wandb.mode=offline",
        env={"WANDB_MODE": None, "WANDB_API_KEY": None},
    )
    assert r.returncode == 0, r.stderr
    wandb_file = next((run / "wandb").glob("offline-run-*/run-*.wandb"))
    shown = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(wandb_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    history = [json.loads(line)["history"]["item"] for line in shown.stdout.splitlines() if '"type":"history"' in line]
    want = [r for r in metrics_of(run) if "loss" in r]
    assert [h["_step"] for h in history] == [r["step"] for r in want]
    assert [h["loss"] for h in history] == [r["loss"] for r in want]
    files = wandb_file.parent / "files"
    assert (files / "config.yaml").exists() and (files / "doctor" / "report.md").exists()


def test_a_missing_tracker_package_is_one_line_naming_the_extra(tmp_path):
    code = (
        "import sys; sys.modules['mlflow'] = None; from shoal.cli import main; "
        f"sys.exit(main(['worker', {QUICKSTART!r}, 'run.dir={tmp_path / 'run'}', 'log.mlflow.experiment=x']))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == "shoal: error: log.mlflow: needs the mlflow package: pip install 'shoal[mlflow]'"
