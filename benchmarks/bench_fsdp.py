"""strategy fsdp against allreduce on 2 gloo ranks: bytes per rank, step time, checkpoint save and load,
and activation checkpointing's memory and time.

A transformer_lm of about 50M parameters (width 512, 16 layers, tied embeddings; AdamW; 8 x 64 tokens
per rank) trains a few steps under each strategy (and fsdp with reshard_after_forward: false); each
rank reports the bytes of parameters, gradients and optimizer
state it holds, its peak RSS, the median step time, and the seconds a checkpoint takes to save
(sync) and to load on resume. Then a smaller model (width 256, 8 layers) trains with and without
train.activation_checkpointing, counting the bytes the forward saves for backward. Runs alternate
strategies; ratios are taken within a round.

    python benchmarks/bench_fsdp.py [--rounds 2] [--steps 6]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import machine, median, spawn_ranks, table

BIG = {"model.width": 512, "model.depth": 16, "model.heads": 8, "data.seq_len": 64, "data.batch_size": 8}
SMALL = {"model.width": 256, "model.depth": 8, "model.heads": 4, "data.seq_len": 64, "data.batch_size": 4}


def config(strategy: str, shape: dict, steps: int, run_dir: str, **extra):
    from shoal.config import JobConfig

    return JobConfig().replace(
        {
            "strategy": strategy,
            "data.dataset": "synthetic",
            "data.task": "lm",
            "data.vocab_size": 256,
            "data.num_samples": 4000,
            "model.name": "transformer_lm",
            "optim.name": "adamw",
            "optim.lr": 1e-4,
            "train.max_steps": steps,
            "train.eval_every": 0,
            "log.every": 1,
            "log.progress": "none",
            "log.tensorboard": False,
            "checkpoint.at_end": False,
            "run.dir": run_dir,
            **shape,
            **extra,
        }
    )


VARIANTS = {
    "allreduce": ("allreduce", {}),
    "fsdp": ("fsdp", {}),
    "fsdp no reshard": ("fsdp", {"fsdp.reshard_after_forward": False}),
}


def big_rank(variant: str, steps: int, run_dir: str) -> dict:
    """Train, then time a save and a load of the full train state (model, optimizer, the rest)."""
    import torch

    from shoal import checkpoint, dist
    from shoal.dist import WorldInfo
    from shoal.engine import train_step
    from shoal.job import build_job

    strategy, extra = VARIANTS[variant]
    cfg = config(strategy, BIG, steps, run_dir, **extra)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 600, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"), Path(run_dir))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        train_step(job)
        times.append(time.perf_counter() - t)
    dist.barrier()
    t = time.perf_counter()
    job.checkpointer.save(job.state.collect(), steps, {}, 0)
    dist.barrier()
    save_s = time.perf_counter() - t
    latest = checkpoint.find_latest(Path(run_dir)) if world.is_main else None
    latest = dist.broadcast_object(latest)
    t = time.perf_counter()
    job.state.restore(checkpoint.load(latest)[1], latest)
    dist.barrier()
    load_s = time.perf_counter() - t
    return {"step_s": median(times[1:]), "save_s": save_s, "load_s": load_s, **job.strategy.memory(job.optimizer)}


def ac_rank(strategy: str, mode: str, steps: int) -> dict:
    """Step time and bytes saved for backward at one step, with train.activation_checkpointing = mode."""
    import torch

    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.engine import train_step
    from shoal.job import build_job

    cfg = config(strategy, SMALL, steps, "unused", **{"train.activation_checkpointing": mode})
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 600, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    times = []
    for i in range(steps):
        t = time.perf_counter()
        if i == 1:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                train_step(job)
        else:
            train_step(job)
        times.append(time.perf_counter() - t)
    return {"step_s": median(times[1:]), "saved_mb": saved[0] / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    rows, ratios = [], {}
    for r in range(args.rounds):
        got = {}
        for variant in list(VARIANTS)[::-1] if r % 2 else list(VARIANTS):  # alternate the order
            with tempfile.TemporaryDirectory() as d:
                got[variant] = spawn_ranks(big_rank, 2, variant, args.steps, d + "/run", timeout_s=3600)[0]
        base = got["allreduce"]
        held = {v: g["params_mb"] + g["grads_mb"] + g["optimizer_mb"] for v, g in got.items()}
        for v, g in got.items():
            rows.append(
                [
                    r + 1,
                    v,
                    g["params_mb"],
                    g["grads_mb"],
                    g["optimizer_mb"],
                    held[v],
                    g["peak_mb"],
                    g["step_s"],
                    g["save_s"],
                    g["load_s"],
                ]
            )
            if v != "allreduce":
                figures = {
                    "bytes": held[v] / held["allreduce"],
                    "step": g["step_s"] / base["step_s"],
                    "save": g["save_s"] / base["save_s"],
                    "load": g["load_s"] / base["load_s"],
                }
                for k, x in figures.items():
                    ratios.setdefault(v, {}).setdefault(k, []).append(x)
                print(
                    f"round {r + 1}, {v} / allreduce: " + ", ".join(f"{k} {x:.3f}" for k, x in figures.items()),
                    flush=True,
                )
    print(
        f"\ntransformer_lm width 512 x 16 layers (about 50M parameters), 8 x 64 tokens per rank, 2 ranks gloo, rank 0's figures; {machine()}"
    )
    print(
        table(
            [
                "round",
                "strategy",
                "params MiB",
                "grads MiB",
                "optimizer MiB",
                "held MiB",
                "peak RSS MiB",
                "step s",
                "save s",
                "load s",
            ],
            rows,
        )
    )
    for v, figs in ratios.items():
        print(f"{v} / allreduce, median over rounds: " + ", ".join(f"{k} {median(x):.3f}" for k, x in figs.items()))
    ac_rows = []
    for strategy in ("allreduce", "fsdp"):
        base = None
        for mode in ("none", "every_n", "full"):
            got = spawn_ranks(ac_rank, 2, strategy, mode, args.steps, timeout_s=3600)[0]
            base = base or got
            ac_rows.append(
                [
                    strategy,
                    mode,
                    got["saved_mb"],
                    got["saved_mb"] / base["saved_mb"],
                    got["step_s"],
                    got["step_s"] / base["step_s"],
                ]
            )
    print("\nactivation checkpointing, transformer_lm width 256 x 8 layers, 4 x 64 tokens per rank:")
    print(
        table(
            ["strategy", "train.activation_checkpointing", "saved for backward MiB", "vs none", "step s", "vs none"],
            ac_rows,
        )
    )


if __name__ == "__main__":
    main()
