"""One rank, from the torchrun environment to its summary. The single entry of every launcher: the
Ray rank actor, `torchrun -m shoal worker` and a plain `shoal worker` all call `run_worker`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal import rundir
from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.errors import ConfigError

log = logging.getLogger("shoal")

Report = Callable[[dict[str, Any]], None]


def run_worker(
    cfg: JobConfig,
    *,
    resume: bool = False,
    report: Report | None = None,
    stop: threading.Event | None = None,
    on_step: Callable[[int], None] | None = None,
    mark: Callable[[str], None] | None = None,
    controlled: bool = False,
) -> dict[str, Any]:
    """Train this rank; returns the run's summary. Rank 0 owns the run directory and writes metrics.

    Args:
        report: receives rank 0's metrics records (progress display).
        stop: set it to ask for a stop at the next step boundary, agreed by every rank.
        on_step: told of every finished step (the Ray controller's hang watch).
        mark: told of start-up stages as they end (startup.json).
        controlled: a controller prepared the run directory (cfg.run.dir is set) and finalises
            summary.json; otherwise (torchrun, a plain worker) rank 0 does both.
    """
    mark = mark or (lambda name: None)
    import torch

    from shoal import dist

    mark("torch_imported")
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
    threads = cfg.scaling.threads(under_ray=controlled)
    if threads:
        torch.set_num_threads(threads)
    backend = dist.select_backend(device, cfg.scaling.backend)
    dist.init_process_group(world, backend, cfg.scaling.timeout_s, device)
    mark("process_group")
    run_dir: Path | None = Path(cfg.run.dir) if controlled else None  # set once this run owns the directory
    writer = job = final = None
    try:
        if not controlled:
            if world.is_main:
                cfg = rundir.prepare(rundir.resolve(cfg), cfg, resume=resume)
            cfg = dist.broadcast_object(cfg)  # every rank uses rank 0's resolved run.dir
            run_dir = Path(cfg.run.dir)
        from shoal.engine import train
        from shoal.job import build_job

        job = build_job(cfg, world, device, run_dir)
        if stop is not None:
            job.stop_requested = stop
        resumed_from = _resume(job, cfg, run_dir, resume, world)
        mark("built")
        if world.is_main:
            # a resumed run rewrites what the interrupted one logged after its checkpoint
            from shoal import tracking
            from shoal.metrics import MetricsWriter

            writer = MetricsWriter(
                run_dir,
                cfg.log.tensorboard,
                truncate_after_step=job.counters.step if resumed_from else None,
                tracker=tracking.build(cfg, run_dir, world.world_size, resumed=resumed_from is not None),
            )
            log.info("run directory %s; %d rank(s) on %s, backend %s", run_dir, world.world_size, device, backend)
        first = [True]

        def on_record(record: dict[str, Any]) -> None:
            if writer is not None:
                writer.log(record)
                if report is not None:
                    report(record)

        def stepped(step: int) -> None:
            if first[0]:
                first[0] = False
                mark("first_step")
            if on_step is not None:
                on_step(step)

        summary = train(job, on_record, stepped)
        summary.update(
            run_dir=str(run_dir),
            name=cfg.name,
            strategy=cfg.strategy,
            precision=cfg.train.precision,
            device=str(device),
        )
        if resumed_from is not None:
            summary["resumed_from"] = str(resumed_from)
        final = summary
        if world.is_main and not controlled:
            rundir.write_summary(run_dir, summary)
        return summary
    except BaseException as exc:
        if world.is_main and run_dir is not None and not controlled:
            rundir.write_failure(run_dir, exc)
        raise
    finally:
        if writer is not None:
            writer.close(final)
        if job is not None:
            job.strategy.close()
        dist.destroy_process_group()


def _resume(job: Any, cfg: JobConfig, run_dir: Path, resume: bool, world: WorldInfo) -> Path | None:
    """Load the checkpoint to continue from: the run's latest (--resume) or checkpoint.resume_from."""
    from shoal import checkpoint, dist

    target: Path | None = None
    if resume:
        # rank 0 picks (falling back past corrupt ones); every rank loads the same one
        found = checkpoint.find_latest(run_dir) if world.is_main else None
        target = dist.broadcast_object(found)  # type: ignore[assignment]
        if target is None:
            if world.is_main:
                log.info("--resume: no complete checkpoint in %s; starting from step 0", run_dir)
            return None
    elif cfg.checkpoint.resume_from:
        target = Path(cfg.checkpoint.resume_from).expanduser()
    if target is None:
        return None
    _meta, data = checkpoint.load(target)
    job.state.restore(data, target)
    if world.is_main:
        log.info("resumed from %s at step %d", target, job.counters.step)
    return target


def setup_logging(world_rank: int | None, level: int = logging.INFO) -> None:
    """Worker log lines, prefixed by rank unless the launcher prefixes them itself."""
    prefix = "" if world_rank is None else f"[rank {world_rank}] "
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{prefix}%(message)s"))
    root = logging.getLogger("shoal")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
