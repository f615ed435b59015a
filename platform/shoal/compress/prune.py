"""Magnitude pruning through torch.nn.utils.prune, made permanent (the zeros are in the weights).

Pruned: the weights of Linear and Conv2d layers (and Hugging Face's Conv1D, GPT-2's Linear with its
weight stored transposed), except a weight shared by two modules (a tied
embedding): pruning one name of it would silently prune the other. Structured pruning removes whole
output neurons or channels (rows of the weight, by L2 norm) and spares the output layer, whose rows
are the classes."""

from __future__ import annotations

from torch import nn
from torch.nn.utils import prune as tprune

from shoal.errors import ShoalError

PRUNABLE = (nn.Linear, nn.Conv2d)


def _transposed(m: nn.Module) -> bool:
    """transformers' Conv1D: a Linear whose weight is (inputs, outputs)."""
    return type(m).__name__ == "Conv1D" and type(m).__module__.startswith("transformers.")


def layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return [
        (n, m)
        for n, m in model.named_modules()
        if (isinstance(m, PRUNABLE) or _transposed(m)) and seen[id(m.weight)] == 1
    ]


def prune(model: nn.Module, sparsity: float, method: str = "unstructured", scope: str = "global") -> None:
    """Zero the smallest weights in place: `sparsity` of them over all layers (global) or in each layer."""
    if not 0 <= sparsity < 1:
        raise ShoalError(f"--sparsity: each value must be in [0, 1) (got {sparsity:g})")
    found = layers(model)
    if not found:
        raise ShoalError("the model has no Linear or Conv2d weights to prune")
    if sparsity == 0:
        return
    if method == "structured":
        for _, m in found[:-1] if len(found) > 1 else found:
            tprune.ln_structured(m, "weight", amount=sparsity, n=2, dim=1 if _transposed(m) else 0)
    elif scope == "global":
        tprune.global_unstructured([(m, "weight") for _, m in found], tprune.L1Unstructured, amount=sparsity)
    else:
        for _, m in found:
            tprune.l1_unstructured(m, "weight", amount=sparsity)
    for _, m in found:
        if tprune.is_pruned(m):
            tprune.remove(m, "weight")


def zeros(model: nn.Module) -> tuple[int, int]:
    """(parameters, of which exactly zero) over every floating-point parameter."""
    total = zero = 0
    for p in model.parameters():
        if p.is_floating_point():
            total += p.numel()
            try:
                zero += int((p == 0).sum())
            except NotImplementedError:  # a quantised tensor: count in its float values
                zero += int((p.dequantize() == 0).sum())
    return total, zero
