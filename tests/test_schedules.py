"""Cyclical, one-cycle and warm-restart schedules against torch's own lr_scheduler implementations of the papers."""

from __future__ import annotations

import pytest
import torch

from shoal.config import JobConfig
from shoal.optim import Schedule, build_optimizer


def reference(make, steps: int, optimizer_kind=torch.optim.SGD, **opt_kwargs) -> list[tuple[float, float]]:
    """(lr, momentum or beta1) torch's scheduler gives at steps 0..steps-1."""
    p = torch.nn.Parameter(torch.zeros(1))
    opt = optimizer_kind([p], lr=1.0, **opt_kwargs)
    sched = make(opt)
    out = []
    for _ in range(steps):
        g = opt.param_groups[0]
        out.append((g["lr"], g["betas"][0] if "betas" in g else g.get("momentum", 0.0)))
        opt.step()
        sched.step()
    return out


def ours(schedule: dict, steps: int, name: str = "sgd", momentum: float = 0.9) -> list[tuple[float, float]]:
    cfg = JobConfig().replace(
        {
            "optim.name": name,
            "optim.lr": 1.0,
            "optim.momentum": momentum if name == "sgd" else 0.0,
            "train.max_steps": steps,
            **{f"schedule.{k}": v for k, v in schedule.items()},
        }
    )
    model = torch.nn.Linear(1, 1)
    opt = build_optimizer(model, cfg.optim)
    s = Schedule(cfg.schedule, cfg.optim.lr, steps)
    out = []
    for step in range(1, steps + 1):  # the engine's step numbers
        s.apply(opt, step)
        g = opt.param_groups[0]
        out.append((g["lr"], g["betas"][0] if "betas" in g else g["momentum"]))
    return out


def close(a, b, i=0):
    return all(abs(x[i] - y[i]) < 1e-9 for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_cyclic_matches_cycliclr(mode):
    want = reference(
        lambda o: torch.optim.lr_scheduler.CyclicLR(
            o, base_lr=0.1, max_lr=1.0, step_size_up=10, mode=mode, gamma=0.99, cycle_momentum=False
        ),
        65,
        momentum=0.9,
    )
    got = ours({"name": "cyclic", "cycle_steps": 20, "cyclic_mode": mode, "base_lr_ratio": 0.1, "gamma": 0.99}, 65)
    assert close(got, want)
    peak = {"triangular": 1.0, "triangular2": 1.0, "exp_range": 0.1 + 0.9 * 0.99**10}[mode]
    assert got[10][0] == pytest.approx(peak) and got[20][0] == pytest.approx(0.1)  # peak and trough


def test_one_cycle_rate_and_momentum_match_onecyclelr_for_sgd_and_adam():
    make = lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1.0, total_steps=100, pct_start=0.3)  # noqa: E731
    for kind, name, extra in ((torch.optim.SGD, "sgd", {"momentum": 0.9}), (torch.optim.AdamW, "adamw", {})):
        want = reference(make, 100, kind, **extra)
        got = ours({"name": "one_cycle", "pct_start": 0.3}, 100, name)
        assert close(got, want, 0) and close(got, want, 1), name
    assert got[0][0] == pytest.approx(1 / 25) and got[-1][0] == pytest.approx(1 / 25e4)
    assert got[0][1] == pytest.approx(0.95) and min(m for _, m in got) == pytest.approx(0.85)


@pytest.mark.parametrize("mult", [1, 2])
def test_cosine_restarts_match_sgdr(mult):
    want = reference(
        lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=10, T_mult=mult, eta_min=0.05), 75
    )
    got = ours({"name": "cosine_restarts", "restart_period": 10, "restart_mult": mult, "min_lr_ratio": 0.05}, 75)
    assert close(got, want)
    assert got[10][0] == pytest.approx(1.0)  # a restart


def test_schedule_command_draws_the_run(tmp_path):
    from conftest import REPO, shoal_cli

    out = tmp_path / "s.png"
    r = shoal_cli(
        "schedule",
        str(REPO / "configs" / "quickstart.yaml"),
        "schedule.name=one_cycle",
        "schedule.warmup_steps=0",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert "one_cycle: lr 1.2e-08-0.003 over 300 steps, momentum 0.85-0.95" in r.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"
    r = shoal_cli("schedule", str(REPO / "configs" / "quickstart.yaml"), "schedule.name=one_cycle")
    assert r.returncode == 2 and "schedule.warmup_steps" in r.stderr
