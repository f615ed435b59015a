"""Batch size that adapts, measured: (1) the cost of measuring the gradient noise scale on the step,
(2) steps and wall time to the quickstart's target validation loss with a batch ramp against a fixed batch.

    python benchmarks/bench_batch.py [--rounds 5] [--steps 200]

(1) 2 gloo ranks, MLP 784-1024-1024-10 on synthetic data, batch 64 per rank: time per step with
train.gns_every 10 (the default) and 1, each over gns_every 0, alternating which runs first.
(2) 2 ranks on digits: fixed global batch 64 against train.batch_ramp {start 64, end 256, steps 150,
lr_scaling sqrt}, evaluating every 10 steps until val_loss <= --target.
"""

from __future__ import annotations

import argparse
import time

import torch

from shoal.config import JobConfig, config_from_dict

from _common import machine, median, spawn_ranks, table


def rank_job(cfg_dict: dict):
    """This spawned rank's job on gloo, one thread per rank."""
    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.job import build_job

    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 120, torch.device("cpu"))
    torch.set_num_threads(1)
    return build_job(config_from_dict(cfg_dict), world, torch.device("cpu"))


def timed(cfg_dict: dict, steps: int) -> float:
    from shoal import dist
    from shoal.engine import train_step

    job = rank_job(cfg_dict)
    for _ in range(10):
        train_step(job)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        train_step(job)
    float(job.gns.sums.sum())  # wait for the last step's work
    return (time.perf_counter() - start) / steps


def to_target(cfg_dict: dict, target: float) -> dict:
    from shoal.engine import evaluate, train_step

    job = rank_job(cfg_dict)
    cfg = job.cfg
    start = time.perf_counter()
    while job.counters.step < cfg.train.max_steps:
        train_step(job)
        if job.counters.step % 10 == 0 and evaluate(job)["val_loss"] <= target:
            break
    return {"steps": job.counters.step, "seconds": time.perf_counter() - start, "samples": job.counters.samples}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--target", type=float, default=0.12)
    args = p.parse_args()
    big = {
        "data.dataset": "synthetic",
        "data.input_shape": [784],
        "data.num_samples": 20000,
        "data.batch_size": 64,
        "model.width": 1024,
        "model.depth": 2,
        "train.eval_every": 0,
        "log.tensorboard": False,
    }
    ratios: dict[int, list[float]] = {10: [], 1: []}
    for r in range(args.rounds):
        for every in (10, 1):
            pair = [JobConfig().replace({**big, "train.gns_every": e}).to_dict() for e in (0, every)]
            order = pair if r % 2 == 0 else pair[::-1]
            times = [spawn_ranks(timed, 2, c, args.steps, timeout_s=600)[0] for c in order]
            off, on = times if r % 2 == 0 else times[::-1]
            ratios[every].append(on / off)
            print(f"round {r} gns_every={every}: {on / off:.3f} ({on * 1e3:.2f} vs {off * 1e3:.2f} ms)", flush=True)
    quick = {"train.max_steps": 600, "train.eval_every": 0, "log.tensorboard": False, "optim.lr": 0.003}
    fixed = spawn_ranks(to_target, 2, JobConfig().replace(quick).to_dict(), args.target, timeout_s=600)[0]
    ramp = {**quick, "train.batch_ramp": {"start": 64, "end": 256, "steps": 150, "lr_scaling": "sqrt"}}
    ramped = spawn_ranks(to_target, 2, JobConfig().replace(ramp).to_dict(), args.target, timeout_s=600)[0]
    print(f"\n{machine()}\n")
    print(
        table(
            ["gns_every", "step time / off (median)", "rounds"],
            [[e, median(v), ", ".join(f"{x:.3f}" for x in v)] for e, v in ratios.items()],
        )
    )
    print()
    print(
        table(
            [f"quickstart to val_loss <= {args.target:.2f}", "steps", "seconds", "samples"],
            [
                ["fixed batch 64", fixed["steps"], fixed["seconds"], fixed["samples"]],
                ["ramp 64 -> 256 (sqrt lr)", ramped["steps"], ramped["seconds"], ramped["samples"]],
            ],
        )
    )


if __name__ == "__main__":
    main()
