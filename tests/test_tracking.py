"""Experiment tracking against real trackers: an MLflow server the test starts (SQLite backend, local artifact
store), W&B in offline mode read back with wandb's own tool."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from shoal import tracking
from shoal.tracking import flatten
from shoal.tracking.sender import RETRY_PAUSES

from conftest import REPO, free_ports, shoal_cli, tiny_overrides

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def start_mlflow(root: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_ports(1)[0]
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


def losses_logged(run: Path) -> int:
    """The loss records written whole to metrics.jsonl so far."""
    path = run / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.exists() else []
    return sum('"loss"' in line for line in lines)


def wait_for(what: str, ok: Callable[[], object], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def run_id_of(run: Path) -> str | None:
    return tracking.read_ids(run).get("mlflow_run_id")


def artifacts_under(client, run_id: str, path: str) -> set[str]:
    """Every file artifact under path, as paths relative to it."""
    out: set[str] = set()
    for a in client.list_artifacts(run_id, path):
        if a.is_dir:
            out |= {f"{Path(a.path).name}/{p}" for p in artifacts_under(client, run_id, a.path)}
        else:
            out.add(Path(a.path).name)
    return out


class Warnings:
    """The shoal logger's warnings, as lines."""

    def __init__(self):
        import logging

        self.lines: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda r: self.lines.append(r.getMessage())  # type: ignore[method-assign]

    def __enter__(self) -> list[str]:
        import logging

        logging.getLogger("shoal").addHandler(self.handler)
        return self.lines

    def __exit__(self, *exc: object) -> None:
        import logging

        logging.getLogger("shoal").removeHandler(self.handler)


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
    from shoal.worker import run_worker

    _, url = mlflow_server
    cfg = load_config(QUICKSTART, [f"log.mlflow.tracking_uri={url}", "log.mlflow.experiment=grouped"])
    grouped = tracking.group(cfg, "sweep demo")
    parent = grouped.log.mlflow.parent_run_id
    assert parent
    run = tmp_path / "child"
    over = [f"log.mlflow.tracking_uri={url}", "log.mlflow.experiment=grouped", f"log.mlflow.parent_run_id={parent}"]
    assert run_worker(load_config(QUICKSTART, [*tiny_overrides(run, **{"train.max_steps": 20}), *over]))  # in here
    child = MlflowClient(url).get_run(json.loads((run / "tracking.json").read_text())["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == parent
    assert MlflowClient(url).get_run(parent).data.tags["shoal.group"] == "sweep demo"


@pytest.fixture(scope="module")
def checkpointed_run(mlflow_server, tmp_path_factory):
    """One run with log.mlflow.log_checkpoints, started in a git repository of its own with a known commit."""
    _, url = mlflow_server
    root = tmp_path_factory.mktemp("in_git")
    repo, run = root / "project", root / "run"
    repo.mkdir()
    (repo / "train.txt").write_text("the code of the run\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false"]
    for args in (["init", "-q"], ["add", "train.txt"], ["commit", "-q", "-m", "the run's code"]):
        subprocess.run([*git, *args], cwd=repo, check=True, capture_output=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True, text=True)
    r = shoal_cli(
        "worker",
        QUICKSTART,
        *tiny_overrides(run, **{"train.max_steps": 20, "train.eval_every": 10, "checkpoint.every_steps": 10}),
        f"log.mlflow.tracking_uri={url}",
        "log.mlflow.experiment=checkpoints",
        "log.mlflow.log_checkpoints=true",
        cwd=repo,
    )
    assert r.returncode == 0, r.stderr
    return url, run, commit.stdout.strip()


def test_log_checkpoints_uploads_every_checkpoint_file(checkpointed_run):
    from mlflow.tracking import MlflowClient

    url, run, _ = checkpointed_run
    client = MlflowClient(url)
    run_id = run_id_of(run)
    assert run_id and client.get_run(run_id).info.status == "FINISHED"
    on_disk = {str(p.relative_to(run / "checkpoints")) for p in (run / "checkpoints").rglob("*") if p.is_file()}
    assert {"step-000010", "step-000020"} <= {p.split("/")[0] for p in on_disk}, on_disk
    assert artifacts_under(client, run_id, "checkpoints") == on_disk


def test_the_run_carries_the_commit_of_the_code_it_ran_in(checkpointed_run):
    from mlflow.tracking import MlflowClient

    url, run, commit = checkpointed_run
    got = MlflowClient(url).get_run(run_id_of(run)).data.tags
    assert got["git.commit"] == commit and got["mlflow.source.git.commit"] == commit


class LatePort:
    """A port where nothing listens until open(); from then on it forwards every connection to a running server: for
    the client, a server that comes up late (without the seconds an MLflow server takes to start)."""

    def __init__(self, server_url: str):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.target = ("127.0.0.1", int(server_url.rsplit(":", 1)[1]))
        self.sock: socket.socket | None = None

    def open(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed
                return
            server = socket.create_connection(self.target)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


def test_a_training_run_started_before_its_server_is_logged_in_full(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    _, server_url = mlflow_server
    late = LatePort(server_url)
    run = tmp_path / "run"
    out = tmp_path / "train.log"
    train = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "worker",
            QUICKSTART,
            *tiny_overrides(
                run, **{"train.max_steps": 1_000_000, "train.eval_every": 0, "log.every": 500, "health.every": 500}
            ),
            f"log.mlflow.tracking_uri={late.url}",
            "log.mlflow.experiment=late_run",
        ],
        stdout=open(out, "w"),
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])},
    )
    try:
        # a record every 500 steps (log and health alike, about one a second here): the backlog of the minutes the server was down is
        # sent in seconds once it is up, so the end of the run has little left to send on a slow machine too
        wait_for("the tracker's first failure", lambda: "log.mlflow: the tracking server" in out.read_text(), 90)
        time.sleep(sum(RETRY_PAUSES) + 2)  # the quick retries of the run's creation are spent when it comes up
        wait_for("a backlog of records", lambda: losses_logged(run) >= 2, 90)
        assert run_id_of(run) is None and train.poll() is None
        late.open()
        wait_for("the run to be created", lambda: run_id_of(run) is not None, 60)
        client = MlflowClient(server_url)
        wait_for(
            "the first records", lambda: 500 in {m.step for m in client.get_metric_history(run_id_of(run), "loss")}
        )
        train.send_signal(signal.SIGTERM)  # a graceful stop: checkpoint, summary, the tracker's flush
        assert train.wait(timeout=120) == 143, out.read_text()[-3000:]
        run_id = run_id_of(run)
        assert client.get_run(run_id).info.status == "FINISHED"
        want = [(r["step"], r["loss"]) for r in metrics_of(run) if "loss" in r]
        assert len(want) >= 2 and want[0][0] == 500
        assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss")) == want
        assert "gave up" not in out.read_text()
        assert "the tracker answers again" in out.read_text()  # it came up after the quick retries, as meant
    finally:
        if train.poll() is None:
            train.kill()
        late.close()


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


