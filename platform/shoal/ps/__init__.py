"""strategy: async_ps. Parameter-server actors own balanced slices of the parameters; worker actors
push gradients without waiting for each other. Same outputs as AllReduce mode: metrics.jsonl,
TensorBoard, summary.json (plus updates/s and staleness), checkpoints, --resume.

A "step" in this mode is one update applied by the servers (one worker's micro-batches), so
train.max_steps, checkpoint.every_steps, log.every and train.eval_every count updates.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from shoal.config import JobConfig
from shoal.errors import ClusterError, WorkerFailed
from shoal.ps.sharding import TensorSpec, balance, flatten

POLL_S = 0.25


def model_specs(cfg: JobConfig) -> tuple[list[TensorSpec], list[np.ndarray], dict[str, str]]:
    """Every trainable tensor (name, shape, decay group) and its initial value, as the workers build it,
    and the other names of shared tensors (a tied head) for the checkpoint's full state dict."""
    import torch

    from shoal.engine import build_job
    from shoal.dist import WorldInfo
    from shoal.models import aliases, trainable
    from shoal.optim import decay_flags

    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    flags = decay_flags(job.bare_model, cfg.optim)
    named = trainable(job.bare_model)
    specs = [TensorSpec(n, tuple(p.shape), flags[n]) for n, p in named]
    return specs, [p.detach().numpy().copy() for _, p in named], aliases(job.bare_model)


def run_async_ps(cfg: JobConfig, path: Path, resume: bool, out: Any) -> dict[str, Any]:
    """Train with parameter servers on the connected Ray cluster; returns the summary."""
    import ray

    from shoal.checkpoint import Checkpointer
    from shoal.dist import WorldInfo
    from shoal.metrics import MetricsWriter
    from shoal.progress import Progress
    from shoal.rundir import write_summary
    from shoal.signals import StopOnSignal

    specs, values, tied = model_specs(cfg)
    shards = balance([s.numel * 4 for s in specs], cfg.ps.num_shards)
    cfg_dict = cfg.to_dict()
    server_cls = ray.remote(_server_class())
    servers = [
        server_cls.options(num_cpus=cfg.ps.cpus_per_server).remote(k, [specs[i] for i in idx], flatten([values[i] for i in idx]), cfg_dict)
        for k, idx in enumerate(shards)
    ]
    resumed_from = _resume(cfg, path, resume, servers)
    n = cfg.scaling.num_workers
    worker_cls = ray.remote(_worker_class())
    workers = [
        worker_cls.options(num_cpus=cfg.scaling.cpus_per_worker, num_gpus=cfg.scaling.gpus_per_worker, max_concurrency=2).remote(r, n, cfg_dict, servers, shards, specs)
        for r in range(n)
    ]
    runs = [w.run.remote(os.getcwd(), list(sys.path)) for w in workers]
    writer = MetricsWriter(path, cfg.log.tensorboard, truncate_after_step=_start(servers)[0] if (resume or resumed_from) else None)
    progress = Progress(cfg.train.max_steps, cfg.log.progress, cfg.log.print_every_s, out)
    saver = Checkpointer(cfg, path, WorldInfo())
    watch = _Watch(cfg, servers, writer, progress, saver, shards, specs, tied)
    stop = threading.Event()
    watch.start_version, watch.start_samples = _start(servers)
    try:
        with StopOnSignal(stop, on_first=lambda: [s.stop.remote() for s in servers]) as signals:
            results = watch.until_done(runs)
        watch.poll()  # the last evaluations and window
        if cfg.checkpoint.at_end or stop.is_set():
            watch.save()
        saver.wait()
    finally:
        writer.close()
        progress.close()
        for actor in workers + servers:
            ray.kill(actor, no_restart=True)
    wall = time.perf_counter() - (watch.first_update or watch.started)
    summary = watch.summary(wall, results)
    summary.update(status="preempted" if stop.is_set() else "completed", run_dir=str(path), name=cfg.name, exit_code=signals.exit_code)
    if resumed_from is not None:
        summary["resumed_from"] = str(resumed_from)
    write_summary(path, {k: v for k, v in summary.items() if k != "exit_code"})
    return summary


