"""Config lints (pure: the config and the data's size in, findings out): settings that run but train
badly or waste the run, each with the key and the value that fixes it. Cheap enough to run before every
`shoal train`."""

from __future__ import annotations

import math

from shoal.check.findings import NOTE, Finding
from shoal.config import JobConfig

HIGH_LR = {"sgd": 0.5, "rmsprop": 0.01, "adam": 0.005, "adamw": 0.005}


def lint(cfg: JobConfig, train_samples: int | None = None, world_size: int | None = None) -> list[Finding]:
    """Every lint that fires for this config (train_samples: the training split's size, when known)."""
    o, t, s = cfg.optim, cfg.train, cfg.schedule
    out: list[Finding] = []

    def add(kind: str, message: str, fix: str, **numbers: float) -> None:
        out.append(Finding(kind, "config", message, fix, numbers=numbers))

    if o.name == "adam" and o.weight_decay > 0:
        add(
            "adam_weight_decay",
            f"optim.name: adam with optim.weight_decay={o.weight_decay:g} adds L2 to the gradient, which "
            "Adam's scaling mostly cancels (Loshchilov and Hutter)",
            "optim.name: adamw (decoupled weight decay)",
        )
    if o.lr >= HIGH_LR[o.name] and s.warmup_steps == 0 and t.clip_grad_norm is None and t.clip_grad_value is None:
        add(
            "high_lr_unguarded",
            f"optim.lr={o.lr:g} is high for {o.name}, with neither warmup nor clipping",
            f"schedule.warmup_steps: {max(10, t.max_steps // 20)} or train.clip_grad_norm: 1.0 (or a lower optim.lr)",
            lr=o.lr,
        )
    if t.precision == "fp16" and t.clip_grad_norm is None and t.clip_grad_value is None:
        add(
            "fp16_unclipped",
            "train.precision: fp16 without clipping: one overflowing step can blow up the loss scale and the weights",
            "train.clip_grad_norm: 1.0 (or train.precision: bf16)",
        )
    if t.eval_every > t.max_steps:
        add(
            "eval_after_end",
            f"train.eval_every={t.eval_every} is past train.max_steps={t.max_steps}: only the final evaluation runs",
            f"train.eval_every: {max(1, t.max_steps // 5)}",
        )
    if cfg.scaling.max_failures > 0 and cfg.checkpoint.every_steps is None and cfg.checkpoint.every_minutes is None:
        add(
            "restarts_without_checkpoints",
            f"scaling.max_failures={cfg.scaling.max_failures} restarts from the latest checkpoint, "
            "but none is saved before the end: every restart begins again at step 0",
            "checkpoint.every_minutes: 10 (or checkpoint.every_steps)",
        )
    if t.early_stopping is not None and t.eval_every == 0:
        add(
            "early_stopping_without_evals",
            "train.early_stopping watches evaluations, and train.eval_every: 0 runs only the last one",
            f"train.eval_every: {max(1, t.max_steps // 10)}",
        )
    if s.name == "cosine" and s.warmup_steps >= t.max_steps:
        add(
            "warmup_longer_than_run",
            f"schedule.warmup_steps={s.warmup_steps} >= train.max_steps={t.max_steps}",
            f"schedule.warmup_steps: {max(1, t.max_steps // 20)}",
        )
    world = world_size or cfg.scaling.num_workers
    global_batch = cfg.data.batch_size * t.grad_accum_steps * world
    if train_samples is not None:
        if global_batch > train_samples:
            add(
                "batch_larger_than_data",
                f"one step takes {global_batch:,} samples (data.batch_size x train.grad_accum_steps x "
                f"{world} ranks), more than the {train_samples:,} training samples",
                f"data.batch_size: {max(1, train_samples // (2 * world))}",
                global_batch=global_batch,
                samples=train_samples,
            )
        else:
            steps_per_epoch = train_samples // global_batch
            if steps_per_epoch < cfg.log.every:
                add(
                    "epoch_shorter_than_log",
                    f"an epoch is {steps_per_epoch} steps, shorter than one log interval (log.every={cfg.log.every})",
                    f"log.every: {max(1, steps_per_epoch // 2)}",
                    steps_per_epoch=steps_per_epoch,
                )
            epochs = t.max_steps / max(1, steps_per_epoch)
            if epochs > 200:
                out.append(
                    Finding(
                        "many_epochs",
                        "config",
                        f"train.max_steps={t.max_steps} passes over the data {epochs:,.0f} times",
                        "train.early_stopping, or fewer train.max_steps",
                        NOTE,
                        {"epochs": round(epochs, 1)},
                    )
                )
    if math.isfinite(o.lr) and o.name == "sgd" and o.momentum == 0 and o.lr < 1e-4:
        add(
            "low_lr",
            f"optim.lr={o.lr:g} with plain SGD barely moves the weights",
            "optim.lr: 0.01-0.1 (or run `shoal lr-find`)",
        )
    return out
