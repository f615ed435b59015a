"""One run as a rank sees it, built once by the entry that starts the rank (the Ray rank actor under
the controller; `run_worker` itself for torchrun or a plain process): the run directory, the
checkpoint it resumes from, rank 0's record (metrics.jsonl, TensorBoard, trackers) and summary.json.
The AllReduce worker (worker.py) and the parameter-server worker (ps/client.py) both train through it.
Imports no torch: the Ray driver imports the rank actor's module, which builds runs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from shoal import dist, rundir, tracking
from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.metrics import MetricsWriter

log = logging.getLogger("shoal")


def _unmarked(name: str, seconds: float | None = None) -> None:
    pass


@dataclass
class Hooks:
    """How whoever started the rank follows it; each one optional."""

    report: Callable[[dict[str, Any]], None] | None = None  # rank 0's metrics records (progress display)
    stop: threading.Event | None = None  # set: stop at the next step boundary, agreed by every rank
    on_step: Callable[[int], None] | None = None  # every finished step (the controller's hang watch)
    # start-up stages as they end (startup.json); with seconds, a duration named *_s (compile_s)
    mark: Callable[..., None] = _unmarked
    stepped: bool = field(default=False, init=False)

    def step_done(self, step: int) -> None:
        """A finished step (a push, for a parameter-server worker); the first one ends start-up."""
        if not self.stepped:
            self.stepped = True
            self.mark("first_step")
        if self.on_step is not None:
            self.on_step(step)


@dataclass
class Run:
    """The run one rank trains in. `under_controller`: the Ray controller prepared run.dir and writes
    summary.json itself (and the rank is a Ray actor); otherwise rank 0 does both."""

    cfg: JobConfig
    resume: bool = False  # --resume: continue from the run directory's latest checkpoint
    hooks: Hooks = field(default_factory=Hooks)
    under_controller: bool = False
    world: WorldInfo = field(default_factory=WorldInfo, init=False)
    opened: bool = field(default=False, init=False)  # run.dir is this run's from here on
    resumed_from: Path | None = field(default=None, init=False)
    # set by the controller when the group resumes at another world size: reason, died_at, last_step
    resize: dict[str, Any] | None = None
    writer: MetricsWriter | None = field(default=None, init=False)

    @property
    def dir(self) -> Path:
        return Path(self.cfg.run.dir)

    def threads(self) -> int | None:
        """Torch threads for this rank (scaling.threads_per_worker resolved)."""
        return self.cfg.scaling.threads(under_ray=self.under_controller)

    def open(self, world: WorldInfo) -> Run:
        """Take the directory every rank uses: the controller's, or prepared now by rank 0 (the process
        group, if any, is up). Use it as a context: a failure inside is recorded and the record closed."""
        self.world = world
        if not self.under_controller:
            if world.is_main:
                self.cfg = rundir.prepare(rundir.resolve(self.cfg), self.cfg, resume=self.resume)
            self.cfg = dist.broadcast_object(self.cfg)  # type: ignore[assignment]  # every rank: rank 0's run.dir
        self.opened = True
        return self

    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc is not None and self.opened and self.world.is_main and not self.under_controller:
            rundir.write_failure(self.dir, exc)
        self.close()

    def resume_target(self, say_none: bool = True) -> Path | None:
        """The checkpoint to continue from, the same on every rank that asks: the run's latest (--resume;
        rank 0 picks, falling back past corrupt ones) or checkpoint.resume_from."""
        from shoal import checkpoint  # torch: kept out of the Ray driver

        if self.resume:
            found = checkpoint.find_latest(self.dir) if self.world.is_main else None
            target: Path | None = dist.broadcast_object(found)  # type: ignore[assignment]
            if target is None and self.world.is_main and say_none:
                log.info("--resume: no complete checkpoint in %s; starting from step 0", self.dir)
        else:
            resume_from = self.cfg.checkpoint.resume_from
            target = Path(resume_from).expanduser() if resume_from else None
        self.resumed_from = target
        return target

    def open_record(self, step: int) -> None:
        """Rank 0 starts writing metrics at `step`: a resumed run rewrites what the interrupted one logged
        after its checkpoint."""
        if not self.world.is_main:
            return
        resumed = self.resumed_from is not None
        self.writer = MetricsWriter(
            self.dir,
            self.cfg.log.tensorboard,
            truncate_after_step=step if resumed else None,
            tracker=tracking.build(self.cfg, self.dir, self.world.world_size, resumed=resumed),
        )

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record: written and reported by rank 0, dropped elsewhere."""
        if self.writer is not None:
            self.writer.log(record)
            if self.hooks.report is not None:
                self.hooks.report(record)

    def names(self) -> dict[str, str]:
        """What names the run in its summary."""
        return {"run_dir": str(self.dir), "name": self.cfg.name}

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """The run's summary with where it resumed from; rank 0 writes summary.json (unless the controller
        does) and hands it to the trackers."""
        if self.resumed_from is not None:
            summary["resumed_from"] = str(self.resumed_from)
        if self.world.is_main and not self.under_controller:
            rundir.write_summary(self.dir, summary)
        self.close(summary)
        return summary

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Close the record; the trackers get the summary (None: the run failed)."""
        if self.writer is not None:
            self.writer.close(summary)
            self.writer = None
