"""One rank, from the torchrun environment to its summary. The single AllReduce entry of every
launcher: the Ray rank actor, `torchrun -m shoal worker` and a plain `shoal worker` all call
`run_worker`; the run it trains in (run.py) keeps the directory, the record and the summary.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.errors import ConfigError
from shoal.run import Hooks, Run

log = logging.getLogger("shoal")

Report = Callable[[dict[str, Any]], None]


def run_worker(
    run: Run | JobConfig,
    *,
    resume: bool = False,
    report: Report | None = None,
    stop: threading.Event | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train this rank; returns the run's summary. A bare config is a run of its own (torchrun, a plain
    process, a test): Run(cfg, resume, Hooks(report, stop, on_step)), whose directory rank 0 prepares."""
    if not isinstance(run, Run):
        run = Run(run, resume, Hooks(report, stop, on_step))
    world, device, backend = _join_group(run)
    if world.restart and not run.resume:  # torchrun restarted the group (a worker died, or --nnodes MIN:MAX resized it)
        run.resume = True
        if world.is_main:
            log.info("torchrun restart %d: resuming from the run's newest checkpoint or snapshot", world.restart)
    from shoal import dist

    job = None
    try:
        # the engine loads once the process group is up, as startup.json's stages count it
        from shoal.engine import train
        from shoal.job import build_job

        with run.open(world):
            job = build_job(run.cfg, world, device, run.dir)
            if run.hooks.stop is not None:
                job.stop_requested = run.hooks.stop
            restored = _restore(job, run, world)
            # What start-up built lives for the whole run: frozen, the collector's full passes during
            # training no longer walk it (a loop of a plain script does not pay for Shoal's imports).
            gc.collect()
            gc.freeze()
            run.hooks.mark("built")
            run.open_record(job.counters.step)
            if world.is_main:
                log.info("run directory %s; %d rank(s) on %s, backend %s", run.dir, world.world_size, device, backend)
            summary = train(job, run.log, _step_done(run, world, Resize.of(run, restored, job.counters.step)))
            done = summary["status"] == "completed"  # a run stopped early may resume (or grow) from its snapshot
            if done and job.snapshots is not None and job.snapshots.enabled and world.local_rank == 0:
                from shoal import snapshot

                snapshot.remove(run.dir)  # the run is over: nothing left to recover (its checkpoints stay on disk)
            named = {**run.names(), "strategy": run.cfg.strategy, "precision": run.cfg.train.precision}
            return run.finish({**summary, **named, "device": str(device)})
    finally:
        gc.unfreeze()  # the run's objects may go now (a process that trains again, a test)
        if job is not None:
            job.strategy.close()
        dist.destroy_process_group()


def _step_done(run: Run, world: WorldInfo, resize: Resize | None) -> Callable[[int], None]:
    """The run's step hook. The first step also records how long compiling took, with train.compile (startup.json's
    compile_s, and a log line: torch compiles lazily, inside the first forward and backward), and a resize of the
    group: the first step at the new world ends its recovery (metrics.jsonl's resize record)."""
    if not run.cfg.train.compile and resize is None:
        return run.hooks.step_done
    from shoal.models import compile_seconds  # loads torch, which this module keeps out of the CLI and the driver

    def step_done(step: int) -> None:
        if not run.hooks.stepped:
            seconds = compile_seconds() if run.cfg.train.compile else None
            if seconds is not None:
                run.hooks.mark("compile_s", seconds)
                if world.is_main:
                    log.info("train.compile: %s compiled in %.1f s of the first step", run.cfg.train.compile, seconds)
            if resize is not None:
                run.log(resize.record(step))
        run.hooks.step_done(step)

    return step_done


