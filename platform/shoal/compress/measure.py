"""What a model costs and scores, measured on the CPU: validation loss and accuracy, size on disk,
parameters and zeros, latency per sample at batch 1 and throughput at the job's batch (medians)."""

from __future__ import annotations

import io
import statistics
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from shoal.compress.prune import zeros
from shoal.config import JobConfig
from shoal.data.spec import DataSpec
from shoal.losses import Loss

LATENCY_RUNS = 21  # medians of this many timings, each of enough calls to last MIN_TIMING_S
THROUGHPUT_RUNS = 7
MIN_TIMING_S = 0.02


def size_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict as torch.save writes it."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes


@torch.inference_mode()
def score(model: nn.Module, cfg: JobConfig, spec: DataSpec, val: Any, limit: int | None = None) -> dict[str, float]:
    """Validation loss and accuracy over the split (or its first `limit` samples)."""
    loss_fn = Loss.of(cfg, spec)
    n = len(val) if limit is None else min(limit, len(val))
    sums = np.zeros(3)
    for lo in range(0, n, 256):
        x, y = val.get_batch(np.arange(lo, min(n, lo + 256), dtype=np.int64))[:2]
        out = model(x)
        count = loss_fn.count(y)
        sums += [float(loss_fn(out, y)) * count, float(loss_fn.correct(out, y)), count]
    result = {"val_loss": sums[0] / sums[2]}
    if loss_fn.classify:
        result["val_accuracy"] = sums[1] / sums[2]
    return result


@torch.inference_mode()
def speed(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Median latency per sample at batch 1 (ms) and samples/s at the batch given."""
    one = x[:1]
    lat = _per_call(lambda: model(one), LATENCY_RUNS)
    per_batch = _per_call(lambda: model(x), THROUGHPUT_RUNS)
    return {"latency_ms": lat * 1e3, "samples_per_s": len(x) / per_batch}


def _per_call(fn: Any, runs: int) -> float:
    """Median seconds per call; each timing repeats the call until it lasts MIN_TIMING_S (a single sub-millisecond
    call is mostly timer and scheduler noise)."""
    for _ in range(3):
        fn()
    t = time.perf_counter()
    fn()
    reps = max(1, int(MIN_TIMING_S / max(time.perf_counter() - t, 1e-7)))
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t) / reps)
    return statistics.median(times)


def measure(model: nn.Module, cfg: JobConfig, spec: DataSpec, val: Any) -> dict[str, Any]:
    model.eval()
    params, zero = zeros(model)
    x = val.get_batch(np.arange(min(cfg.data.batch_size, len(val)), dtype=np.int64))[0]
    return {
        **score(model, cfg, spec, val),
        "size_bytes": size_bytes(model),
        "parameters": params,
        "nonzero": params - zero,
        **speed(model, x),
    }
