"""A trained model, rebuilt for inference from what a run leaves: a run directory (its latest checkpoint),
a checkpoint directory, or a model `shoal compress` wrote (a directory with model.pt and meta.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.config import JobConfig, config_from_dict
from shoal.data.loaders import open_splits
from shoal.data.spec import DataSpec
from shoal.errors import CheckpointError
from shoal.state import MODEL, file_of

VARIANT = "variant.json"  # beside a compressed model's model.pt: the config and what was done to it


@dataclass
class Trained:
    cfg: JobConfig
    model: nn.Module
    spec: DataSpec
    source: Path
    variant: dict[str, Any] = field(default_factory=dict)  # compression applied ({} for a checkpoint's model)


def resolve(path: Path) -> Path:
    """A run directory means its latest complete checkpoint."""
    from shoal.checkpoint import find_latest

    if (path / "checkpoints").is_dir():
        found = find_latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint")
        return found
    return path


def load(path: Path) -> Trained:
    """The model in eval mode on the CPU, with its job's config and data spec."""
    from shoal.checkpoint import META, is_sharded, load_model_state, verify
    from shoal.losses import Loss
    from shoal.models import build_model

    path = resolve(path)
    if (path / VARIANT).exists():
        meta = json.loads((path / VARIANT).read_text())
    else:
        meta = verify(path)
        if "config" not in meta:
            raise CheckpointError(f"checkpoint {path}: its {META} holds no config to rebuild the model from")
    cfg = config_from_dict(meta["config"])
    spec = open_splits(cfg)[0].spec
    loss = Loss(cfg.train, spec, "model.target" if cfg.model.target else "model.name")
    model = build_model(cfg.model, spec, loss.out_features())
    variant = meta.get("variant", {})
    if variant.get("quantize"):
        from shoal.compress.quantize import quantize

        quantize(model, variant["quantize"])
    if (path / VARIANT).exists():
        state = torch.load(
            path / "model.pt", map_location="cpu", weights_only=False if variant.get("quantize") else True
        )
        model.load_state_dict(state, assign=bool(variant.get("quantize")))
    elif is_sharded(path):
        from shoal.dcp import Sharded

        load_model_state(model, Sharded(path / MODEL), path)
    else:
        from shoal.checkpoint import _load_file

        state = _load_file(path, file_of(MODEL))
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"checkpoint {path}: holds no model weights")
        load_model_state(model, state, path)
    return Trained(cfg, model.eval(), spec, path, variant)
