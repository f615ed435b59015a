"""Checkpoints: exact resume, atomic saves under SIGKILL and full disks, preemption by SIGTERM,
pruning, corrupt-checkpoint fallback, safe loading, export."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shoal import checkpoint
from shoal.checkpoint import Checkpointer, find_latest, verify
from shoal.config import JobConfig, load_config
from shoal.dist import WorldInfo
from shoal.errors import CheckpointError
from shoal.job import build_job
from shoal.models import build_model

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
COMPARED = ("step", "epoch", "samples", "loss", "lr", "grad_norm", "skipped_steps", "val_loss", "val_accuracy")


def cfg_for(run_dir: Path, **updates) -> JobConfig:
    base = {
        "data.dataset": "synthetic",
        "data.num_samples": 600,
        "data.input_shape": [10],
        "data.num_classes": 3,
        "data.batch_size": 16,
        "model.width": 16,
        "model.dropout": 0.2,
        "optim.name": "adamw",
        "optim.lr": 0.01,
        "schedule.name": "step",
        "schedule.step_size": 30,
        "schedule.gamma": 0.5,
        "train.max_steps": 100,
        "train.eval_every": 20,
        "log.every": 5,
        "log.tensorboard": False,
        "run.dir": str(run_dir),
    }
    base.update(updates)
    return JobConfig().replace(base)


def run(cfg: JobConfig, resume: bool = False, stop_after: int | None = None) -> tuple[dict, list[dict]]:
    """Train in this process (world of one) through run_worker; optionally ask for a stop after a step."""
    import threading

    from shoal.worker import run_worker

    stop = threading.Event()

    def report(record: dict) -> None:
        if stop_after is not None and record["step"] >= stop_after:
            stop.set()

    summary = run_worker(cfg, resume=resume, report=report, stop=stop)
    return summary, [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(find_latest(run_dir) / "model.pt", weights_only=True)


def same_records(a: list[dict], b: list[dict]) -> None:
    assert [{k: r.get(k) for k in COMPARED} for r in a] == [{k: r.get(k) for k in COMPARED} for r in b]


def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(tmp_path):
    straight, straight_log = run(cfg_for(tmp_path / "a"))
    stopped, _ = run(cfg_for(tmp_path / "b"), stop_after=45)
    assert stopped["status"] == "preempted" and 45 < stopped["steps"] < 100
    saved = find_latest(tmp_path / "b")
    assert saved.name == f"step-{stopped['steps']:06d}"
    resumed, resumed_log = run(cfg_for(tmp_path / "b"), resume=True)
    assert (
        resumed["status"] == "completed"
        and resumed["steps"] == 100
        and resumed["steps_this_run"] == 100 - stopped["steps"]
    )
    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    same_records(straight_log, resumed_log)  # metrics.jsonl continues with the same values


def test_resume_from_a_given_checkpoint_into_a_new_run_dir(tmp_path):
    run(cfg_for(tmp_path / "a", **{"checkpoint.every_steps": 40}))
    ckpt = tmp_path / "a" / "checkpoints" / "step-000040"
    summary, log = run(cfg_for(tmp_path / "c", **{"checkpoint.resume_from": str(ckpt)}))
    assert summary["steps_this_run"] == 60 and summary["resumed_from"] == str(ckpt)
    assert log[0]["step"] == 45
    a, c = final_weights(tmp_path / "a"), final_weights(tmp_path / "c")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_model_that_does_not_fit_lists_keys_and_shapes(tmp_path):
    run(cfg_for(tmp_path / "a", **{"train.max_steps": 10}))
    ckpt = find_latest(tmp_path / "a")
    with pytest.raises(
        CheckpointError,
        match=r"does not fit the model.*shape mismatch layers\.0\.linear\.weight: checkpoint \[16, 10\] vs model \[32, 10\]",
    ):
        run(cfg_for(tmp_path / "c", **{"model.width": 32, "checkpoint.resume_from": str(ckpt)}))


def test_corrupt_latest_falls_back_and_explicit_path_fails(tmp_path, caplog):
    run(cfg_for(tmp_path / "a", **{"checkpoint.every_steps": 20, "train.max_steps": 60}))
    root = tmp_path / "a" / "checkpoints"
    assert (root / "latest").read_text() == "step-000060"
    with open(root / "step-000060" / "model.pt", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with caplog.at_level("WARNING", logger="shoal"):
        assert find_latest(tmp_path / "a") == root / "step-000040"
    assert "step-000060: model.pt does not match its checksum" in caplog.text
    (root / "step-000040" / "state.pt").unlink()
    assert find_latest(tmp_path / "a") == root / "step-000020"
    with pytest.raises(CheckpointError, match="state.pt is missing"):
        run(cfg_for(tmp_path / "c", **{"checkpoint.resume_from": str(root / "step-000040")}))


def test_injected_failure_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, caplog):
    cfg = cfg_for(tmp_path / "a")
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    saver = Checkpointer(cfg.checkpoint, tmp_path / "a", WorldInfo())
    saver.save(job.state.collect(), 10, {}, 0)
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if str(path).endswith("optimizer.pt"):
            real_save(obj, path, *a, **k)  # half the bytes, then the disk is full
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with caplog.at_level("ERROR", logger="shoal"):
        saver.save(job.state.collect(), 20, {}, 0)
    assert "checkpoint at step 20 failed (No space left on device); the previous checkpoint is kept" in caplog.text
    root = tmp_path / "a" / "checkpoints"
    assert (root / "latest").read_text() == "step-000010"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000010"]  # no half-written leftovers
    verify(root / "step-000010")


SAVER = """
import sys, torch
from shoal.config import JobConfig
from shoal.worker import run_worker
cfg = JobConfig().replace({"data.dataset": "synthetic", "data.num_samples": 256, "data.input_shape": [512], "model.width": 1024,
    "model.depth": 2, "train.max_steps": 100000, "train.eval_every": 0, "checkpoint.every_steps": 1, "log.tensorboard": False,
    "log.progress": "none", "run.dir": sys.argv[1]})
