"""Shoal's shard reader against a bare webdataset pipeline and in-memory tensors; RSS at two sizes;
2-rank DDP training from shards against training from memory.

    python benchmarks/bench_data.py [--samples 20000] [--rounds 3]

1. Reader, one process, 784-float samples, batches of 64: a bare webdataset pipeline decoding one
   `.npy` per sample, Shoal's packed shards with 0, 1 and 2 loader workers, and indexing an
   in-memory tensor.
2. Peak RSS of a process reading 50,000 samples from a 200,000- and a 2,000,000-sample shard set.
3. 2 ranks on gloo, MLP 784-1024-1024-10, batch 64 per rank: ms per step from memory and from
   shards (0 and 1 loader workers), with the data-wait share of the step Shoal logs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine, median, spawn_ranks, table

DIM = 784


def write_npy_layout(root: Path, n: int) -> str:
    """The common webdataset layout: one .npy input and one .cls label per sample."""
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per = 5000
    for s in range(0, n, per):
        with wds.TarWriter(str(root / f"npy-{s // per:06d}.tar")) as sink:
            for i in range(s, min(n, s + per)):
                sink.write(
                    {
                        "__key__": f"{i:09d}",
                        "input.npy": rng.standard_normal(DIM).astype(np.float32),
                        "cls": int(i % 10),
                    }
                )
    return str(root / f"npy-{{000000..{(n - 1) // per:06d}}}.tar")


def write_packed(root: Path, n: int, dim: int = DIM) -> Path:
    from shoal.data.writer import ShardOptions, load_source, write_shards

    table = load_source("synthetic", num_samples=n, input_shape=[dim], num_classes=10)
    write_shards(table, root, ShardOptions(samples_per_shard=5000, val_fraction=0.0), "synthetic", progress=False)
    return root


def bare_webdataset(pattern: str, n: int) -> float:
    import webdataset as wds

    ds = wds.WebDataset(pattern, shardshuffle=False).decode().to_tuple("input.npy", "cls").batched(64)
    start = time.perf_counter()
    seen = sum(len(b[1]) for b in ds)
    assert seen == n
    return n / (time.perf_counter() - start)


def shoal_reader(path: str, workers: int) -> float:
    import torch

    from shoal.config import JobConfig
    from shoal.data.loaders import build_loaders
    from shoal.dist import WorldInfo

    cfg = JobConfig().replace(
        {"data.format": "shards", "data.path": path, "data.batch_size": 64, "data.num_workers": workers}
    )
    stream = build_loaders(cfg, WorldInfo(), torch.device("cpu")).train
    batches = stream.plan.num_batches(stream.consumed)
    start = time.perf_counter()
    seen = sum(len(next(stream)[1]) for _ in range(batches))
    return seen / (time.perf_counter() - start)


def in_memory(n: int) -> float:
    import torch

    x = torch.randn(n, DIM)
    y = torch.randint(0, 10, (n,))
    perm = torch.randperm(n)
    start = time.perf_counter()
    for i in range(0, n - 63, 64):
        idx = perm[i : i + 64]
        _ = x[idx], y[idx]
    return n / (time.perf_counter() - start)


RSS_CHILD = """
import resource, sys, torch
from shoal.config import JobConfig
from shoal.data.loaders import build_loaders
from shoal.dist import WorldInfo
cfg = JobConfig().replace({"data.format": "shards", "data.path": sys.argv[1], "data.batch_size": 256, "data.shuffle_buffer": 8192})
stream = build_loaders(cfg, WorldInfo(), torch.device("cpu")).train
for _ in range(50_000 // 256):
    next(stream)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""


def rss_mb(path: Path) -> int:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def ddp_rank(steps: int, warmup: int, run_dir: str, data: dict) -> tuple[float, float]:
    """(seconds per step, data-wait share) of Shoal's loop on this data."""
    from shoal.config import JobConfig
    from shoal.worker import run_worker

    cfg = JobConfig().replace(
        {
            "model.width": 1024,
            "model.depth": 2,
            "optim.name": "sgd",
            "optim.lr": 0.01,
            "optim.momentum": 0.9,
            "data.batch_size": 64,
            "train.max_steps": warmup + steps + 10,
            "train.eval_every": 0,
            "log.every": 10,
            "log.progress": "none",
            "log.tensorboard": False,
            "run.dir": run_dir,
            **data,
        }
    )
    marks: dict[int, float] = {}
    waits: list[float] = []

    def report(r: dict) -> None:
        marks.setdefault(r["step"], time.perf_counter())
        if warmup < r["step"] <= warmup + steps:
            waits.append(r["data_wait"])

    run_worker(cfg, report=report)
    if not marks:  # only rank 0 reports
        return float("nan"), float("nan")
    return (marks[warmup + steps] - marks[warmup]) / steps, float(np.mean(waits))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--parts", default="123", help="which parts to run, e.g. 13")
    args = p.parse_args()
    n = args.samples
    with tempfile.TemporaryDirectory(prefix="shoal-bench-data-") as tmp:
        root = Path(tmp)
        pattern = write_npy_layout(root / "npy", n)
        packed = write_packed(root / "packed", n)
        if "1" in args.parts:
            reader_part(args, n, pattern, packed)
        if "2" in args.parts:
            rss_part(root)
        if "3" in args.parts:
            ddp_part(args, n, root, packed)


def reader_part(args: argparse.Namespace, n: int, pattern: str, packed: Path) -> None:
    print(f"1. reader, one process, {n:,} samples of {DIM} floats, batch 64; {machine()}", flush=True)
    rows = []
    for r in range(args.rounds):
        row = {"bare webdataset .npy": bare_webdataset(pattern, n)}
        for w in (0, 1, 2):
            row[f"Shoal packed, {w} loader workers"] = shoal_reader(str(packed), w)
        row["in-memory tensor"] = in_memory(n)
        rows.append(row)
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v:,.0f}/s" for k, v in row.items()), flush=True)
    base = [r["bare webdataset .npy"] for r in rows]
    print(
        table(
            ["reader", "samples/s (median)", "x bare webdataset"],
            [[k, median([r[k] for r in rows]), median([r[k] / b for r, b in zip(rows, base)])] for k in rows[0]],
        )
    )


