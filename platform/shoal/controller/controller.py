"""The controller: one restart loop for every strategy, with explicit states.

STARTING (the group is placed and started) -> RUNNING (polled until every rank is done) ->
FINISHED; a failure goes to RESTARTING (back to STARTING from the latest checkpoint) or ERRORED,
as the pure failure policy decides. The controller alone writes summary.json for a Ray run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from shoal import rundir
from shoal.config import JobConfig
from shoal.controller.failure import RAISE, Failure, GroupFailed, HangWatch, RankStatus, decide, root_cause
from shoal.errors import ShoalError, WorkerFailed
from shoal.progress import Progress
from shoal.signals import StopOnSignal
from shoal.startup import Startup

log = logging.getLogger("shoal")
POLL_S = 0.25
FAILURE_GRACE_S = 1.0  # after a failure, wait this long for the root cause to report too

STARTING, RUNNING, RESTARTING, FINISHED, ERRORED = "starting", "running", "restarting", "finished", "errored"
TRANSITIONS = {
    STARTING: {RUNNING, RESTARTING, ERRORED},
    RUNNING: {FINISHED, RESTARTING, ERRORED},
    RESTARTING: {STARTING},
    FINISHED: set(),
    ERRORED: set(),
}


class Group(Protocol):
    """What the controller needs of a worker group (rank actors, or parameter servers and their workers)."""

    size: int

    def start(self, resume: bool) -> None: ...
    def poll(self) -> list[RankStatus]: ...
    def request_stop(self) -> None: ...
    def kill(self) -> None: ...


class Controller:
    """Run a group to completion, restarting it within scaling.max_failures."""

    def __init__(
        self,
        cfg: JobConfig,
        run_dir: Path,
        make_group: Callable[[], Group],
        out: Any,
        startup: Startup | None = None,
        poll_s: float = POLL_S,
        grace_s: float = FAILURE_GRACE_S,
    ):
        self.cfg, self.run_dir, self.make_group, self.out = cfg, run_dir, make_group, out
        self.startup = startup or Startup()
        self.poll_s, self.grace_s = poll_s, grace_s
        self.state = STARTING
        self.history = [STARTING]
        self.restarts = 0

    def to(self, state: str) -> None:
        assert state in TRANSITIONS[self.state], f"controller: {self.state} -> {state}"
        self.state = state
        self.history.append(state)

    def run(self, resume: bool) -> dict[str, Any]:
        """Train until done; returns rank 0's summary (with restarts), or raises the root cause."""
        while True:
            try:
                result = self._attempt(resume or self.restarts > 0)
                self.to(FINISHED)
                return self._finish(result)
            except GroupFailed as e:
                if decide(e.failure, self.restarts, self.cfg.scaling.max_failures) == RAISE:
                    self.to(ERRORED)
                    self._fail(e.failure)
                self.restarts += 1
                self.to(RESTARTING)
                print(
                    f"[shoal] {e.failure.message}; restarting all workers from the latest checkpoint "
                    f"(restart {self.restarts} of scaling.max_failures={self.cfg.scaling.max_failures})",
                    file=self.out,
                    flush=True,
                )
                self.to(STARTING)
            except KeyboardInterrupt:
                rundir.write_summary(
                    self.run_dir,
                    {
                        "status": "failed",
                        "error": "interrupted (stopped at once, no checkpoint)",
                        "restarts": self.restarts,
                    },
                )
                raise

    def _attempt(self, resume: bool) -> dict[str, Any]:
        group = self.make_group()
        try:
            self.startup.mark("group_placed")
            group.start(resume)
            self.startup.mark("ranks_started")
            self.to(RUNNING)
            return self._watch(group)
        finally:
            group.kill()

    def _watch(self, group: Group) -> dict[str, Any]:
        """Poll every rank until all are done or one fails; rank 0's records drive the progress display."""
        progress = Progress(self.cfg.train.max_steps, self.cfg.log.progress, self.cfg.log.print_every_s, self.out)
        hang = HangWatch(group.size, self.cfg.scaling.hang_timeout_s, self.cfg.scaling.timeout_s, time.monotonic())
        stop = threading.Event()
        try:
            # first SIGTERM/SIGINT: every rank finishes its step, saves and stops; a second one stops at once
            with StopOnSignal(stop, on_first=group.request_stop) as signals:
                while True:
                    polls = group.poll()
                    self._note_startup(polls[0])
                    for record in polls[0].records:
                        progress.update(record)
                    if any(p.state == "failed" for p in polls):
                        # the peers of a dead rank fail too, in their collectives; look again briefly so
                        # the report names the root cause rather than whichever rank noticed first
                        time.sleep(self.grace_s)
                        later = group.poll()
                        failed = [(r, p) for r, p in enumerate(later) if p.state == "failed"] or [
                            (r, p) for r, p in enumerate(polls) if p.state == "failed"
                        ]
                        raise GroupFailed(root_cause(failed))
                    hung = hang.check(polls, time.monotonic())
                    if hung is not None:
                        raise GroupFailed(hung)
                    if all(p.state == "done" for p in polls):
                        return {**(polls[0].result or {}), "exit_code": signals.exit_code}
                    time.sleep(self.poll_s)
        finally:
            progress.close()

    def _note_startup(self, rank0: RankStatus) -> None:
        if "first_step" in rank0.marks and 0 not in self.startup.ranks:
            self.startup.add_rank(0, rank0.marks)
            self.startup.write(self.run_dir)

    def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """The one place a Ray run's summary.json is written."""
        if self.restarts:
            result["restarts"] = self.restarts
        rundir.write_summary(self.run_dir, {k: v for k, v in result.items() if k != "exit_code"})
        return result

    def _fail(self, f: Failure) -> None:
        message = f.message
        if not f.user_error and self.cfg.scaling.max_failures:
            message += f" (after {self.restarts} restart(s); scaling.max_failures={self.cfg.scaling.max_failures})"
        rundir.write_summary(self.run_dir, {"status": "failed", "error": message, "restarts": self.restarts})
        if f.user_error:
            exc = ShoalError(message)
            exc.exit_code = f.exit_code
            raise exc
        raise WorkerFailed(message)
