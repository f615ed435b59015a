"""Shoal's time per optimizer step against a hand-written raw DDP loop: same model, data, batch.

2 ranks on gloo, one thread each (as torchrun sets), MLP 784-1024-1024-10, SGD with momentum,
batch 64 per rank, synthetic data held in memory. Rounds alternate raw and Shoal (and which goes
first) so both see the same machine load; each run's time per step is the median over 10-step
windows, and the figure is the median of the per-round ratios.

    python benchmarks/bench_step.py [--rounds 3] [--steps 200] [--warmup 30]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import machine, median, spawn_ranks, table

WIDTH, IN, CLASSES, BATCH = 1024, 784, 10, 64


def job_config(steps: int, run_dir: str, accum: int = 1, overrides: tuple[str, ...] = ()):
    from shoal.config import JobConfig, parse_override

    extra = dict(parse_override(o) for o in overrides)
    return JobConfig().replace(
        {
            "name": "bench-step",
            "data.dataset": "synthetic",
            "data.num_samples": 20000,
            "data.val_fraction": 0.0,
            "data.input_shape": [IN],
            "data.num_classes": CLASSES,
            "data.batch_size": BATCH,
            "model.width": WIDTH,
            "model.depth": 2,
            "optim.name": "sgd",
            "optim.lr": 0.01,
            "optim.momentum": 0.9,
            "train.max_steps": steps,
            "train.eval_every": 0,
            "train.grad_accum_steps": accum,
            "log.every": 10,
            "log.progress": "none",
            "run.dir": run_dir,
            **extra,
        }
    )


def shoal_rank(steps: int, warmup: int, run_dir: str, accum: int, overrides: tuple[str, ...] = ()) -> float:
    """Seconds per step of Shoal's own loop (run_worker: metrics, TensorBoard, all of it)."""
    from shoal.worker import run_worker

    marks: dict[int, float] = {}
    run_worker(
        job_config(warmup + steps + 10, run_dir, accum, overrides),
        report=lambda r: marks.setdefault(r["step"], time.perf_counter()),
    )
    if not marks:  # only rank 0 reports
        return float("nan")
    return median_window(marks, warmup, steps)


def median_window(marks: dict[int, float], warmup: int, steps: int) -> float:
    """Seconds per step: the median over 10-step windows (robust to a noisy neighbour on 2 cores)."""
    points = sorted(s for s in marks if warmup <= s <= warmup + steps)
    return median([(marks[b] - marks[a]) / (b - a) for a, b in zip(points, points[1:])])


def raw_rank(steps: int, warmup: int, accum: int) -> float:
    """Seconds per step of a plain DDP loop over the same model and data."""
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    from shoal.config import DataConfig
    from shoal.data.memory import SyntheticData

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = SyntheticData(
        DataConfig(dataset="synthetic", num_samples=20000, val_fraction=0.0, input_shape=[IN], num_classes=CLASSES),
        "train",
        0,
    )
    x_all, y_all = data.get_batch(np.arange(len(data)))
    torch.manual_seed(0)
    model = DDP(
        nn.Sequential(nn.Linear(IN, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, CLASSES))
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
    per_step = world * BATCH
    marks: dict[int, float] = {}
    pos = 0
    for step in range(warmup + steps + 1):
        if step >= warmup and step % 10 == 0:
            marks[step] = time.perf_counter()
        for i in range(accum):
            if pos + per_step > len(perm):
                pos = 0
            idx = perm[pos + rank * BATCH : pos + (rank + 1) * BATCH]
            pos += per_step
            ctx = model.no_sync() if i < accum - 1 else torch.enable_grad()
            with ctx:
                loss = F.cross_entropy(model(x_all[idx]), y_all[idx]) / accum
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.destroy_process_group()
    return median_window(marks, warmup, steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra Shoal config override")
    args = p.parse_args()
    rows = []
    ratios = []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:

            def shoal() -> float:
                return spawn_ranks(
                    shoal_rank, 2, args.steps, args.warmup, d + "/run", args.accum, tuple(args.set), timeout_s=600
                )[0]

            if r % 2:  # alternate which goes first: no order bias
                sh, raw = shoal(), spawn_ranks(raw_rank, 2, args.steps, args.warmup, args.accum, timeout_s=600)[0]
            else:
                raw, sh = spawn_ranks(raw_rank, 2, args.steps, args.warmup, args.accum, timeout_s=600)[0], shoal()
        ratios.append(sh / raw)
        rows.append([r + 1, raw * 1000, sh * 1000, sh / raw])
        print(
            f"round {r + 1}: raw {raw * 1000:.2f} ms/step, shoal {sh * 1000:.2f} ms/step, ratio {sh / raw:.3f}",
            flush=True,
        )
    print()
    print(
        f"2 ranks gloo, MLP {IN}-{WIDTH}-{WIDTH}-{CLASSES}, batch {BATCH}/rank, accumulation {args.accum}; {machine()}"
    )
    print(table(["round", "raw DDP ms/step", "Shoal ms/step", "Shoal / raw"], rows))
    print(f"\nmedian ratio Shoal / raw DDP: {median(ratios):.3f}")


if __name__ == "__main__":
    main()
