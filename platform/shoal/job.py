"""Everything one rank trains with, assembled once: data, model behind its strategy, optimizer,
schedule, precision, loss, health, checkpointer and the named train state."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from shoal import dist
from shoal.batch import BatchSchedule
from shoal.checkpoint import Checkpointer, load_weights
from shoal.config import JobConfig
from shoal.data.loaders import Loaders, build_loaders
from shoal.dist import WorldInfo
from shoal.gns import NoiseScale
from shoal.health import HealthMonitor
from shoal.health.detectors import overfitting_remedies
from shoal.health.policy import Rollback
from shoal.losses import Loss
from shoal.metrics import Window
from shoal.models import apply_freeze, build_model, checkpoint_activations, compile_in_place, trainable
from shoal.optim import Schedule, StepExtras, build_optimizer
from shoal.precision import Precision
from shoal.snapshot import Snapshots, cadence
from shoal.state import (
    BATCH,
    COUNTERS,
    DATA,
    EVAL,
    GNS,
    HEALTH,
    PRECISION,
    SCHEDULE,
    WINDOW,
    Counters,
    LastEval,
    TrainState,
)
from shoal.strategies import build_strategy
from shoal.strategies.base import Strategy
from shoal.weights import SparsityMasks


@dataclass
class Job:
    """One rank's run. The engine reads it; build_job makes it."""

    cfg: JobConfig
    world: WorldInfo
    device: torch.device
    strategy: Strategy
    params: list[nn.Parameter]  # trainable, each tensor once
    frozen: list[str]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: Precision
    loss_fn: Loss
    data: Loaders
    health: HealthMonitor
    checkpointer: Checkpointer
    window: Window
    batch: BatchSchedule  # micro-batches per step (train.batch_ramp grows them)
    extras: StepExtras  # l1, gradient noise, pruned zeros kept: edits around the optimizer step
    gns: NoiseScale
    counters: Counters = field(default_factory=Counters)
    last_eval: LastEval = field(default_factory=LastEval)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    snapshots: Snapshots | None = None  # checkpoint.memory_every: the train state in shared memory (set by build_job)
    pulse: dist.Pulse = field(init=False)
    state: TrainState = field(init=False)

    def __post_init__(self) -> None:
        self.pulse = dist.Pulse(self.device)
        parts = {
            COUNTERS: self.counters,
            SCHEDULE: self.schedule,
            PRECISION: self.precision,
            DATA: self.data.train,
            WINDOW: self.window,
            EVAL: self.last_eval,
            HEALTH: self.health,
            BATCH: self.batch,
            GNS: self.gns,
        }
        self.state = TrainState(self.strategy.state_io, self.optimizer, parts, self.world, self.cfg.seed)

    @property
    def model(self) -> nn.Module:
        """The module forward runs through (wrapped by the strategy)."""
        assert self.strategy.module is not None
        return self.strategy.module

    @property
    def bare_model(self) -> nn.Module:
        return self.strategy.bare_model


def build_job(cfg: JobConfig, world: WorldInfo, device: torch.device, run_dir: Path | None = None) -> Job:
    """This rank's job. run_dir=None: nothing is written (no checkpoints, no health file)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    strategy = build_strategy(cfg, world, device)
    data = build_loaders(cfg, strategy.data_world(), device)
    loss_fn = Loss.of(cfg, data.spec)
    model, sparsity, frozen = prepared_model(cfg, data, loss_fn, device)
    strategy.wrap(model).train()  # training mode from here on; evaluation switches back itself
    optimizer = build_optimizer(strategy.bare_model, cfg.optim)  # after wrapping: sharding replaces parameters
    params = [p for _, p in trainable(strategy.bare_model)]
    # dropout and other training randomness differ per rank, reproducibly
    torch.manual_seed(cfg.seed * 1_000_003 + world.rank + 1)
    job = Job(
        cfg=cfg,
        world=world,
        device=device,
        strategy=strategy,
        params=params,
        frozen=frozen,
        optimizer=optimizer,
        schedule=Schedule(cfg.schedule, cfg.optim.lr, cfg.train.max_steps),
        precision=Precision(cfg.train.precision, device),
        loss_fn=loss_fn,
        data=data,
        health=health_monitor(cfg, strategy, data, world, run_dir),
        checkpointer=Checkpointer(cfg.checkpoint, run_dir, world, cfg.to_dict(), sharded=strategy.state_io.sharded),
        window=Window(lambda: torch.zeros((), dtype=torch.float64, device=device), _global_sums(device), world.is_main),
        batch=BatchSchedule(cfg, data.world.world_size),
        extras=StepExtras(optimizer, params, cfg.optim.grad_noise, cfg.seed, sparsity),
        gns=NoiseScale(cfg.train.gns_every, data.world.world_size, device, strategy.noise_probe),
    )
    if cfg.health.on_nonfinite == "rollback":
        job.health.rollback = Rollback(cfg.health, job.state, job.checkpointer)
    job.snapshots = Snapshots(cadence(cfg), run_dir, world, job.state.held, job.state.progress, job.state.generation)
    return job


def prepared_model(
    cfg: JobConfig, data: Loaders, loss_fn: Loss, device: torch.device
) -> tuple[nn.Module, SparsityMasks, list[str]]:
    """The model on its device, before the strategy wraps it: weights loaded, sparsity masks taken, parameters
    frozen, activation checkpointing in place, then compiled (train.compile: before DDP wraps or fsdp shards it)."""
    model = build_model(cfg.model, data.spec, loss_fn.out_features())
    if cfg.model.weights:
        load_weights(model, cfg.model.weights)
    model = model.to(device)
    sparsity = SparsityMasks(model if cfg.model.keep_sparsity else None)  # masks on the model's device
    frozen = apply_freeze(model, cfg.model.freeze)
    checkpoint_activations(
        model, cfg.train.activation_checkpointing, cfg.train.activation_checkpointing_every, cfg.fsdp.units or None
    )
    compile_in_place(model, cfg.train.compile, device.type == "cpu", cfg.fsdp.units or None)
    return model, sparsity, frozen


def health_monitor(
    cfg: JobConfig, strategy: Strategy, data: Loaders, world: WorldInfo, run_dir: Path | None
) -> HealthMonitor:
    spec = data.spec
    return HealthMonitor(
        cfg.health,
        cfg.train.early_stopping,
        strategy.bare_model,
        world.is_main,
        run_dir if world.is_main else None,
        classes=spec.vocab_size if spec.task == "lm" else spec.num_classes,
        overfit_remedies=overfitting_remedies(spec.task, spec.input_shape),
        reduce=strategy.reduce_squares,
        layout=strategy.layout,
    )


def _global_sums(device: torch.device):
    """The window's loss sum, count and tokens summed over ranks: one small collective per log line."""

    def reduce(loss_sum: torch.Tensor, count: float, tokens: float) -> tuple[float, float, float]:
        counts = torch.tensor([float(count), float(tokens)], dtype=torch.float64, device=device)
        total, n, t = dist.all_sum(torch.cat([loss_sum.reshape(1), counts])).tolist()
        return total, n, t

    return reduce
