"""The Ray launcher on a real local cluster (127.0.0.1), and the same job under torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal import launcher
from shoal.config import load_config
from shoal.errors import ClusterError, WorkerFailed

from conftest import REPO, TESTS, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_quickstart_on_ray_reaches_95_percent(ray_cluster, tmp_path):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "run", **{"log.tensorboard": "true"}))
    summary = launcher.run(cfg)
    assert summary["status"] == "completed"
    assert summary["world_size"] == 2
    assert summary["steps"] == cfg.train.max_steps
    assert summary["val_accuracy"] >= 0.95
    run = tmp_path / "run"
    saved = json.loads((run / "summary.json").read_text())
    for key in (
        "status",
        "steps",
        "samples",
        "wall_s",
        "samples_per_s",
        "world_size",
        "train_loss",
        "val_loss",
        "val_accuracy",
    ):
        assert key in saved, key
    assert saved["samples"] == cfg.train.max_steps * 2 * cfg.data.batch_size
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][:3] == [10, 20, 30]
    assert records[-1]["step"] == cfg.train.max_steps and "val_accuracy" in records[-1]
    assert list(run.glob("events.out.tfevents.*"))
    assert load_config(run / "config.yaml").run.dir == str(run)


def test_ray_ranks_get_the_torchrun_environment(ray_cluster, tmp_path):
    env_dir = tmp_path / "env"
    cfg = load_config(
        QUICKSTART,
        tiny_overrides(
            tmp_path / "run",
            **{
                "model.target": "helpers:env_recording_mlp",
                "model.kwargs": f"{{out_dir: {env_dir}}}",
                "train.max_steps": 2,
            },
        ),
    )
    launcher.run(cfg)
    import ray

    node_ip = ray.nodes()[0]["NodeManagerAddress"]
    ray_env = [json.loads((env_dir / f"env-{r}.json").read_text()) for r in range(2)]
    for rank, env in enumerate(ray_env):
        assert env["RANK"] == str(rank) and env["WORLD_SIZE"] == "2"
        assert env["LOCAL_RANK"] == str(rank) and env["LOCAL_WORLD_SIZE"] == "2" and env["GROUP_RANK"] == "0"
        assert env["MASTER_ADDR"] == node_ip and int(env["MASTER_PORT"]) > 0
    assert ray_env[0]["MASTER_PORT"] == ray_env[1]["MASTER_PORT"]
    # torchrun gives the same variables for the same job
    tr_dir = tmp_path / "env-torchrun"
    proc = torchrun(
        QUICKSTART,
        tiny_overrides(
            tmp_path / "run2",
            **{
                "model.target": "helpers:env_recording_mlp",
                "model.kwargs": f"{{out_dir: {tr_dir}}}",
                "train.max_steps": 2,
            },
        ),
    )
    assert proc.returncode == 0, proc.stderr[:3000]  # the ranks speak first; torchrun's own report follows
    tr_env = [json.loads((tr_dir / f"env-{r}.json").read_text()) for r in range(2)]
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")
    assert [{k: e[k] for k in keys} for e in ray_env] == [{k: e[k] for k in keys} for e in tr_env]


def test_impossible_request_fails_at_once_with_requested_and_available(ray_cluster, tmp_path):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "run", **{"scaling.num_workers": 8}))
    started = time.monotonic()
    with pytest.raises(ClusterError) as e:
        launcher.run(cfg)
    assert time.monotonic() - started < 10
    assert "8 workers x 1 CPU = 8 CPU requested" in str(e.value)
    assert "the cluster has 2 CPU" in str(e.value)
    assert not (tmp_path / "run").exists()  # nothing written for a job that never started


def test_a_failing_rank_stops_the_job_within_seconds(ray_cluster, tmp_path):
    cfg = load_config(
        QUICKSTART,
        tiny_overrides(
            tmp_path / "run",
            **{
                "model.target": "helpers:failing_mlp",
                "model.kwargs": "{fail_rank: 1, after_calls: 5}",
                "train.max_steps": 10000,
                "scaling.timeout_s": 600,
            },
        ),
    )
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as e:
        launcher.run(cfg)
    assert time.monotonic() - started < 30  # not the 600 s collective timeout
    assert "rank 1 failed: RuntimeError: planted failure on rank 1" in str(e.value)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and "rank 1" in summary["error"]


def test_ctrl_c_stops_every_worker_after_a_checkpoint(ray_cluster, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(TESTS)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "train",
            str(QUICKSTART),
            *tiny_overrides(
                tmp_path / "run",
                **{"scaling.address": ray_cluster, "train.max_steps": 100000, "log.print_every_s": 0.5},
            ),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 90
    for line in proc.stdout:
        if "[shoal] step" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-2000:]
    assert _rank_actor_processes_gone(timeout_s=20)
    # Ctrl-C is a graceful stop: every rank finished its step and rank 0 saved a checkpoint
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "preempted"
    assert (tmp_path / "run" / "checkpoints" / f"step-{summary['steps']:06d}" / "meta.json").exists()
    assert "preempted at step" in out


def _rank_actor_processes_gone(timeout_s: float) -> bool:
    import psutil

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [
            p for p in psutil.process_iter(["cmdline"]) if any("RankActor" in c for c in (p.info["cmdline"] or []))
        ]
        if not alive:
            return True
        time.sleep(0.5)
    return False


def torchrun(config: Path, overrides: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(TESTS)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "shoal",
        "worker",
        str(config),
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)


def test_quickstart_under_torchrun_reaches_95_percent(tmp_path):
    proc = torchrun(QUICKSTART, tiny_overrides(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["status"] == "completed"
    assert summary["val_accuracy"] >= 0.95


def test_embedded_cluster_is_private_and_cleaned_up(ray_cluster, tmp_path):
    import glob

    import ray

    before = set(glob.glob("/tmp/shoal-ray-*"))
    # as a new user runs it: no address, no auth settings, a home without ~/.ray
    env = {
        "RAY_ADDRESS": None,
        "RAY_AUTH_MODE": None,
        "RAY_AUTH_TOKEN_PATH": None,
        "RAY_AUTH_TOKEN": None,
        "HOME": str(tmp_path / "home"),
    }
    overrides = tiny_overrides(tmp_path / "run", **{"train.max_steps": 30, "scaling.keep_alive_s": 0})
    proc = shoal_cli("train", *overrides, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "oken authentication" not in proc.stdout + proc.stderr  # Ray's notice stays out of the user's output
    assert not (tmp_path / "home" / ".ray").exists()  # the cluster's token is its own, not written into the home
    assert set(glob.glob("/tmp/shoal-ray-*")) <= before  # its temp folder is gone
    # the other cluster on the machine (this session's) was neither joined nor stopped
    assert ray.get(ray.remote(lambda: 42).remote()) == 42
    assert sum(1 for n in ray.nodes() if n["Alive"]) == 1


def _listeners(root_pid: int) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening socket of a process tree."""
    import psutil

    root = psutil.Process(root_pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            out += [
                (p.name(), c.laddr.ip, c.laddr.port)
                for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            ]
        except psutil.Error:
            continue  # a process that ended meanwhile
    return out


def _command_lines(root_pid: int) -> list[str]:
    import psutil

    root = psutil.Process(root_pid)
    out = []
    for p in [root, *root.children(recursive=True)]:
        try:
            out.append(" ".join(p.cmdline()))
        except psutil.Error:
            continue
    return out


def _loopback(address: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def test_a_running_embedded_job_listens_on_loopback_only_and_starts_no_dashboard(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])  # this checkout's shoal
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shoal",
            "train",
            str(QUICKSTART),
            *tiny_overrides(run, **{"train.max_steps": 100000, "scaling.keep_alive_s": 0}),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start training"
            time.sleep(0.2)
        listening = _listeners(proc.pid)
        names = {name for name, _, _ in listening}
        assert {"gcs_server", "raylet"} <= names  # the cluster's own servers are in the tree we read
        assert len([1 for name, _, _ in listening if "RankActor" in name or name.startswith("ray::")]) >= 2
        exposed = [(name, ip, port) for name, ip, port in listening if not _loopback(ip)]
        assert not exposed, f"listening beyond loopback: {exposed}"
        # only what a local run needs: no API server / dashboard, no autoscaler monitor; the log monitor
        # that forwards the ranks' output stays
        lines = _command_lines(proc.pid)
        assert not [c for c in lines if "dashboard/dashboard.py" in c or "autoscaler/_private/monitor.py" in c]
        assert [c for c in lines if "log_monitor.py" in c]
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]


