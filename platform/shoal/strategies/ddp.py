"""strategy: allreduce. Every rank holds the whole model; DDP all-reduces the gradients in buckets
during the backward of the step's last micro-batch."""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.strategies.base import Strategy


class DDPStrategy(Strategy):
    name = "allreduce"
    hook: BucketHook | None = None  # set when DDP wraps the model (2+ ranks)

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model when there is more than one rank; the bare model otherwise."""
        self._bare = model
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            self.module = model
            return model
        cfg = self.cfg.ddp
        # torch >= 2.13 renamed broadcast_buffers to forward_sync_buffers (same meaning for forward syncs)
        sync_key = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
            else "broadcast_buffers"
        )
        self.hook = BucketHook()
        self.module = DDP(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=cfg.bucket_cap_mb,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            static_graph=cfg.static_graph,
            find_unused_parameters=cfg.find_unused_parameters,
            **{sync_key: cfg.broadcast_buffers},
        )
        self.module.register_comm_hook(self.hook, _bucket_hook)
        return self.module

    @property
    def measures_noise(self) -> bool:
        return self.hook is not None  # DDP's comm hook, installed with two or more ranks

    def arm_noise_probe(self, enabled: bool) -> None:
        if self.hook is not None:
            self.hook.armed, self.hook.local_sq = enabled, None

    def local_grad_sq(self) -> torch.Tensor | None:
        return self.hook.local_sq if self.hook is not None else None

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """no_sync() unless this micro-batch must all-reduce.

        The forward belongs inside too: DDP decides at forward time whether the coming backward
        reduces, so wrapping only the backward still all-reduces (a classic accumulation bug).
        """
        if enabled or not isinstance(self.module, DDP):
            return contextlib.nullcontext()
        return self.module.no_sync()


class BucketHook:
    """DDP's communication hook state: bucket all-reduces counted, and (when armed, on the steps the gradient
    noise scale is measured) the squared norm of this rank's own gradients, taken from each bucket just before
    it is reduced: the one moment a rank's small-batch gradient exists whole."""

    def __init__(self) -> None:
        self.calls = 0
        self.armed = False
        self.local_sq: torch.Tensor | None = None


def _bucket_hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.calls += 1
    if state.armed:
        buf = bucket.buffer()
        sq = torch.dot(buf, buf) if buf.dtype == torch.float32 else buf.float().square().sum()
        state.local_sq = sq if state.local_sq is None else state.local_sq + sq
    return allreduce_hook(None, bucket)
