"""Batch ramp: the accumulation schedule, its equality with phases of hand-set train.grad_accum_steps on 2 real
ranks, the lr it logs under lr_scaling, exact resume."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.batch import BatchSchedule
from shoal.config import JobConfig, config_from_dict
from shoal.dist import WorldInfo
from shoal.engine import train_step
from shoal.errors import ConfigError
from shoal.job import build_job

from _ranks import spawn_ranks
from conftest import free_ports


def cfg_with(**updates) -> JobConfig:
    base = {
        "data.dataset": "synthetic",
        "data.num_samples": 4000,
        "data.input_shape": [8],
        "data.num_classes": 4,
        "data.batch_size": 16,
        "data.shuffle": False,
        "model.width": 16,
        "optim.name": "sgd",
        "optim.lr": 0.1,
        "train.eval_every": 0,
        "log.tensorboard": False,
        "scaling.num_workers": 2,
    }
    return JobConfig().replace({**base, **updates})


def test_ramp_counts_and_lr_scaling():
    cfg = cfg_with(**{"train.batch_ramp": {"start": 64, "end": 256, "steps": 6, "lr_scaling": "linear"}})
    b = BatchSchedule(cfg, data_world=2)  # one micro-batch on every rank = 32 samples
    assert [b.accum(step) for step in range(1, 10)] == [2, 3, 4, 5, 6, 7, 8, 8, 8]  # step numbers, 1-based
    assert [b.accum(step) * b.unit for step in (1, 7)] == [64, 256]  # global batches
    assert b.lr_factor(1) == 1.0 and b.lr_factor(7) == 4.0
    sqrt = BatchSchedule(
        cfg_with(**{"train.batch_ramp": {"start": 64, "end": 256, "steps": 6, "lr_scaling": "sqrt"}}), 2
    )
    assert sqrt.lr_factor(7) == 2.0


def test_auto_grows_towards_the_noise_scale_within_bounds_and_never_shrinks():
    b = BatchSchedule(cfg_with(**{"train.batch_ramp": "auto"}), data_world=2)
    assert (b.start_k, b.end_k) == (1, 8)
    b.adapt(100.0)
    assert b.accum(1) == 3  # floor(100 / 32)
    b.adapt(10.0)
    assert b.accum(1) == 3
    b.adapt(1e9)
    assert b.accum(6) == 8
    assert b.state_dict() == {"current": 8}


@pytest.mark.parametrize(
    "updates, key",
    [
        ({"train.batch_ramp": {"start": 48, "end": 256, "steps": 6}}, "multiple of data.batch_size"),
        ({"train.batch_ramp": {"end": 256, "steps": 6}, "train.grad_accum_steps": 2}, "grad_accum_steps"),
        ({"train.batch_ramp": {"end": 64}}, "give end and steps"),
        ({"train.batch_ramp": "auto", "strategy": "fsdp"}, "auto follows"),
    ],
)
def test_ramp_config_errors(updates, key):
    with pytest.raises(ConfigError, match=key):
        cfg_with(**updates)


def steps_on_rank(cfg_dict: dict, counts: list[int] | None) -> dict:
    """Train max_steps steps, the accumulation count per step from the config or, with counts, set by hand
    (test_optim's gradient-noise test trains its ranks through this)."""
    from shoal import dist

    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    used = []
    for t in range(cfg.train.max_steps):
        if counts is not None:
            job.batch.start_k = job.batch.end_k = counts[t]
        used.append(job.batch.accum(job.counters.step + 1))
        train_step(job)
    return {
        "params": {k: v.clone() for k, v in job.bare_model.state_dict().items()},
        "used": used,
        "samples": job.counters.samples,
    }


def runs_in_sequence(runs: list[tuple[dict, bool]], ports: list[int]) -> list[dict]:
    """run_worker for each (config, resume) in turn, in the same rank processes (one spawn for them all); each run
    its own port, so a rank that starts the next run early never meets the store of the last one."""
    import os

    from shoal.worker import run_worker

    out = []
    for (cfg_dict, resume), port in zip(runs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        summary = run_worker(config_from_dict(cfg_dict), resume=resume)
        out.append({"steps": summary["steps"], "samples": summary["samples"]})
    return out


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_rank_ramp_equals_phases_of_hand_set_grad_accum_steps_resumed_from_checkpoints(tmp_path):
    """The reference never sees a ramp: train.grad_accum_steps and optim.lr are set by hand in phases, each a
    new run resumed from the previous phase's checkpoint."""
    from shoal.checkpoint import find_latest

    quiet = {"log.every": 1, "schedule.name": "constant", "schedule.warmup_steps": 0}
    # 2 ranks x data.batch_size 16: one micro-batch on every rank is 32 samples. Ramp 32 -> 128 over 6 steps:
    # step t (1-based) takes 1 + floor(3 (t - 1) / 6) micro-batches, by hand: 1 1 2 2 3 3 4
    ramp = cfg_with(
        **quiet,
        **{
            "train.max_steps": 7,
            "train.batch_ramp": {"start": 32, "end": 128, "steps": 6, "lr_scaling": "linear"},
            "run.dir": str(tmp_path / "ramp"),
        },
    )
    phases = [(2, 1), (4, 2), (6, 3), (7, 4)]  # (train.max_steps at the phase's end, micro-batches per step)
    hand = [
        (
            cfg_with(
                **quiet,
                **{
                    "train.max_steps": until,
                    "train.grad_accum_steps": k,
                    "optim.lr": 0.1 * k,  # lr_scaling linear, by hand: optim.lr x batch / start batch
                    "run.dir": str(tmp_path / "hand"),
                },
            ).to_dict(),
            i > 0,
        )
        for i, (until, k) in enumerate(phases)
    ]
    runs = [(ramp.to_dict(), False), *hand]
    out = spawn_ranks(runs_in_sequence, 2, runs, free_ports(len(runs)), timeout_s=240)
    assert [r["steps"] for r in out[0]] == [7, 2, 4, 6, 7]
    assert out[0][0]["samples"] == out[0][-1]["samples"] == 32 * (1 + 1 + 2 + 2 + 3 + 3 + 4)

    batches = [32, 32, 64, 64, 96, 96, 128]
    for run in ("ramp", "hand"):
        records = logged(tmp_path / run)
        assert [r["step"] for r in records] == list(range(1, 8))
        samples = [r["samples"] for r in records]
        assert [b - a for a, b in zip([0, *samples], samples)] == batches, run  # samples each step read
        assert [r["batch"] for r in records] == batches, run
        assert [r["lr"] for r in records] == pytest.approx([0.1 * b / 32 for b in batches], rel=1e-12), run
    a = torch.load(find_latest(tmp_path / "ramp") / "model.pt", weights_only=True)
    b = torch.load(find_latest(tmp_path / "hand") / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    first = torch.load(tmp_path / "hand" / "checkpoints" / "step-000002" / "model.pt", weights_only=True)
    assert any(not torch.allclose(first[k], b[k]) for k in b)  # the phases trained: the weights moved


@pytest.mark.parametrize("scaling, power", [("linear", 1.0), ("sqrt", 0.5)])
def test_lr_logged_each_step_is_optim_lr_scaled_by_the_batch(tmp_path, scaling, power):
    from shoal.worker import run_worker

    cfg = cfg_with(
        **{
            "scaling.num_workers": 1,
            "train.max_steps": 6,
            "log.every": 1,
            "schedule.name": "constant",
            "schedule.warmup_steps": 0,
            "train.batch_ramp": {"start": 32, "end": 112, "steps": 4, "lr_scaling": scaling},
            "run.dir": str(tmp_path / "run"),
        }
    )
    run_worker(cfg)
    records = logged(tmp_path / "run")
    # one rank x 16 samples a micro-batch; 2 -> 7 micro-batches over 4 steps: 2 + floor(5 (t - 1) / 4) at step t
    batches = [32, 48, 64, 80, 112, 112]
    samples = [r["samples"] for r in records]
    assert [b - a for a, b in zip([0, *samples], samples)] == batches
    assert [r["batch"] for r in records] == batches
    want = [0.1 * (b / 32) ** power for b in batches]
    assert [r["lr"] for r in records] == pytest.approx(want, rel=1e-12)
    assert records[-1]["lr"] == pytest.approx({"linear": 0.35, "sqrt": 0.1 * 3.5**0.5}[scaling], rel=1e-12)


def test_resume_in_the_middle_of_the_ramp_is_exact(tmp_path):
    from shoal.checkpoint import find_latest

    ramp = {"train.batch_ramp": {"start": 32, "end": 128, "steps": 8}, "checkpoint.every_steps": 4}
    whole = cfg_with(**ramp, **{"train.max_steps": 8, "run.dir": str(tmp_path / "whole")})
    first = cfg_with(**ramp, **{"train.max_steps": 4, "run.dir": str(tmp_path / "cut")})
    rest = cfg_with(**ramp, **{"train.max_steps": 8, "run.dir": str(tmp_path / "cut"), "run.overwrite": True})
    # one spawn for the three; the whole run between the cut one and its resumption, so that nothing the cut run
    # left in the processes is where the resumed one starts
    runs = [(first.to_dict(), False), (whole.to_dict(), False), (rest.to_dict(), True)]
    out = spawn_ranks(runs_in_sequence, 2, runs, free_ports(len(runs)), timeout_s=240)
    assert out[0][2]["steps"] == 8
    a = torch.load(find_latest(tmp_path / "whole") / "model.pt", weights_only=True)
    b = torch.load(find_latest(tmp_path / "cut") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world, pieces", [(2, 1), (1, 2), (3, 1)])
def test_elastic_steps_keep_the_configured_samples_at_any_world(world, pieces):
    cfg = cfg_with(
        **{"scaling.min_workers": 1, "scaling.max_failures": 1, "train.grad_accum_steps": 3, "data.batch_size": 16}
    )
    b = BatchSchedule(cfg, data_world=world)
    assert b.unit == 32 and b.pieces == pieces  # one unit = 16 x 2 configured ranks, cut for the ranks present
    assert b.accum(1) == 3 * pieces
    assert b.samples(1, rows=999, data_world=world) == 96  # the configured global batch, whatever a rank read
    assert b.lr_factor(1) == 1.0
