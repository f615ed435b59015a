"""Measurements every health.every steps: per-layer gradient and weight norms, update-to-weight ratios,
and (optionally) activation statistics through forward hooks.

Norms are computed from what this rank holds and made global by `reduce` (a sum of squares over
the ranks that shard a tensor: one small all-reduce for all layers together); a sharded model's
weights are never gathered to be measured. Whole-tensor strategies reduce nothing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shoal.models import trainable

ACTIVATION_TYPES = (nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid)


def layers(model: nn.Module) -> OrderedDict[str, list[nn.Parameter]]:
    """Trainable parameters grouped by the module that owns them, input side first."""
    out: OrderedDict[str, list[nn.Parameter]] = OrderedDict()
    for name, p in trainable(model):
        out.setdefault(name.rsplit(".", 1)[0] if "." in name else name, []).append(p)
    return out


Reduce = Callable[[torch.Tensor], torch.Tensor]


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor (its shard of a DTensor; the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def _whole(values: torch.Tensor, reduce: Reduce | None) -> list[float]:
    return (reduce(values) if reduce is not None else values).tolist()


def _group_norms(
    groups: OrderedDict[str, list[torch.Tensor]], reduce: Reduce | None, layout: list[str] | None = None
) -> list[tuple[str, float]]:
    """Per-layer norms. With a layout (the whole model's layers, when this rank holds some of them), every rank
    reduces the same vector: its own layers' squares in their places, zeros and a 0 "held" flag elsewhere."""
    names = layout if layout is not None else list(groups)
    flat = [local(t).detach().float() for ts in groups.values() for t in ts]
    squares = torch.stack(torch._foreach_norm(flat)).double() ** 2 if flat else torch.zeros(0, dtype=torch.float64)
    sums = torch.zeros(2 * len(names), dtype=torch.float64)
    i = 0
    for name, ts in groups.items():
        k = names.index(name)
        sums[k], sums[len(names) + k] = squares[i : i + len(ts)].sum().cpu(), 1.0
        i += len(ts)
    values = _whole(sums, reduce)
    return [(name, values[k] ** 0.5) for k, name in enumerate(names) if values[len(names) + k] > 0]


def grad_norms(
    groups: OrderedDict[str, list[nn.Parameter]], reduce: Reduce | None = None, layout: list[str] | None = None
) -> list[tuple[str, float]]:
    """(layer, gradient L2 norm) for layers whose parameters have gradients."""
    with_grad = OrderedDict((k, [p.grad for p in ps if p.grad is not None]) for k, ps in groups.items())
    return _group_norms(OrderedDict((k, v) for k, v in with_grad.items() if v), reduce, layout)


def weight_norms(
    groups: OrderedDict[str, list[nn.Parameter]], reduce: Reduce | None = None, layout: list[str] | None = None
) -> list[tuple[str, float]]:
    return _group_norms(OrderedDict((k, list(ps)) for k, ps in groups.items()), reduce, layout)


class UpdateRatio:
    """||w_after - w_before|| / ||w_before|| per layer, for the step it is armed on.

    Estimated on a fixed random sample of up to SAMPLE elements per tensor (each tensor's squares
    scaled by numel / sample, so a layer's large weight and small bias weigh as in the full norm):
    copying every parameter at each measurement cost more than the rest of health monitoring.
    """

    SAMPLE = 4096

    def __init__(self) -> None:
        self.before: OrderedDict[str, list[torch.Tensor]] | None = None
        self._index: dict[int, torch.Tensor | None] = {}

    def _sample(self, param: torch.Tensor) -> torch.Tensor:
        key, p = id(param), local(param)  # the parameter's identity is stable; a DTensor's local view is not
        if key not in self._index:
            n = p.numel()
            gen = torch.Generator().manual_seed(n)
            self._index[key] = (
                None if n <= self.SAMPLE else torch.randperm(n, generator=gen)[: self.SAMPLE].to(p.device)
            )
        idx = self._index[key]
        flat = p.detach().reshape(-1)
        return flat.clone() if idx is None else flat.index_select(0, idx)

    def arm(self, groups: OrderedDict[str, list[nn.Parameter]]) -> None:
        self.before = OrderedDict((k, [self._sample(p) for p in ps]) for k, ps in groups.items())

    def read(
        self,
        groups: OrderedDict[str, list[nn.Parameter]],
        reduce: Reduce | None = None,
        layout: list[str] | None = None,
    ) -> list[tuple[str, float]]:
        """Per layer, from this rank's part of each tensor, made global by `reduce` (see _group_norms for layout)."""
        if self.before is None:
            return []
        names = layout if layout is not None else list(groups)
        sums = torch.zeros(2 * len(names), dtype=torch.float64)
        for k, ps in groups.items():
            i = names.index(k)
            for p, b in zip(ps, self.before[k]):
                scale = local(p).numel() / max(1, b.numel())
                sums[2 * i] += scale * (self._sample(p) - b).double().pow(2).sum().cpu()
                sums[2 * i + 1] += scale * b.double().pow(2).sum().cpu()
        self.before = None
        values = _whole(sums, reduce)
        return [(k, (values[2 * i] / values[2 * i + 1]) ** 0.5) for i, k in enumerate(names) if values[2 * i + 1] > 0]


QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
HIST_SAMPLE = 1 << 16  # values per tensor a histogram is drawn from (a fixed random subset past this)


def _values(t: torch.Tensor) -> torch.Tensor:
    flat = local(t).detach().reshape(-1).float()
    if flat.numel() > HIST_SAMPLE:
        gen = torch.Generator(device=flat.device).manual_seed(flat.numel())
        flat = flat[torch.randint(flat.numel(), (HIST_SAMPLE,), generator=gen, device=flat.device)]
    return flat.cpu()


class Histograms:
    """Per-layer value distributions of weights, gradients and activations for the armed step (rank 0; a sharded
    tensor contributes rank 0's shard). Each becomes a TensorBoard histogram and its quantiles a metrics entry."""

    def __init__(self, model: nn.Module):
        self.armed = False
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [
            m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            if self.armed and module.training:
                self.values[f"activation/{name}"] = _values(out)

        return hook

    def capture(self, kind: str, groups: OrderedDict[str, list[nn.Parameter]], grads: bool = False) -> None:
        for layer, ps in groups.items():
            ts = [p.grad if grads else p for p in ps]
            ts = [t for t in ts if t is not None]
            if ts:
                self.values[f"{kind}/{layer}"] = torch.cat([_values(t) for t in ts])

    def take(self) -> tuple[dict[str, Any], dict[str, list[float]]]:
        """(histograms by tag as numpy arrays, quantiles by metrics key) of what was captured."""
        values, self.values = self.values, {}
        q = torch.tensor(QUANTILES)
        hist = {tag: v.numpy() for tag, v in values.items() if v.numel()}
        quant = {f"dist_{tag}": torch.quantile(v, q).tolist() for tag, v in values.items() if v.numel()}
        return hist, quant


class ActivationProbe:
    """Forward hooks on activation modules; they record only while armed."""

    def __init__(self, model: nn.Module):
        self.armed = False
        self.stats: dict[str, dict[str, float]] = {}
        self.handles = [
            m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if isinstance(m, ACTIVATION_TYPES)
        ]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            if self.armed and module.training:
                o = out.detach().float()
                entry = {"mean": float(o.mean()), "std": float(o.std()) if o.numel() > 1 else 0.0}
                if isinstance(module, nn.ReLU):
                    entry["dead"] = float((o <= 0).all(dim=0).float().mean())  # units silent for the whole batch
                self.stats[name] = entry

        return hook

    def take(self) -> dict[str, dict[str, float]]:
        stats, self.stats = self.stats, {}
        return stats
