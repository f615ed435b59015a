"""What the model needs to know about the data: shapes, classes, task. No torch: the driver reads it too."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shoal.config import DataConfig
from shoal.data.locate import MANIFEST, expand, find_manifest, is_directory, is_local, join, parent
from shoal.data.storage import is_remote

DIGITS_SAMPLES = 1797


@dataclass(frozen=True)
class DataSpec:
    task: str  # classification | regression | lm
    input_shape: tuple[int, ...]
    num_classes: int = 0  # classification
    target_dim: int = 1  # regression
    vocab_size: int = 0  # lm, and classification of token ids (inputs are ids in [0, vocab_size))
    seq_len: int = 0  # lm
    pad_id: int | None = None  # right-padded token data: the id after a sample's last token

    @property
    def token_ids(self) -> bool:
        """Whether the inputs are token ids (int64 batches), not float features."""
        return self.vocab_size > 0

    @property
    def classes(self) -> int:
        """What the model predicts among: classes, or the vocabulary for lm (0 for regression)."""
        return self.vocab_size if self.task == "lm" else self.num_classes


def from_config(cfg: DataConfig) -> DataSpec:
    """The spec the data section states (memory data, and shards without Shoal's manifest)."""
    if cfg.format == "memory" and cfg.dataset == "digits":
        return DataSpec(task="classification", input_shape=(1, 8, 8), num_classes=10)
    if cfg.task == "lm":
        return DataSpec(task="lm", input_shape=(cfg.seq_len,), vocab_size=cfg.vocab_size, seq_len=cfg.seq_len)
    return DataSpec(
        task=cfg.task,
        input_shape=tuple(cfg.input_shape),
        num_classes=cfg.num_classes if cfg.task == "classification" else 0,
    )


def from_manifest(manifest: dict[str, Any] | None, cfg: DataConfig) -> DataSpec:
    """The spec of shards: their manifest's, else the config's."""
    if manifest is None:
        return from_config(cfg)
    x = manifest["fields"]["x"]
    task = manifest["task"]
    if task == "lm":
        return DataSpec(
            task="lm", input_shape=tuple(x["shape"]), vocab_size=int(manifest["vocab_size"]), seq_len=int(x["shape"][0])
        )
    y_shape = manifest["fields"]["y"]["shape"]
    pad = manifest.get("pad_id")
    return DataSpec(
        task=task,
        input_shape=tuple(x["shape"]),
        num_classes=int(manifest.get("num_classes") or 0),
        target_dim=int(math.prod(y_shape)) if task == "regression" else 1,
        vocab_size=int(manifest.get("vocab_size") or 0),  # rows of token ids (`shoal shard --tokenizer`)
        pad_id=int(pad) if pad is not None else None,
    )


def readable_manifest(cfg: DataConfig) -> dict[str, Any] | None:
    """The manifest of local or s3:// shards, when there is one to read (None for memory data and streamed URLs)."""
    if cfg.format != "shards" or cfg.path is None:
        return None
    if cfg.manifest:
        readable = is_local(cfg.manifest) or is_remote(cfg.manifest)
        return find_manifest(cfg.manifest, cfg.storage_options) if readable else None
    if is_directory(cfg.path):
        return find_manifest(join(cfg.path, MANIFEST), cfg.storage_options)
    if is_local(cfg.path) or is_remote(cfg.path):
        return find_manifest(join(parent(expand(cfg.path)[0]), MANIFEST), cfg.storage_options)
    return None


def describe(cfg: DataConfig) -> tuple[DataSpec, int | None]:
    """(spec, training samples) as far as they are known without reading samples (the driver's view)."""
    manifest = readable_manifest(cfg)
    if manifest is not None:
        split = manifest["splits"].get("train", {})
        samples = split.get("samples") or sum(int(s["samples"]) for s in split.get("shards", []))
        return from_manifest(manifest, cfg), int(samples) if cfg.path and is_directory(cfg.path) else None
    if cfg.format == "memory":
        total = DIGITS_SAMPLES if cfg.dataset == "digits" else cfg.num_samples
        return from_config(cfg), total - int(round(total * cfg.val_fraction))
    return from_config(cfg), None