# ---------------------------------------------------------------- elastic: a rank SIGKILLed, the group resized


def elastic_job(tmp_path: Path, steps: int, **kill: object) -> tuple[object, dict]:
    """Digits on 2 ranks that may go down to 1: rank 1 SIGKILLs itself at its 8th training forward."""
    from test_snapshot import elastic_cfg

    from shoal.config import config_from_dict

    kwargs = {"marker": str(tmp_path / "killed"), "kill_rank": 1, "at_call": 8, **kill}
    updates = {
        "model.target": "helpers:killing_mlp",
        "model.kwargs": kwargs,
        "train.max_steps": steps,
        "scaling.max_failures": 2,
        "scaling.cpus_per_worker": 1,
        "checkpoint.every_steps": 5,
    }
    data = elastic_cfg(tmp_path / "run", **updates)
    return config_from_dict(data), data


def reference_params(tmp_path: Path, data: dict) -> dict:
    """The same job on 2 gloo ranks, never interrupted (the kill's marker is already there)."""
    from test_snapshot import final_params, train_until

    from _ranks import spawn_ranks

    (tmp_path / "killed").write_text("{}")
    reference = {**data, "run": {**data["run"], "dir": str(tmp_path / "reference")}}
    model = reference["model"]
    reference["model"] = {**model, "kwargs": {**model["kwargs"], "sleep_s": 0.0, "drop": None}}
    spawn_ranks(train_until, 2, reference, None)
    return final_params(tmp_path / "reference")


