"""A trained model, rebuilt for inference from what a run leaves: a run directory (its latest checkpoint),
a checkpoint directory, or a model `shoal compress` wrote (a directory with model.pt and meta.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from shoal.checkpoint import META, find_latest, is_sharded, load_model_state, load_part, verify
from shoal.config import JobConfig, config_from_dict
from shoal.data.loaders import open_splits
from shoal.data.spec import DataSpec
from shoal.dcp import Sharded
from shoal.errors import CheckpointError
from shoal.losses import Loss
from shoal.models import build_model
from shoal.state import MODEL
from shoal.weights import load_file, quantize

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
    if (path / "checkpoints").is_dir():
        found = find_latest(path)
        if found is None:
            raise CheckpointError(f"{path}: no complete checkpoint")
        return found
    return path


def load(path: Path) -> Trained:
    """The model in eval mode on the CPU, with its job's config and data spec."""
    path = resolve(path)
    if (path / VARIANT).exists():
        meta = _variant_meta(path)
    else:
        meta = verify(path)
        if "config" not in meta:
            raise CheckpointError(f"checkpoint {path}: its {META} holds no config to rebuild the model from")
    cfg = config_from_dict(meta["config"])
    spec = open_splits(cfg)[0].spec
    loss = Loss.of(cfg, spec)
    model = build_model(cfg.model, spec, loss.out_features())
    variant = meta.get("variant", {})
    if variant.get("quantize"):  # the int8 modules first, so the saved int8 tensors have their places
        quantize(model, variant["quantize"])
    if (path / VARIANT).exists():
        state = load_file(path / "model.pt", f"compressed model {path}", quantized=bool(variant.get("quantize")))
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"{path}: model.pt holds no model weights")
        model.load_state_dict(state, assign=bool(variant.get("quantize")))
    elif is_sharded(path):
        load_model_state(model, Sharded(path / MODEL), path)
    else:
        state = load_part(path, MODEL)
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"checkpoint {path}: holds no model weights")
        load_model_state(model, state, path)
    return Trained(cfg, model.eval(), spec, path, variant)


def _variant_meta(path: Path) -> dict[str, Any]:
    """A compressed model's variant.json: the job's config and what was done to the weights."""
    try:
        meta = json.loads((path / VARIANT).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / VARIANT}: not readable JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path / VARIANT}: holds no config to rebuild the model from")
    if not isinstance(meta.get("variant", {}), dict):
        raise CheckpointError(f"{path / VARIANT}: 'variant' must be a mapping")
    return meta
