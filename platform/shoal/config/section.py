"""What every config section shares, and the watched evaluation metric several of them follow."""

from __future__ import annotations

import re
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class WatchedMetric(Section):
    """An evaluation metric and which way is better: early stopping, the plateau schedule and keep_best follow one."""

    metric: str = "val_loss"
    """Evaluation metric watched, e.g. val_loss or val_accuracy."""
    mode: Literal["min", "max"] = "min"
    """Whether the metric should go down (min) or up (max)."""

    def improves(self, value: float, best: float | None, margin: float = 0.0) -> bool:
        """Whether value beats best (None: nothing yet) by more than margin, in the metric's direction."""
        sign = 1.0 if self.mode == "min" else -1.0
        return best is None or sign * (best - value) > margin

    def best_of(self, scored: list[tuple[float, T]]) -> T:
        """The item of the best (score, item) pair."""
        return (min if self.mode == "min" else max)(scored, key=lambda t: t[0])[1]


def check_target(key: str, value: str | None, shape: str = "package.module:fn") -> None:
    """Refuse (ValueError naming key) a value that is set but does not look like "package.module:fn"."""
    if value is not None and not re.fullmatch(r"[\w.]+:[\w.]+", value):
        raise ValueError(f"{key}: must look like '{shape}' (got {value!r})")