def steps_logged(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "batch" in r]


def test_a_rank_sigkilled_the_job_goes_on_with_one_and_grows_back_to_two(ray_cluster, tmp_path, capsys):
    from test_snapshot import assert_same_params, final_params

    # 30 ms per forward: the spare rank has time to load while one rank trains alone
    cfg, data = elastic_job(tmp_path, 200, sleep_s=0.03)
    cfg = cfg.replace({"checkpoint.memory_every": 1})
    summary = launcher.run(cfg)
    assert summary["status"] == "completed" and summary["steps"] == 200
    shrink, grow = summary["resizes"]
    killed_at = json.loads((tmp_path / "killed").read_text())["time"]
    assert (shrink["old_world"], shrink["new_world"], shrink["resumed_from"]) == (2, 1, "memory")
    assert shrink["steps_lost"] <= 1  # checkpoint.memory_every = 1
    assert 0 < shrink["recovery_s"] < 30 and shrink["time"] > killed_at
    assert (grow["old_world"], grow["new_world"], grow["reason"]) == (1, 2, "resources returned")
    out = capsys.readouterr().out
    assert "resized 2 -> 1 workers" in out and "recovered in" in out and "growing from 1 to 2 workers" in out
    steps = steps_logged(tmp_path / "run")
    assert [r["step"] for r in steps] == list(range(1, 201))  # the lost steps' records were rewritten
    assert {r["batch"] for r in steps} == {16}
    from shoal.health.doctor import diagnose
    from shoal.report import write

    doctor = diagnose(tmp_path / "run").read_text()
    assert "## Workers (elastic resizes)" in doctor and "| 2 -> 1 |" in doctor and "| 1 -> 2 |" in doctor
    assert "<table id='resizes'>" in write(tmp_path / "run").read_text()
    assert_same_params(final_params(tmp_path / "run"), reference_params(tmp_path, data))


def test_a_rank_lost_with_its_snapshots_resumes_from_disk_and_says_so(ray_cluster, tmp_path, capsys):
    from test_snapshot import assert_same_params, final_params

    from shoal import snapshot

    cfg, data = elastic_job(tmp_path, 30, drop=str(snapshot.snapshot_dir(tmp_path / "run")))
    summary = launcher.run(cfg)
    assert summary["status"] == "completed" and summary["steps"] == 30
    shrink = summary["resizes"][0]
    assert (shrink["new_world"], shrink["resumed_from"]) == (1, "disk")
    assert 1 <= shrink["steps_lost"] <= 5  # since the disk checkpoint (checkpoint.every_steps = 5)
    assert "from disk" in capsys.readouterr().out
    assert_same_params(final_params(tmp_path / "run"), reference_params(tmp_path, data))