def _join_group(run: Run) -> tuple[WorldInfo, Any, str]:
    """This rank's world, device and process-group backend, with the group joined."""
    # torch loads here, not at import: the CLI's checks and the Ray actor's set-up import this module first
    import torch

    from shoal import dist

    run.hooks.mark("torch_imported")
    cfg = run.cfg
    if cfg.strategy == "async_ps":
        raise ConfigError(
            "async_ps runs its parameter servers through the Ray launcher: use `shoal train`, not torchrun",
            key="strategy",
        )
    world = WorldInfo.from_env()
    device = dist.select_device(world, cfg.scaling.device)
    if cfg.train.needs_cuda and device.type != "cuda":
        raise ConfigError(
            "fp16 needs CUDA and this rank runs on CPU; use bf16 or fp32 (or set scaling.gpus_per_worker >= 1 on a GPU cluster)",
            key="train.precision",
        )
    threads = run.threads()
    if threads:
        torch.set_num_threads(threads)
    backend = dist.select_backend(device, cfg.scaling.backend)
    dist.init_process_group(world, backend, cfg.scaling.timeout_s, device)
    run.hooks.mark("process_group")
    return world, device, backend


@dataclass(frozen=True)
class Restored:
    """Where a rank resumed: the step, the world size that saved it, and whether from memory."""

    step: int
    world_size: int
    from_memory: bool


def _restore(job: Any, run: Run, world: WorldInfo) -> Restored | None:
    """Load what every rank continues from: the newest of the run's memory snapshot and its disk checkpoint."""
    from shoal import checkpoint, snapshot

    snaps = job.snapshots
    target = run.resume_target(say_none=snaps is None or not snaps.enabled)  # a snapshot may be there instead
    if snaps is not None and snaps.enabled:
        if not run.resume:  # a fresh run: an old run's snapshots in this directory's name are not its own
            if world.local_rank == 0:
                snapshot.remove(run.dir)
        else:
            sharded = job.strategy.state_io.sharded
            choice = snapshot.choose(run.dir, sharded)
            on_disk = checkpoint.step_of(target) if target is not None else -1
            if choice is not None and choice.step >= on_disk:  # the same step: memory reads faster
                data = snapshot.take(run.dir, choice, world, sharded)
                job.state.restore(data, f"the memory snapshot of step {choice.step}")
                run.resumed_from = snapshot.snapshot_dir(run.dir)
                if world.is_main:
                    log.info("resumed from the memory snapshot of step %d (%s)", choice.step, run.resumed_from)
                return Restored(choice.step, int(data["state"]["world_size"]), True)
            if world.is_main:
                where = f"the disk checkpoint {target}" if target is not None else "step 0 (no checkpoint on disk)"
                newest = f"step {choice.step}" if choice is not None else "none"
                log.warning(
                    "no memory snapshot newer than the disk checkpoint on every node (newest: %s; a node lost?); "
                    "resuming from %s",
                    newest,
                    where,
                )
    if target is None:
        return None
    _meta, data = checkpoint.load(target)
    job.state.restore(data, target)
    if world.is_main:
        log.info("resumed from %s at step %d", target, job.counters.step)
    return Restored(job.counters.step, int(data["state"]["world_size"]), False)


@dataclass(frozen=True)
class Resize:
    """The group resumed at another world size: metrics.jsonl's resize record, written at its first step."""

    old_world: int
    new_world: int
    resumed_step: int
    from_memory: bool
    cause: dict[str, Any]  # from the controller: reason, died_at (wall clock), last_step (before the failure)

    @classmethod
    def of(cls, run: Run, restored: Restored | None, step: int) -> Resize | None:
        if restored is None or restored.world_size == run.world.world_size:
            return None
        return cls(restored.world_size, run.world.world_size, step, restored.from_memory, dict(run.resize or {}))

    def record(self, step: int) -> dict[str, Any]:
        now = time.time()
        died_at, last = self.cause.get("died_at"), self.cause.get("last_step")
        return {
            "step": step,
            "event": "resize",
            "time": now,
            "old_world": self.old_world,
            "new_world": self.new_world,
            "reason": self.cause.get("reason", "the group restarted at another world size"),
            "steps_lost": max(0, last - self.resumed_step) if last is not None else None,
            "recovery_s": round(now - died_at, 3) if died_at is not None else None,
            "resumed_from": "memory" if self.from_memory else "disk",
        }


def setup_logging(world_rank: int | None, level: int = logging.INFO) -> None:
    """Worker log lines, prefixed by rank unless the launcher prefixes them itself."""
    prefix = "" if world_rank is None else f"[rank {world_rank}] "
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    root = logging.getLogger("shoal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
