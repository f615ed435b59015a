"""`shoal batch-find CONFIG`: the largest micro-batch the job's model fits in, and its throughput at each size.

One process on the job's device trains the job's model on its own data at micro-batch 1, 2, 4, ... (a few
timed optimizer steps each). On a GPU a size fits unless CUDA runs out of memory (then it backs off by
bisection between the last size that fit and the first that did not); on the CPU, unless the process's
peak memory passes --max-memory less HEADROOM (a training rank holds a little more than this probe: the
loader, the health monitor, the metrics writer). The suggestion: the largest fitting micro-batch, and the
data.batch_size and train.grad_accum_steps that give the target global batch with it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from shoal import plots
from shoal.config import JobConfig
from shoal.data.loaders import open_splits
from shoal.losses import Loss
from shoal.models import build_model
from shoal.optim import build_optimizer
from shoal.strategies.memory import peak_memory_mb

HEADROOM = 0.9
TIMED_STEPS = 3


def _device(cfg: JobConfig) -> torch.device:
    s = cfg.scaling
    if not s.on_cpu and (s.device == "cuda" or torch.cuda.is_available()):
        return torch.device("cuda", 0)
    return torch.device("cpu")


def memory_budget_mb(cfg: JobConfig) -> tuple[float, str]:
    """--max-memory's default on the CPU: what this process may use (the cgroup's limit, or the machine's available
    memory, whichever is lower) shared by the ranks of one node; and how it was worked out, to say."""
    available = psutil.virtual_memory().available
    limit = _cgroup_limit()
    mine, where = (
        (limit, "the cgroup's memory limit")
        if limit is not None and limit < available
        else (
            available,
            "the machine's available memory",
        )
    )
    per_node = max(1, min(cfg.scaling.num_workers, int((psutil.cpu_count() or 1) // cfg.scaling.cpus_per_worker) or 1))
    mib = mine / 2**20
    return mib / per_node, f"{where} {mib / 1024:.1f} GiB / {per_node} rank(s) per node"


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2, else v1); None when there is none."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # v1 says "no limit" with a huge number, v2 with "max"
            return int(text)
    return None


def find(
    cfg: JobConfig, out: Path, max_memory_mb: float | None, max_batch: int, target: int | None, say: Any = print
) -> dict[str, Any]:
    device = _device(cfg)
    max_memory_mb, how = _memory_limit(cfg, device, max_memory_mb, say)
    torch.manual_seed(cfg.seed)
    attempt = _attempt(cfg, device, max_memory_mb * HEADROOM if max_memory_mb else None)
    rows, fit, failed = _double(attempt, max_batch, say)
    if failed is not None and device.type == "cuda":  # back off: bisect between the last fit and the failure
        fit = _bisect(attempt, fit, failed, rows)
    result = _suggest(cfg, fit, target)
    tried = sorted(rows, key=lambda r: r["batch"])
    result.update(device=str(device), max_memory_mb=max_memory_mb, max_memory_from=how, tried=tried)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    result["plot"] = str(_plot(result["tried"], fit, out / "batch_find.png"))
    return result


def _memory_limit(cfg: JobConfig, device: torch.device, max_memory_mb: float | None, say: Any) -> tuple[Any, str]:
    """(--max-memory, or on the CPU the default budget; how it was set)."""
    how = "--max-memory" if max_memory_mb is not None else "none on a GPU (CUDA says when it is full)"
    if device.type == "cpu" and max_memory_mb is None:
        max_memory_mb, how = memory_budget_mb(cfg)
        say(f"[shoal] batch-find: no --max-memory given: searching under {max_memory_mb / 1024:.2f} GiB ({how})")
    return max_memory_mb, how


def _attempt(cfg: JobConfig, device: torch.device, limit_mb: float | None) -> Callable[[int], dict[str, Any]]:
    """A micro-batch size -> its row, trained on the job's model, optimizer and training data."""
    source = open_splits(cfg)[0]
    loss_fn = Loss.of(cfg, source.spec)
    model = build_model(cfg.model, source.spec, loss_fn.out_features()).to(device).train()
    optimizer = build_optimizer(model, cfg.optim)
    return functools.partial(_try, model, optimizer, loss_fn, source, device=device, limit_mb=limit_mb)


