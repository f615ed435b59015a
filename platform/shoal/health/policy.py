"""What to do about it, and the mechanisms the decisions need.

Every input here is the same number on every rank (gradients after the reduction, losses and
metrics reduced across ranks), so every rank takes the same decision at the same step without
another collective: no rank ever leaves the loop alone. A rollback (health.on_nonfinite=rollback)
and the best weights of early stopping (restore_best) live here, beside the policies that ask
for them.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from shoal import dist
from shoal.checkpoint import load, snapshot
from shoal.config import EarlyStopping, HealthConfig
from shoal.state import COUNTERS, HEALTH, SCHEDULE, WINDOW

log = logging.getLogger("shoal")

# Decisions: the same on every rank. EARLY_STOP ends a completed run; STOP ends it as diverged.
CONTINUE, ROLLBACK, STOP, EARLY_STOP = "continue", "rollback", "stop", "early_stop"


def on_trouble(policy: str, rollbacks: int, max_rollbacks: int) -> str:
    """health.on_nonfinite for a non-finite step or a diverged loss (skip: the engine already skipped the update)."""
    if policy == "rollback":
        return ROLLBACK if rollbacks < max_rollbacks else STOP
    if policy == "stop":
        return STOP
    return CONTINUE


class EarlyStopper:
    """train.early_stopping: patience over evaluations of one metric; keeps the best weights when asked."""

    def __init__(self, cfg: EarlyStopping | None, model: Any = None):
        self.cfg = cfg
        self.model = model  # the bare model: its weights at the best evaluation are kept (restore_best)
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad = 0
        self.best_weights: dict[str, Any] | None = None

    def observe(self, step: int, metrics: dict[str, float]) -> bool:
        """Record an evaluation; True when training should stop now."""
        if (
            self.cfg is None
            or not isinstance(metrics.get(self.cfg.metric), float)
            or math.isnan(metrics[self.cfg.metric])
        ):
            return False
        value = metrics[self.cfg.metric]
        if self.cfg.improves(value, self.best, self.cfg.min_delta):
            self.best, self.best_step, self.bad = value, step, 0
            if self.cfg.restore_best and self.model is not None:
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
            return False
        self.bad += 1
        return self.bad >= self.cfg.patience

    def restore_best(self) -> bool:
        """Put the best evaluation's weights back (restore_best); True if it did."""
        if self.best_weights is None or self.model is None:
            return False
        self.model.load_state_dict(self.best_weights)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad = state["best"], state["best_step"], int(state["bad"])


class Rollback:
    """health.on_nonfinite=rollback: every rank, together, back to the newest checkpoint taken at or
    before the last good step (or to this run's start), with the learning rate lowered."""

    def __init__(self, cfg: HealthConfig, state: Any, checkpointer: Any):
        self.cfg, self.state, self.checkpointer = cfg, state, checkpointer
        # the target when no checkpoint is older (a collective: every rank builds it at the same point)
        self.initial = snapshot(state.collect()) if cfg.on_nonfinite == "rollback" else None

    def __call__(self, last_good_step: int, rollbacks: int) -> None:
        target = self.checkpointer.find_at_or_before(last_good_step) if self.state.world.is_main else None
        target = dist.broadcast_object(target)
        data = load(target)[1] if target is not None else self.initial
        where = target or "the start of this run"
        schedule, window = self.state.parts[SCHEDULE], self.state.parts[WINDOW]
        scale = schedule.lr_scale  # lowered by every rollback so far; the target's own scale is older
        self.state.restore(data, where, keep=(HEALTH,))  # the alert history and rollback count survive
        schedule.lr_scale = scale * self.cfg.rollback_lr_factor
        window.reset()
        if self.state.world.is_main:
            log.warning(
                "health: rolled back to %s (step %d) with the learning rate x%g (rollback %d of %d)",
                where,
                self.state.parts[COUNTERS].step,
                schedule.lr_scale,
                rollbacks,
                self.cfg.max_rollbacks,
            )
