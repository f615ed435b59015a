"""One rank, from the torchrun environment to summary.json. The single entry of every launcher:
the Ray actor, `torchrun -m shoal worker` and a plain `shoal worker` all call `run_worker`.
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path
from collections.abc import Callable
from typing import Any

from shoal import rundir
from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.engine import Report
from shoal.errors import ConfigError

log = logging.getLogger("shoal")


def run_worker(
    cfg: JobConfig,
    *,
    run_dir: Path | None = None,
    resume: bool = False,
    report: Report | None = None,
    stop: threading.Event | None = None,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train this rank. Rank 0 owns the run directory and writes metrics and summary.json.

    Args:
        run_dir: already prepared by the launcher; None = rank 0 prepares it (torchrun, plain worker).
        report: receives rank 0's metrics records (progress display).
        stop: set it to ask for a stop at the next step boundary, agreed by every rank.
        on_step: called with the step number after every step (the Ray launcher's hang watch).
    """
    import torch

    from shoal import dist
    from shoal.checkpoint import Checkpointer
    from shoal.engine import build_job, train

    if cfg.strategy != "allreduce":
        raise ConfigError("async_ps runs its parameter servers through the Ray launcher: use `shoal train`, not torchrun", key="strategy")
    world = WorldInfo.from_env()
    device = dist.select_device(world, cfg.scaling.device)
    if cfg.train.precision == "fp16" and device.type != "cuda":
        raise ConfigError(
            "fp16 needs CUDA and this rank runs on CPU; use bf16 or fp32 "
            "(or set scaling.gpus_per_worker >= 1 on a GPU cluster)",
            key="train.precision",
        )
    threads = cfg.scaling.threads_per_worker
    if threads:
        torch.set_num_threads(threads)
    dist.init_process_group(world, dist.select_backend(device, cfg.scaling.backend), cfg.scaling.timeout_s, device)
    writer = None
    path = run_dir  # set once this run owns the directory: only then may a failure be written there
    try:
        if world.is_main and run_dir is None:
            cfg = rundir.prepare(rundir.resolve(cfg), cfg, resume=resume)
        cfg = dist.broadcast_object(cfg)  # every rank uses rank 0's resolved run.dir
        path = Path(cfg.run.dir) if run_dir is None else run_dir
        job = build_job(cfg, world, device)
        if world.is_main:
            from shoal.health import HEALTH_FILE

            job.health.path = path / HEALTH_FILE
        if stop is not None:
            job.stop_requested = stop
        resumed_from = _resume(job, cfg, path, resume, world)
        if world.is_main:
            from shoal.metrics import MetricsWriter

            # a resumed run rewrites what the interrupted one logged after its checkpoint
            writer = MetricsWriter(path, cfg.log.tensorboard, truncate_after_step=job.counters.step if (resume or resumed_from) else None)
            log.info("run directory %s; %d rank(s) on %s, backend %s", path, world.world_size, device, dist.select_backend(device, cfg.scaling.backend))

        def on_record(record: dict[str, Any]) -> None:
            if writer is not None:
                writer.log(record)
                if report is not None:
                    report(record)

        summary = train(job, on_record, Checkpointer(cfg, path, world), on_step)
        summary.update(run_dir=str(path), name=cfg.name, strategy=cfg.strategy, precision=cfg.train.precision, device=str(device))
        if resumed_from is not None:
            summary["resumed_from"] = str(resumed_from)
        if world.is_main:
            rundir.write_summary(path, summary)
        return summary
    except BaseException as exc:
        if world.is_main and path is not None:
            _write_failed_summary(path, exc)
        raise
    finally:
        if writer is not None:
            writer.close()
        dist.destroy_process_group()


def _resume(job: Any, cfg: JobConfig, path: Path, resume: bool, world: WorldInfo) -> Path | None:
    """Load the checkpoint to continue from: the run's latest (--resume) or checkpoint.resume_from."""
    from shoal import checkpoint, dist
    from shoal.engine import restore_state

    target: Path | None = None
    if resume:
        # rank 0 picks (falling back past corrupt ones); every rank loads the same one
        found = checkpoint.find_latest(path) if world.is_main else None
        target = dist.broadcast_object(found)  # type: ignore[assignment]
        if target is None:
            if world.is_main:
                log.info("--resume: no complete checkpoint in %s; starting from step 0", path)
            return None
    elif cfg.checkpoint.resume_from:
        target = Path(cfg.checkpoint.resume_from).expanduser()
    if target is None:
        return None
    _meta, data = checkpoint.load(target)
    restore_state(job, target, data)
    if world.is_main:
        log.info("resumed from %s at step %d", target, job.counters.step)
    return target


def _write_failed_summary(path: Path, exc: BaseException) -> None:
    """Best effort: say in summary.json that the run failed and why."""
    try:
        if path.is_dir():
            rundir.write_summary(
                path,
                {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=20)},
            )
    except OSError:
        pass


def setup_logging(world_rank: int | None, level: int = logging.INFO) -> None:
    """Worker log lines, prefixed by rank unless the launcher prefixes them itself."""
    prefix = "" if world_rank is None else f"[rank {world_rank}] "
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    root = logging.getLogger("shoal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
