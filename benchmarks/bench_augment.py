"""Step time of the image augmentations on the quickstart-sized CNN (digits as 8x8 images, batch 32, one
process): none, against [crop, hflip] and [crop, hflip, rotate, noise], made in the training process
(data.num_workers 0) or on one loader worker (data.num_workers 1), alternating rounds.

    python benchmarks/bench_augment.py [--rounds 3] [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.engine import train_step
from shoal.job import build_job

from _common import machine, median, table

SETS = {"crop, hflip": ["crop", "hflip"], "crop, hflip, rotate, noise": ["crop", "hflip", "rotate", "noise"]}


def step_ms(augment: list, workers: int, steps: int) -> float:
    cfg = JobConfig().replace(
        {
            "model.name": "cnn",
            "model.width": 32,
            "data.augment": augment,
            "data.num_workers": workers,
            "train.eval_every": 0,
            "log.tensorboard": False,
        }
    )
    torch.manual_seed(0)
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    for _ in range(10):
        train_step(job)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(job)
    out = (time.perf_counter() - start) / steps * 1e3
    job.data.train.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args()
    rows = []
    for name, aug in SETS.items():
        for workers in (0, 1):
            ratios = []
            for r in range(args.rounds):
                pair = [([], workers), (aug, workers)]
                times = [step_ms(a, w, args.steps) for a, w in (pair if r % 2 == 0 else pair[::-1])]
                base, augmented = times if r % 2 == 0 else times[::-1]
                ratios.append(augmented / base)
                print(f"{name} workers={workers} round {r}: {augmented:.2f} vs {base:.2f} ms", flush=True)
            where = "training process" if workers == 0 else "1 loader worker"
            rows.append([name, where, median(ratios), ", ".join(f"{x:.2f}" for x in ratios)])
    print(f"\n{machine()}\n")
    print(table(["augment", "made on", "step time / none (median)", "rounds"], rows))


if __name__ == "__main__":
    main()
