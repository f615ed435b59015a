"""Memory snapshots and world-size changes on real gloo ranks: a group stopped mid-epoch resumes on fewer
ranks from the node's shared memory (or, with the snapshot gone, from disk) and ends where the uninterrupted
run ends; the slots a killed writer leaves behind."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

from shoal import checkpoint, snapshot
from shoal.config import JobConfig, config_from_dict
from shoal.dcp import gather
from shoal.dist import WorldInfo

from _ranks import spawn_ranks

STOP_AT = 5
STEPS = 12


def elastic_cfg(run_dir: Path, **updates: object) -> dict:
    base = {
        "data.dataset": "digits",
        "data.batch_size": 8,
        "data.val_fraction": 0.1,
        "model.name": "mlp",
        "model.width": 32,
        "model.depth": 1,
        "optim.name": "adamw",
        "optim.lr": 0.01,
        "train.max_steps": STEPS,
        "train.eval_every": 0,
        "scaling.num_workers": 2,
        "scaling.min_workers": 1,
        "scaling.max_failures": 1,
        "log.every": 1,
        "log.progress": "none",
        "log.tensorboard": False,
        "run.dir": str(run_dir),
    }
    return JobConfig().replace({**base, **updates}).to_dict()


def train_until(cfg: dict, stop_at: int | None, resume: bool = False, torchrun_restart: bool = False) -> dict:
    """One rank of run_worker: stopped (as by SIGTERM, agreed at a step boundary) once step `stop_at` is done.
    torchrun_restart: started as torchrun restarts a group (TORCHELASTIC_RESTART_COUNT=1), without --resume."""
    import os

    from shoal.worker import run_worker

    if torchrun_restart:
        os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"

    stop = threading.Event()

    def on_step(step: int) -> None:
        if stop_at is not None and step >= stop_at:
            stop.set()

    return run_worker(config_from_dict(cfg), resume=resume, stop=stop, on_step=on_step)


def final_params(run_dir: Path) -> dict[str, torch.Tensor]:
    path = checkpoint.find_latest(run_dir)
    assert path is not None
    if checkpoint.is_sharded(path):
        return gather(path / "model")
    return checkpoint.load_part(path, "model")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


def assert_same_params(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def interrupt_and_resume(
    tmp_path: Path, before: int, after: int, drop_snapshot: bool = False, torchrun: bool = False, **updates
) -> Path:
    run = tmp_path / "run"
    cfg = elastic_cfg(run, **updates)
    first = spawn_ranks(train_until, before, cfg, STOP_AT)
    assert first[0]["status"] == "preempted" and first[0]["steps"] < STEPS
    if drop_snapshot:  # as when the node that held it is gone
        shutil.rmtree(snapshot.snapshot_dir(run))
    else:
        assert snapshot.slots(run), "a stopped run keeps its snapshots"
    second = spawn_ranks(train_until, after, cfg, None, not torchrun, torchrun)
    assert second[0]["status"] == "completed" and second[0]["steps"] == STEPS
    assert not snapshot.snapshot_dir(run).exists(), "a completed run frees its shared memory"
    return run


def uninterrupted(tmp_path: Path, world: int, **updates) -> Path:
    run = tmp_path / "reference"
    spawn_ranks(train_until, world, elastic_cfg(run, **updates), None)
    return run


def resize_record(run: Path) -> dict:
    (record,) = [r for r in records(run) if r.get("event") == "resize"]
    return record


@pytest.mark.parametrize("strategy", ["allreduce", "fsdp"])
def test_two_ranks_stopped_go_on_as_one_from_memory_and_end_as_the_uninterrupted_run(tmp_path, strategy):
    run = interrupt_and_resume(tmp_path, 2, 1, strategy=strategy)
    resize = resize_record(run)
    assert (resize["old_world"], resize["new_world"], resize["resumed_from"]) == (2, 1, "memory")
    steps = [r for r in records(run) if "batch" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert {r["batch"] for r in steps} == {16}  # the configured global batch on 2 ranks and on 1
    reference = uninterrupted(tmp_path, 2, strategy=strategy)
    got, want = losses(run), losses(reference)
    assert got.keys() == want.keys()
    assert all(abs(got[s] - want[s]) < 1e-5 for s in got), (got, want)
    assert_same_params(final_params(run), final_params(reference))


def test_with_the_snapshot_gone_a_torchrun_restart_resumes_from_disk(tmp_path):
    """As `torchrun --nnodes=1:2` restarts the group at one node (TORCHELASTIC_RESTART_COUNT, no --resume)."""
    run = interrupt_and_resume(tmp_path, 2, 1, drop_snapshot=True, torchrun=True)
    assert resize_record(run)["resumed_from"] == "disk"
    summary = json.loads((run / "summary.json").read_text())
    assert "/checkpoints/step-" in summary["resumed_from"]
    assert_same_params(final_params(run), final_params(uninterrupted(tmp_path, 2)))


def test_uneven_pieces_three_ranks_to_two_equal_one_rank_on_the_same_samples(tmp_path):
    """6 x 3 = 18 samples per step: on 2 ranks as 4 pieces of 4 or 5, on 1 rank as 3 pieces of 6."""
    updates = {"scaling.num_workers": 3, "data.batch_size": 6}
    run = interrupt_and_resume(tmp_path, 3, 2, **updates)
    assert {r["batch"] for r in records(run) if "batch" in r} == {18}
    reference = uninterrupted(tmp_path, 1, **updates)
    got, want = losses(run), losses(reference)
    assert all(abs(got[s] - want[s]) < 1e-5 for s in got), (got, want)
    assert_same_params(final_params(run), final_params(reference))


# ---------------------------------------------------------------- slots


def test_a_slot_torn_by_a_killed_writer_leaves_the_other_whole(tmp_path):
    run = tmp_path / "run"
    state = {"w": torch.arange(6, dtype=torch.float32), "meta": {"step": 0, "pairs": (1, 2), 3: float("nan")}}
    snaps = snapshot.Snapshots(1, run, WorldInfo(), lambda: {"model": state}, lambda: {"rng": torch.ones(3)})
    try:
        snaps.save(1)
        state["w"] += 1
        snaps.save(2)
        newest = max(snapshot.slots(run), key=lambda s: s.step)
        back = snapshot.read(newest)
        assert torch.equal(back["model"]["w"], torch.arange(6, dtype=torch.float32) + 1)  # the bytes of the step
        meta = back["model"]["meta"]
        assert meta["pairs"] == (1, 2) and meta[3] != meta[3]  # tuples, int keys, NaN
        assert torch.equal(back["state"]["rng"], torch.ones(3))
        with open(newest.path, "r+b") as f:  # the writer of step 3 died after clearing the slot's whole flag
            f.seek(8)
            f.write(b"\0")
        assert [s.step for s in snapshot.slots(run)] == [1]
        again = snapshot.Snapshots(1, run, WorldInfo(), lambda: {"model": state}, dict)
        assert again.slot == int(newest.path.name.split(".")[1])  # a restarted writer fills the torn slot first
        assert snapshot.restorable_steps(snapshot.slots(run), sharded=False) == {1}
    finally:
        snapshot.remove(run)
    assert not snapshot.snapshot_dir(run).exists()
