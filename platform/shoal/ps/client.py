"""An asynchronous worker: pull parameters, compute gradients with the engine's own step pieces
(precision, local accumulation, clipping), push them with the version they were computed on. It
never waits for the other workers, only for its own round trip to the servers. It trains on the
device it reserved (scaling.gpus_per_worker).

PS rank 0 also fills the servers at the start (every worker builds the same model from the seed),
loads a checkpoint into them on resume, and keeps the run's cadence over the servers' updates: the
metrics window, evaluations, checkpoints and the summary's figures; the run (run.py) writes them.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from shoal import checkpoint, dist
from shoal.data.loaders import EvalSet
from shoal.dist import WorldInfo
from shoal.engine import compute_gradients, evaluate
from shoal.errors import CheckpointError
from shoal.job import Job, build_job
from shoal.metrics import Window
from shoal.models import aliases, trainable
from shoal.optim import decays
from shoal.ps.sharding import TensorSpec, balance, flatten
from shoal.run import Hooks, Run
from shoal.state import MODEL, OPTIMIZER, STATE

log = logging.getLogger("shoal")
RECORD_EVERY_S = 0.25  # how often rank 0 reads the servers' progress
PS_SERVERS = "ps_servers"


@dataclass(frozen=True)
class Layout:
    """Where the trainable tensors live on the servers."""

    specs: list[TensorSpec]  # in the model's order of trainable tensors
    shards: list[list[int]]  # each server's tensors, as indices into specs
    tied: dict[str, str]  # alias -> the name of the tensor the model also holds under it


def run_ps_worker(run: Run, servers: list[Any]) -> dict[str, Any]:
    """Train one PS worker until the servers say done; rank 0 returns the run's summary."""
    run.hooks.mark("torch_imported")
    world = WorldInfo.from_env()  # a rank of the group; no process group: workers never talk to each other
    device = dist.select_device(world, run.cfg.scaling.device)
    threads = run.threads()
    if threads:
        torch.set_num_threads(threads)
    with run.open(world):
        job = build_job(run.cfg, world, device, run.dir if world.is_main else None)
        layout = _layout(job, len(servers))
        recorder = _start(run, job, servers, layout) if world.is_main else None
        if recorder is None:
            _wait_until_ready(servers)
        run.hooks.mark("built")
        pushes, version = _train(job, servers, layout.shards, recorder, run.hooks)
        job.data.train.close()
        return recorder.finish() if recorder is not None else {"pushes": pushes, "version": version}


def _layout(job: Job, num_servers: int) -> Layout:
    """The trainable tensors balanced by bytes over the servers (every worker computes the same)."""
    named = trainable(job.bare_model)
    specs = [TensorSpec(n, tuple(p.shape), decays(p, job.cfg.optim)) for n, p in named]
    return Layout(specs, balance([s.numel * 4 for s in specs], num_servers), aliases(job.bare_model))


def _start(run: Run, job: Job, servers: list[Any], layout: Layout) -> Recorder:
    """PS rank 0: fill the servers (and load the checkpoint to resume from), open them, keep the record."""
    if job.data.val is not None:  # rank 0 evaluates alone: the whole split, not a rank's share
        job.data.val = EvalSet(job.data.val.source, WorldInfo(), job.data.val.batch_size, job.device)
    values = [p.detach().cpu().numpy() for _, p in trainable(job.bare_model)]
    ray.get(
        [
            s.init.remote([layout.specs[i] for i in idx], flatten([values[i] for i in idx]))
            for s, idx in zip(servers, layout.shards)
        ]
    )
    target = run.resume_target()
    if target is not None:
        _load_servers(target, servers)
    ray.get([s.open.remote() for s in servers])
    return Recorder(run, job, servers, layout)


def _wait_until_ready(servers: list[Any]) -> None:
    """Until rank 0 has filled and opened the servers."""
    while not all(ray.get([s.ready.remote() for s in servers])):
        time.sleep(0.05)


def _load_servers(target: Path, servers: list[Any]) -> None:
    _meta, data = checkpoint.load(target)
    states = data[STATE].get(PS_SERVERS)
    if states is None or len(states) != len(servers):
        raise CheckpointError(
            f"checkpoint {target}: not an async_ps checkpoint with {len(servers)} server shard(s) (ps.num_shards)"
        )
    ray.get([s.load.remote(st) for s, st in zip(servers, states)])
    log.info("resumed the parameter servers from %s", target)


