"""Batch ramp: the accumulation schedule, its equality with hand-set counts on 2 real ranks, exact resume."""

from __future__ import annotations

import pytest
import torch

from shoal.batch import BatchSchedule
from shoal.config import JobConfig, config_from_dict
from shoal.dist import WorldInfo
from shoal.engine import train_step
from shoal.errors import ConfigError
from shoal.job import build_job

from _ranks import spawn_ranks


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
    assert [b.accum(t) for t in range(9)] == [2, 3, 4, 5, 6, 7, 8, 8, 8]
    assert [b.global_batch(t) for t in (0, 6)] == [64, 256]
    assert b.lr_factor(0) == 1.0 and b.lr_factor(6) == 4.0
    sqrt = BatchSchedule(
        cfg_with(**{"train.batch_ramp": {"start": 64, "end": 256, "steps": 6, "lr_scaling": "sqrt"}}), 2
    )
    assert sqrt.lr_factor(6) == 2.0


def test_auto_grows_towards_the_noise_scale_within_bounds_and_never_shrinks():
    b = BatchSchedule(cfg_with(**{"train.batch_ramp": "auto"}), data_world=2)
    assert (b.start_k, b.end_k) == (1, 8)
    b.adapt(100.0)
    assert b.accum(0) == 3  # floor(100 / 32)
    b.adapt(10.0)
    assert b.accum(0) == 3
    b.adapt(1e9)
    assert b.accum(5) == 8
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
    """Train len(counts) steps: with the config's ramp (counts None) or with the accumulation set by hand."""
    from shoal import dist

    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    used = []
    for t in range(cfg.train.max_steps):
        if counts is not None:
            job.batch.start_k = job.batch.end_k = counts[t]  # the hand-written schedule
        used.append(job.batch.accum(job.counters.step))
        train_step(job)
    return {
        "params": {k: v.clone() for k, v in job.bare_model.state_dict().items()},
        "used": used,
        "samples": job.counters.samples,
    }


def test_two_rank_ramp_equals_hand_set_accumulation_counts():
    ramp = cfg_with(**{"train.max_steps": 7, "train.batch_ramp": {"start": 32, "end": 128, "steps": 6}})
    plain = cfg_with(**{"train.max_steps": 7})
    got = spawn_ranks(steps_on_rank, 2, ramp.to_dict(), None)
    want = spawn_ranks(steps_on_rank, 2, plain.to_dict(), [1, 1, 2, 2, 3, 3, 4])
    assert got[0]["used"] == [1, 1, 2, 2, 3, 3, 4] and got[0]["samples"] == 16 * 32
    for k, v in want[0]["params"].items():
        assert torch.allclose(got[0]["params"][k], v, atol=1e-6, rtol=0), k
        assert torch.equal(got[0]["params"][k], got[1]["params"][k])  # replicas identical


def run_worker_rank(cfg_dict: dict, resume: bool) -> dict:
    from shoal.worker import run_worker

    summary = run_worker(config_from_dict(cfg_dict), resume=resume)
    return {"steps": summary["steps"], "samples": summary["samples"]}


def test_resume_in_the_middle_of_the_ramp_is_exact(tmp_path):
    from shoal.checkpoint import find_latest

    ramp = {"train.batch_ramp": {"start": 32, "end": 128, "steps": 8}, "checkpoint.every_steps": 4}
    whole = cfg_with(**ramp, **{"train.max_steps": 8, "run.dir": str(tmp_path / "whole")})
    spawn_ranks(run_worker_rank, 2, whole.to_dict(), False)
    first = cfg_with(**ramp, **{"train.max_steps": 4, "run.dir": str(tmp_path / "cut")})
    spawn_ranks(run_worker_rank, 2, first.to_dict(), False)
    rest = cfg_with(**ramp, **{"train.max_steps": 8, "run.dir": str(tmp_path / "cut"), "run.overwrite": True})
    out = spawn_ranks(run_worker_rank, 2, rest.to_dict(), True)
    assert out[0]["steps"] == 8
    a = torch.load(find_latest(tmp_path / "whole") / "model.pt", weights_only=True)
    b = torch.load(find_latest(tmp_path / "cut") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
