"""Gradient communication: DDP wrapping, accumulation without AllReduce, counting AllReduces."""

from __future__ import annotations

import contextlib
import inspect
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.config import DDPConfig


def wrap_ddp(model: nn.Module, cfg: DDPConfig, device: torch.device) -> nn.Module:
    """DDP around the model when a process group exists; the bare model otherwise."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return model
    # torch >= 2.13 renamed broadcast_buffers to forward_sync_buffers (same meaning for forward syncs)
    sync_key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters else "broadcast_buffers"
    return DDP(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
        gradient_as_bucket_view=cfg.gradient_as_bucket_view,
        static_graph=cfg.static_graph,
        find_unused_parameters=cfg.find_unused_parameters,
        **{sync_key: cfg.broadcast_buffers},
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (for evaluation, checkpoints and export)."""
    return model.module if isinstance(model, DDP) else model


def sync_gradients(model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Context for one micro-batch's forward AND backward: no_sync() unless this one must AllReduce.

    The forward belongs inside too: DDP decides at forward time whether the coming backward
    reduces, so wrapping only the backward still AllReduces (a classic accumulation bug).
    """
    if enabled or not isinstance(model, DDP):
        return contextlib.nullcontext()
    return model.no_sync()


class AllReduceCounter:
    """A DDP communication hook that counts bucket AllReduces (then does the default AllReduce)."""

    def __init__(self) -> None:
        self.calls = 0

    def attach(self, model: nn.Module) -> AllReduceCounter:
        assert isinstance(model, DDP), "count AllReduces on a DDP model"
        model.register_comm_hook(self, _counting_allreduce_hook)
        return self


def _counting_allreduce_hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.calls += 1
    return allreduce_hook(None, bucket)
