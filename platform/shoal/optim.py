"""Optimizers (with no-decay groups and an L1 penalty) and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from shoal.config import GradNoise, OptimConfig, ScheduleConfig
from shoal.models import trainable


def decays(p: torch.Tensor, cfg: OptimConfig) -> bool:
    """Weight decay (and L1) reach matrices and kernels: tensors of two or more dimensions.

    Biases, normalisation gains and scalars are exempt, whatever class owns them (a model's own
    LayerNorm or RMSNorm included), as nanoGPT and TorchTitan decide; optim.decay_bias_and_norm
    decays them too.
    """
    return p.ndim >= 2 or cfg.decay_bias_and_norm


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Trainable parameters (a shared tensor once) split into a decayed and a no-decay group."""
    decay = [p for _, p in trainable(model) if decays(p, cfg)]
    no_decay = [p for _, p in trainable(model) if not decays(p, cfg)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "l1": cfg.l1}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "l1": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer the config names, over the model's trainable parameters."""
    return make_optimizer(param_groups(model, cfg), cfg)


def decay_flags(model: nn.Module, cfg: OptimConfig) -> dict[str, bool]:
    """Trainable parameter name -> whether it is in the decayed group (for parameter servers)."""
    return {n: decays(p, cfg) for n, p in trainable(model)}


def make_optimizer(groups: list[dict[str, Any]], cfg: OptimConfig) -> torch.optim.Optimizer:
    """The optimizer the config names, over given parameter groups."""
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps)


def add_l1_grad(optimizer: torch.optim.Optimizer) -> None:
    """Add l1 * sign(w) to the gradients of groups with an L1 penalty (after AllReduce: same on every rank)."""
    for group in optimizer.param_groups:
        l1 = group.get("l1", 0.0)
        if l1:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(torch.sign(p.detach()), alpha=l1)


def add_grad_noise(params: list[torch.nn.Parameter], noise: GradNoise | None, seed: int, step: int) -> None:
    """Gaussian noise of variance eta / (1 + step)^gamma on every gradient (Neelakantan et al. 2015), after clipping.

    Drawn from a generator seeded by (seed, step), so every replica adds the same noise and stays identical,
    and a resumed run draws what the uninterrupted one would. A sharded tensor draws for its own shard, seeded by
    its place in the shard dimension (replicas of the same shard, under hybrid sharding, draw alike).
    """
    if noise is None:
        return
    std = math.sqrt(noise.eta / (1 + step) ** noise.gamma)
    for i, p in enumerate(params):
        g = p.grad
        if g is None:
            continue
        local = g.to_local() if hasattr(g, "to_local") else g
        shard = g.device_mesh.get_coordinate()[-1] if hasattr(g, "device_mesh") else 0
        gen = torch.Generator(device=local.device).manual_seed(hash((seed, step, i, shard)) & 0x7FFF_FFFF_FFFF_FFFF)
        local.add_(torch.randn(local.shape, generator=gen, device=local.device, dtype=local.dtype), alpha=std)


class Schedule:
    """Learning rate by step: linear warmup, then constant | step | multistep | cosine | plateau.

    The plateau factor changes only at evaluations (`observe`); it is part of the state so a
    resumed job continues with the same rate.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, max_steps: int):
        self.cfg = cfg
        self.base_lr = base_lr
        self.max_steps = max_steps
        self.plateau_factor = 1.0
        self.lr_scale = 1.0  # health rollbacks lower the whole schedule
        self.best: float | None = None
        self.bad_evals = 0

    def lr_at(self, step: int) -> float:
        """Rate for optimizer step `step` (0-based)."""
        c = self.cfg
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        after = max(0, step - c.warmup_steps)
        if c.name == "step":
            decay = c.gamma ** (after // c.step_size)
        elif c.name == "multistep":
            decay = c.gamma ** sum(step >= m for m in c.milestones)
        elif c.name == "range_test":
            decay = c.range_start_ratio ** (1.0 - min(1.0, step / max(1, self.max_steps - 1)))
        elif c.name == "cosine":
            span = max(1, self.max_steps - c.warmup_steps)
            progress = min(1.0, after / span)
            decay = c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            decay = 1.0
        lr = self.base_lr * warm * decay * self.plateau_factor * self.lr_scale
        return max(lr, c.min_lr) if c.name == "plateau" else lr

    def apply(self, optimizer: torch.optim.Optimizer, step: int, factor: float = 1.0) -> float:
        """Set every group's rate for step `step` (times `factor`: a batch ramp's lr scaling); returns it."""
        lr = self.lr_at(step) * factor
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr

    def observe(self, metrics: dict[str, float]) -> None:
        """Feed an evaluation to the plateau rule (a no-op for other schedules)."""
        if self.cfg.name != "plateau" or self.cfg.metric not in metrics:
            return
        value = metrics[self.cfg.metric]
        sign = 1.0 if self.cfg.mode == "min" else -1.0
        if self.best is None or sign * value < sign * self.best - self.cfg.threshold * abs(self.best):
            self.best = value
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.cfg.patience:
            self.plateau_factor *= self.cfg.factor
            self.bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "plateau_factor": self.plateau_factor,
            "best": self.best,
            "bad_evals": self.bad_evals,
            "lr_scale": self.lr_scale,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.plateau_factor = float(state["plateau_factor"])
        self.best = state["best"]
        self.bad_evals = int(state["bad_evals"])
        self.lr_scale = float(state.get("lr_scale", 1.0))
