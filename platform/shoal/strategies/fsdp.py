"""strategy: fsdp. Fully sharded data parallel with FSDP2 (`fully_shard`, as TorchTitan uses it): every
rank holds 1/N of the parameters, gradients and optimizer state; a unit's parameters are gathered for
its forward and backward and its gradients reduce-scattered once per optimizer step.

Units are the model's blocks (models.blocks: the built-in models' layers, or fsdp.units), then the
root. Checkpoints are sharded: every rank writes its own part with torch.distributed.checkpoint
(see checkpoint.py), and resume reshards to any number of ranks, or into strategy allreduce.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from shoal.dist import WorldInfo
from shoal.errors import ConfigError
from shoal.strategies.base import Strategy

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class FSDPStrategy(Strategy):
    name = "fsdp"
    sharded_state = True

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard each block, then the root, over the device mesh (hybrid: nodes x ranks per node)."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        from shoal.dist import ensure_group
        from shoal.models import blocks

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
        return model

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Gradient reduce-scatter off for micro-batches 1..k-1: FSDP keeps their unsharded gradients and
        reduces once, after the last."""
        self.module.set_requires_gradient_sync(enabled)  # type: ignore[union-attr]
        return contextlib.nullcontext()

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The norm of all shards: local sums of squares, summed over the ranks that shard (one all-reduce)."""
        return self.norm_of([p.grad for p in params if p.grad is not None])

    def norm_of(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
        sq = (
            torch.stack([n.double() ** 2 for n in torch._foreach_norm(local)]).sum()
            if local
            else torch.zeros((), dtype=torch.float64)
        )
        return self.reduce_squares(sq.reshape(1)).sqrt()[0]

    def reduce_squares(self, values: torch.Tensor) -> torch.Tensor:
        """Sum per-rank sums of squares over the shard dimension (replicas of a hybrid mesh hold the same shards)."""
        group = self.mesh.get_group(self.mesh.ndim - 1)
        values = values.to(self.device)
        dist.all_reduce(values, group=group)
        return values

    # ---------------------------------------------------------------- state

    def model_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_model_state(self, state: Any, source: Path | str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

        from shoal.checkpoint import check_keys, shapes_of
        from shoal.dcp import Sharded, read_into

        if isinstance(state, Sharded):  # this strategy's own format: DCP reshards to this world
            target = get_model_state_dict(self.module)
            check_keys(target, state.shapes(), source)
            read_into(target, state.path)
            set_model_state_dict(self.module, target)
        elif is_sharded_dict(state):  # an in-memory snapshot of this run (a rollback)
            set_model_state_dict(self.module, state)
        else:  # a full state dict (strategy allreduce, or an export): every rank takes its shards from it
            check_keys(
                get_model_state_dict(self.module), shapes_of(state), source
            )  # DTensor shapes are the whole tensor's
            set_model_state_dict(self.module, state, options=StateDictOptions(full_state_dict=True))

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.module, optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        from shoal.dcp import Sharded, read_optimizer_into

        if isinstance(state, Sharded):
            target = get_optimizer_state_dict(self.module, optimizer)
            read_optimizer_into(target, state.path)
            set_optimizer_state_dict(self.module, optimizer, target)
        elif _keyed_by_name(state):  # an in-memory snapshot of this run (a rollback)
            set_optimizer_state_dict(self.module, optimizer, state)
        else:  # torch's own format, keyed by parameter index: name the parameters as DCP does
            full = by_name(state, self.module, optimizer)
            set_optimizer_state_dict(self.module, optimizer, full, options=StateDictOptions(full_state_dict=True))

    def local_bytes(self, tensors: list[torch.Tensor]) -> int:
        """Bytes of this rank's shards of these tensors."""
        return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


def device_mesh(world: WorldInfo, sharding: str, device: torch.device) -> Any:
    """1-D over every rank, or 2-D (nodes x ranks per node) for hybrid sharding. On a machine with GPUs
    a gloo mesh is built on the CPU explicitly (pytorch#132471: a segfault otherwise)."""
    from torch.distributed.device_mesh import init_device_mesh

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


def by_name(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """torch's optimizer state dict (parameters by index, in param_groups order) keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    saved = [i for g in state["param_groups"] for i in g["params"]]
    if len(saved) != len(order):
        raise ConfigError(
            f"the checkpoint's optimizer holds {len(saved)} parameters, this model trains {len(order)}",
            key="checkpoint",
        )
    name_of = dict(zip(saved, order))
    groups = [
        {**{k: v for k, v in g.items() if k != "params"}, "params": [name_of[i] for i in g["params"]]}
        for g in state["param_groups"]
    ]
    return {"state": {name_of[i]: v for i, v in state["state"].items()}, "param_groups": groups}


def is_sharded_dict(state: dict[str, Any]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(v, DTensor) for v in state.values())


def _keyed_by_name(state: dict[str, Any]) -> bool:
    return any(isinstance(i, str) for g in state.get("param_groups", []) for i in g.get("params", []))
