"""`shoal train`, `shoal worker` and `shoal validate`: run a job with Ray, run one rank of it under
torchrun, or run every check a job can have before it starts.

The modules that do the work are imported inside the handlers: they load torch or Ray, which the
driver's start-up (`shoal validate`, `shoal --help`) must not."""

from __future__ import annotations

import argparse
import threading
from typing import TYPE_CHECKING, Any

from shoal.cli.command import Command, check_resume, config_args, load_job, resume_arg
from shoal.cli.output import exit_code, note, say, say_result

if TYPE_CHECKING:
    from shoal.config import JobConfig

RESUME_HELP = "continue the run in run.dir from its latest complete checkpoint"


def _train_args(p: argparse.ArgumentParser) -> None:
    config_args(p, optional=True)
    resume_arg(p, RESUME_HELP)


def _worker_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    resume_arg(p, RESUME_HELP)


def _validate_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    resume_arg(p, "check as `shoal train --resume` would (run.dir may hold a run)")


def train(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    check_resume(args, cfg)
    from shoal.check.task import before_run
    from shoal.launcher import run

    before_run(cfg, note)
    summary = run(cfg, resume=args.resume)
    say_result(summary)
    return exit_code(summary)


def run_rank(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    from shoal.check.task import before_run
    from shoal.dist import WorldInfo
    from shoal.preflight import check_trackers
    from shoal.worker import setup_logging

    check_resume(args, cfg)
    check_trackers(cfg)
    world = WorldInfo.from_env()
    setup_logging(world.rank if world.distributed else None)
    before_run(cfg, note if world.is_main else (lambda line: None))
    summary = _rank_summary(cfg, args.resume, world.is_main)
    if world.is_main:
        say_result(summary)
    return exit_code(summary)


def _rank_summary(cfg: JobConfig, resume: bool, is_main: bool) -> dict[str, Any]:
    """This rank's summary; a first SIGTERM or SIGINT stops it at a checkpoint, with the signal's exit status."""
    from shoal.progress import Progress
    from shoal.signals import StopOnSignal
    from shoal.worker import run_worker

    progress = Progress(cfg.train.max_steps, cfg.log.progress, cfg.log.print_every_s) if is_main else None
    stop = threading.Event()
    try:
        with StopOnSignal(stop) as signals:
            summary = run_worker(cfg, resume=resume, report=progress.update if progress else None, stop=stop)
    finally:
        if progress is not None:
            progress.close()
    summary["exit_code"] = signals.exit_code
    return summary


def validate(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    check_resume(args, cfg)
    from shoal import cluster, preflight
    from shoal.check.task import before_run

    local = cluster.on_this_machine(cluster.requested_address(cfg.scaling.address))
    preflight.check(cfg, resume=args.resume, local_files=local)
    before_run(cfg, note)
    preflight.check_model(cfg)
    say(cfg.to_yaml(), end="")
    return 0


def down(args: argparse.Namespace) -> int:
    from shoal import keeper

    state = keeper.stop()
    if state is None:
        say("[shoal] no local Ray cluster is up")
    else:
        say(f"[shoal] stopped the local Ray cluster at {state['gcs']} (keeper pid {state['pid']})")
    return 0


TRAIN = Command(
    "train", "train with N DDP workers started by Ray (default: the bundled quickstart)", _train_args, train
)
WORKER = Command(
    "worker", "run one rank from torchrun's environment (torchrun ... -m shoal worker CONFIG)", _worker_args, run_rank
)
VALIDATE = Command(
    "validate",
    "run every check that needs only the config and files; print the resolved config or the first error",
    _validate_args,
    validate,
)
DOWN = Command(
    "down",
    "stop the local Ray cluster that `shoal train` keeps up for the next run (scaling.keep_alive_s)",
    lambda p: None,
    down,
)