def late_backend(tmp_path: Path, url: str, experiment: str):
    """An MLflow backend as rank 0 builds it, for a run directory of its own."""
    from shoal.config import load_config
    from shoal.tracking.mlflow_backend import MLflowBackend

    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(
        QUICKSTART, [f"run.dir={run}", f"log.mlflow.tracking_uri={url}", f"log.mlflow.experiment={experiment}"]
    )
    return MLflowBackend(cfg, run, 1, resumed=False), cfg, run


def test_a_server_down_when_the_run_starts_gets_the_run_and_every_record_once_it_answers(mlflow_server, tmp_path):
    from mlflow.tracking import MlflowClient

    _, url = mlflow_server
    late = LatePort(url)  # the module's server, on a port that answers only once it comes up
    with Warnings() as warned:
        backend, cfg, run = late_backend(tmp_path, late.url, "late")
        began = time.monotonic()
        for step in range(0, 50, 10):
            backend.log(step, {"loss": 1.0 / (step + 1), "lr": 0.1})
        assert time.monotonic() - began < 0.5  # training never waits for the tracker
        # the server comes up only after the quick retries of the first call (the run's creation) are spent
        wait_for("the sender to find the tracker down", lambda: backend.sender.down, 30)
        assert run_id_of(run) is None
        late.open()
        try:
            for step in range(50, 100, 10):
                backend.log(step, {"loss": 1.0 / (step + 1), "lr": 0.1})
            wait_for("the run to be created", lambda: run_id_of(run) is not None, 60)
            backend.finish({"status": "completed"}, run, [(run / "tracking.json", "")])
            assert backend.close()
            client = MlflowClient(url)
            run_id = run_id_of(run)
            got = client.get_run(run_id)
            assert got.info.status == "FINISHED"
            assert got.data.params == {k: str(v) for k, v in flatten(cfg.to_dict()).items()}
            for key, want in (("loss", [(s, 1.0 / (s + 1)) for s in range(0, 100, 10)]), ("lr", None)):
                history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
                assert [s for s, _ in history] == list(range(0, 100, 10)), key
                if want:
                    assert history == want
            assert {a.path for a in client.list_artifacts(run_id)} == {"tracking.json"}
        finally:
            late.close()
    assert len(warned) == 1 and "did not answer" in warned[0], warned


def test_the_end_of_a_run_waits_briefly_for_a_server_that_never_answers(tmp_path):
    url = f"http://127.0.0.1:{free_ports(1)[0]}"
    with Warnings() as warned:
        backend, _, run = late_backend(tmp_path, url, "never")
        for step in range(0, 300, 10):
            backend.log(step, {"loss": 1.0})
        wait_for("the first send to fail", lambda: backend.sender.failed is not None)
        time.sleep(1.0)  # a retry pause under way
        backend.finish({"status": "completed"}, run, [])
        began = time.monotonic()
        assert not backend.close()
        took = time.monotonic() - began
    assert took <= tracking.FLUSH_DOWN_S + 0.5, took
    assert len(warned) == 2, warned  # the first failure, and the end
    assert "retrying in the background" in warned[0]
    assert warned[1].startswith(f"log.mlflow: the tracking server {url} did not answer (MlflowException")
    assert (
        f"gave up after {tracking.FLUSH_DOWN_S:g} s at the end of the run: 30 metrics record(s) not sent" in warned[1]
    )
    assert warned[1].endswith("nor the run's creation, the artifacts and the run's end"), warned[1]
    wait_for("the sender to stop", lambda: not backend.sender.thread.is_alive(), 2)
    assert run_id_of(run) is None


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
            *tiny_overrides(run, **{"train.max_steps": 1500, "train.eval_every": 0, "log.every": 10}),
            f"log.mlflow.tracking_uri={url}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])},
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
    assert "status completed" in out and "steps 1500" in out
    assert "log.mlflow: the tracking server" in out and "training goes on" in out
    assert out.index("training goes on") < out.index("(1500/1500"), out[-3000:]  # found down before the last step
    assert json.loads((run / "summary.json").read_text())["steps"] == 1500