def _double(attempt: Callable[[int], dict[str, Any]], max_batch: int, say: Any) -> tuple[list[dict], int, int | None]:
    """(rows, largest size that fit, first that did not or None) of sizes 1, 2, 4, ... up to max_batch."""
    rows: list[dict[str, Any]] = []
    fit, size = 0, 1
    while size <= max_batch:
        row = attempt(size)
        rows.append(row)
        say(
            f"[shoal] batch-find: micro-batch {size:>6}: {row['status']}, {row['samples_per_s']:,.0f} samples/s, "
            f"peak {row['peak_mb']:,.0f} MiB"
        )
        if row["status"] != "fits":
            return rows, fit, size
        fit = size
        size *= 2
    return rows, fit, None


def _bisect(attempt: Callable[[int], dict[str, Any]], fit: int, failed: int, rows: list[dict[str, Any]]) -> int:
    """The largest size found to fit between the last fit and the failure (its rows added to `rows`)."""
    lo, hi = fit, failed
    while hi - lo > max(1, lo // 8):
        mid = (lo + hi) // 2
        row = attempt(mid)
        rows.append(row)
        lo, hi = (mid, hi) if row["status"] == "fits" else (lo, mid)
    return lo


def _try(model, optimizer, loss_fn, source, size, device, limit_mb) -> dict[str, Any]:
    idx = np.arange(size, dtype=np.int64) % len(source)
    x, y = source.get_batch(idx)[:2]
    x, y = x.to(device), y.to(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        elapsed = _timed_steps(model, optimizer, loss_fn, x, y, device)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        return {"batch": size, "status": "out of memory", "samples_per_s": 0.0, "peak_mb": float("nan")}
    peak = peak_memory_mb(device)
    status = "fits" if limit_mb is None or peak <= limit_mb else "over --max-memory"
    return {"batch": size, "status": status, "samples_per_s": TIMED_STEPS * size / elapsed, "peak_mb": peak}


def _timed_steps(model, optimizer, loss_fn, x, y, device) -> float:
    """Seconds of TIMED_STEPS optimizer steps on this batch, after one that warms up (allocations, kernels)."""
    elapsed = 0.0
    for i in range(TIMED_STEPS + 1):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            elapsed += time.perf_counter() - start
    return elapsed


def _suggest(cfg: JobConfig, fit: int, target: int | None) -> dict[str, Any]:
    ranks = max(1, cfg.scaling.num_workers // cfg.parallel.pipeline_stages)
    target = target or cfg.data.batch_size * cfg.train.grad_accum_steps * ranks
    share = math.ceil(target / ranks)  # samples per rank per step
    if not fit:
        return {"largest_batch": 0, "target_batch": target, "data.batch_size": None, "train.grad_accum_steps": None}
    accum = math.ceil(share / fit)
    micro = math.ceil(share / accum)
    return {
        "largest_batch": fit,
        "target_batch": target,
        "data.batch_size": micro,
        "train.grad_accum_steps": accum,
        "global_batch": micro * accum * ranks,
    }


def _plot(rows: list[dict[str, Any]], fit: int, path: Path) -> Path:
    fig, ax = plots.figure(1, 2, (11, 4))
    good = [r for r in rows if r["status"] == "fits"]
    ax[0][0].plot([r["batch"] for r in good], [r["samples_per_s"] for r in good], "o-")
    ax[0][0].set(xscale="log", xlabel="micro-batch", ylabel="samples/s", title="throughput")
    ax[0][1].plot([r["batch"] for r in rows], [r["peak_mb"] for r in rows], "o-")
    ax[0][1].axvline(fit, color="green", linestyle="--", label=f"largest that fits: {fit}")
    ax[0][1].set(xscale="log", xlabel="micro-batch", ylabel="peak MiB", title="memory")
    ax[0][1].legend()
    return plots.save(fig, path)