def _train(
    job: Job, servers: list[Any], shards: list[list[int]], recorder: Recorder | None, hooks: Hooks
) -> tuple[int, int]:
    """Pull, compute, push until done; returns (pushes, last version)."""
    shard_params = [[job.params[i] for i in idx] for idx in shards]
    # gradients accumulate straight into one flat buffer per shard: pushed without a gather
    grad_bufs = [torch.zeros(sum(p.numel() for p in ps), device=job.device) for ps in shard_params]
    on_gpu = job.device.type != "cpu"
    param_bufs = [torch.zeros_like(b) for b in grad_bufs] if on_gpu else None  # on a GPU: one copy in per pull
    for ps, buf in zip(shard_params, grad_bufs):
        _point(ps, buf, lambda p, view: setattr(p, "grad", view))
    replies = ray.get([s.push_pull.remote(None, -1, None) for s in servers])
    pending = None  # the push in flight while the next gradient is computed (ps.overlap)
    pushes = 0
    while True:
        _load(shard_params, [r[0] for r in replies], param_bufs)
        versions = [r[1] for r in replies]
        if recorder is not None:
            recorder.tick(versions[0])
        if replies[0][2]:  # shard 0 says when the job is done
            break
        refs = _push(job, servers, grad_bufs, versions, pushes + 1)
        pushes += 1
        hooks.step_done(pushes)
        if job.cfg.ps.overlap:
            # compute the next gradient while this push travels; it starts from the previous reply
            if pending is None:
                pending = refs
                continue
            replies, pending = ray.get(pending), refs
        else:
            replies = ray.get(refs)
    if pending is not None:
        ray.get(pending)
    return pushes, versions[0]


def _push(job: Job, servers: list[Any], grad_bufs: list[torch.Tensor], versions: list[int], step: int) -> list[Any]:
    """Compute this worker's step number `step` and push each server its shard with the version it was computed on."""
    g = compute_gradients(job, step)
    if job.precision.scaler is not None:
        job.precision.scaler.update()
    grads = [buf.cpu().numpy() if g.ok else None for buf in grad_bufs]
    stats = {
        "loss_sum": float(g.loss_sum),
        "count": g.count,
        "samples": g.rows,
        "grad_norm": float(g.grad_norm),
        "ok": g.ok,
    }
    refs = [
        s.push_pull.remote(gr, v, stats if k == 0 else None)
        for k, (s, gr, v) in enumerate(zip(servers, grads, versions))
    ]
    for buf in grad_bufs:  # the calls above already copied the gradients into the object store
        buf.zero_()
    return refs


def _point(params: list[Any], flat: Any, assign: Callable[[Any, Any], None]) -> None:
    o = 0
    for p in params:
        n = p.numel()
        assign(p, flat[o : o + n].view_as(p))
        o += n


def _load(shard_params: list[list[Any]], flats: list[np.ndarray], device_bufs: list[Any] | None) -> None:
    """Point the parameters at the servers' buffers: zero-copy on the CPU (the worker never writes
    them), one copy per shard into the device's buffers on a GPU."""
    for k, (ps, flat) in enumerate(zip(shard_params, flats)):
        with warnings.catch_warnings():  # Ray hands out read-only shared memory; the worker only reads it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(flat)
        if device_bufs is not None:
            device_bufs[k].copy_(t, non_blocking=True)
            t = device_bufs[k]
        _point(ps, t, lambda p, view: setattr(p, "data", view))