def _server_class() -> type:
    from shoal.ps.server import ParameterServer

    return ParameterServer


def _worker_class() -> type:
    from shoal.ps.client import PSWorker

    return PSWorker


def _start(servers: list[Any]) -> tuple[int, int]:
    """(version, samples) the servers start from (non-zero after a resume)."""
    import ray

    p = ray.get(servers[0].progress.remote())
    return int(p["version"]), int(p["samples"])


def _resume(cfg: JobConfig, path: Path, resume: bool, servers: list[Any]) -> Path | None:
    import ray

    from shoal import checkpoint
    from shoal.errors import CheckpointError

    target = checkpoint.find_latest(path) if resume else (Path(cfg.checkpoint.resume_from) if cfg.checkpoint.resume_from else None)
    if target is None:
        return None
    _meta, data = checkpoint.load(target)
    states = data["state.pt"].get("ps_servers")
    if states is None or len(states) != len(servers):
        raise CheckpointError(f"checkpoint {target}: not an async_ps checkpoint with {len(servers)} server shard(s) (ps.num_shards)")
    ray.get([s.load.remote(st) for s, st in zip(servers, states)])
    print(f"[shoal] resumed the parameter servers from {target}", flush=True)
    return target


class _Watch:
    """The driver's loop: metrics from the servers, checkpoints, failures."""

    def __init__(self, cfg: JobConfig, servers: list[Any], writer: Any, progress: Any, saver: Any, shards: list[list[int]],
                 specs: list[TensorSpec], tied: dict[str, str]):
        self.cfg, self.servers, self.writer, self.progress, self.saver = cfg, servers, writer, progress, saver
        self.shards, self.specs, self.tied = shards, specs, tied
        self.version = 0
        self.last_log = time.perf_counter()
        self.window = {"loss_sum": 0.0, "count": 0, "samples": 0, "grad_norm_sum": 0.0, "pushes": 0, "staleness_sum": 0}
        self.updates_at_log = 0
        self.next_log = cfg.log.every
        self.next_save = cfg.checkpoint.every_steps
        self.last = {"samples": 0, "dropped": 0, "skipped": 0, "staleness": {}, "lr": 0.0}
        self.final_eval: dict[str, float] = {}
        self.train_loss = float("nan")
        self.started = time.perf_counter()
        self.first_update: float | None = None
        self.start_version = 0
        self.start_samples = 0

    def until_done(self, runs: list[Any]) -> list[dict[str, Any]]:
        import ray

        while True:
            ready, _ = ray.wait(runs, num_returns=len(runs), timeout=POLL_S)
            try:
                self.poll()
            except ray.exceptions.RayActorError as e:
                raise WorkerFailed(f"a parameter server died: {str(e).splitlines()[0]}") from None
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    raise WorkerFailed(f"ps worker {runs.index(ref)} died: {str(e).splitlines()[0]}") from None
                except ray.exceptions.RayTaskError as e:
                    cause = e.cause if getattr(e, "cause", None) is not None else e
                    raise WorkerFailed(f"ps worker {runs.index(ref)} failed: {type(cause).__name__}: {str(cause).splitlines()[0]}") from None
            if len(ready) == len(runs):
                return ray.get(runs)
            limit = self.cfg.train.max_time_s
            if limit is not None and self.first_update is not None and time.perf_counter() - self.first_update >= limit:
                for s in self.servers:
                    s.stop.remote()
            if self.next_save and self.version >= self.next_save:
                self.save()
                self.next_save = (self.version // self.cfg.checkpoint.every_steps + 1) * self.cfg.checkpoint.every_steps
            elif self.saver.time_due():
                self.save()

    def poll(self) -> None:
        import ray

        p = ray.get(self.servers[0].progress.remote(), timeout=self.cfg.scaling.timeout_s)
        if self.first_update is None and p["version"] > self.start_version:
            # training time starts with the first update, as AllReduce's starts with its loop (not actor start-up)
            self.first_update = self.started = self.last_log = time.perf_counter()
        self.version = p["version"]
        for k, v in p["window"].items():
            self.window[k] += v
        self.last.update(samples=p["samples"], dropped=p["dropped"], skipped=p["skipped"], staleness=p["staleness"], lr=p["lr"])
        if self.version >= self.next_log or (self.version >= self.cfg.train.max_steps and self.window["pushes"]):
            self._log()
        for ev in p["evals"]:
            metrics = {k: v for k, v in ev.items() if k != "version"}
            self.final_eval = metrics
            self._write({"step": ev["version"], "samples": p["samples"], **metrics})

    def _log(self) -> None:
        w = self.window
        now = time.perf_counter()
        elapsed = now - self.last_log
        hist = self.last["staleness"]
        self.train_loss = w["loss_sum"] / w["count"] if w["count"] else float("nan")
        record = {
            "step": self.version, "samples": self.last["samples"], "loss": self.train_loss, "lr": self.last["lr"],
            "grad_norm": w["grad_norm_sum"] / max(1, w["pushes"]), "samples_per_s": w["samples"] / elapsed if elapsed > 0 else 0.0,
            "updates_per_s": (self.version - self.updates_at_log) / elapsed if elapsed > 0 else 0.0,
            "staleness_mean": _mean(hist), "dropped_updates": self.last["dropped"], "skipped_steps": self.last["skipped"],
        }
        self._write(record)
        self.window = {k: 0 if isinstance(v, int) else 0.0 for k, v in w.items()}
        self.updates_at_log, self.last_log = self.version, now
        self.next_log = (self.version // self.cfg.log.every + 1) * self.cfg.log.every

    def _write(self, record: dict[str, Any]) -> None:
        record = {"time": time.time(), "elapsed_s": time.perf_counter() - self.started, **record}
        self.writer.log(record)
        self.progress.update(record)

    def save(self) -> None:
        """Checkpoint the servers' state (parameters, optimizer, version) in the usual layout."""
        import ray
        import torch

        states = ray.get([s.state.remote() for s in self.servers])
        model: dict[str, torch.Tensor] = {}
        for idx, st in zip(self.shards, states):
            o = 0
            for i in idx:
                spec = self.specs[i]
                model[spec.name] = st["flat"][o : o + spec.numel].view(spec.shape).clone()
                o += spec.numel
        model.update({alias: model[name] for alias, name in self.tied.items()})  # one tensor, every name the model has
        version = int(states[0]["version"])
        state = {
            "model": model,
            "optimizer": {"ps_shards": [st["optimizer"] for st in states]},
            "state": {"ps_servers": states, "data": {"epoch": 0, "consumed": 0}, "strategy": "async_ps"},
        }
        self.saver.save(state, version, self.final_eval, self.last["skipped"])

    def summary(self, wall: float, results: list[dict[str, Any]]) -> dict[str, Any]:
        hist = self.last["staleness"]
        return {
            "strategy": "async_ps", "steps": self.version, "samples": self.last["samples"], "wall_s": wall,
            "samples_per_s": (self.last["samples"] - self.start_samples) / wall if wall > 0 else 0.0,
            "updates_per_s": (self.version - self.start_version) / wall if wall > 0 else 0.0,
            "world_size": len(results), "train_loss": self.train_loss, "skipped_steps": self.last["skipped"],
            "dropped_updates": self.last["dropped"], "staleness_mean": _mean(hist), "staleness_p50": _quantile(hist, 0.5),
            "staleness_p99": _quantile(hist, 0.99), "staleness_max": max((int(k) for k in hist), default=0),
            "staleness_histogram": {str(k): v for k, v in sorted(hist.items())}, "ps_shards": len(self.servers),
            **self.final_eval,
        }


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


def check_resources_ps(cfg: JobConfig) -> None:
    """Servers and workers must fit the cluster (fail at once, like the AllReduce launcher)."""
    import ray

    have = ray.cluster_resources().get("CPU", 0.0)
    need = cfg.scaling.num_workers * cfg.scaling.cpus_per_worker + cfg.ps.num_shards * cfg.ps.cpus_per_server
    if need > have + 1e-9:
        raise ClusterError(
            f"scaling: {cfg.scaling.num_workers} workers x {cfg.scaling.cpus_per_worker:g} CPU + {cfg.ps.num_shards} servers x "
            f"{cfg.ps.cpus_per_server:g} CPU = {need:g} CPU requested, but the cluster has {have:g} CPU"
        )
