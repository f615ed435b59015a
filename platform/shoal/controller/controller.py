"""The controller: one restart loop for every strategy, with explicit states.

STARTING (the group is placed and started) -> RUNNING (polled until every rank is done) ->
FINISHED; a failure goes to RESTARTING (back to STARTING from the latest checkpoint) or ERRORED,
as the pure failure policy decides. The controller alone writes summary.json for a Ray run.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from typing import Any, NoReturn, Protocol

from shoal import rundir
from shoal.config import JobConfig
from shoal.controller.failure import (
    RAISE,
    Failure,
    GroupFailed,
    HangWatch,
    RankError,
    RankState,
    RankStatus,
    decide,
    root_cause,
)
from shoal.errors import ShoalError, WorkerFailed
from shoal.progress import Progress
from shoal.signals import StopOnSignal
from shoal.startup import Startup

log = logging.getLogger("shoal")
POLL_S = 0.25  # until rank 0's first step: start-up marks and early failures show at once
TRAINING_POLL_S = 1.0  # then: each poll is a call into every rank, taken from training's CPU
FAILURE_GRACE_S = 1.0  # after a failure, wait this long for the root cause to report too


class State(Enum):
    """Where the controller is; FINISHED and ERRORED end a run."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    FINISHED = "finished"
    ERRORED = "errored"

    @property
    def terminal(self) -> bool:
        """The run ended here: no state follows."""
        return not TRANSITIONS[self]


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.RESTARTING, State.ERRORED}),
    State.RUNNING: frozenset({State.FINISHED, State.RESTARTING, State.ERRORED}),
    State.RESTARTING: frozenset({State.STARTING}),
    State.FINISHED: frozenset(),
    State.ERRORED: frozenset(),
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
        self.state = State.STARTING
        self.history = [State.STARTING]
        self.restarts = 0

    def to(self, state: State) -> None:
        assert state in TRANSITIONS[self.state], f"controller: {self.state.value} -> {state.value}"
        self.state = state
        self.history.append(state)

    def run(self, resume: bool) -> dict[str, Any]:
        """Train until done; returns rank 0's summary (with restarts), or raises the root cause."""
        try:
            while True:
                try:
                    result = self._attempt(resume or self.restarts > 0)
                except GroupFailed as e:
                    self._restart_or_fail(e.failure)
                    continue
                self.to(State.FINISHED)
                return self._finish(result)
        except KeyboardInterrupt:
            if not self.state.terminal:  # an ended run keeps the summary it wrote
                summary = {"status": "failed", "error": "interrupted (stopped at once, no checkpoint)"}
                rundir.write_summary(self.run_dir, {**summary, "restarts": self.restarts})
            raise

    def _restart_or_fail(self, f: Failure) -> None:
        """RESTARTING and back to STARTING within scaling.max_failures; ERRORED (raises) past it."""
        if decide(f, self.restarts, self.cfg.scaling.max_failures) == RAISE:
            self.to(State.ERRORED)
            self._fail(f)
        self.restarts += 1
        self.to(State.RESTARTING)
        print(
            f"[shoal] {f.message}; restarting all workers from the latest checkpoint "
            f"(restart {self.restarts} of scaling.max_failures={self.cfg.scaling.max_failures})",
            file=self.out,
            flush=True,
        )
        self.to(State.STARTING)

    def _attempt(self, resume: bool) -> dict[str, Any]:
        group = self.make_group()
        try:
            self.startup.mark("group_placed")
            group.start(resume)
            self.startup.mark("ranks_started")
            self.to(State.RUNNING)
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
                    if _errors(polls):
                        # the peers of a dead rank fail too, in their collectives; look again briefly so
                        # the report names the root cause rather than whichever rank noticed first
                        time.sleep(self.grace_s)
                        raise GroupFailed(root_cause(_errors(group.poll()) or _errors(polls)))
                    hung = hang.check(polls, time.monotonic())
                    if hung is not None:
                        raise GroupFailed(hung)
                    if all(p.state == RankState.DONE for p in polls):
                        return {**(polls[0].result or {}), "exit_code": signals.exit_code}
                    time.sleep(max(self.poll_s, TRAINING_POLL_S) if "first_step" in polls[0].marks else self.poll_s)
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

    def _fail(self, f: Failure) -> NoReturn:
        message = f.message
        if not f.user_error and self.cfg.scaling.max_failures:
            message += f" (after {self.restarts} restart(s); scaling.max_failures={self.cfg.scaling.max_failures})"
        rundir.write_summary(self.run_dir, {"status": "failed", "error": message, "restarts": self.restarts})
        if f.user_error:
            exc = ShoalError(message)
            exc.exit_code = f.exit_code
            raise exc
        raise WorkerFailed(message)


def _errors(polls: Sequence[RankStatus]) -> list[RankError]:
    """The errors of the ranks that failed (a status holds one exactly when it failed)."""
    return [p.error for p in polls if p.error is not None]
