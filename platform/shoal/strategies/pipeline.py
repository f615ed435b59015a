"""parallel.pipeline_stages > 1: the model's layers split into P stages on P ranks, each micro-batch cut
into pieces that flow through them on a schedule (torch.distributed.pipelining: GPipe, 1F1B,
interleaved 1F1B), composed with data parallelism over D = world / P replicas (allreduce or fsdp).

Rank r is stage r % P of replica r // P: a replica's stages are neighbouring ranks, on one node when
nodes hold whole replicas (torchrun and Shoal's Ray launcher number ranks node after node). Each stage
keeps its modules under the model's own names, so checkpoints (sharded: every stage writes its part),
alerts and exports speak of the whole model's layers, whatever stage holds them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from shoal.config import JobConfig
from shoal.data.loaders import build_loaders
from shoal.dist import WorldInfo, broadcast_object, ensure_group
from shoal.errors import ConfigError
from shoal.health.probes import layers
from shoal.imports import import_object
from shoal.losses import Loss
from shoal.models import Piece, pieces
from shoal.precision import Precision
from shoal.strategies.base import Batch, Strategy, spread_nonfinite
from shoal.strategies.state_io import StageStateIO, optimizer_order

log = logging.getLogger("shoal")
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved_1f1b": "ScheduleInterleaved1F1B"}


class Stage(nn.Module):
    """A contiguous run of pieces: their modules registered under the model's own names, their functions applied in order."""

    def __init__(self, model: nn.Module, run: Sequence[Piece]):
        super().__init__()
        for p in run:
            for name in p.modules:
                register(self, name, model.get_submodule(name))
        self._fns = [p.fn for p in run]  # a plain list: the functions are not modules of their own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fn in self._fns:
            x = fn(x)
        return x


def register(root: nn.Module, name: str, module: nn.Module) -> None:
    """root.<a>.<b>.<c> = module, making empty containers on the way (so the state dict keeps `a.b.c.*`)."""
    *path, leaf = name.split(".")
    for part in path:
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    root.add_module(leaf, module)


