"""The training loop. `train_step` is one optimizer step and reads top to bottom: fetch k
micro-batches, forward and backward each (one gradient reduction, after the last), unscale, clip,
check, step, schedule. `train` repeats it and decides, with every rank, when to log, evaluate,
save and stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shoal import dist
from shoal.dist import Flags
from shoal.health.policy import CONTINUE, EARLY_STOP, ROLLBACK, STOP
from shoal.job import Job
from shoal.optim import add_grad_noise, add_l1_grad
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
    ok: bool  # every gradient finite, on every rank
    data_s: float


def train_step(job: Job) -> StepResult:
    """One optimizer step over train.grad_accum_steps micro-batches; advances the step counter."""
    c, opt = job.counters, job.optimizer
    step = c.step + 1  # 1-based: health, the records and the checkpoints all count this way
    job.health.arm(step)
    job.gns.arm(step)
    g = compute_gradients(job)
    job.gns.observe(step, g.grad_norm, g.rows, job.precision.scale)
    job.health.observe_gradients(step, float(g.grad_norm))
    if g.ok:
        add_l1_grad(opt)
        add_grad_noise(job.params, job.cfg.optim.grad_noise, job.cfg.seed, step)
    lr = job.schedule.apply(opt, c.step, job.batch.lr_factor(c.step))
    stepped = job.precision.step(opt, g.ok)
    job.sparsity.apply()  # model.keep_sparsity: pruned weights stay zero
    job.health.observe_update(step)
    opt.zero_grad(set_to_none=True)

    samples = g.rows * job.data.world.world_size  # every replica reads as many: equal on every rank
    c.step, c.samples, c.skipped_steps = step, c.samples + samples, c.skipped_steps + (not stepped)
    job.window.add(g.loss_sum, g.count, samples, g.data_s)
    return StepResult(g.loss_sum, g.count, samples, g.grad_norm, lr, stepped, g.data_s)


def compute_gradients(job: Job) -> Gradients:
    """Fetch, forward and backward the step's micro-batches (train.grad_accum_steps, or the batch ramp's count),
    unscale, clip, check.

    (The parameter-server workers call this too, and push what it leaves.)
    """
    t0 = time.perf_counter()
    batches = [
        next(job.data.train) for _ in range(job.batch.accum(job.counters.step))
    ]  # all first: the step's sample count is known
    data_s = time.perf_counter() - t0
    counts = [job.loss_fn.count(y) for _, y in batches]
    loss_sum = job.strategy.forward_backward(batches, counts, job.loss_fn, job.precision)
    job.precision.unscale(job.optimizer)  # clipping and the finite check must see true gradients
    grad_norm = job.strategy.clip(job.params)
    # The agreement: the norm comes from reduced gradients, and a non-finite loss or gradient on any
    # rank made them NaN on every rank (forward_backward spreads it), so every rank reads the same
    # answer here and skips or steps together, with no collective of its own.
    ok = bool(torch.isfinite(grad_norm))
    return Gradients(loss_sum, job.strategy.counted(counts), sum(y.shape[0] for _, y in batches), grad_norm, ok, data_s)


@torch.no_grad()
def evaluate(job: Job) -> dict[str, float]:
    """Validation loss and accuracy: exact global means from sums and counts across ranks."""
    if job.data.val is None:
        return {}
    model = job.bare_model  # not the wrapper: ranks may hold different numbers of validation batches
    was_training = model.training
    model.eval()
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
    model.train(was_training)
    loss_sum, correct, count = dist.all_sum(sums).tolist()
    if count == 0:
        return {}
    result = {"val_loss": loss_sum / count}
    if job.loss_fn.classify:
        result["val_accuracy"] = correct / count
    return result


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
    train_loss, ending = float("nan"), "completed" if c.step >= cfg.train.max_steps else ""
    while not ending:
        r = train_step(job)
        on_step(c.step)
        flags = job.pulse.exchange(
            Flags(stop=job.stop_requested.is_set(), save=job.checkpointer.time_due(), out_of_time=clock.out_of_time())
        )
        # a stop is not a log or eval step: a resumed run then logs exactly what an uninterrupted one would
        last = c.step >= cfg.train.max_steps or flags.out_of_time
        record = job.health.take_measurements()
        if c.step % cfg.log.every == 0 or last:
            record.update(
                job.window.figures(),
                lr=r.lr,
                grad_norm=float(r.grad_norm),
                skipped_steps=c.skipped_steps,
                mem_mb=peak_memory_mb(job.device),
                batch=job.batch.global_batch(c.step - 1),
                **job.gns.figures(),
                **(job.strategy.log_figures() if job.strategy.log_figures else {}),
            )
            job.batch.adapt(record.get("gns"))  # batch_ramp auto: every rank holds the same reduced estimate
            train_loss = record["loss"]
        decision = job.health.judge(c.step, r.stepped, record.get("loss"), record.get("data_wait"))
        if decision == CONTINUE and ((cfg.train.eval_every and c.step % cfg.train.eval_every == 0) or last):
            record.update(evaluate_and_observe(job))
            decision = job.health.after_eval(c.step, train_loss, job.last_eval.metrics)
        if record:
            report(
                {
                    "step": c.step,
                    "epoch": job.data.train.epoch,
                    "samples": c.samples,
                    "time": time.time(),
                    "elapsed_s": clock.elapsed(),
                    **record,
                }
            )
        if decision == ROLLBACK:
            job.health.roll_back()
            continue
        if decision == EARLY_STOP and job.health.stopper.restore_best():  # end with the best evaluation's weights
            job.last_eval.metrics = evaluate(job)
        ending = {STOP: "diverged", EARLY_STOP: "early_stopped"}.get(decision) or (
            "preempted" if flags.stop else "completed" if last else ""
        )
        if decision != STOP and job.checkpointer.due(c.step, flags.save, flags.stop, bool(ending)):
            job.checkpointer.save(job.state.collect(), c.step, job.last_eval.metrics, c.skipped_steps)
    return finish(job, clock, ending, train_loss)


def evaluate_and_observe(job: Job) -> dict[str, float]:
    """Evaluate, and let the schedule (plateau) see the result."""
    job.last_eval.metrics = evaluate(job)
    job.schedule.observe(job.last_eval.metrics)
    return job.last_eval.metrics


def finish(job: Job, clock: Clock, ending: str, train_loss: float) -> dict[str, Any]:
    """Drain what is in flight (the pulse, loader workers, a background save) and sum up the run."""
    c = job.counters
    job.pulse.drain()
    job.data.train.close()  # loader workers stop now, not when the garbage collector finds them
    job.checkpointer.wait()
    skipped = torch.tensor(
        [float(getattr(job.data.train, "skipped_samples", 0))], dtype=torch.float64, device=job.device
    )
    memory = dist.all_gather_object(
        memory_report(job.bare_model, job.optimizer, job.strategy.grads_bytes, job.device)
    )  # every rank's, in rank order
    wall = clock.elapsed()
    return {
        "status": "completed" if ending == "early_stopped" else ending,
        "steps": c.step,
        "samples": c.samples,
        "epochs": job.data.train.epoch,
        "skipped_steps": c.skipped_steps,
        "wall_s": wall,
        "samples_per_s": (c.samples - clock.start_samples) / wall if wall > 0 else 0.0,
        "steps_this_run": c.step - clock.start_step,
        "world_size": job.world.world_size,
        "train_loss": train_loss,
        "data_skipped_samples": int(dist.all_sum(skipped).item()),
        "early_stopped": ending == "early_stopped",
        "memory": {k: [round(m[k], 3) for m in memory] for k in memory[0]},
        **job.health.summary(),
        **job.last_eval.metrics,
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
