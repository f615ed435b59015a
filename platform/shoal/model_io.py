"""model.inputs and model.output: a user's model called on a batch of named fields, its result read as one tensor.

The model's class is swapped for a subclass of it (as torch's fully_shard does) whose forward takes the
batch, calls the model's own forward with the fields bound to its arguments and returns what
model.output names. Nothing is wrapped: parameter names, the state dict, the class name (and so a
Hugging Face model's save_pretrained) stay the model's own. A tensor in (today's contract) is passed on
positionally. Every mismatch is a ConfigError naming model.inputs or model.output.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shoal.config import ModelConfig
from shoal.data.fields import LABELS, Fields, names
from shoal.data.spec import DataSpec
from shoal.errors import ConfigError

LOSS = "loss"


@dataclass
class ModelIO:
    """How a batch becomes the forward's arguments (None: the input positionally) and its result the output."""

    binding: dict[str, str] | None  # batch field -> forward argument
    output: str | int | None
    default_name: str | None  # read when model.output is unset and the result is not a tensor (HF: logits)
    shift_labels: bool  # also pass the (already shifted) labels as shift_labels: a causal LM shifts no more

    def arguments(self, batch: Fields) -> dict[str, Any]:
        if self.binding is None:
            return {}
        args = {arg: batch[field] for field, arg in self.binding.items()}
        if self.shift_labels:
            args["shift_labels"] = batch[LABELS]
        return args

    def read(self, out: Any) -> torch.Tensor:
        """The model's output: the tensor, or what model.output names of the result."""
        if self.output is None and isinstance(out, torch.Tensor):
            return out
        name = self.output if self.output is not None else self.default_name
        got = _part(out, name) if name is not None else None
        if isinstance(got, torch.Tensor):
            return got
        what = f"{name!r} is {type(got).__name__}; " if name is not None else ""
        hint = "a tuple index" if isinstance(out, tuple | list) else "one of them"
        raise ConfigError(
            f"the forward returned {type(out).__name__} ({_contents(out)}); {what}set model.output to {hint}",
            key="model.output",
        )


def bind(model: nn.Module, cfg: ModelConfig, spec: DataSpec, hugging_face: bool) -> nn.Module:
    """The model, its forward taking a batch (Fields or a tensor) and returning one tensor."""
    params = inspect.signature(model.forward).parameters
    binding = _binding(type(model).__name__, params, cfg, spec, hugging_face)
    if cfg.output == LOSS and (binding is None or LABELS not in binding):
        raise ConfigError(
            "loss: the model computes its loss from the targets, so they must reach its forward: "
            "map them in model.inputs (e.g. labels: labels)",
            key="model.output",
        )
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    shift = hugging_face and spec.task == "lm" and binding is not None and LABELS in binding and takes_any
    model.shoal_io = ModelIO(binding, cfg.output, "logits" if hugging_face else None, shift)
    model.__class__ = _io_class(type(model))
    return model


def _binding(cls: str, params: Any, cfg: ModelConfig, spec: DataSpec, hugging_face: bool) -> dict[str, str] | None:
    """Batch field -> argument, checked against the batch's fields and the forward's parameters."""
    fields = names(spec)
    # a Hugging Face forward's **kwargs are its attention and loss options, never a batch field
    takes_any = not hugging_face and any(p.kind is p.VAR_KEYWORD for p in params.values())
    if cfg.inputs is not None:
        binding = dict(cfg.inputs)
    elif hugging_face:
        binding = {f: f for f in fields if f in params and (f != LABELS or cfg.output == LOSS)}
        if fields[0] not in binding:
            raise ConfigError(
                f"the batch's input {fields[0]!r} is not an argument of {cls}.forward (it takes: "
                f"{_listed(params)}); map it in model.inputs",
                key="model.inputs",
            )
    else:
        return None
    for field, arg in binding.items():
        if field not in fields:
            raise ConfigError(f"the batch has no field {field!r} (it has: {', '.join(fields)})", key="model.inputs")
        if arg not in params and not takes_any:
            raise ConfigError(
                f"{cls}.forward takes no argument {arg!r} (it takes: {_listed(params)})", key="model.inputs"
            )
    _check_required(cls, params, binding, fields)
    return binding


def _check_required(cls: str, params: Any, binding: dict[str, str], fields: list[str]) -> None:
    """Every argument the forward needs (no default) is given by a field."""
    for name, p in params.items():
        needed = p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        if needed and name not in binding.values():
            raise ConfigError(
                f"{cls}.forward needs {name!r}, which no batch field gives (fields: {', '.join(fields)}); "
                "map one to it",
                key="model.inputs",
            )


def _listed(params: Any) -> str:
    return ", ".join(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))


_CLASSES: dict[type, type] = {}


def _io_class(cls: type) -> type:
    """cls with a forward that takes a batch: one subclass per model class, named as it is."""
    if getattr(cls, "_shoal_base", None) is not None:
        return cls
    if cls not in _CLASSES:
        body = {"forward": _forward, "_shoal_base": cls, "__module__": cls.__module__, "__qualname__": cls.__qualname__}
        _CLASSES[cls] = type(cls.__name__, (cls,), body)
    return _CLASSES[cls]


def _forward(self: nn.Module, batch: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
    io: ModelIO = self.shoal_io
    base = type(self)._shoal_base
    if isinstance(batch, Fields):
        out = base.forward(self, **io.arguments(batch)) if io.binding is not None else base.forward(self, batch.main)
    else:
        out = base.forward(self, batch, *args, **kwargs)
    return io.read(out)


def _part(out: Any, name: str | int) -> Any:
    """out[name] or out.name (a tuple index for an int); None when there is no such part."""
    if isinstance(name, int):
        return out[name] if isinstance(out, tuple | list) and -len(out) <= name < len(out) else None
    if isinstance(out, dict):  # Hugging Face's ModelOutput is an OrderedDict of the parts it has
        return out.get(name)
    return getattr(out, name, None)


def _contents(out: Any) -> str:
    if isinstance(out, dict):
        return "keys: " + (", ".join(map(str, out.keys())) or "none")
    if isinstance(out, tuple | list):
        return f"{len(out)} items"
    attrs = [a for a in dir(out) if not a.startswith("_") and isinstance(getattr(out, a, None), torch.Tensor)]
    return "tensor attributes: " + (", ".join(attrs) or "none")