def rss_part(root: Path) -> None:
    print("\n2. peak RSS reading 50,000 samples (32 floats each, batch 256)", flush=True)
    small = write_packed(root / "small", 200_000, dim=32)
    large = write_packed(root / "large", 2_000_000, dim=32)
    rs, rl = rss_mb(small), rss_mb(large)
    print(table(["data set", "peak RSS MiB"], [["200,000 samples", rs], ["2,000,000 samples", rl], ["ratio", rl / rs]]))


def ddp_part(args: argparse.Namespace, n: int, root: Path, packed: Path) -> None:
    print(f"\n3. 2 ranks gloo, MLP {DIM}-1024-1024-10, batch 64/rank, {args.steps} steps", flush=True)
    variants = {
        "memory": {
            "data.dataset": "synthetic",
            "data.num_samples": n,
            "data.input_shape": [DIM],
            "data.val_fraction": 0.0,
        },
        "shards, 0 loader workers": {"data.format": "shards", "data.path": str(packed), "data.num_workers": 0},
        "shards, 1 loader worker": {"data.format": "shards", "data.path": str(packed), "data.num_workers": 1},
    }
    results: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
    for r in range(args.rounds):
        for name, data in variants.items():
            run_dir = root / f"run-{r}-{list(variants).index(name)}"
            results[name].append(spawn_ranks(ddp_rank, 2, args.steps, 30, str(run_dir), data, timeout_s=900)[0])
        print(f"  round {r + 1}: " + ", ".join(f"{k} {v[-1][0] * 1000:.1f} ms" for k, v in results.items()), flush=True)
    mem = [s for s, _ in results["memory"]]
    print(
        table(
            ["data", "ms/step (median)", "x memory", "data-wait share"],
            [
                [
                    k,
                    median([s for s, _ in v]) * 1000,
                    median([s / m for (s, _), m in zip(v, mem)]),
                    median([w for _, w in v]),
                ]
                for k, v in results.items()
            ],
        )
    )


if __name__ == "__main__":
    main()
