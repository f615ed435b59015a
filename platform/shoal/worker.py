"""One rank, from the torchrun environment to its summary. The single AllReduce entry of every
launcher: the Ray rank actor, `torchrun -m shoal worker` and a plain `shoal worker` all call
`run_worker`; the run it trains in (run.py) keeps the directory, the record and the summary.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable
from pathlib import Path
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
            _restore(job, run.resume_target(), world)
            # What start-up built lives for the whole run: frozen, the collector's full passes during
            # training no longer walk it (a loop of a plain script does not pay for Shoal's imports).
            gc.collect()
            gc.freeze()
            run.hooks.mark("built")
            run.open_record(job.counters.step)
            if world.is_main:
                log.info("run directory %s; %d rank(s) on %s, backend %s", run.dir, world.world_size, device, backend)
            summary = train(job, run.log, _step_done(run, world))
            named = {**run.names(), "strategy": run.cfg.strategy, "precision": run.cfg.train.precision}
            return run.finish({**summary, **named, "device": str(device)})
    finally:
        gc.unfreeze()  # the run's objects may go now (a process that trains again, a test)
        if job is not None:
            job.strategy.close()
        dist.destroy_process_group()


def _step_done(run: Run, world: WorldInfo) -> Callable[[int], None]:
    """The run's step hook; with train.compile, the first step also records how long compiling took (startup.json's
    compile_s, and a log line): torch compiles lazily, inside the first forward and backward."""
    if not run.cfg.train.compile:
        return run.hooks.step_done
    from shoal.models import compile_seconds  # loads torch, which this module keeps out of the CLI and the driver

    def step_done(step: int) -> None:
        if not run.hooks.stepped:
            seconds = compile_seconds()
            if seconds is not None:
                run.hooks.mark("compile_s", seconds)
                if world.is_main:
                    log.info("train.compile: %s compiled in %.1f s of the first step", run.cfg.train.compile, seconds)
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


def _restore(job: Any, target: Path | None, world: WorldInfo) -> None:
    """Load the checkpoint to continue from into every rank's job."""
    from shoal import checkpoint

    if target is None:
        return
    _meta, data = checkpoint.load(target)
    job.state.restore(data, target)
    if world.is_main:
        log.info("resumed from %s at step %d", target, job.counters.step)


def setup_logging(world_rank: int | None, level: int = logging.INFO) -> None:
    """Worker log lines, prefixed by rank unless the launcher prefixes them itself."""
    prefix = "" if world_rank is None else f"[rank {world_rank}] "
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    root = logging.getLogger("shoal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