run_worker(cfg)
"""


def test_sigkill_during_saves_always_leaves_a_complete_latest(tmp_path):
    run_dir = tmp_path / "a"
    for attempt, delay in enumerate((4.0, 1.3, 2.1)):
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER, str(run_dir)]
            if attempt == 0
            else [sys.executable, "-c", SAVER.replace("run_worker(cfg)", "run_worker(cfg, resume=True)"), str(run_dir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (run_dir / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)  # saves of ~20 MB every step: the kill lands mid-save most of the time
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
        verify(latest)  # `latest` always names a complete, checksum-clean checkpoint
        assert find_latest(run_dir) == latest


def test_sigterm_saves_exits_preempted_and_resume_completes(tmp_path):
    overrides = tiny_overrides(tmp_path / "run", **{"train.max_steps": 1000, "log.every": 10, "log.print_every_s": 0.2})
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shoal", "worker", str(QUICKSTART), *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "[shoal] step" in line and int(line.split("step ")[1].split()[0]) >= 100:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-2000:]
    assert "preempted at step" in out and "--resume" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "preempted"
    stopped_at = summary["steps"]
    assert find_latest(tmp_path / "run").name == f"step-{stopped_at:06d}"
    done = shoal_cli("worker", str(QUICKSTART), *overrides, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (
        summary["status"] == "completed" and summary["steps"] == 1000 and summary["steps_this_run"] == 1000 - stopped_at
    )


def test_keep_last_and_best_and_the_newest_clean_one_survive_pruning(tmp_path):
    cfg = cfg_for(
        tmp_path / "a", **{"checkpoint.keep_last": 2, "checkpoint.keep_best": {"metric": "val_loss", "mode": "min"}}
    )
    saver = Checkpointer(cfg.checkpoint, tmp_path / "a", WorldInfo())
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    state = job.state.collect()
    # (step, val_loss, non-finite steps seen so far): NaNs start after step 30
    for step, loss, bad in [(10, 0.9, 0), (20, 0.5, 0), (30, 0.7, 0), (40, 0.8, 2), (50, 0.95, 5), (60, 0.99, 5)]:
        saver.save(state, step, {"val_loss": loss}, bad)
    kept = sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*"))
    # newest two (50, 60), the best (20), the newest before the latest non-finite step (40: taken before steps 41-50 went bad)
    assert kept == ["step-000020", "step-000040", "step-000050", "step-000060"]


def test_keep_last_protects_the_last_clean_checkpoint(tmp_path):
    cfg = cfg_for(tmp_path / "a", **{"checkpoint.keep_last": 1})
    saver = Checkpointer(cfg.checkpoint, tmp_path / "a", WorldInfo())
    state = build_job(cfg, WorldInfo(), torch.device("cpu")).state.collect()
    for step, bad in [(10, 0), (20, 0), (30, 3), (40, 3)]:
        saver.save(state, step, {}, bad)
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("step-*")) == ["step-000020", "step-000040"]


def test_async_save_writes_the_same_checkpoint_and_waits_at_the_end(tmp_path):
    run(cfg_for(tmp_path / "sync", **{"checkpoint.every_steps": 25}))
    summary, _ = run(cfg_for(tmp_path / "async", **{"checkpoint.every_steps": 25, "checkpoint.async": True}))
    for step in (25, 50, 75, 100):
        name = f"step-{step:06d}"
        a = torch.load(tmp_path / "sync" / "checkpoints" / name / "model.pt", weights_only=True)
        b = torch.load(tmp_path / "async" / "checkpoints" / name / "model.pt", weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "async" / "checkpoints" / "latest").read_text() == "step-000100"


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/shoal-pwned",))


def test_checkpoints_are_loaded_without_running_pickled_code(tmp_path):
    run(cfg_for(tmp_path / "a", **{"train.max_steps": 5}))
    ckpt = find_latest(tmp_path / "a")
    torch.save({"payload": Evil()}, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["state.pt"] = checkpoint.sha256(ckpt / "state.pt")  # even with matching checksums
    (ckpt / "meta.json").write_text(json.dumps(meta))
    if os.path.exists("/tmp/shoal-pwned"):
        os.remove("/tmp/shoal-pwned")
    with pytest.raises(CheckpointError, match="cannot load state.pt safely"):
        checkpoint.load(ckpt)
    assert not os.path.exists("/tmp/shoal-pwned")


def test_export_loads_into_the_bare_model_with_the_same_outputs(tmp_path):
    cfg = cfg_for(tmp_path / "a", **{"train.max_steps": 20})
    run(cfg)
    proc = shoal_cli("export", str(tmp_path / "a"), str(tmp_path / "model.pt"))
    assert proc.returncode == 0, proc.stderr
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in weights)
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    model = build_model(cfg.model, job.data.spec, job.loss_fn.out_features())
    model.load_state_dict(weights)
    checkpoint.load_model_state(
        job.bare_model, torch.load(find_latest(tmp_path / "a") / "model.pt", weights_only=True), tmp_path
    )
    x = torch.randn(7, 10)
    model.eval(), job.bare_model.eval()
    assert torch.equal(model(x), job.bare_model(x))


def test_resume_on_ray_with_another_world_size(ray_cluster, tmp_path):
    from shoal import launcher

    cfg = load_config(
        QUICKSTART, tiny_overrides(tmp_path / "run", **{"train.max_steps": 60, "checkpoint.every_steps": 30})
    )
    launcher.run(cfg)
    more = cfg.replace({"train.max_steps": 120, "scaling.num_workers": 1})
    summary = launcher.run(more, resume=True)
    assert summary["status"] == "completed" and summary["world_size"] == 1
    assert summary["steps"] == 120 and summary["steps_this_run"] == 60
    assert summary["resumed_from"].endswith("step-000060")


def test_resume_needs_a_run_dir():
    proc = shoal_cli("worker", str(QUICKSTART), "--resume")
    assert proc.returncode == 2 and "run.dir: --resume needs the run to continue" in proc.stderr


def test_export_does_not_write_over_an_existing_file_unless_asked(tmp_path):
    run(cfg_for(tmp_path / "a", **{"train.max_steps": 5}))
    out = tmp_path / "model.pt"
    out.write_bytes(b"the user's own file")
    proc = shoal_cli("export", str(tmp_path / "a"), str(out))
    assert proc.returncode == 2 and "already exists; pass --overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"the user's own file"
    proc = shoal_cli("export", str(tmp_path / "a"), str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert "layers.0.linear.weight" in torch.load(out, weights_only=True)


def test_export_of_a_code_running_pickle_is_refused_in_one_line(tmp_path):
    run(cfg_for(tmp_path / "a", **{"train.max_steps": 5}))
    ckpt = find_latest(tmp_path / "a")
    marker = tmp_path / "pwned"
    torch.save({"payload": Touch(str(marker))}, ckpt / "model.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["model.pt"] = checkpoint.sha256(ckpt / "model.pt")
    (ckpt / "meta.json").write_text(json.dumps(meta))
    proc = shoal_cli("export", str(ckpt), str(tmp_path / "out.pt"))
    assert proc.returncode == 2, proc.stderr
    assert "cannot load model.pt safely" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


class Touch:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))
