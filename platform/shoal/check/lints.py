"""Config lints (pure: the config and the data's size in, findings out): settings that run but train
badly or waste the run, each with the key and the value that fixes it. Cheap enough to run before every
`shoal train`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from shoal.check.findings import NOTE, PROBLEM, Finding
from shoal.config import JobConfig

HIGH_LR = {"sgd": 0.5, "rmsprop": 0.01, "adam": 0.005, "adamw": 0.005}


@dataclass(frozen=True)
class Subject:
    """What a lint reads: the config, the training split's size (when known) and the ranks one step spans."""

    cfg: JobConfig
    train_samples: int | None
    world: int

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.cfg.train.grad_accum_steps * self.world

    @property
    def steps_per_epoch(self) -> int | None:
        """None when the split's size is unknown or one step takes more than all of it."""
        if self.train_samples is None or self.global_batch > self.train_samples:
            return None
        return self.train_samples // self.global_batch


def _config(kind: str, message: str, fix: str, severity: str = PROBLEM, **numbers: float) -> Finding:
    return Finding(kind, "config", message, fix, severity, numbers)


def _unclipped(s: Subject) -> bool:
    return s.cfg.train.clip_grad_norm is None and s.cfg.train.clip_grad_value is None


def _adam_weight_decay(s: Subject) -> Finding | None:
    o = s.cfg.optim
    if not (o.name == "adam" and o.weight_decay > 0):
        return None
    return _config(
        "adam_weight_decay",
        f"optim.name: adam with optim.weight_decay={o.weight_decay:g} adds L2 to the gradient, which "
        "Adam's scaling mostly cancels (Loshchilov and Hutter)",
        "optim.name: adamw (decoupled weight decay)",
    )


def _high_lr_unguarded(s: Subject) -> Finding | None:
    o, t = s.cfg.optim, s.cfg.train
    if not (o.lr >= HIGH_LR[o.name] and s.cfg.schedule.warmup_steps == 0 and _unclipped(s)):
        return None
    return _config(
        "high_lr_unguarded",
        f"optim.lr={o.lr:g} is high for {o.name}, with neither warmup nor clipping",
        f"schedule.warmup_steps: {max(10, t.max_steps // 20)} or train.clip_grad_norm: 1.0 (or a lower optim.lr)",
        lr=o.lr,
    )


def _fp16_unclipped(s: Subject) -> Finding | None:
    if s.cfg.train.precision != "fp16" or not _unclipped(s):
        return None
    return _config(
        "fp16_unclipped",
        "train.precision: fp16 without clipping: one overflowing step can blow up the loss scale and the weights",
        "train.clip_grad_norm: 1.0 (or train.precision: bf16)",
    )


def _eval_after_end(s: Subject) -> Finding | None:
    t = s.cfg.train
    if t.eval_every <= t.max_steps:
        return None
    return _config(
        "eval_after_end",
        f"train.eval_every={t.eval_every} is past train.max_steps={t.max_steps}: only the final evaluation runs",
        f"train.eval_every: {max(1, t.max_steps // 5)}",
    )


def _restarts_without_checkpoints(s: Subject) -> Finding | None:
    c = s.cfg
    if c.scaling.max_failures <= 0 or c.checkpoint.every_steps is not None or c.checkpoint.every_minutes is not None:
        return None
    return _config(
        "restarts_without_checkpoints",
        f"scaling.max_failures={c.scaling.max_failures} restarts from the latest checkpoint, "
        "but none is saved before the end: every restart begins again at step 0",
        "checkpoint.every_minutes: 10 (or checkpoint.every_steps)",
    )


def _early_stopping_without_evals(s: Subject) -> Finding | None:
    t = s.cfg.train
    if t.early_stopping is None or t.eval_every != 0:
        return None
    return _config(
        "early_stopping_without_evals",
        "train.early_stopping watches evaluations, and train.eval_every: 0 runs only the last one",
        f"train.eval_every: {max(1, t.max_steps // 10)}",
    )


def _warmup_longer_than_run(s: Subject) -> Finding | None:
    sched, t = s.cfg.schedule, s.cfg.train
    if sched.name != "cosine" or sched.warmup_steps < t.max_steps:
        return None
    return _config(
        "warmup_longer_than_run",
        f"schedule.warmup_steps={sched.warmup_steps} >= train.max_steps={t.max_steps}",
        f"schedule.warmup_steps: {max(1, t.max_steps // 20)}",
    )


def _batch_larger_than_data(s: Subject) -> Finding | None:
    n = s.train_samples
    if n is None or s.global_batch <= n:
        return None
    return _config(
        "batch_larger_than_data",
        f"one step takes {s.global_batch:,} samples (data.batch_size x train.grad_accum_steps x "
        f"{s.world} ranks), more than the {n:,} training samples",
        f"data.batch_size: {max(1, n // (2 * s.world))}",
        global_batch=s.global_batch,
        samples=n,
    )


def _epoch_shorter_than_log(s: Subject) -> Finding | None:
    steps, every = s.steps_per_epoch, s.cfg.log.every
    if steps is None or steps >= every:
        return None
    return _config(
        "epoch_shorter_than_log",
        f"an epoch is {steps} steps, shorter than one log interval (log.every={every})",
        f"log.every: {max(1, steps // 2)}",
        steps_per_epoch=steps,
    )


def _many_epochs(s: Subject) -> Finding | None:
    if s.steps_per_epoch is None:
        return None
    max_steps = s.cfg.train.max_steps
    epochs = max_steps / max(1, s.steps_per_epoch)
    if epochs <= 200:
        return None
    return _config(
        "many_epochs",
        f"train.max_steps={max_steps} passes over the data {epochs:,.0f} times",
        "train.early_stopping, or fewer train.max_steps",
        NOTE,
        epochs=round(epochs, 1),
    )


def _low_lr(s: Subject) -> Finding | None:
    o = s.cfg.optim
    if not (math.isfinite(o.lr) and o.name == "sgd" and o.momentum == 0 and o.lr < 1e-4):
        return None
    return _config(
        "low_lr",
        f"optim.lr={o.lr:g} with plain SGD barely moves the weights",
        "optim.lr: 0.01-0.1 (or run `shoal lr-find`)",
    )


# in the order the findings are reported
LINTS: list[Callable[[Subject], Finding | None]] = [
    _adam_weight_decay,
    _high_lr_unguarded,
    _fp16_unclipped,
    _eval_after_end,
    _restarts_without_checkpoints,
    _early_stopping_without_evals,
    _warmup_longer_than_run,
    _batch_larger_than_data,
    _epoch_shorter_than_log,
    _many_epochs,
    _low_lr,
]


def lint(cfg: JobConfig, train_samples: int | None = None, world_size: int | None = None) -> list[Finding]:
    """Every lint that fires for this config (train_samples: the training split's size, when known)."""
    subject = Subject(cfg, train_samples, world_size or cfg.scaling.num_workers)
    return [f for check in LINTS if (f := check(subject)) is not None]
