"""strategy: allreduce. Every rank holds the whole model; DDP all-reduces the gradients in buckets
during the backward of the step's last micro-batch."""

from __future__ import annotations

import contextlib
import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.nn.parallel import DistributedDataParallel as DDP

from shoal.strategies.base import Strategy
from shoal.strategies.state_io import FullStateIO


class DDPStrategy(Strategy):
    name = "allreduce"
    holds_shards = False  # as a pipeline's replicas: each holds whole tensors
    noise_probe: HandReduction | None = None

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model when there is more than one rank; the bare model otherwise.

        No communication hook: DDP's own C++ all-reduce runs every step. The gradient noise scale needs a
        rank's gradient before its reduction; on the steps it is measured the reduction is done by hand
        instead (HandReduction), so the other steps pay nothing for it.
        """
        self._bare = self.module = model
        self.state_io = FullStateIO(model)
        if not (dist.is_initialized() and dist.get_world_size() > 1):
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
        if not cfg.static_graph:  # static_graph forbids no_sync(), which the measured steps use
            self.noise_probe = HandReduction(model)
        return self.module

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """no_sync() unless this micro-batch must all-reduce (and the step is not measured: see HandReduction).

        The forward belongs inside too: DDP decides at forward time whether the coming backward
        reduces, so wrapping only the backward still all-reduces (a classic accumulation bug).
        """
        if (enabled and not (self.noise_probe and self.noise_probe.armed)) or not isinstance(self.module, DDP):
            return contextlib.nullcontext()
        return self.module.no_sync()

    def forward_backward(self, batches, counts, loss_fn, precision, total=None):  # types as Strategy's
        loss_sum = super().forward_backward(batches, counts, loss_fn, precision, total)
        if self.noise_probe and self.noise_probe.armed:
            self.noise_probe.reduce()
        return loss_sum

    @staticmethod
    def replicate(stage: nn.Module, mesh: DeviceMesh) -> nn.Module:
        """A pipeline stage's replicas over the mesh, all-reducing its gradients. The composable `replicate`
        stands in for DDP here: the schedule drives its gradient sync, and DDP's reducer cannot follow a
        backward split into the schedule's pieces."""
        from torch.distributed._composable.replicate_with_fsdp import replicate  # loads FSDP: pipelines only

        return replicate(stage, mesh=mesh)


class HandReduction:
    """The noise scale's probe under DDP: on an armed step every micro-batch runs without sync (see
    DDPStrategy.sync), this rank's squared gradient norm is taken, and the gradients are then averaged
    over the ranks in one all-reduce."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.armed = False
        self._local_sq: torch.Tensor | None = None

    def arm(self, enabled: bool) -> None:
        self.armed, self._local_sq = enabled, None

    def local_grad_sq(self) -> torch.Tensor | None:
        return self._local_sq

    def reduce(self) -> None:
        self._local_sq = reduce_by_hand([p for p in self.model.parameters() if p.requires_grad])
        self.armed = False


def reduce_by_hand(params: list[nn.Parameter]) -> torch.Tensor:
    """This rank's squared gradient norm, then the gradients averaged over the ranks (one flat all-reduce, as DDP's
    averaging does). Parameters without a gradient here get zeros, so every rank reduces the same sizes."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    local_sq = torch.stack([n.double() ** 2 for n in torch._foreach_norm(grads)]).sum()
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat.div_(dist.get_world_size())
    dist.all_reduce(flat)
    torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)])
    return local_sq
