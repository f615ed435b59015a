"""Mixed precision: fp16 unscales before clipping and skips inf steps; bf16 trains on CPU.

The fp16 tests run on CPU too (GradScaler supports it); the `cuda` variants repeat them on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.engine import train_step
from shoal.job import build_job

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda),
]


def cfg_for(precision: str, device: str, **updates) -> JobConfig:
    base = {
        "data.dataset": "synthetic",
        "data.num_samples": 512,
        "data.input_shape": [16],
        "data.num_classes": 4,
        "data.batch_size": 32,
        "model.width": 32,
        "optim.name": "sgd",
        "optim.lr": 1.0,
        "train.precision": precision,
        "scaling.device": "cuda",  # fp16 is allowed by the config only for CUDA; the tests build on `device`
        "train.eval_every": 0,
    }
    base.update(updates)
    return JobConfig().replace(base)


def flat_params(job) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in job.bare_model.parameters()])


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_clips_unscaled_gradients(device):
    fp16 = build_job(cfg_for("fp16", device, **{"train.clip_grad_norm": 0.01}), WorldInfo(), torch.device(device))
    fp32 = build_job(cfg_for("fp32", device, **{"train.clip_grad_norm": 0.01}), WorldInfo(), torch.device(device))
    assert fp16.precision.scale == 65536.0
    before = flat_params(fp16)
    r16, r32 = train_step(fp16), train_step(fp32)
    # the reported norm is the true one, not 65,536 times it
    assert r16.grad_norm.item() == pytest.approx(r32.grad_norm.item(), rel=2e-2)
    assert 0.01 < r16.grad_norm.item() < 100
    # the update is clipped to lr x 0.01: clipping scaled gradients would give a ~65,536x smaller step
    step_norm = (flat_params(fp16) - before).norm().item()
    assert step_norm == pytest.approx(0.01, rel=1e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_inf_step_is_skipped_and_scale_backs_off(device):
    job = build_job(cfg_for("fp16", device), WorldInfo(), torch.device(device))
    stream = job.data.train
    before = flat_params(job)

    def with_inf_first():
        for i, (x, y) in enumerate(stream):
            if i == 0:
                x = x.clone()
                x[0, 0] = math.inf
            yield x, y

    job.data.train = with_inf_first()
    r = train_step(job)
    assert not r.stepped
    assert job.precision.scale == 32768.0
    assert torch.equal(flat_params(job), before)
    r = train_step(job)
    assert r.stepped and math.isfinite(r.loss_sum.item())
    assert not torch.equal(flat_params(job), before)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_trains(device):
    job = build_job(cfg_for("bf16", device, **{"optim.lr": 0.5}), WorldInfo(), torch.device(device))
    x, _ = next(job.data.train)
    with job.precision.autocast():
        assert job.model(x).dtype == torch.bfloat16
    losses = [(lambda r: r.loss_sum.item() / r.count)(train_step(job)) for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5
