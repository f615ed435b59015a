"""Training time lost per checkpoint save: synchronous against asynchronous.

One process, MLP 784-2048x4-10 with AdamW (about 57 MB of weights, 170 MB with optimizer state).
Two figures per save: the stall (time the training loop waits in the save call: the whole write
when synchronous, the copy to host memory when asynchronous) and the end-to-end loss (time of a
run with saves minus the same run without, divided by the saves; includes the background writer
competing for the CPU). Runs alternate; figures are medians.

    python benchmarks/bench_checkpoint.py [--rounds 3] [--steps 130] [--every 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from _common import machine, median, table


def train_run(steps: int, run_dir: str, every: int | None, async_save: bool) -> tuple[float, list[float]]:
    """(seconds from step 10 to the end, stall of each save)."""
    import torch

    from shoal import engine
    from shoal.checkpoint import Checkpointer
    from shoal.config import JobConfig
    from shoal.dist import WorldInfo

    torch.set_num_threads(2)
    cfg = JobConfig().replace(
        {
            "data.dataset": "synthetic",
            "data.num_samples": 4096,
            "data.input_shape": [784],
            "data.val_fraction": 0.0,
            "model.width": 2048,
            "model.depth": 4,
            "optim.name": "adamw",
            "data.batch_size": 64,
            "train.max_steps": steps,
            "train.eval_every": 0,
            "log.every": 10,
            "log.progress": "none",
            "log.tensorboard": False,
            "checkpoint.every_steps": every,
            "checkpoint.at_end": False,
            "checkpoint.async": async_save,
            "run.dir": run_dir,
        }
    )
    job = engine.build_job(cfg, WorldInfo(), torch.device("cpu"))
    saver = Checkpointer(cfg.checkpoint, __import__("pathlib").Path(run_dir), WorldInfo())
    marks: dict[int, float] = {}
    engine.train(job, lambda r: marks.setdefault(r["step"], time.perf_counter()), saver)
    return marks[steps] - marks[10], saver.stalls


def state_mb() -> float:
    from shoal.config import ModelConfig
    from shoal.data.spec import DataSpec
    from shoal.models import build_model

    m = build_model(
        ModelConfig(width=2048, depth=4), DataSpec(task="classification", input_shape=(784,), num_classes=10), 10
    )
    return sum(p.numel() for p in m.parameters()) * 4 * 3 / 2**20  # weights + two AdamW moments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=130)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args()
    rows = []
    stall = {"sync": [], "async": []}
    lost = {"sync": [], "async": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as d:
            base, _ = train_run(args.steps, f"{d}/none", None, False)
            for mode in ("sync", "async"):
                t, stalls = train_run(args.steps, f"{d}/{mode}", args.every, mode == "async")
                stall[mode].append(statistics.median(stalls))
                lost[mode].append((t - base) / len(stalls))
        rows.append([r + 1, base, stall["sync"][-1], stall["async"][-1], lost["sync"][-1], lost["async"][-1]])
        print(
            f"round {r + 1}: stall per save sync {stall['sync'][-1]:.3f} s, async {stall['async'][-1]:.3f} s",
            flush=True,
        )
    print(f"\nstate {state_mb():.0f} MB (weights + AdamW moments), a save every {args.every} steps; {machine()}")
    print(
        table(
            [
                "round",
                "run without saves (s)",
                "stall/save sync (s)",
                "stall/save async (s)",
                "lost/save sync (s)",
                "lost/save async (s)",
            ],
            rows,
        )
    )
    s, a = median(stall["sync"]), median(stall["async"])
    print(f"\nmedian stall per save: sync {s:.3f} s, async {a:.3f} s, async / sync {a / s:.3f}")
    print(f"median end-to-end loss per save: sync {median(lost['sync']):.3f} s, async {median(lost['async']):.3f} s")


if __name__ == "__main__":
    main()
