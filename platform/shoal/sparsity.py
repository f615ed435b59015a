"""model.weights and model.keep_sparsity: start from saved weights and keep their zeros zero, so a pruned
model fine-tunes without growing back (the masks are re-applied after every optimizer step)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from shoal.errors import CheckpointError


def load_weights(model: nn.Module, path: str) -> None:
    from shoal.checkpoint import load_model_state

    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"model.weights: {file}: not found (a state dict file, e.g. compress/<variant>/model.pt)")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"model.weights: {file}: not a loadable state dict ({type(e).__name__})") from None
    load_model_state(model, state, file)


class SparsityMasks:
    """Zero masks of the weights that start with zeros; apply() keeps them zero."""

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
