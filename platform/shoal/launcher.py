"""`shoal train`: check what can be checked here, join or start a Ray cluster, prepare the run
directory, and hand the job's worker group to the controller. The driver never imports torch."""

from __future__ import annotations

import sys
from typing import Any

from shoal import cluster, preflight, rundir
from shoal.config import JobConfig
from shoal.startup import Startup


def run(cfg: JobConfig, *, resume: bool = False, progress_stream: Any = None) -> dict[str, Any]:
    """Train with Ray: returns rank 0's summary, or raises the root cause of a failure.

    A rank that fails, dies or hangs stops the whole group; with scaling.max_failures > 0 the
    group is started again and resumes from the latest complete checkpoint.
    """
    from shoal.controller.controller import Controller

    out = progress_stream or sys.stdout
    startup = Startup()
    address = cluster.requested_address(cfg.scaling.address)
    path = preflight.check(
        cfg, resume=resume, local_files=cluster.on_this_machine(address)
    )  # a typo fails before Ray starts
    startup.mark("checked")
    conn = cluster.connect(address, cfg.scaling.dashboard, cfg.scaling.keep_alive_s)
    startup.mark("ray_ready")
    if conn.note:
        print(conn.note, file=out, flush=True)
    try:
        make_group = group_of(cfg)
        cfg = rundir.prepare(path, cfg, resume)
        print(
            f"[shoal] run directory: {path}" + (f" (strategy {cfg.strategy})" if cfg.strategy != "allreduce" else ""),
            file=out,
            flush=True,
        )
        startup.note_modules(["torch", *user_modules(cfg)])
        return Controller(cfg, path, lambda: make_group(cfg), out, startup).run(resume)
    finally:
        conn.close()


def group_of(cfg: JobConfig):
    """The factory of this strategy's worker group, once the cluster is known to hold it."""
    if cfg.strategy == "async_ps":
        from shoal.ps.group import PSGroup, check_ps_resources

        check_ps_resources(cfg)
        return PSGroup
    from shoal.controller.worker_group import WorkerGroup, check_resources

    check_resources(cfg)
    return WorkerGroup


def user_modules(cfg: JobConfig) -> list[str]:
    """The modules of model.target and data.decode: loaded in the ranks, never in the driver."""
    return [t.partition(":")[0] for t in (cfg.model.target, cfg.data.decode) if t]
