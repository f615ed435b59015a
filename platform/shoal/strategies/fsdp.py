"""strategy: fsdp. Fully sharded data parallel with FSDP2 (`fully_shard`, as TorchTitan uses it): every
rank holds 1/N of the parameters, gradients and optimizer state; a unit's parameters are gathered for
its forward and backward and its gradients reduce-scattered once per optimizer step.

Units are the model's blocks (models.blocks: the built-in models' layers, or fsdp.units), then the
root. Checkpoints are sharded: every rank writes its own part with torch.distributed.checkpoint
(state_io.py, checkpoint.py), and resume reshards to any number of ranks, or into strategy allreduce.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

from shoal.dist import WorldInfo, ensure_group
from shoal.errors import ConfigError
from shoal.models import blocks
from shoal.strategies.base import Strategy
from shoal.strategies.state_io import ShardedStateIO

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDPStrategy(Strategy):
    name = "fsdp"
    holds_shards = True  # as a pipeline's replicas: each holds a shard of every tensor

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard each block, then the root, over the device mesh (hybrid: nodes x ranks per node)."""
        cfg = self.cfg.fsdp
        ensure_group(self.device)  # a world of one still shards (over one rank): the mesh needs a group
        self.mesh = device_mesh(self.world, cfg.sharding, self.device)
        kwargs: dict[str, Any] = {"mesh": self.mesh}
        if cfg.param_dtype or cfg.reduce_dtype:
            kwargs["mp_policy"] = MixedPrecisionPolicy(
                param_dtype=DTYPES.get(cfg.param_dtype or ""), reduce_dtype=DTYPES.get(cfg.reduce_dtype or "fp32")
            )
        if cfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        reshard = cfg.reshard_after_forward
        shard_size = self.mesh.size(-1)
        if not isinstance(reshard, bool) and shard_size % reshard:
            raise ConfigError(
                f"{reshard} does not divide the {shard_size} ranks that shard each parameter",
                key="fsdp.reshard_after_forward",
            )
        self.units = blocks(model, cfg.units or None)
        for _, unit in self.units:
            fully_shard(unit, reshard_after_forward=reshard, **kwargs)
        fully_shard(
            model,
            reshard_after_forward=True if isinstance(reshard, int) and not isinstance(reshard, bool) else reshard,
            **kwargs,
        )
        self._bare = self.module = model
        self.state_io = ShardedStateIO(model)
        return model

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Gradient reduce-scatter off for micro-batches 1..k-1: FSDP keeps their unsharded gradients and
        reduces once, after the last."""
        self.module.set_requires_gradient_sync(enabled)  # type: ignore[union-attr]
        return contextlib.nullcontext()

    def reduce_squares(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-rank sums of squares over the shard dimension (replicas of a hybrid mesh hold the same shards)."""
        group = self.mesh.get_group(self.mesh.ndim - 1)
        values = values.to(self.device)
        dist.all_reduce(values, group=group)
        return values

    @staticmethod
    def replicate(stage: nn.Module, mesh: DeviceMesh) -> nn.Module:
        """A pipeline stage's replicas over the mesh, each holding a shard of it (gradients reduce-scattered)."""
        return fully_shard(stage, mesh=mesh)


def device_mesh(world: WorldInfo, sharding: str, device: torch.device) -> DeviceMesh:
    """1-D over every rank, or 2-D (nodes x ranks per node) for hybrid sharding. On a machine with GPUs
    a gloo mesh is built on the CPU explicitly (pytorch#132471: a segfault otherwise)."""
    kind = device.type
    if sharding == "hybrid":
        per_node = world.local_world_size
        if world.world_size % per_node:
            raise ConfigError(
                f"hybrid sharding needs the same number of ranks on every node ({world.world_size} ranks, {per_node} on this node)",
                key="fsdp.sharding",
            )
        return init_device_mesh(kind, (world.world_size // per_node, per_node), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(kind, (world.world_size,), mesh_dim_names=("shard",))