class Recorder:
    """PS rank 0's cadence over the updates the servers applied (their versions jump: thresholds, not
    multiples): one metrics window between log lines, evaluations every train.eval_every versions,
    checkpoints, the time limit, and the summary's figures. The run writes the records and the summary."""

    def __init__(self, run: Run, job: Job, servers: list[Any], layout: Layout):
        self.run, self.job, self.cfg, self.servers, self.layout = run, job, job.cfg, servers, layout
        start = ray.get(servers[0].progress.remote())
        self.start_version, self.start_samples = int(start["version"]), int(start["samples"])
        run.open_record(self.start_version)
        self.window = Window(float, lambda loss_sum, count, tokens: (loss_sum, count, tokens))
        self.extra = dict.fromkeys(("grad_norm_sum", "pushes", "staleness_sum"), 0.0)
        self.version, self.last = self.start_version, start
        self.next_log = _next(self.start_version, self.cfg.log.every)
        self.next_eval = _next(self.start_version, self.cfg.train.eval_every)
        self.next_save = _next(self.start_version, self.cfg.checkpoint.every_steps)
        self.last_read = 0.0
        self.first_update: float | None = None
        self.updates_at_log = self.start_version
        self.train_loss = float("nan")
        self.final_eval: dict[str, float] = {}

    def tick(self, version: int) -> None:
        """Between pushes: read the servers' progress about every RECORD_EVERY_S, log, evaluate, save."""
        now = time.perf_counter()
        if now - self.last_read >= RECORD_EVERY_S:
            self.last_read = now
            self._read()
        if self.next_eval is not None and version >= self.next_eval:
            self._evaluate(version)
            self.next_eval = _next(version, self.cfg.train.eval_every)
        if (self.next_save is not None and self.version >= self.next_save) or self.job.checkpointer.time_due():
            self.save()
            self.next_save = _next(self.version, self.cfg.checkpoint.every_steps)
        limit = self.cfg.train.max_time_s
        if limit is not None and self.first_update is not None and now - self.first_update >= limit:
            for s in self.servers:
                s.stop.remote()

    def _read(self) -> None:
        p = ray.get(self.servers[0].progress.remote(), timeout=self.cfg.scaling.timeout_s)
        if self.first_update is None and p["version"] > self.start_version:
            # training time starts with the first update, as AllReduce's starts with its loop (not actor start-up)
            self.first_update = time.perf_counter()
            self.window.reset()
        w = p["window"]
        self.window.add(w["loss_sum"], w["count"], int(w["samples"]))
        for k in self.extra:
            self.extra[k] += w[k]
        self.version, self.last = p["version"], p
        if self.next_log is not None and (self.version >= self.next_log or (p["done"] and self.extra["pushes"])):
            self._log()

    def _log(self) -> None:
        elapsed = max(time.perf_counter() - self.window.start, 1e-9)
        figures = self.window.figures()
        pushes = max(1.0, self.extra["pushes"])
        self.train_loss = figures["loss"]
        self._write(
            {
                "step": self.version,
                "samples": self.last["samples"],
                "loss": figures["loss"],
                "lr": self.last["lr"],
                "grad_norm": self.extra["grad_norm_sum"] / pushes,
                "samples_per_s": figures["samples_per_s"],
                "updates_per_s": (self.version - self.updates_at_log) / elapsed,
                "staleness_mean": _mean(self.last["staleness"]),
                "dropped_updates": self.last["dropped"],
                "skipped_steps": self.last["skipped"],
            }
        )
        self.extra = dict.fromkeys(self.extra, 0.0)
        self.updates_at_log = self.version
        self.next_log = _next(self.version, self.cfg.log.every)

    def _evaluate(self, version: int) -> None:
        self.final_eval = evaluate(self.job)
        if self.final_eval:
            self._write({"step": version, "samples": self.last["samples"], **self.final_eval})

    def _write(self, record: dict[str, Any]) -> None:
        start = self.first_update or time.perf_counter()
        self.run.log({"time": time.time(), "elapsed_s": time.perf_counter() - start, **record})

    def save(self) -> None:
        """Checkpoint the servers' state (parameters, optimizer, version) in the usual layout, with the
        model's full state dict: every name (a tied head too) and rank 0's buffers."""
        states = ray.get([s.state.remote() for s in self.servers])
        model = {k: v.detach().cpu().clone() for k, v in self.job.bare_model.state_dict().items()}
        for idx, st in zip(self.layout.shards, states):
            o = 0
            for i in idx:
                spec = self.layout.specs[i]
                model[spec.name] = st["flat"][o : o + spec.numel].view(spec.shape).clone()
                o += spec.numel
        model.update({alias: model[name] for alias, name in self.layout.tied.items()})  # one tensor, every name
        version = int(states[0]["version"])
        state = {
            MODEL: model,
            OPTIMIZER: {"ps_shards": [st["optimizer"] for st in states]},
            STATE: {PS_SERVERS: states, "data": {"epoch": 0, "consumed": 0}, "strategy": "async_ps"},
        }
        self.job.checkpointer.save(state, version, self.final_eval, int(self.last["skipped"]))

    def finish(self) -> dict[str, Any]:
        """After the servers said done: the last window, a final evaluation, the final checkpoint, the summary."""
        self._read()
        if self.extra["pushes"]:
            self._log()
        stop = self.run.hooks.stop
        stopped = stop is not None and stop.is_set()
        self._evaluate(self.version)
        if self.cfg.checkpoint.at_end or stopped:
            self.save()
        self.job.checkpointer.wait()
        return self.run.finish(self._summary("preempted" if stopped else "completed"))

    def _summary(self, status: str) -> dict[str, Any]:
        wall = time.perf_counter() - (self.first_update or time.perf_counter())
        hist = self.last["staleness"]
        return {
            "status": status,
            "strategy": "async_ps",
            "steps": self.version,
            "samples": self.last["samples"],
            "wall_s": wall,
            "samples_per_s": (self.last["samples"] - self.start_samples) / wall if wall > 0 else 0.0,
            "updates_per_s": (self.version - self.start_version) / wall if wall > 0 else 0.0,
            "world_size": self.job.world.world_size,
            "train_loss": self.train_loss,
            "skipped_steps": self.last["skipped"],
            "dropped_updates": self.last["dropped"],
            "staleness_mean": _mean(hist),
            "staleness_p50": _quantile(hist, 0.5),
            "staleness_p99": _quantile(hist, 0.99),
            "staleness_max": max((int(k) for k in hist), default=0),
            "staleness_histogram": {str(k): v for k, v in sorted(hist.items(), key=lambda kv: int(kv[0]))},
            "ps_shards": len(self.servers),
            **self.run.names(),
            "device": str(self.job.device),
            **self.final_eval,
        }


def _next(version: int, every: int | None) -> int | None:
    """The first multiple of `every` past `version` (None: never)."""
    return (version // every + 1) * every if every else None


def _mean(hist: dict[Any, int]) -> float:
    total = sum(hist.values())
    return sum(int(k) * v for k, v in hist.items()) / total if total else 0.0


def _quantile(hist: dict[Any, int], q: float) -> float:
    total = sum(hist.values())
    if not total:
        return 0.0
    seen = 0
    for k in sorted(hist, key=int):
        seen += hist[k]
        if seen >= q * total:
            return float(int(k))
    return float(max(int(k) for k in hist))
