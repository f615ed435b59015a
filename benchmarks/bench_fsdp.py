"""strategy fsdp against allreduce on 2 gloo ranks: bytes per rank, step time, checkpoint save and load,
and activation checkpointing's memory and time.

A transformer_lm of about 50M parameters (width 512, 16 layers, tied embeddings; AdamW; 8 x 64 tokens
per rank) trains a few steps under each strategy (and fsdp with reshard_after_forward: false); each
rank reports the bytes of parameters, gradients and optimizer
state it holds, its peak RSS, the median step time, and the seconds a checkpoint takes to save
(sync) and to load on resume. Then a smaller model (width 256, 8 layers) trains with and without
train.activation_checkpointing, counting the bytes the forward saves for backward (a proxy: a tensor saved by
several operations counts several times, and saved weights are no new memory), and measuring what a step really
holds at its peak, in a fresh pair of rank processes per variant, after a warm-up step (the optimizer state
exists, the gradients are freed again): the peak bytes live in torch's CPU allocator over those live before the
step (the profiler's memory events: every allocation and free), and the peak resident set over the one before
it (the process's high-water mark, VmHWM / getrusage ru_maxrss, reset first through /proc/self/clear_refs;
glibc's mmap threshold fixed at 64 KiB in these processes, so a freed tensor leaves the resident set instead of
staying in malloc's heap; what malloc still keeps and hands out again makes this figure the lower). Runs
alternate strategies; ratios are taken within a round.

    python benchmarks/bench_fsdp.py [--rounds 2] [--steps 6] [--only fsdp|ac]
"""

from __future__ import annotations

import argparse
import os
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
    from shoal.strategies.memory import memory_report

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
    return {
        "step_s": median(times[1:]),
        "save_s": save_s,
        "load_s": load_s,
        **memory_report(job.bare_model, job.optimizer, job.strategy.grads_bytes, job.device),
    }


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


def rss_bytes() -> int:
    """This process's resident set now (Linux /proc; 0 where there is none)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """The process's peak resident set: its memory's high-water mark (Linux VmHWM, which /proc/self/clear_refs
    resets), else getrusage's ru_maxrss (KiB on Linux, bytes on macOS). On Linux ru_maxrss is the larger of that
    mark and the one kept when any thread of the process exited, so after a reset it can still report an older
    peak; VmHWM cannot."""
    import resource
    import sys

    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def reset_peak_rss() -> bool:
    """Reset the peak resident set to the current one (Linux 4.0+: "5" to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def allocator_peak_bytes(step) -> int:
    """Peak bytes live in torch's CPU allocator during step(), over what was live at its start: every allocation
    and free the profiler's memory events report, summed in time order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def ac_memory_rank(strategy: str, mode: str) -> dict:
    """What one training step holds at its peak, after a warm-up step: the resident set's peak over the resident
    set before it (step 2), and torch's allocator's peak over what was live before it (step 3)."""
    import gc

    import torch

    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.engine import train_step
    from shoal.job import build_job

    cfg = config(strategy, SMALL, 3, "unused", **{"train.activation_checkpointing": mode})
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 600, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    train_step(job)  # warm-up: the optimizer state is made, the gradients are freed again (set_to_none)
    gc.collect()
    dist.barrier()
    before, peak_before = rss_bytes(), peak_rss_bytes()
    reset = reset_peak_rss()
    train_step(job)
    peak = peak_rss_bytes()
    # without a reset the peak is the process's lifetime one: only its growth over the step is the step's
    delta = peak - before if reset else max(0, peak - max(before, peak_before))
    gc.collect()
    dist.barrier()
    allocated = allocator_peak_bytes(lambda: train_step(job))
    return {
        "rss_before_mb": before / 2**20,
        "peak_mb": peak / 2**20,
        "peak_delta_mb": delta / 2**20,
        "allocator_peak_mb": allocated / 2**20,
        "reset": reset,
    }


def measure_ac_memory(strategy: str, mode: str) -> dict:
    """ac_memory_rank in a fresh pair of rank processes, whose glibc returns a freed tensor to the system."""
    key = "MALLOC_MMAP_THRESHOLD_"
    old = os.environ.get(key)
    os.environ[key] = str(64 * 1024)  # read by each spawned rank's malloc at start; fixed, not dynamic
    try:
        return spawn_ranks(ac_memory_rank, 2, strategy, mode, timeout_s=3600)[0]
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument(
        "--only", choices=["fsdp", "ac"], help="only the strategy comparison, or only activation checkpointing"
    )
    args = p.parse_args()
    if args.only != "ac":
        compare_strategies(args)
    if args.only != "fsdp":
        compare_activation_checkpointing(args)


def compare_strategies(args: argparse.Namespace) -> None:
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


def compare_activation_checkpointing(args: argparse.Namespace) -> None:
    ac_rows = []
    for strategy in ("allreduce", "fsdp"):
        base = base_mem = None
        for mode in ("none", "every_n", "full"):
            got = spawn_ranks(ac_rank, 2, strategy, mode, args.steps, timeout_s=3600)[0]
            mem = measure_ac_memory(strategy, mode)
            base, base_mem = base or got, base_mem or mem
            ac_rows.append(
                [
                    strategy,
                    mode,
                    got["saved_mb"],
                    got["saved_mb"] / base["saved_mb"],
                    mem["allocator_peak_mb"],
                    mem["allocator_peak_mb"] / base_mem["allocator_peak_mb"],
                    mem["peak_delta_mb"],
                    mem["peak_delta_mb"] / base_mem["peak_delta_mb"] if base_mem["peak_delta_mb"] else float("nan"),
                    mem["rss_before_mb"],
                    got["step_s"],
                    got["step_s"] / base["step_s"],
                ]
            )
            if not mem["reset"]:
                print("(the peak resident set could not be reset here: the step's peak is a lower bound)")
    print(
        "\nactivation checkpointing, transformer_lm width 256 x 8 layers, 4 x 64 tokens per rank, 2 ranks gloo, "
        f"rank 0's figures; {machine()}:"
    )
    print(
        table(
            [
                "strategy",
                "train.activation_checkpointing",
                "saved for backward MiB",
                "vs none",
                "step peak in torch's allocator MiB",
                "vs none",
                "step peak RSS over before MiB",
                "vs none",
                "RSS before MiB",
                "step s",
                "vs none",
            ],
            ac_rows,
        )
    )


if __name__ == "__main__":
    main()
