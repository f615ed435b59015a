"""The training loop. `train_step` is one optimizer step and reads top to bottom:
fetch k micro-batches, forward and backward each (AllReduce only on the last), unscale,
agree across ranks, clip, step, schedule.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shoal import comm, dist
from shoal.config import JobConfig
from shoal.data.loaders import Loaders, build_loaders
from shoal.health import policy
from shoal.dist import WorldInfo
from shoal.losses import Loss
from shoal.models import apply_freeze, build_model, trainable
from shoal.optim import Schedule, add_l1_grad, build_optimizer
from shoal.precision import Precision

Report = Callable[[dict[str, Any]], None]


@dataclass
class Counters:
    """Where training stands; saved in checkpoints."""

    step: int = 0
    samples: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "samples": self.samples, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.samples, self.skipped_steps = state["step"], state["samples"], state["skipped_steps"]


@dataclass
class Job:
    """Everything one rank trains with."""

    cfg: JobConfig
    world: WorldInfo
    device: torch.device
    model: nn.Module  # DDP-wrapped when distributed
    params: list[nn.Parameter]  # trainable ones
    frozen: list[str]
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    precision: Precision
    loss_fn: Loss
    data: Loaders
    counters: Counters = field(default_factory=Counters)
    stop_requested: threading.Event = field(default_factory=threading.Event)
    window: Window = field(init=False)
    last_eval: dict[str, float] = field(default_factory=dict)
    straggle_s: float = 0.0  # scaling.straggler_*: this rank sleeps so long per step
    health: Any = None  # health.HealthMonitor, made by build_job

    def __post_init__(self) -> None:
        self.window = Window(self.device)
        s = self.cfg.scaling
        self.straggle_s = s.straggler_delay_s if s.straggler_rank == self.world.rank else 0.0

    @property
    def bare_model(self) -> nn.Module:
        return comm.unwrap(self.model)


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's summed loss over its samples (on device, not yet reduced)
    count: int  # elements that loss is summed over on this rank
    samples: int  # global samples in the step
    grad_norm: torch.Tensor  # global gradient norm before clipping (same on every rank)
    lr: float
    stepped: bool
    data_s: float  # time waiting for this rank's batches


def build_job(cfg: JobConfig, world: WorldInfo, device: torch.device) -> Job:
    """Data, model (frozen parts, DDP), optimizer, schedule, precision and loss for this rank."""
    torch.manual_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    data = build_loaders(cfg, world, device)
    loss_fn = Loss(cfg.train, data.spec, "model.target" if cfg.model.target else "model.name")
    model = build_model(cfg.model, data.spec, loss_fn.out_features()).to(device)
    frozen = apply_freeze(model, cfg.model.freeze)
    params = [p for _, p in trainable(model)]
    optimizer = build_optimizer(model, cfg.optim)
    model = comm.wrap_ddp(model, cfg.ddp, device)
    # dropout and other training randomness differ per rank, reproducibly
    torch.manual_seed(cfg.seed * 1_000_003 + world.rank + 1)
    from shoal.health import HealthMonitor

    classes = data.spec.vocab_size if data.spec.task == "lm" else data.spec.num_classes
    return Job(
        cfg=cfg,
        world=world,
        device=device,
        model=model,
        params=params,
        frozen=frozen,
        optimizer=optimizer,
        schedule=Schedule(cfg.schedule, cfg.optim.lr, cfg.train.max_steps),
        precision=Precision(cfg.train.precision, device),
        loss_fn=loss_fn,
        data=data,
        health=HealthMonitor(cfg, comm.unwrap(model), world.is_main, classes=classes),
    )


@dataclass
class Gradients:
    """What the backward passes of one step leave behind, before the optimizer acts."""

    loss_sum: torch.Tensor  # this rank's summed loss (on device)
    count: int  # elements it is summed over
    rows: int  # samples this rank read
    grad_norm: torch.Tensor  # global norm before clipping
    ok: bool  # every gradient finite, on every rank
    data_s: float


def train_step(job: Job) -> StepResult:
    """One optimizer step over train.grad_accum_steps micro-batches, one gradient AllReduce."""
    step = job.counters.step + 1
    job.health.arm(step)
    g = compute_gradients(job)
    job.health.observe_gradients(step, float(g.grad_norm))
    opt = job.optimizer
    if g.ok:
        add_l1_grad(opt)
    lr = job.schedule.apply(opt, job.counters.step)
    stepped = job.precision.step(opt, g.ok)
    job.health.observe_update(step)
    opt.zero_grad(set_to_none=True)
    return StepResult(
        loss_sum=g.loss_sum,
        count=g.count,
        samples=g.rows * job.world.world_size,  # equal on every rank
        grad_norm=g.grad_norm,
        lr=lr,
        stepped=stepped,
        data_s=g.data_s,
    )


def compute_gradients(job: Job) -> Gradients:
    """Fetch, forward and backward train.grad_accum_steps micro-batches, unscale, check, clip.

    Whether to step is decided by the one gradient AllReduce itself: a NaN/Inf in any rank's loss
    or gradients reaches every rank's reduced gradients, so every rank computes the same norm
    from the same numbers and skips or steps with the others, without a second collective.
    (The parameter-server workers call this too, without DDP, and push what it leaves.)
    """
    cfg = job.cfg.train
    k = cfg.grad_accum_steps
    model, opt, precision, loss_fn = job.model, job.optimizer, job.precision, job.loss_fn

    t0 = time.perf_counter()
    batches = [next(job.data.train) for _ in range(k)]  # all k first: the step's sample count is known
    data_s = time.perf_counter() - t0
    counts = [loss_fn.count(y) for _, y in batches]
    total = sum(counts)

    model.train()
    loss_sum = torch.zeros((), device=job.device, dtype=torch.float64)
    for i, ((x, y), n) in enumerate(zip(batches, counts)):
        with comm.sync_gradients(model, enabled=i == k - 1):  # forward and backward of 1..k-1 in no_sync
            with precision.autocast():
                out = model(x)
            if n:
                loss = loss_fn(out, y)
                # mean over the samples actually accumulated; a non-finite loss poisons this rank's gradients
                precision.backward(loss * (n / total) * _poison(loss))
                loss_sum += loss.detach().double() * n
            else:  # every sample of this micro-batch was skipped (data.on_error=skip): zero gradients, same collectives
                precision.backward(out.float().sum() * 0.0)

    precision.unscale(opt)  # clipping and the finite check must see true gradients
    grad_norm = _total_norm(job.params, job.device)
    ok = bool(torch.isfinite(grad_norm))  # identical reduced gradients: the same answer on every rank
    if ok and cfg.clip_grad_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(job.params, cfg.clip_grad_norm, grad_norm)
    elif ok and cfg.clip_grad_value is not None:
        torch.nn.utils.clip_grad_value_(job.params, cfg.clip_grad_value)
    if job.straggle_s:
        time.sleep(job.straggle_s)
    return Gradients(loss_sum, total, sum(y.shape[0] for _, y in batches), grad_norm, ok, data_s)


def _poison(loss: torch.Tensor) -> torch.Tensor:
    """1.0 for a finite loss, NaN otherwise: multiplied into the loss, it makes every gradient NaN."""
    return 1.0 + 0.0 * loss.detach()


def _total_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float64)
    return torch.nn.utils.get_total_norm(grads, foreach=True).double()


@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    """Validation loss and accuracy: exact global means from sums and counts across ranks."""
    if job.data.val is None:
        return {}
    model = job.bare_model  # no DDP: ranks may hold different numbers of validation batches
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=job.device)
    for x, y in job.data.val.batches(job.cfg.train.eval_batches):
        with job.precision.autocast():
            out = model(x)
        n = job.loss_fn.count(y)
        sums[0] += job.loss_fn(out, y).double() * n
        sums[1] += job.loss_fn.correct(out, y).double()
        sums[2] += n
    model.train(was_training)
    loss_sum, correct, count = dist.all_sum(sums).tolist()
    if count == 0:
        return {}
    result = {"val_loss": loss_sum / count}
    if job.loss_fn.classify:
        result["val_accuracy"] = correct / count
    return result


class Window:
    """Sums between two log lines, kept on the device: reduced across ranks once per log line."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.count = 0
        self.samples = 0
        self.data_s = 0.0
        self.start = time.perf_counter()

    def add(self, r: StepResult) -> None:
        self.loss_sum += r.loss_sum
        self.count += r.count
        self.samples += r.samples
        self.data_s += r.data_s

    def _local(self) -> torch.Tensor:
        return torch.stack([self.loss_sum, torch.tensor(float(self.count), dtype=torch.float64, device=self.device)])

    def mean_loss(self) -> float:
        """Global mean loss of the window: one small collective."""
        loss_sum, count = dist.all_sum(self._local()).tolist()
        return loss_sum / count if count else float("nan")

    def state_dict(self) -> dict[str, float]:
        """The window summed over ranks (a collective): a resumed run logs the same values."""
        loss_sum, count = dist.all_sum(self._local()).tolist()
        return {"loss_sum": loss_sum, "count": count, "samples": self.samples}

    def load_state_dict(self, state: dict[str, float], is_main: bool) -> None:
        self.reset()
        if is_main:  # rank 0 carries the global sums; the next reduction adds the others' zeros
            self.loss_sum += state["loss_sum"]
            self.count = int(state["count"])
        self.samples = int(state["samples"])


