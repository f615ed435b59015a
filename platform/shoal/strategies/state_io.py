"""The model and optimizer state a strategy saves and takes back, one class per layout.

Full (strategies single and allreduce): rank 0 writes the whole state dicts; they load a full checkpoint,
or a sharded one read whole. Sharded (fsdp): every rank gives and takes its own shards through
torch.distributed.checkpoint, resharding to any world; it also takes a full state dict. Stages
(pipelines): every rank gives and takes its own layers' part of either kind, under the whole model's names.

torch.distributed.checkpoint and DTensor (each loads FSDP) take about a second to import: they are imported
where a sharded state is handled, so a job that never meets one starts without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.checkpoint import check_keys, load_model_state, shapes_of
from shoal.config import OptimConfig
from shoal.dcp import Sharded, read_into, read_optimizer_into
from shoal.errors import ConfigError
from shoal.optim import param_groups


class FullStateIO:
    """The whole model on every rank: torch's own state dicts (rank 0 writes them)."""

    sharded = False

    def __init__(self, model: nn.Module):
        self.model = model

    def model_state(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_model_state(self, state: Any, source: Path | str) -> None:
        """A full state dict, or a sharded checkpoint's model read whole (a job saved by strategy fsdp)."""
        load_model_state(self.model, state, source)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        if not isinstance(state, Sharded):
            optimizer.load_state_dict(state)
            return
        # saved sharded, keyed by parameter name: read it whole into this optimizer's named state
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        target = get_optimizer_state_dict(self.model, optimizer)
        read_optimizer_into(target, state.path)
        set_optimizer_state_dict(self.model, optimizer, target)


class ShardedStateIO:
    """Every rank holds shards of every tensor (FSDP2's DTensors): DCP's state dicts, keyed by name."""

    sharded = True

    def __init__(self, module: nn.Module):
        self.module = module

    def model_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module)

    def load_model_state(self, state: Any, source: Path | str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

        if isinstance(state, Sharded):  # this layout's own format: DCP reshards to this world
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

        if isinstance(state, Sharded):
            target = get_optimizer_state_dict(self.module, optimizer)
            read_optimizer_into(target, state.path)
            set_optimizer_state_dict(self.module, optimizer, target)
        elif _keyed_by_name(
            state
        ):  # an in-memory state of this run: a rollback's (shards) or a snapshot's (joined whole)
            whole = not any(is_sharded_dict(v) for v in state["state"].values())
            options = StateDictOptions(full_state_dict=True) if whole else None
            set_optimizer_state_dict(self.module, optimizer, state, options=options)
        else:  # torch's own format, keyed by parameter index: name the parameters as DCP does
            full = by_name(state, self.module, optimizer)
            set_optimizer_state_dict(self.module, optimizer, full, options=StateDictOptions(full_state_dict=True))


class StageStateIO:
    """This rank's pipeline stages (`local`: their modules under the whole model's names): its part of the
    model and optimizer, from a checkpoint of any layout; other stages' keys are theirs."""

    sharded = True  # every stage writes its own part of the one checkpoint

    def __init__(self, local: nn.Module, full_order: list[str]):
        self.local = local
        self.full_order = full_order  # the whole model's optimizer's parameter names, in its order (optimizer_order)

    def model_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.local)

    def load_model_state(self, state: Any, source: Path | str) -> None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        target = get_model_state_dict(self.local)
        if isinstance(state, Sharded):
            shapes = state.shapes()
            check_keys(
                target, {k: v for k, v in shapes.items() if k in target}, source
            )  # this stage's keys, all present
            read_into(target, state.path)
            set_model_state_dict(self.local, target)
        else:
            mine = {k: v for k, v in state.items() if k in target}
            check_keys(target, shapes_of(mine), source)
            set_model_state_dict(self.local, mine)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.local, optimizer)

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        target = get_optimizer_state_dict(self.local, optimizer)
        if isinstance(state, Sharded):
            read_optimizer_into(target, state.path)
        else:  # torch's format from a whole model (strategy allreduce): parameters by index in its groups' order
            named = {self.full_order[i]: st for i, st in state["state"].items()}
            target["state"] = {name: named[name] for name in target["state"] if name in named}
        set_optimizer_state_dict(self.local, optimizer, target)


def optimizer_order(model: nn.Module, cfg: OptimConfig) -> list[str]:
    """Parameter names in the order a whole model's optimizer lists them (its groups, in turn)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in param_groups(model, cfg) for p in g["params"]]


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
