"""Weights as files, and the one way Shoal reads them: `load_file` never runs pickled code.

Everything Shoal loads with torch (checkpoints, `model.weights`, compressed models) comes through
`load_file`, which is `torch.load(weights_only=True)`: tensors and plain data only. A compressed
model's int8 tensors are torchao tensor subclasses; their classes (and nothing else) are allowed by
name while such a file is read, so a "compressed model" whose pickle calls `os.system` is refused
like any other. This module also owns what a compressed model is: int8 quantisation through torchao
(`quantize`), and the zeros of pruned weights kept zero while fine-tuning (`SparsityMasks`). Loading them
into a model (model.weights, checkpoints) is `checkpoint`'s: it depends on this module, never the reverse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.errors import CheckpointError, ShoalError

QUANTIZE_KINDS = ("dynamic", "weight_only")


def load_file(path: Path, where: str, quantized: bool = False) -> Any:
    """The tensors and plain data in a torch file, loaded without running pickled code.

    `where` says what holds the file in an error ("checkpoint RUN/checkpoints/step-000010", "model.weights");
    `quantized` allows torchao's quantised tensor classes, and only those.
    """
    allowed = _quantized_classes() if quantized else []
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: {path.name} not found") from None
    except Exception as e:  # weights_only refuses anything but tensors, plain data and the allowed classes
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{where}: cannot load {path.name} safely ({type(e).__name__}: {first})") from None


def _quantized_classes() -> list[type]:
    """torchao's int8 tensor classes. Importing torchao registers its tensor subclasses and the small types
    inside them (granularity, mapping type) with torch's allow-list itself; Int8Tensor is named here too so
    a torchao that stops doing so still loads Shoal's own files."""
    tq = _torchao()
    return [c for c in (getattr(tq, "Int8Tensor", None),) if isinstance(c, type)]


def _torchao() -> Any:
    try:  # an optional extra: only int8 models need it
        import torchao.quantization as tq
    except ImportError:
        raise ShoalError("int8 quantisation needs torchao: pip install 'shoal[compress]'") from None
    return tq


def quantize(model: nn.Module, kind: str) -> nn.Module:
    """Quantise the model's Linear layers to int8 in place (and return it), through torchao (PyTorch's maintained
    quantisation library; torch.ao.quantization is deprecated in its favour): `dynamic` quantises weights to int8
    and each batch's activations on the fly, `weight_only` keeps activations in float. Neither needs calibration."""
    if kind not in QUANTIZE_KINDS:
        raise ShoalError(f"--quantize: {kind!r} is not one of {', '.join(QUANTIZE_KINDS)}")
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ShoalError(f"--quantize {kind}: the model has no Linear layers for int8 quantisation to take")
    tq = _torchao()
    config = tq.Int8DynamicActivationInt8WeightConfig() if kind == "dynamic" else tq.Int8WeightOnlyConfig()
    tq.quantize_(model, config, filter_fn=lambda m, _: isinstance(m, nn.Linear) and m.weight.shape[0] > 1)
    return model


class SparsityMasks:
    """model.keep_sparsity: zero masks of the weights that start with zeros; apply() keeps them zero, so a pruned
    model fine-tunes without growing back (applied after every optimizer step)."""

    def __init__(self, model: nn.Module | None = None):
        self.masks: list[tuple[nn.Parameter, torch.Tensor]] = []
        if model is not None:
            for p in model.parameters():
                if p.dim() >= 2 and bool((p == 0).any()):
                    self.masks.append((p, p.detach() != 0))

    @torch.no_grad()
    def apply(self) -> None:
        for p, mask in self.masks:
            p.mul_(mask)
