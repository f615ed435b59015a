"""The training loop. `train_step` is one optimizer step and reads top to bottom: fetch k
micro-batches, forward and backward each (one gradient reduction, after the last), unscale, clip,
check, step, schedule. `train` repeats it and decides, with every rank, when to log, evaluate,
save and stop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from shoal import dist
from shoal.data.fields import tokens_in
from shoal.dist import Flags
from shoal.health.policy import CONTINUE, EARLY_STOP, ROLLBACK, STOP
from shoal.job import Job
from shoal.strategies.memory import memory_report, peak_memory_mb

Report = Callable[[dict[str, Any]], None]


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's summed loss over its samples (on device, not yet reduced)
    count: int  # elements that loss is summed over on this rank
    samples: int  # global samples in the step
    grad_norm: torch.Tensor  # global gradient norm before clipping (the same on every rank)
    lr: float
    stepped: bool
    data_s: float  # time waiting for this rank's batches


@dataclass
class Gradients:
    """What the backward passes of one step leave behind, before the optimizer acts."""

    loss_sum: torch.Tensor  # this rank's summed loss (on device)
    count: int  # elements it is summed over
    rows: int  # samples this rank read
    grad_norm: torch.Tensor  # global norm before clipping
    norm: float  # the same, read once on the host
    data_s: float
    tokens: int = 0  # real tokens this rank read (token data)

    @property
    def ok(self) -> bool:
        """Every gradient finite, on every rank."""
        return math.isfinite(self.norm)


def train_step(job: Job) -> StepResult:
    """One optimizer step over train.grad_accum_steps micro-batches (or the batch ramp's count); advances the
    step counter. Every collaborator gets the same step number, 1-based: the step being taken."""
    c, opt = job.counters, job.optimizer
    step = c.step + 1
    job.health.arm(step)
    job.gns.arm(step)
    g = compute_gradients(job, step)
    job.batch.adapt(job.gns.observe(step, g.grad_norm, g.rows, job.precision.scale))  # auto ramp: at estimates
    job.health.observe_gradients(step, g.norm)
    lr = job.schedule.apply(opt, step, job.batch.lr_factor(step))
    if g.ok:
        job.extras.before_step(step)
    stepped = job.precision.step(opt, g.ok)
    job.extras.after_step(step)
    job.health.observe_update(step)
    opt.zero_grad(set_to_none=True)

    samples = job.batch.samples(step, g.rows, job.data.world.world_size)  # equal on every rank
    c.step, c.samples, c.skipped_steps = step, c.samples + samples, c.skipped_steps + (not stepped)
    job.window.add(g.loss_sum, g.count, samples, g.data_s, g.tokens)
    return StepResult(g.loss_sum, g.count, samples, g.grad_norm, lr, stepped, g.data_s)


def compute_gradients(job: Job, step: int) -> Gradients:
    """Fetch, forward and backward step number `step`'s micro-batches, unscale, clip, check.

    (The parameter-server workers call this too, and push what it leaves.)
    """
    t0 = time.perf_counter()
    batches = [next(job.data.train) for _ in range(job.batch.accum(step))]  # all first: the sample count is known
    data_s = time.perf_counter() - t0
    counts = [job.loss_fn.count(y) for _, y in batches]
    loss_sum = job.strategy.forward_backward(batches, counts, job.loss_fn, job.precision, loss_total(job, counts))
    job.precision.unscale(job.optimizer)  # clipping and the finite check must see true gradients
    grad_norm = job.strategy.clip(job.params)
    # The agreement: the norm comes from reduced gradients, and a non-finite loss or gradient on any
    # rank made them NaN on every rank (forward_backward spreads it), so every rank reads the same
    # answer here and skips or steps together, with no collective of its own. This is the step's one
    # host read (the skip decision needs it before the optimizer runs); everything else stays on device.
    norm = float(grad_norm)
    rows, tokens = sum(y.shape[0] for _, y in batches), sum(tokens_in(x) for x, _ in batches)
    return Gradients(loss_sum, job.strategy.counted(counts), rows, grad_norm, norm, data_s, tokens)


def loss_total(job: Job, counts: list[int]) -> float | torch.Tensor:
    """What this rank's summed loss is divided by: its own count; elastic, where ranks read uneven pieces, its even
    share of the global count (the ranks' gradients are averaged), so the step's gradient is the exact mean over
    every counted element whatever the world size."""
    if not job.batch.elastic:
        return float(sum(counts))
    mine = torch.tensor(float(sum(counts)), dtype=torch.float64, device=job.device)
    # left on device (the step's one host read stays the norm's), in the losses' dtype
    return (dist.all_sum(mine) / job.data.world.world_size).float()


@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    """Validation loss and accuracy: exact global means from sums and counts across ranks."""
    if job.data.val is None:
        return {}
    model = job.bare_model  # not the wrapper: ranks may hold different numbers of validation batches
    was_training = model.training
    model.eval()
    loss_sum, correct, count = dist.all_sum(validation_sums(job)).tolist()
    model.train(was_training)
    if count == 0:
        return {}
    result = {"val_loss": loss_sum / count}
    if job.loss_fn.classify:
        result["val_accuracy"] = correct / count
    return result


def validation_sums(job: Job) -> torch.Tensor:
    """This rank's summed validation loss, correct predictions and counted targets."""
    sums = torch.zeros(3, dtype=torch.float64, device=job.device)
    for x, y, counted in job.data.val.batches(job.cfg.train.eval_batches):
        with job.precision.autocast():
            out = job.strategy.eval_forward(x)
        if out is None or not counted:  # a pipeline's earlier stage, or an extra forward so every rank makes as many
            continue
        n = job.loss_fn.count(y)
        sums[0] += job.loss_fn(out, y).double() * n
        sums[1] += job.loss_fn.correct(out, y).double()
        sums[2] += n
    return sums


class Ending(str, Enum):
    """How a run's loop ended (summary.json's status says completed for an early stop, with early_stopped)."""

    COMPLETED = "completed"
    EARLY_STOPPED = "early_stopped"
    DIVERGED = "diverged"
    PREEMPTED = "preempted"


def train(
    job: Job, report: Report = lambda record: None, on_step: Callable[[int], None] = lambda step: None
) -> dict[str, Any]:
    """Run steps until train.max_steps, an agreed stop or a health decision; returns the summary figures.

    `report(record)` gets every metrics record on every rank (rank 0's are written); `on_step(step)` is
    told of every finished step (the Ray controller's hang watch). Whatever a rank
    raises (a stop by signal, the save timer, the time limit) is agreed through the Pulse, and health
    decisions follow numbers every rank shares, so all ranks log, evaluate, save and stop together.
    """
    cfg, c = job.cfg, job.counters
    clock = Clock(c.step, c.samples, cfg.train.max_time_s)
    train_loss, ending = float("nan"), Ending.COMPLETED if c.step >= cfg.train.max_steps else None
    while ending is None:
        r = train_step(job)
        on_step(c.step)
        flags = job.pulse.exchange(
            Flags(stop=job.stop_requested.is_set(), save=job.checkpointer.time_due(), out_of_time=clock.out_of_time())
        )
        # a stop is not a log or eval step: a resumed run then logs exactly what an uninterrupted one would
        last = c.step >= cfg.train.max_steps or flags.out_of_time
        record = job.health.take_measurements()
        if c.step % cfg.log.every == 0 or last:
            record.update(log_figures(job, r))
            train_loss = record["loss"]
        decision = judge(job, r.stepped, record, train_loss, eval_due=last or every(cfg.train.eval_every, c.step))
        if record:
            report({**progress(job, clock), **record})
        if decision == ROLLBACK:
            job.health.roll_back()
            continue
        ending = ending_of(job, decision, flags.stop, last)
        if decision != STOP and job.checkpointer.due(c.step, flags.save, flags.stop, ending is not None):
            job.checkpointer.save(job.state.collect(), c.step, job.last_eval.metrics, c.skipped_steps)
        if job.snapshots is not None and job.snapshots.due(c.step):
            job.snapshots.save(c.step)  # in shared memory: what a resized or restarted group resumes from
    return finish(job, clock, ending, train_loss)


def every(n: int, step: int) -> bool:
    """Whether step number `step` is a multiple of a cadence n (0: never)."""
    return bool(n) and step % n == 0


def log_figures(job: Job, r: StepResult) -> dict[str, Any]:
    """A log line's figures (every rank computes them: the window's are a collective)."""
    return {
        **job.window.figures(),
        "lr": r.lr,
        "grad_norm": float(r.grad_norm),
        "skipped_steps": job.counters.skipped_steps,
        "mem_mb": peak_memory_mb(job.device),
        "batch": r.samples,  # the step's global batch (under batch_ramp auto, the next one may already be larger)
        **job.gns.figures(),
        **(job.strategy.log_figures() if job.strategy.log_figures else {}),
    }


def progress(job: Job, clock: Clock) -> dict[str, Any]:
    """Where the run stands, at the head of every metrics record."""
    c = job.counters
    return {
        "step": c.step,
        "epoch": job.data.train.epoch,
        "samples": c.samples,
        "time": time.time(),
        "elapsed_s": clock.elapsed(),
    }


def judge(job: Job, stepped: bool, record: dict[str, Any], train_loss: float, eval_due: bool) -> str:
    """The step's one health decision (alike on every rank): the step and its log line judged, then, if training
    goes on and an evaluation is due, the evaluation (plateau, overfitting, early stopping). Adds what the
    evaluation measured to `record`."""
    step = job.counters.step
    decision = job.health.judge(step, stepped, record.get("loss"), record.get("data_wait"))
    if decision == CONTINUE and eval_due:
        record.update(evaluate_and_observe(job))
        decision = job.health.after_eval(step, train_loss, job.last_eval.metrics)
    return decision


def ending_of(job: Job, decision: str, stop: bool, last: bool) -> Ending | None:
    """The run's ending after this step, if it ends: an early stop first puts the best evaluation's weights back."""
    if decision == STOP:
        return Ending.DIVERGED
    if decision == EARLY_STOP:
        if job.health.stopper.restore_best():
            job.last_eval.metrics = evaluate(job)
        return Ending.EARLY_STOPPED
    return Ending.PREEMPTED if stop else Ending.COMPLETED if last else None


def evaluate_and_observe(job: Job) -> dict[str, float]:
    """Evaluate, and let the schedule (plateau) see the result."""
    job.last_eval.metrics = evaluate(job)
    job.schedule.observe(job.last_eval.metrics)
    return job.last_eval.metrics


def finish(job: Job, clock: Clock, ending: Ending, train_loss: float) -> dict[str, Any]:
    """Drain what is in flight (the pulse, loader workers, a background save) and sum up the run."""
    job.pulse.drain()
    job.data.train.close()  # loader workers stop now, not when the garbage collector finds them
    job.checkpointer.wait()
    c, wall = job.counters, clock.elapsed()
    return {
        "status": (Ending.COMPLETED if ending == Ending.EARLY_STOPPED else ending).value,
        "steps": c.step,
        "samples": c.samples,
        "epochs": job.data.train.epoch,
        "skipped_steps": c.skipped_steps,
        "wall_s": wall,
        "samples_per_s": (c.samples - clock.start_samples) / wall if wall > 0 else 0.0,
        "steps_this_run": c.step - clock.start_step,
        "world_size": job.world.world_size,
        "train_loss": train_loss,
        **totals_over_ranks(job),
        "early_stopped": ending == Ending.EARLY_STOPPED,
        **job.health.summary(),
        **job.last_eval.metrics,
    }


def totals_over_ranks(job: Job) -> dict[str, Any]:
    """The summary's figures every rank contributes to (collectives: every rank calls this at the end)."""
    skipped = torch.tensor(
        [float(getattr(job.data.train, "skipped_samples", 0))], dtype=torch.float64, device=job.device
    )
    # every rank's, in rank order
    memory = dist.all_gather_object(memory_report(job.bare_model, job.optimizer, job.strategy.grads_bytes, job.device))
    return {
        "data_skipped_samples": int(dist.all_sum(skipped).item()),
        "memory": {k: [round(m[k], 3) for m in memory] for k in memory[0]},
    }


class Clock:
    """Training time of this run (not start-up), and train.max_time_s."""

    def __init__(self, start_step: int, start_samples: int, limit_s: float | None):
        self.start, self.start_step, self.start_samples, self.limit_s = (
            time.perf_counter(),
            start_step,
            start_samples,
            limit_s,
        )

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def out_of_time(self) -> bool:
        return self.limit_s is not None and self.elapsed() >= self.limit_s
