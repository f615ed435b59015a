"""What to do about it. Every input here is the same number on every rank (gradients after the
AllReduce, losses and metrics reduced across ranks), so every rank takes the same decision at the
same step without another collective: no rank ever leaves the loop alone."""

from __future__ import annotations

import math
from typing import Any

from shoal.config import EarlyStopping

CONTINUE, SKIP, ROLLBACK, STOP = "continue", "skip", "rollback", "stop"


def on_trouble(policy: str, nonfinite: bool, rollbacks: int, max_rollbacks: int) -> str:
    """health.on_nonfinite for a non-finite step or a diverged loss."""
    if policy == "rollback":
        return ROLLBACK if rollbacks < max_rollbacks else STOP
    if policy == "stop":
        return STOP
    return SKIP if nonfinite else CONTINUE  # skip: the engine already skipped the update


class EarlyStopper:
    """train.early_stopping: patience over evaluations of one metric."""

    def __init__(self, cfg: EarlyStopping | None):
        self.cfg = cfg
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0

    def observe(self, step: int, metrics: dict[str, float]) -> tuple[bool, bool]:
        """(improved, stop now)."""
        if self.cfg is None or not isinstance(metrics.get(self.cfg.metric), float) or math.isnan(metrics[self.cfg.metric]):
            return False, False
        value = metrics[self.cfg.metric]
        sign = 1.0 if self.cfg.mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > self.cfg.min_delta:
            self.best, self.best_step, self.bad = value, step, 0
            return True, False
        self.bad += 1
        return False, self.bad >= self.cfg.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], int(state["bad"])