def collect_state(job: Job) -> dict[str, Any]:
    """Everything needed to continue exactly (collective: every rank calls it at the same step)."""
    from shoal.checkpoint import rng_state

    rngs = dist.all_gather_object(rng_state())
    return {
        "model": job.bare_model.state_dict(),
        "optimizer": job.optimizer.state_dict(),
        "state": {
            "counters": job.counters.state_dict(),
            "schedule": job.schedule.state_dict(),
            "precision": job.precision.state_dict(),
            "data": job.data.train.state_dict(),
            "window": job.window.state_dict(),
            "last_eval": dict(job.last_eval),
            "health": job.health.state_dict(),
            "rng": rngs,
            "world_size": job.world.world_size,
        },
    }


def restore_state(job: Job, path: Any, data: dict[str, Any]) -> None:
    """Load a checkpoint's contents into this rank's job."""
    from shoal.checkpoint import load_model_state, set_rng_state
    from shoal.errors import CheckpointError

    load_model_state(job.bare_model, data["model.pt"], path)
    try:
        job.optimizer.load_state_dict(data["optimizer.pt"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit this config ({e})") from None
    st = data["state.pt"]
    job.counters.load_state_dict(st["counters"])
    job.schedule.load_state_dict(st["schedule"])
    job.precision.load_state_dict(st["precision"])
    job.data.train.load_state_dict(st["data"])
    job.window.load_state_dict(st["window"], job.world.is_main)
    job.last_eval = dict(st["last_eval"])
    if "health" in st:
        job.health.load_state_dict(st["health"])
    if st["world_size"] == job.world.world_size:
        set_rng_state(st["rng"][job.world.rank])
    else:  # new ranks: fresh, reproducible generators (bitwise resume needs the same world size)
        torch.manual_seed(job.cfg.seed * 1_000_003 + job.world.rank + 1 + 7919 * job.counters.step)


def train(job: Job, log: Report, saver: Any = None, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run steps until train.max_steps (or an agreed stop); returns the final figures.

    `log(record)` receives every metrics record on every rank; rank 0's are written. `saver` (a
    checkpoint.Checkpointer) is asked at each step; what any rank raises (a stop request, a
    save timer) is agreed through a Pulse, so every rank saves and stops at the same step.
    Health decisions (rollback, stop, early stopping) follow numbers every rank shares.
    """
    cfg, c, health = job.cfg, job.counters, job.health
    window = job.window
    pulse = dist.Pulse(3, job.device)
    started = time.perf_counter()
    start_step, start_samples = c.step, c.samples
    initial = _snapshot(job) if cfg.health.on_nonfinite == "rollback" else None
    best_weights: dict[str, torch.Tensor] | None = None
    train_loss = float("nan")
    status = "completed"
    stop = out_of_time = finished = False
    while c.step < cfg.train.max_steps and not (stop or out_of_time or finished):
        r = train_step(job)
        c.step += 1
        c.samples += r.samples
        c.skipped_steps += 0 if r.stepped else 1
        window.add(r)
        if on_step is not None:
            on_step(c.step)
        action = health.after_step(c.step, r.stepped, float(r.grad_norm))
        time_up = cfg.train.max_time_s is not None and time.perf_counter() - started >= cfg.train.max_time_s
        stop, save_due, out_of_time = pulse.exchange([job.stop_requested.is_set(), saver is not None and saver.time_due(), time_up])
        # a stop is not a log or eval step: a resumed run then logs exactly what an uninterrupted one would
        last = c.step == cfg.train.max_steps or out_of_time
        record: dict[str, Any] = health.take_measurements()
        if c.step % cfg.log.every == 0 or last:
            elapsed = time.perf_counter() - window.start
            train_loss = window.mean_loss()
            data_wait = window.data_s / elapsed
            record.update(loss=train_loss, lr=r.lr, grad_norm=float(r.grad_norm), samples_per_s=window.samples / elapsed,
                          data_wait=data_wait, skipped_steps=c.skipped_steps)
            window.reset()
            if action == policy.CONTINUE:
                action = health.after_log(c.step, train_loss, data_wait)
        if action in (policy.ROLLBACK, policy.STOP):
            log({"step": c.step, "epoch": job.data.train.epoch, "samples": c.samples, "time": time.time(), **record})
            if action == policy.STOP:
                status, finished = "diverged", True
                break
            _rollback(job, saver, initial)
            continue
        if (cfg.train.eval_every and c.step % cfg.train.eval_every == 0) or last:
            job.last_eval = evaluate(job)
            job.schedule.observe(job.last_eval)
            record.update(job.last_eval)
            improved, finished = health.after_eval(c.step, train_loss, job.last_eval)
            if improved and cfg.train.early_stopping and cfg.train.early_stopping.restore_best:
                best_weights = {k: v.detach().to("cpu", copy=True) for k, v in job.bare_model.state_dict().items()}
        if record:
            log({"step": c.step, "epoch": job.data.train.epoch, "samples": c.samples, "time": time.time(),
                 "elapsed_s": time.perf_counter() - started, **record})
        if finished and best_weights is not None:  # early stop: end with the best evaluation's weights
            job.bare_model.load_state_dict(best_weights)
            job.last_eval = evaluate(job)
        if saver is not None and (saver.step_due(c.step) or save_due or stop or ((last or finished) and cfg.checkpoint.at_end)):
            saver.save(collect_state(job), c.step, job.last_eval, c.skipped_steps)
    pulse.drain()
    job.data.train.close()  # loader workers stop now, not when the garbage collector finds them
    if saver is not None:
        saver.wait()
    wall = time.perf_counter() - started
    trained = c.samples - start_samples
    skipped = getattr(job.data.train, "skipped_samples", 0)
    skipped = int(dist.all_sum(torch.tensor([float(skipped)], dtype=torch.float64, device=job.device)).item())
    return {
        "status": "preempted" if stop else status,
        "steps": c.step,
        "samples": c.samples,
        "epochs": job.data.train.epoch,
        "skipped_steps": c.skipped_steps,
        "wall_s": wall,
        "samples_per_s": trained / wall if wall > 0 else 0.0,
        "steps_this_run": c.step - start_step,
        "world_size": job.world.world_size,
        "train_loss": train_loss,
        "data_skipped_samples": skipped,
        "early_stopped": bool(finished and status == "completed"),
        **health.summary(),
        **job.last_eval,
    }


def _snapshot(job: Job) -> dict[str, Any]:
    """The current state as an in-memory checkpoint (the rollback target when no checkpoint is older)."""
    from shoal.checkpoint import snapshot

    state = snapshot(collect_state(job))
    return {"model.pt": state["model"], "optimizer.pt": state["optimizer"], "state.pt": state["state"]}


def _rollback(job: Job, saver: Any, initial: dict[str, Any] | None) -> None:
    """Every rank, together: back to the newest checkpoint from before the trouble, with a lower rate."""
    from shoal.checkpoint import find_at_or_before, load

    health = job.health
    target = None
    if saver is not None and job.world.is_main:
        target = find_at_or_before(saver.run_dir, health.last_good_step)
    target = dist.broadcast_object(target)
    data = load(target)[1] if target is not None else initial
    kept = health.state_dict()  # the alert history and rollback count survive the rollback
    restore_state(job, target or "the start of this run", data)
    health.load_state_dict(kept)
    health.rolled_back(job.cfg.health.rollback_lr_factor)
    job.schedule.lr_scale = health.lr_scale
    job.window.reset()
    if job.world.is_main:
        logging.getLogger("shoal").warning(
            "health: rolled back to %s (step %d) with the learning rate x%g (rollback %d of %d)",
            target or "the start of this run", job.counters.step, health.lr_scale, health.rollbacks, job.cfg.health.max_rollbacks)
