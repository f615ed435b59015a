"""Running on a Ray cluster: job submission, two raylets as two nodes, recovery from a killed worker,
hang detection, clear failures for unreachable clusters and missing tokens."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from shoal import launcher
from shoal.config import load_config
from shoal.errors import WorkerFailed

from conftest import REPO, TESTS, free_ports, shoal_cli, start_ray_node, stop_ray_node, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def job_file(tmp_path: Path, **updates) -> Path:
    """The quickstart with an absolute run.dir, in a small working directory to upload."""
    cfg = yaml.safe_load(QUICKSTART.read_text())
    for key, value in {
        "run.dir": str(tmp_path / "run"),
        "log.progress": "lines",
        "log.tensorboard": False,
        **updates,
    }.items():
        section, _, leaf = key.partition(".")
        cfg.setdefault(section, {})[leaf] = value
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.yaml").write_text(yaml.safe_dump(cfg))
    return work / "job.yaml"


def test_submit_follows_the_job_to_success_and_jobs_commands_see_it(ray_head, tmp_path):
    job = job_file(tmp_path, **{"train.max_steps": 60})
    proc = shoal_cli("submit", str(job), "optim.lr=0.003", "--address", ray_head.dashboard, cwd=job.parent, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    job_id = proc.stdout.split("[shoal] submitted job ")[1].split()[0]
    assert f"[shoal] job {job_id}: SUCCEEDED" in proc.stdout
    assert "val_accuracy" in proc.stdout  # the job's own output was followed
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["steps"] == 60
    listed = shoal_cli("jobs", "list", "--address", ray_head.dashboard)
    assert job_id in listed.stdout and "SUCCEEDED" in listed.stdout
    status = shoal_cli("jobs", "status", job_id, "--address", ray_head.dashboard)
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout
    logs = shoal_cli("jobs", "logs", job_id, "--address", ray_head.dashboard)
    assert "status completed" in logs.stdout


def test_submit_without_the_clusters_token_says_so(ray_head, tmp_path):
    job = job_file(tmp_path)
    env = {"HOME": str(tmp_path), "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": ""}
    proc = shoal_cli("submit", str(job), "--address", ray_head.dashboard, cwd=job.parent, env=env)
    assert proc.returncode == 2
    assert "asks for an authentication token" in proc.stderr and "RAY_AUTH_TOKEN" in proc.stderr


def test_unreachable_cluster_fails_within_seconds(tmp_path):
    (port,) = free_ports(1)
    started = time.monotonic()
    proc = shoal_cli("submit", str(QUICKSTART), "--address", f"http://127.0.0.1:{port}", cwd=tmp_path)
    assert proc.returncode == 2 and "cannot reach the Ray Jobs API" in proc.stderr
    proc = shoal_cli(
        "train", *tiny_overrides(tmp_path / "run", **{"scaling.address": f"127.0.0.1:{port}"}), cwd=tmp_path
    )
    assert proc.returncode == 2 and "nothing answers at" in proc.stderr
    assert time.monotonic() - started < 20


@pytest.fixture
def private_head(tmp_path):
    """A Ray head of this test's own, with one runtime-env build attempt instead of Ray's three: a failing
    pip build (a clone of the whole virtualenv each try) would otherwise keep a core busy for minutes."""
    import shutil
    import tempfile

    from conftest import start_ray_head

    temp_dir = tempfile.mkdtemp(prefix="shoal-rt-env-")
    proc, head = start_ray_head(temp_dir, num_cpus=1, env={"RUNTIME_ENV_RETRY_TIMES": "1"})
    try:
        yield head
    finally:
        stop_ray_node(proc)
        kill_processes_mentioning(temp_dir)  # an env build still running under the stopped agent
        shutil.rmtree(temp_dir, ignore_errors=True)


def kill_processes_mentioning(text: str) -> None:
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def test_runtime_env_that_fails_to_build_is_reported(private_head, tmp_path):
    job = job_file(tmp_path)
    proc = shoal_cli(
        "submit",
        str(job),
        "--address",
        private_head.dashboard,
        "--pip",
        "/nonexistent/shoal_missing-1.0-py3-none-any.whl",
        "--start-timeout",
        "6",
        cwd=job.parent,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "FAILED" in proc.stdout or "did not start within 6s" in proc.stderr, (
        proc.stdout[-1500:] + proc.stderr[-1500:]
    )


@pytest.fixture
def second_node(ray_head):
    """A second raylet on this machine standing in for a second node (1 CPU)."""
    import ray

    proc = start_ray_node(
        ray_head.temp_dir, [f"--address={ray_head.gcs}", "--num-cpus=1", '--resources={"second_node": 1}'], "node2.log"
    )
    deadline = time.monotonic() + 60
    while sum(1 for n in ray.nodes() if n["Alive"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 2, "second raylet did not join"
    yield
    stop_ray_node(proc)
    deadline = time.monotonic() + 60
    while ray.cluster_resources().get("CPU", 0) > 2 and time.monotonic() < deadline:
        time.sleep(0.5)


@pytest.mark.parametrize(
    "workers, placement, expected",
    [
        # (LOCAL_RANK, LOCAL_WORLD_SIZE, GROUP_RANK) per rank, as torchrun would number them
        (3, "pack", [("0", "2", "0"), ("1", "2", "0"), ("0", "1", "1")]),
        (2, "strict_spread", [("0", "1", "0"), ("0", "1", "1")]),
    ],
)
def test_two_raylets_give_torchrun_numbering(ray_cluster, second_node, tmp_path, workers, placement, expected):
    out = tmp_path / "env"
    cfg = load_config(
        QUICKSTART,
        tiny_overrides(
            tmp_path / "run",
            **{
                "scaling.num_workers": workers,
                "scaling.placement": placement,
                "train.max_steps": 3,
                "data.batch_size": 16,
                "model.target": "helpers:node_recording_mlp",
                "model.kwargs": f"{{out_dir: {out}}}",
            },
        ),
    )
    summary = launcher.run(cfg)
    assert summary["world_size"] == workers
    envs = [json.loads((out / f"env-{r}.json").read_text()) for r in range(workers)]
    assert [(e["LOCAL_RANK"], e["LOCAL_WORLD_SIZE"], e["GROUP_RANK"]) for e in envs] == expected
    nodes = [e["NODE_ID"] for e in envs]
    for a in range(workers):
        for b in range(workers):
            assert (nodes[a] == nodes[b]) == (envs[a]["GROUP_RANK"] == envs[b]["GROUP_RANK"])
    assert len({e["MASTER_ADDR"] for e in envs}) == 1 and len({e["MASTER_PORT"] for e in envs}) == 1


def rank_actor_pids() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if any("RankActor" in c for c in (p.info["cmdline"] or []))]


def train_and_kill_a_worker(
    ray_cluster: str, tmp_path: Path, max_failures: int
) -> tuple[subprocess.CompletedProcess, dict]:
    overrides = tiny_overrides(
        tmp_path / "run",
        **{
            "scaling.address": ray_cluster,
            "scaling.max_failures": max_failures,
            "train.max_steps": 600,
            "checkpoint.every_steps": 25,
            "log.print_every_s": 0.5,
        },
    )
    # no RAY_AUTH_MODE: `shoal train scaling.address=...` must find the token cluster's mode itself
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "RAY_AUTH_MODE")}
    env["PYTHONPATH"] = str(TESTS)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "train", str(QUICKSTART), *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    latest = tmp_path / "run" / "checkpoints" / "latest"
    deadline = time.monotonic() + 120
    while not latest.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    victims = rank_actor_pids()
    assert victims, "no rank processes found"
    os.kill(victims[-1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, ""), json.loads(
        (tmp_path / "run" / "summary.json").read_text()
    )


def test_killed_worker_restarts_from_the_last_checkpoint(ray_cluster, tmp_path):
    proc, summary = train_and_kill_a_worker(ray_cluster, tmp_path, max_failures=1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "restarting all workers from the latest checkpoint (restart 1 of scaling.max_failures=1)" in proc.stdout
    assert summary["status"] == "completed" and summary["steps"] == 600 and summary["restarts"] == 1
    assert summary["resumed_from"].startswith(str(tmp_path / "run" / "checkpoints" / "step-"))
    assert summary["steps_this_run"] < 600


def test_killed_worker_without_budget_fails_naming_the_rank(ray_cluster, tmp_path):
    proc, summary = train_and_kill_a_worker(ray_cluster, tmp_path, max_failures=0)
    assert proc.returncode == 1
    assert "shoal: error: rank " in proc.stdout and "process died" in proc.stdout
    assert summary["status"] == "failed" and "rank " in summary["error"]


def test_a_hanging_rank_counts_as_failed(ray_cluster, tmp_path):
    cfg = load_config(
        QUICKSTART,
        tiny_overrides(
            tmp_path / "run",
            **{
                "scaling.address": ray_cluster,
                "scaling.hang_timeout_s": 3,
                "train.max_steps": 100000,
                "model.target": "helpers:hanging_mlp",
                "model.kwargs": "{hang_rank: 1, after_calls: 20}",
            },
        ),
    )
    started = time.monotonic()
    with pytest.raises(WorkerFailed, match=r"rank \d made no progress for 3s .*scaling.hang_timeout_s"):
        launcher.run(cfg)
    assert time.monotonic() - started < 60
