"""`shoal submit` and `shoal jobs`: a job on a remote Ray cluster, through its Jobs API.

`shoal.submit` is imported inside the handlers: it loads pydantic's config models and Ray's job
client, which `shoal --help` must not."""

from __future__ import annotations

import argparse
import os

from shoal.cli.command import Command, cluster_args, config_args, load_job, resume_arg
from shoal.cli.output import note


def _submit_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    cluster_args(p)
    p.add_argument(
        "--working-dir",
        default=None,
        help="directory uploaded with the job (your model code); default: the current one",
    )
    p.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="pip requirement for the job's environment (repeatable)",
    )
    p.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave these out of the upload (repeatable)"
    )
    p.add_argument(
        "--python",
        default=None,
        help="interpreter that runs `-m shoal` on the cluster (default: python, or this one for a local cluster)",
    )
    resume_arg(p, "continue the run in run.dir from its latest checkpoint")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following the logs")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="fail if the job has not started after S seconds (default 600)",
    )


def submit_job(args: argparse.Namespace) -> int:
    cfg = load_job(args)  # validated here: a typo fails on the laptop, not on the cluster
    from shoal.submit import submit

    if not cfg.run.dir or not os.path.isabs(cfg.run.dir):
        note(
            "[shoal] note: run.dir is not an absolute path: the run directory lands in the job's working "
            "directory on the cluster; set run.dir to shared storage to keep it"
        )
    return submit(
        cfg,
        address=args.address,
        token_file=args.token_file,
        working_dir=args.working_dir,
        pip=args.pip,
        python=args.python,
        wait=not args.no_wait,
        start_timeout_s=args.start_timeout,
        excludes=args.exclude,
        resume=args.resume,
    )


def _jobs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["list", "status", "logs", "stop"])
    p.add_argument("job_id", nargs="?", metavar="ID")
    cluster_args(p)


def manage_jobs(args: argparse.Namespace) -> int:
    from shoal.submit import jobs

    return jobs(args.action, args.job_id, args.address, args.token_file)


SUBMIT = Command("submit", "run the job on a remote Ray cluster through its Jobs API", _submit_args, submit_job)
JOBS = Command("jobs", "list | status ID | logs ID | stop ID: jobs on a Ray cluster", _jobs_args, manage_jobs)
