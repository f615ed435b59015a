"""What a rank holds in memory: its parameters, gradients and optimizer state (its shards of them), and its peak."""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from shoal.health.probes import local

MIB = 2.0**20


def memory_report(
    model: nn.Module, optimizer: torch.optim.Optimizer, grads_bytes: int, device: torch.device
) -> dict[str, float]:
    """MiB this rank holds: parameters, gradients (`grads_bytes`, taken at a step), optimizer state, and its peak."""
    state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    return {
        "peak_mb": peak_memory_mb(device),
        "params_mb": local_bytes(list(model.parameters())) / MIB,
        "grads_mb": grads_bytes / MIB,
        "optimizer_mb": local_bytes(state) / MIB,
    }


def local_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes this rank holds of these tensors (its shards of DTensors)."""
    return sum(local(t).nbytes for t in tensors)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank so far: CUDA's max allocated on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux
