"""An asynchronous worker: pull parameters, compute gradients with the engine's own step pieces
(precision, local accumulation, clipping), push them with the version they were computed on. It
never waits for the other workers, only for its own round trip to the servers. It trains on the
device it reserved (scaling.gpus_per_worker).

PS rank 0 also fills the servers at the start (every worker builds the same model from the seed),
loads a checkpoint into them on resume, and keeps the run's record: the metrics window over the
servers' updates, evaluations, checkpoints and the summary, as rank 0 does under AllReduce.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.ps.sharding import TensorSpec, balance, flatten

log = logging.getLogger("shoal")
RECORD_EVERY_S = 0.25  # how often rank 0 reads the servers' progress


def run_ps_worker(
    cfg: JobConfig,
    *,
    resume: bool = False,
    report: Callable[[dict[str, Any]], None] | None = None,
    stop: threading.Event | None = None,
    on_step: Callable[[int], None] | None = None,
    mark: Callable[[str], None] | None = None,
    controlled: bool = True,
    servers: list[Any] = (),
) -> dict[str, Any]:
    """Train one PS worker until the servers say done; rank 0 returns the run's summary."""
    import ray
    import torch

    from shoal import dist
    from shoal.job import build_job
    from shoal.models import aliases

    mark = mark or (lambda name: None)
    mark("torch_imported")
    world = WorldInfo.from_env()  # a rank of the group; no process group: workers never talk to each other
    device = dist.select_device(world, cfg.scaling.device)
    threads = cfg.scaling.threads(under_ray=True)
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(cfg.run.dir)
    job = build_job(cfg, world, device, run_dir if world.is_main else None)
    specs = [TensorSpec(n, tuple(p.shape), d) for (n, p), d in zip(_named(job), _decays(job))]
    shards = balance([s.numel * 4 for s in specs], len(servers))
    recorder = None
    if world.is_main:
        from shoal.data.loaders import EvalSet

        if job.data.val is not None:  # rank 0 evaluates alone: the whole split, not a rank's share
            job.data.val = EvalSet(job.data.val.source, WorldInfo(), job.data.val.batch_size, job.device)
        _fill(servers, specs, shards, job)
        resumed_from = _resume(cfg, run_dir, resume, servers)
        ray.get([s.open.remote() for s in servers])
        recorder = Recorder(job, servers, shards, specs, aliases(job.bare_model), run_dir, report, resumed_from, stop)
    else:
        while not all(ray.get([s.ready.remote() for s in servers])):
            time.sleep(0.05)
    mark("built")
    pushes, version = _train(job, servers, shards, recorder, on_step, mark)
    job.data.train.close()
    if recorder is None:
        return {"pushes": pushes, "version": version}
    return recorder.finish()


def _named(job: Any) -> list[tuple[str, Any]]:
    from shoal.models import trainable

    return trainable(job.bare_model)


def _decays(job: Any) -> list[bool]:
    from shoal.optim import decays

    return [decays(p, job.cfg.optim) for _, p in _named(job)]


def _fill(servers: list[Any], specs: list[TensorSpec], shards: list[list[int]], job: Any) -> None:
    """Give each server its tensors' names, shapes and initial values."""
    import ray

    values = [p.detach().cpu().numpy() for _, p in _named(job)]
    ray.get(
        [s.init.remote([specs[i] for i in idx], flatten([values[i] for i in idx])) for s, idx in zip(servers, shards)]
    )


def _resume(cfg: JobConfig, run_dir: Path, resume: bool, servers: list[Any]) -> Path | None:
    import ray

    from shoal import checkpoint
    from shoal.errors import CheckpointError
    from shoal.state import STATE

    target = (
        checkpoint.find_latest(run_dir)
        if resume
        else (Path(cfg.checkpoint.resume_from).expanduser() if cfg.checkpoint.resume_from else None)
    )
    if target is None:
        return None
    _meta, data = checkpoint.load(target)
    states = data[STATE].get(PS_SERVERS)
    if states is None or len(states) != len(servers):
        raise CheckpointError(
            f"checkpoint {target}: not an async_ps checkpoint with {len(servers)} server shard(s) (ps.num_shards)"
        )
    ray.get([s.load.remote(st) for s, st in zip(servers, states)])
    log.info("resumed the parameter servers from %s", target)
    return target


PS_SERVERS = "ps_servers"


def _train(
    job: Any,
    servers: list[Any],
    shards: list[list[int]],
    recorder: Recorder | None,
    on_step: Callable[[int], None] | None,
    mark: Callable[[str], None],
) -> tuple[int, int]:
    """Pull, compute, push until done; returns (pushes, last version)."""
    import ray
    import torch

    from shoal.engine import compute_gradients, evaluate

    shard_params = [[job.params[i] for i in idx] for idx in shards]
    cpu = job.device.type == "cpu"
    # gradients accumulate straight into one flat buffer per shard: pushed without a gather
    grad_bufs = [torch.zeros(sum(p.numel() for p in ps), device=job.device) for ps in shard_params]
    param_bufs = None if cpu else [torch.zeros_like(b) for b in grad_bufs]  # on a GPU: one copy in per pull
    for ps, buf in zip(shard_params, grad_bufs):
        _point(ps, buf, lambda p, view: setattr(p, "grad", view))
    replies = ray.get([s.push_pull.remote(None, -1, None) for s in servers])
    pending = None  # the push in flight while the next gradient is computed (ps.overlap)
    pushes = 0
    while True:
        _load(shard_params, [r[0] for r in replies], param_bufs)
        versions = [r[1] for r in replies]
        if recorder is not None:
            recorder.tick(versions[0], evaluate)
        if replies[0][2]:  # shard 0 says when the job is done
            break
        g = compute_gradients(job, pushes + 1)  # this worker's own step number
        if job.precision.scaler is not None:
            job.precision.scaler.update()
        grads = [(buf.numpy() if cpu else buf.cpu().numpy()) if g.ok else None for buf in grad_bufs]
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
        pushes += 1
        if pushes == 1:
            mark("first_step")
        if on_step is not None:
            on_step(pushes)
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


def _point(params: list[Any], flat: Any, assign: Callable[[Any, Any], None]) -> None:
    o = 0
    for p in params:
        n = p.numel()
        assign(p, flat[o : o + n].view_as(p))
        o += n


def _load(shard_params: list[list[Any]], flats: list[np.ndarray], device_bufs: list[Any] | None) -> None:
    """Point the parameters at the servers' buffers: zero-copy on the CPU (the worker never writes
    them), one copy per shard into the device's buffers on a GPU."""
    import warnings

    import torch

    for k, (ps, flat) in enumerate(zip(shard_params, flats)):
        with warnings.catch_warnings():  # Ray hands out read-only shared memory; the worker only reads it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(flat)
        if device_bufs is not None:
            device_bufs[k].copy_(t, non_blocking=True)
            t = device_bufs[k]
        _point(ps, t, lambda p, view: setattr(p, "data", view))


class Recorder:
    """PS rank 0's record of the run: one metrics window over the updates the servers applied,
    evaluations every train.eval_every versions, checkpoints, the time limit, and the summary."""

    def __init__(
        self,
        job: Any,
        servers: list[Any],
        shards: list[list[int]],
        specs: list[TensorSpec],
        tied: dict[str, str],
        run_dir: Path,
        report: Callable[[dict[str, Any]], None] | None,
        resumed_from: Path | None,
        stop: threading.Event | None,
    ):
        import ray

        from shoal.metrics import MetricsWriter, Window

        self.job, self.cfg, self.servers, self.shards, self.specs, self.tied = (
            job,
            job.cfg,
            servers,
            shards,
            specs,
            tied,
        )
        self.run_dir, self.report, self.resumed_from, self.stop = run_dir, report, resumed_from, stop
        start = ray.get(servers[0].progress.remote())
        self.start_version, self.start_samples = int(start["version"]), int(start["samples"])
        from shoal import tracking

        self.writer = MetricsWriter(
            run_dir,
            self.cfg.log.tensorboard,
            truncate_after_step=self.start_version if resumed_from else None,
            tracker=tracking.build(self.cfg, run_dir, job.world.world_size, resumed=resumed_from is not None),
        )
        self.window = Window(float, lambda loss_sum, count: (loss_sum, count))
        self.extra = dict.fromkeys(("grad_norm_sum", "pushes", "staleness_sum"), 0.0)
        self.version, self.last = self.start_version, start
        self.next_log = self._next(self.start_version, self.cfg.log.every)
        self.next_eval = self._next(self.start_version, self.cfg.train.eval_every)
        self.next_save = self._next(self.start_version, self.cfg.checkpoint.every_steps)
        self.last_read = 0.0
        self.first_update: float | None = None
        self.updates_at_log = self.start_version
        self.train_loss = float("nan")
        self.final_eval: dict[str, float] = {}

    @staticmethod
    def _next(version: int, every: int | None) -> int | None:
        return (version // every + 1) * every if every else None

    def tick(self, version: int, evaluate: Callable[[Any], dict[str, float]]) -> None:
        """Between pushes: read the servers' progress about every RECORD_EVERY_S, log, evaluate, save."""
        now = time.perf_counter()
        if now - self.last_read >= RECORD_EVERY_S:
            self.last_read = now
            self._read()
        if self.next_eval is not None and version >= self.next_eval:
            self._evaluate(version, evaluate)
            self.next_eval = self._next(version, self.cfg.train.eval_every)
        if (self.next_save is not None and self.version >= self.next_save) or self.job.checkpointer.time_due():
            self.save()
            self.next_save = self._next(self.version, self.cfg.checkpoint.every_steps)
        limit = self.cfg.train.max_time_s
        if limit is not None and self.first_update is not None and now - self.first_update >= limit:
            for s in self.servers:
                s.stop.remote()

    def _read(self) -> None:
        import ray

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
        hist = self.last["staleness"]
        self._write(
            {
                "step": self.version,
                "samples": self.last["samples"],
                "loss": figures["loss"],
                "lr": self.last["lr"],
                "grad_norm": self.extra["grad_norm_sum"] / pushes,
                "samples_per_s": figures["samples_per_s"],
                "updates_per_s": (self.version - self.updates_at_log) / elapsed,
                "staleness_mean": _mean(hist),
                "dropped_updates": self.last["dropped"],
                "skipped_steps": self.last["skipped"],
            }
        )
        self.extra = dict.fromkeys(self.extra, 0.0)
        self.updates_at_log = self.version
        self.next_log = self._next(self.version, self.cfg.log.every)

    def _evaluate(self, version: int, evaluate: Callable[[Any], dict[str, float]]) -> None:
        self.final_eval = evaluate(self.job)
        if self.final_eval:
            self._write({"step": version, "samples": self.last["samples"], **self.final_eval})

    def _write(self, record: dict[str, Any]) -> None:
        start = self.first_update or time.perf_counter()
        record = {"time": time.time(), "elapsed_s": time.perf_counter() - start, **record}
        self.writer.log(record)
        if self.report is not None:
            self.report(record)

    def save(self) -> None:
        """Checkpoint the servers' state (parameters, optimizer, version) in the usual layout, with the
        model's full state dict: every name (a tied head too) and rank 0's buffers."""
        import ray

        from shoal.state import MODEL, OPTIMIZER, STATE

        states = ray.get([s.state.remote() for s in self.servers])
        model = {k: v.detach().cpu().clone() for k, v in self.job.bare_model.state_dict().items()}
        for idx, st in zip(self.shards, states):
            o = 0
            for i in idx:
                spec = self.specs[i]
                model[spec.name] = st["flat"][o : o + spec.numel].view(spec.shape).clone()
                o += spec.numel
        model.update({alias: model[name] for alias, name in self.tied.items()})  # one tensor, every name the model has
        version = int(states[0]["version"])
        state = {
            MODEL: model,
            OPTIMIZER: {"ps_shards": [st["optimizer"] for st in states]},
            STATE: {PS_SERVERS: states, "data": {"epoch": 0, "consumed": 0}, "strategy": "async_ps"},
        }
        self.job.checkpointer.save(state, version, self.final_eval, int(self.last["skipped"]))

    def finish(self) -> dict[str, Any]:
        """After the servers said done: the last window, a final evaluation, the final checkpoint, the summary."""
        from shoal.engine import evaluate

        self._read()
        if self.extra["pushes"]:
            self._log()
        stopped = self.stop is not None and self.stop.is_set()
        self._evaluate(self.version, evaluate)
        if self.cfg.checkpoint.at_end or stopped:
            self.save()
        self.job.checkpointer.wait()
        wall = time.perf_counter() - (self.first_update or time.perf_counter())
        hist = self.last["staleness"]
        summary = {
            "status": "preempted" if stopped else "completed",
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
            "run_dir": str(self.run_dir),
            "name": self.cfg.name,
            "device": str(self.job.device),
            **self.final_eval,
        }
        if self.resumed_from is not None:
            summary["resumed_from"] = str(self.resumed_from)
        self.writer.close(summary)
        return summary


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
