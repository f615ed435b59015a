"""train.compile (model, blocks) against eager on a small GPT: step time once compiled, and the compile time paid.

Shoal's transformer_lm (width 128, 4 layers, 4 heads by default: bench_lm's shape; --width/--depth for a GPU),
synthetic token sequences, AdamW, fp32, one rank on the device `scaling.device: auto` picks (a GPU where there is
one). Each round runs eager, model and blocks in a fresh process with an empty inductor cache (the compile a first
run pays), in an order that rotates per round. Step time is the median over the steps after --warmup; the figures
are the medians over rounds of each mode's ratio to the same round's eager step, and of compile_s (TorchDynamo's
own timers, as startup.json records it).

    python benchmarks/bench_compile.py [--rounds 3] [--steps 200] [--width 128] [--depth 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import machine, median, spawn_ranks, table

MODES = (False, "model", "blocks")
BATCH, SEQ, VOCAB = 12, 64, 256


def step_seconds(cfg_dict: dict, warmup: int) -> dict:
    """One rank's run (a world of one): the median step time after warmup and the seconds spent compiling."""
    from shoal.config import config_from_dict
    from shoal.models import compile_seconds
    from shoal.worker import run_worker

    marks: dict[int, float] = {}
    summary = run_worker(config_from_dict(cfg_dict), report=lambda r: marks.setdefault(r["step"], time.perf_counter()))
    points = sorted(s for s in marks if s >= warmup)
    per_step = median([(marks[b] - marks[a]) / (b - a) for a, b in zip(points, points[1:])])
    return {"step_s": per_step, "compile_s": compile_seconds() or 0.0, "device": summary["device"]}


def config(mode: str | bool, args: argparse.Namespace, run_dir: Path) -> dict:
    from shoal.config import JobConfig

    return (
        JobConfig()
        .replace(
            {
                "data.dataset": "synthetic",
                "data.task": "lm",
                "data.vocab_size": VOCAB,
                "data.seq_len": SEQ,
                "data.num_samples": 20_000,
                "data.batch_size": BATCH,
                "model.name": "transformer_lm",
                "model.width": args.width,
                "model.depth": args.depth,
                "model.heads": 4,
                "optim.name": "adamw",
                "optim.lr": 1e-3,
                "train.max_steps": args.steps,
                "train.eval_every": 0,
                "train.compile": mode,
                "checkpoint.at_end": False,
                "log.every": 1,
                "log.progress": "none",
                "log.tensorboard": False,
                "run.dir": str(run_dir),
            }
        )
        .to_dict()
    )


def one_round(r: int, args: argparse.Namespace, out: Path) -> dict:
    """Every mode once, in fresh processes with empty inductor caches, the order rotated by the round."""
    results = {}
    for mode in MODES[r % 3 :] + MODES[: r % 3]:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(out / f"cache-{r}-{mode}")  # read by the spawned rank's torch
        results[mode] = spawn_ranks(
            step_seconds, 1, config(mode, args, out / f"run-{r}-{mode}"), args.warmup, timeout_s=3600
        )[0]
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rounds = [one_round(r, args, Path(tmp)) for r in range(args.rounds)]
    rows = [
        [
            str(mode).lower(),
            median([rd[mode]["step_s"] for rd in rounds]) * 1e3,
            median([rd[mode]["step_s"] / rd[False]["step_s"] for rd in rounds]),
            median([rd[mode]["compile_s"] for rd in rounds]),
        ]
        for mode in MODES
    ]
    print(f"{machine()}, device {rounds[0][False]['device']}, {args.rounds} rounds, {args.steps} steps")
    print(table(["train.compile", "ms/step", "step time / eager", "compile_s"], rows))


if __name__ == "__main__":
    main()
