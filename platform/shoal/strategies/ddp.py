"""strategy: allreduce. Every rank holds the whole model; DDP all-reduces the gradients in buckets
during the backward of the step's last micro-batch."""

from __future__ import annotations

import contextlib
import inspect

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.strategies.base import Strategy


class DDPStrategy(Strategy):
    name = "allreduce"

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
        self.module = DDP(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            bucket_cap_mb=cfg.bucket_cap_mb,
            gradient_as_bucket_view=cfg.gradient_as_bucket_view,
            static_graph=cfg.static_graph,
            find_unused_parameters=cfg.find_unused_parameters,
            **{sync_key: cfg.broadcast_buffers},
        )
        return self.module

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """no_sync() unless this micro-batch must all-reduce.

        The forward belongs inside too: DDP decides at forward time whether the coming backward
        reduces, so wrapping only the backward still all-reduces (a classic accumulation bug).
        """
        if enabled or not isinstance(self.module, DDP):
            return contextlib.nullcontext()
        return self.module.no_sync()


class AllReduceCounter:
    """A DDP communication hook that counts bucket all-reduces (then does the default all-reduce)."""

    def __init__(self) -> None:
        self.calls = 0

    def attach(self, model: nn.Module) -> AllReduceCounter:
        assert isinstance(model, DDP), "count all-reduces on a DDP model"
        model.register_comm_hook(self, _counting_allreduce_hook)
        return self


def _counting_allreduce_hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.calls += 1
    return allreduce_hook(None, bucket)
