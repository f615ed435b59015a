"""Batches of named fields, for models that take their inputs by name (Hugging Face models, `model.inputs`).

A source's batch is (x, y); `FieldsSource` names them once, where the batch is read (in loader workers
too): `input_ids` for token ids, `pixel_values` for images, `x` for other features, `labels` for the
targets, and for right-padded token data (a manifest's `pad_id`) the batch is cut to its longest sample
and gets `attention_mask` (1 on real tokens). Packed language-model blocks have no pads and need none.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from shoal.data.spec import DataSpec

LABELS = "labels"


class Fields:
    """Named tensors of one batch, rows first: moved, pinned and sliced as one."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return self.tensors[key]
        return Fields({k: v[key] for k, v in self.tensors.items()})

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __repr__(self) -> str:
        return "Fields(" + ", ".join(f"{k}={list(v.shape)}" for k, v in self.tensors.items()) + ")"

    @property
    def main(self) -> torch.Tensor:
        """The input field (the first): what a model that takes one tensor gets."""
        return next(iter(self.tensors.values()))

    def to(self, *args: Any, **kwargs: Any) -> Fields:
        return Fields({k: v.to(*args, **kwargs) for k, v in self.tensors.items()})

    def pin_memory(self) -> Fields:  # DataLoader(pin_memory=True) calls it on a batch of its own type
        return Fields({k: v.pin_memory() for k, v in self.tensors.items()})


def is_hugging_face_target(target: str | None) -> bool:
    """A model.target in the transformers package (its models take their inputs by name)."""
    return bool(target) and target.split(":")[0].split(".")[0] == "transformers"


def input_name(spec: DataSpec) -> str:
    """The batch's name for its input: input_ids for token ids, pixel_values for images, else x."""
    if spec.task == "lm" or spec.vocab_size:
        return "input_ids"
    return "pixel_values" if len(spec.input_shape) == 3 else "x"


def names(spec: DataSpec) -> list[str]:
    """The fields a batch of this data holds."""
    extra = ["attention_mask"] if spec.pad_id is not None else []
    return [input_name(spec), *extra, LABELS]


def named(x: torch.Tensor, y: torch.Tensor, spec: DataSpec) -> Fields:
    """(x, y) as fields; padded token data cut to the batch's longest sample, with its attention mask."""
    if spec.pad_id is None:
        return Fields({input_name(spec): x, LABELS: y})
    mask = x != spec.pad_id
    longest = int(mask.sum(dim=1).max()) if len(x) else x.shape[1]  # right padding: real tokens come first
    return Fields({"input_ids": x[:, :longest], "attention_mask": mask[:, :longest].long(), LABELS: y})


def real_tokens(x: Any) -> int | None:
    """Tokens that are not padding in a batch (None where the batch has no mask)."""
    if isinstance(x, Fields) and "attention_mask" in x:
        return int(x["attention_mask"].sum())
    return None


class FieldsSource:
    """A batch source whose batches are Fields (and the targets), for models that take named inputs."""

    def __init__(self, source: Any):
        self.source = source
        self.spec: DataSpec = source.spec

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:  # shard_counts, scan, ...: the wrapped source's
        if name == "source":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def get_batch(self, idx: np.ndarray) -> tuple[Any, ...]:
        x, y, *rest = self.source.get_batch(idx)
        return (named(x, y, self.spec), y, *rest)