def balance(weights: Sequence[float], parts: int) -> list[int]:
    """Start index of each of `parts` contiguous groups, minimising the heaviest group (exact, by binary search)."""
    if parts > len(weights):
        raise ConfigError(
            f"{parts} stages for a model of {len(weights)} layers/blocks: at most one stage per layer",
            key="parallel.pipeline_stages",
        )

    def cuts(limit: float) -> list[int] | None:
        starts, total = [0], 0.0
        for i, w in enumerate(weights):
            if total + w > limit and total > 0:
                starts.append(i)
                total = 0.0
            total += w
        return starts if len(starts) <= parts else None

    lo, hi = max(weights), sum(weights)
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if cuts(mid) is not None else (mid, hi)
    starts = cuts(hi)
    assert starts is not None
    while len(starts) < parts:  # light tails: split the longest run so every stage holds something
        lengths = [(b - a, i) for i, (a, b) in enumerate(zip(starts, starts[1:] + [len(weights)]))]
        n, i = max(lengths)
        starts.insert(i + 1, starts[i] + n // 2)
    return starts


class Replicas(Protocol):
    """How a stage's replicas reduce their gradients: the data-parallel strategy's class (DDPStrategy, FSDPStrategy)."""

    holds_shards: bool  # each replica holds a shard of every tensor: norms sum over the replicas too

    def replicate(self, stage: nn.Module, mesh: DeviceMesh) -> nn.Module: ...


class PipelineStrategy(Strategy):
    """P stages x D replicas; data parallel over replicas with the job's strategy on each stage's modules."""

    name = "pipeline"

    def __init__(self, cfg: JobConfig, world: WorldInfo, device: torch.device, replicas: Replicas):
        super().__init__(cfg, world, device)
        self.P = cfg.parallel.pipeline_stages
        if world.world_size % self.P:
            raise ConfigError(
                f"{self.P} must divide the {world.world_size} ranks (the world is stages x replicas)",
                key="parallel.pipeline_stages",
            )
        self.D = world.world_size // self.P
        self.replicas = replicas
        self.stage, self.replica = world.rank % self.P, world.rank // self.P
        self.virtual = 2 if cfg.parallel.schedule == "interleaved_1f1b" else 1
        self.microbatches = cfg.parallel.microbatches * cfg.train.grad_accum_steps
        self.layout: list[str] = []  # every layer of the whole model, in order (health reports name them all)

    def data_world(self) -> WorldInfo:
        """The stages of a replica read the same batches: the data is split over replicas only."""
        return WorldInfo(rank=self.replica, world_size=self.D)

    # ---------------------------------------------------------------- the model

    def wrap(self, model: nn.Module) -> nn.Module:
        # torch's pipelining takes about a second to load; `shoal validate` imports this module for its split check
        from torch.distributed.pipelining import PipelineStage

        self._groups()
        self.layout = list(layers(model))
        chain = stage_chain(model, self.cfg)
        total = self.P * self.virtual
        starts = stage_starts(chain, self.cfg, lambda: measured_times(model, chain, self.cfg, self.device))
        runs = [chain[a:b] for a, b in zip(starts, starts[1:] + [len(chain)])]
        mine = [self.stage + v * self.P for v in range(self.virtual)]  # interleaved: stages r and r + P
        self.split = [(i, [p.name for p in run], sum(p.params for p in run)) for i, run in enumerate(runs)]
        if self.world.is_main:
            for i, names, params in self.split:
                shown = ", ".join(names) if len(names) <= 6 else f"{names[0]} ... {names[-1]} ({len(names)} pieces)"
                log.info(
                    "pipeline stage %d (rank %d of each replica): %s; %s parameters",
                    i,
                    i % self.P,
                    shown,
                    f"{params:,}",
                )
        self.stage_modules = [Stage(model, runs[i]) for i in mine]
        local = nn.Module()  # this rank's stages together: one state dict, one optimizer, one set of health probes
        for i in mine:
            for p in runs[i]:
                for name in p.modules:
                    register(local, name, model.get_submodule(name))
        self._bare = local
        self.state_io = StageStateIO(local, optimizer_order(model, self.cfg.optim))
        self.bubble = Bubble(self.pp_group, self.P, self.microbatches, self.virtual)
        self.log_figures = self.bubble.figures
        self.bubble.watch(self.stage_modules)
        wrapped = [self._data_parallel(s) for s in self.stage_modules]
        self.pp_stages = [PipelineStage(w, i, total, self.device, group=self.pp_group) for w, i in zip(wrapped, mine)]
        self.module = wrapped[0]
        self.schedule = self._schedule()
        return local

    def _groups(self) -> None:
        ensure_group(self.device)
        self.mesh = init_device_mesh(self.device.type, (self.D, self.P), mesh_dim_names=("dp", "pp"))
        self.pp_group, self.dp_group = self.mesh.get_group("pp"), self.mesh.get_group("dp")

    def _data_parallel(self, stage: nn.Module) -> nn.Module:
        """The replicas of a stage reduce their gradients over the dp group, as the job's strategy does."""
        return stage if self.D == 1 else self.replicas.replicate(stage, self.mesh["dp"])

    def _schedule(self) -> Any:
        import torch.distributed.pipelining as pp

        cls = getattr(pp, SCHEDULES[self.cfg.parallel.schedule])
        stages = self.pp_stages if self.virtual > 1 else self.pp_stages[0]
        return cls(stages, self.microbatches, loss_fn=self._loss, scale_grads=False)

    # ---------------------------------------------------------------- one step

    def forward_backward(
        self,
        batches: Sequence[Batch],
        counts: Sequence[int],
        loss_fn: Loss,
        precision: Precision,
        total: float | None = None,  # pipelines are never elastic: the stage counts its own
    ) -> torch.Tensor:
        """One schedule over the step's micro-batches cut into k x parallel.microbatches pieces: one gradient
        reduction per step, after the schedule's last backward. Each piece's loss enters weighted by its share
        of the step's elements, so the gradient is the mean over all of them, as without a pipeline."""
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        self._total, self._criterion = sum(counts), loss_fn
        self._pieces: list[torch.Tensor] = []
        started = time.perf_counter()
        with precision.autocast():  # the first stage feeds the inputs, the last one the targets
            self.schedule.step(*((x,) if self.stage == 0 else ()), **({"target": y} if self._is_last() else {}))
        self.bubble.step_s += time.perf_counter() - started
        # the schedule's first step also calls the loss while it works out the shapes between stages:
        # the step's own pieces are the last `microbatches` calls
        real = self._pieces[-self.microbatches :] if self._pieces else []
        return torch.stack(real).sum() if real else torch.zeros((), dtype=torch.float64, device=self.device)

    def counted(self, counts: Sequence[int]) -> int:
        """Elements this rank's loss sum covers: the last stage's count; the others add nothing to the mean."""
        return sum(counts) if self._is_last() else 0

    def _is_last(self) -> bool:
        return self.stage + (self.virtual - 1) * self.P == self.P * self.virtual - 1

    def _loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = self._criterion(out, y)
        n = self._criterion.count(y)
        self._pieces.append(loss.detach().double() * n)
        # a NaN in this piece's loss reaches every stage's gradients through the backward, and every
        # replica's through the reduction: the finite check is agreed without a collective of its own
        return loss * (n / self._total) * spread_nonfinite(loss)

    def reduce_squares(self, values: torch.Tensor) -> torch.Tensor:
        """Sum over the stages (they hold different layers), and over the shards of sharded replicas."""
        values = values.to(self.device)
        dist.all_reduce(values, group=self.pp_group)
        if self.replicas.holds_shards and self.D > 1:
            dist.all_reduce(values, group=self.dp_group)
        return values

    @torch.no_grad()
    def eval_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Forward through the stages by hand (any batch shape): the output on the last stage, None elsewhere."""
        h = x
        for v, module in enumerate(self.stage_modules):
            index = self.stage + v * self.P
            if index > 0:
                h = _recv(self.pp_group, index - 1, self.P, self.device)
            h = module(h)
            if index < self.P * self.virtual - 1:
                _send(h, self.pp_group, index + 1, self.P)
        return h if self._is_last() else None


class Bubble:
    """The measured bubble (share of the step each stage waits) next to the theory (P-1)/(vM+P-1): hooks add up
    the compute time of this rank's stages; the rest of a step is waiting."""

    def __init__(self, pp_group: Any, stages: int, microbatches: int, virtual: int):
        self.pp_group, self.P, self.microbatches, self.virtual = pp_group, stages, microbatches, virtual
        self.busy_s = self.step_s = 0.0  # since the last figures: compute, and whole steps (forward_backward adds)
        self._t = 0.0

    def watch(self, modules: list[nn.Module]) -> None:
        for m in modules:
            m.register_forward_pre_hook(lambda *a: self._mark())
            m.register_forward_hook(lambda *a: self._add())
            m.register_full_backward_pre_hook(lambda *a: self._mark())
            m.register_full_backward_hook(lambda *a: self._add())

    def _mark(self) -> None:
        self._t = time.perf_counter()

    def _add(self) -> None:
        self.busy_s += time.perf_counter() - self._t

    def figures(self) -> dict[str, float]:
        """Every stage's busy time and bubble since the last call, their mean, and the theory (a collective
        over the stages)."""
        t = torch.tensor([self.busy_s, self.step_s], dtype=torch.float64)
        gathered = [torch.zeros(2, dtype=torch.float64) for _ in range(self.P)]
        dist.all_gather(gathered, t, group=self.pp_group)
        self.busy_s = self.step_s = 0.0
        m, p, v = self.microbatches, self.P, self.virtual
        out = {"bubble_theory": (p - 1) / (v * m + p - 1)}
        for s, (busy, step) in enumerate(x.tolist() for x in gathered):
            out[f"stage_busy_s/{s}"] = busy
            out[f"bubble/{s}"] = max(0.0, 1.0 - busy / step) if step > 0 else 0.0
        out["bubble"] = sum(out[f"bubble/{s}"] for s in range(self.P)) / self.P
        return out


def _send(h: torch.Tensor, group: Any, to_stage: int, P: int) -> None:
    dst = dist.get_global_rank(group, to_stage % P)
    shape = torch.tensor([h.dim(), *h.shape], dtype=torch.int64)
    dist.send(torch.tensor([shape.numel()], dtype=torch.int64), dst)
    dist.send(shape, dst)
    dist.send(h.contiguous(), dst)


def _recv(group: Any, from_stage: int, P: int, device: torch.device) -> torch.Tensor:
    src = dist.get_global_rank(group, from_stage % P)
    n = torch.zeros(1, dtype=torch.int64)
    dist.recv(n, src)
    shape = torch.zeros(int(n.item()), dtype=torch.int64)
    dist.recv(shape, src)
    h = torch.empty(shape[1:].tolist(), device=device)
    dist.recv(h, src)
    return h


def stage_chain(model: nn.Module, cfg: Any) -> list[Piece]:
    """The model as the chain of pieces stages are cut from: parallel.split_fn's module names, or models.pieces."""
    fn = cfg.parallel.split_fn
    if fn is None:
        return pieces(model)
    names = import_object(fn, "parallel.split_fn")(model)
    try:
        return [
            Piece(n, model.get_submodule(n), [n], sum(p.numel() for p in model.get_submodule(n).parameters()))
            for n in names
        ]
    except AttributeError as e:
        raise ConfigError(f"{fn} named a module the model does not have ({e})", key="parallel.split_fn") from None


def stage_starts(chain: list[Piece], cfg: Any, times: Callable[[], list[float]] | None) -> list[int]:
    """Index of each stage's first piece: parallel.split_points, else balanced by parameters or (parallel.balance:
    time) by `times()`, the pieces' measured seconds; times=None balances by parameters (a check without a run)."""
    virtual = 2 if cfg.parallel.schedule == "interleaved_1f1b" else 1
    total = cfg.parallel.pipeline_stages * virtual
    points = cfg.parallel.split_points
    if points:
        names = [p.name for p in chain]
        bad = [s for s in points if s not in names]
        if bad:
            raise ConfigError(
                f"{bad} name no layer of the chain {names[:12]}{' ...' if len(names) > 12 else ''}",
                key="parallel.split_points",
            )
        starts = [0] + sorted(names.index(s) for s in points)
        if len(starts) != total or len(set(starts)) != len(starts):
            raise ConfigError(
                f"{len(points)} split points make {len(set(starts))} stages; {total} needed "
                f"(parallel.pipeline_stages{' x 2 for interleaved_1f1b' if virtual > 1 else ''})",
                key="parallel.split_points",
            )
        return starts
    weights = [max(1, p.params) for p in chain]
    if cfg.parallel.balance == "time" and times is not None:
        weights = times()
    return balance(weights, total)


def measured_times(model: nn.Module, chain: list[Piece], cfg: Any, device: torch.device) -> list[float]:
    """Forward and backward seconds of each piece on a sample batch, measured on rank 0 (every rank takes its numbers).
    Compiled blocks (train.compile) are timed on a second pass: the first one compiles them."""
    times: list[float] | None = None
    if dist.get_rank() == 0:
        x, _ = next(build_loaders(cfg, WorldInfo(), device).train)
        for _ in range(2 if cfg.train.compile else 1):
            times = _piece_times(chain, x)
        model.zero_grad(set_to_none=True)
    return broadcast_object(times)  # type: ignore[return-value]


def _piece_times(chain: list[Piece], x: torch.Tensor) -> list[float]:
    times, h = [], x
    for p in chain:
        h = h.detach().requires_grad_(h.is_floating_point())
        t = time.perf_counter()
        out = p.fn(h)
        out.float().sum().backward()
        times.append(time.perf_counter() - t)
        h = out
    return times
