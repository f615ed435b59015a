"""The controller: one restart loop for every strategy, with explicit states.

STARTING (the group is placed and started) -> RUNNING (polled until every rank is done) ->
FINISHED; a failure goes to RESTARTING (back to STARTING from the latest checkpoint), RESIZING
(elastic: the ranks left go on, from the newest snapshot) or ERRORED, as the pure failure policy
decides; an elastic group that can grow back stops at a step boundary and goes RESIZING too. The controller alone writes summary.json for a Ray run.
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
    RESIZE,
    Failure,
    GroupFailed,
    HangWatch,
    RankError,
    RankState,
    RankStatus,
    decide,
    lost_ranks,
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
RESIZE_WAIT_S = 10.0  # for the ranks left after a death to see it (their collective fails) before they go on


class Regroup(Exception):
    """The group stopped at a step boundary to start again at another size (resources returned)."""

    def __init__(self, cause: dict[str, Any]):
        super().__init__(cause["reason"])
        self.cause = cause


class State(Enum):
    """Where the controller is; FINISHED and ERRORED end a run."""

    STARTING = "starting"
    RUNNING = "running"
    RESTARTING = "restarting"
    RESIZING = "resizing"
    FINISHED = "finished"
    ERRORED = "errored"

    @property
    def terminal(self) -> bool:
        """The run ended here: no state follows."""
        return not TRANSITIONS[self]


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STARTING: frozenset({State.RUNNING, State.RESTARTING, State.RESIZING, State.ERRORED}),
    State.RUNNING: frozenset({State.FINISHED, State.RESTARTING, State.RESIZING, State.ERRORED}),
    State.RESTARTING: frozenset({State.STARTING}),
    State.RESIZING: frozenset({State.STARTING}),
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
        self.last_step = -1  # the newest step any rank finished (steps lost in a resize)
        self.grow_asked = 0.0  # when the group was last asked to stop and grow (wall clock)
        self.resizes: list[dict[str, Any]] = []  # metrics.jsonl's resize records, for summary.json

    def to(self, state: State) -> None:
        assert state in TRANSITIONS[self.state], f"controller: {self.state.value} -> {state.value}"
        self.state = state
        self.history.append(state)

    def run(self, resume: bool) -> dict[str, Any]:
        """Train until done; returns rank 0's summary (with restarts), or raises the root cause."""
        group: Group | None = None
        resize: dict[str, Any] | None = None
        try:
            while True:
                group = group or self.make_group()
                try:
                    result = self._attempt(group, resume or self.restarts > 0, resize)
                except GroupFailed as e:
                    group, resize = self._after_failure(e, group)
                    continue
                except Regroup as e:
                    resize = e.cause
                    self.to(State.RESIZING)
                    self.to(State.STARTING)
                    continue
                self.to(State.FINISHED)
                return self._finish(result)
        except KeyboardInterrupt:
            if not self.state.terminal:  # an ended run keeps the summary it wrote
                summary = {"status": "failed", "error": "interrupted (stopped at once, no checkpoint)"}
                rundir.write_summary(self.run_dir, {**summary, "restarts": self.restarts})
            raise
        finally:
            if group is not None:
                group.kill()

    def _after_failure(self, e: GroupFailed, group: Group) -> tuple[Group | None, dict[str, Any] | None]:
        """RESIZE: go on with the ranks left (elastic); RESTART: every rank anew; RAISE past scaling.max_failures."""
        f, s = e.failure, self.cfg.scaling
        left = group.size - len(e.lost)
        elastic = s.min_workers if s.elastic and e.lost and hasattr(group, "shrink") else None
        decision = decide(f, self.restarts, s.max_failures, left, elastic)
        if decision == RAISE:  # the group is killed on the way out
            self.to(State.ERRORED)
            self._fail(f)
        self.restarts += 1
        if decision == RESIZE:
            stuck = group.idle(RESIZE_WAIT_S)  # a survivor's training thread ends once its collective fails
            group.shrink(set(e.lost) | stuck)
        if decision == RESIZE and group.size >= s.min_workers:
            self.to(State.RESIZING)
            cause = {"reason": f.message, "died_at": e.died_at or time.time(), "last_step": self.last_step}
            self._say(f"{f.message}; going on with {group.size} of {s.num_workers} workers from the newest snapshot")
            self.to(State.STARTING)
            return group, cause
        self.to(State.RESTARTING)
        group.kill()
        self._say(
            f"{f.message}; restarting all workers from the latest checkpoint "
            f"(restart {self.restarts} of scaling.max_failures={s.max_failures})"
        )
        self.to(State.STARTING)
        return None, None

    def _say(self, line: str) -> None:
        print(f"[shoal] {line}", file=self.out, flush=True)

    def _attempt(self, group: Group, resume: bool, resize: dict[str, Any] | None) -> dict[str, Any]:
        self.startup.mark("group_placed")
        if resize is None:
            group.start(resume)
        else:
            group.start(resume, resize=resize)
        self.startup.mark("ranks_started")
        self.to(State.RUNNING)
        return self._watch(group)

    def _watch(self, group: Group) -> dict[str, Any]:
        """Poll every rank until all are done or one fails; rank 0's records drive the progress display."""
        progress = Progress(self.cfg.train.max_steps, self.cfg.log.progress, self.cfg.log.print_every_s, self.out)
        hang = HangWatch(group.size, self.cfg.scaling.hang_timeout_s, self.cfg.scaling.timeout_s, time.monotonic())
        stop = threading.Event()
        growing = False
        try:
            # first SIGTERM/SIGINT: every rank finishes its step, saves and stops; a second one stops at once
            with StopOnSignal(stop, on_first=group.request_stop) as signals:
                while True:
                    polls = group.poll()
                    self._note_startup(polls[0])
                    self.last_step = max([self.last_step, *(p.step for p in polls)])
                    for record in polls[0].records:
                        self._show(record, progress)
                    if _errors(polls):
                        # the peers of a dead rank fail too, in their collectives; look again briefly so
                        # the report names the root cause rather than whichever rank noticed first
                        time.sleep(self.grace_s)
                        again = group.poll()
                        errors = _errors(again) or _errors(polls)
                        lost = lost_ranks(again) | lost_ranks(polls)
                        raise GroupFailed(root_cause(errors), lost, min(e.at for e in errors))
                    hung = hang.check(polls, time.monotonic())
                    if hung is not None:
                        raise GroupFailed(hung, frozenset({hung.rank}), time.time())
                    if all(p.state == RankState.DONE for p in polls):
                        ended = (polls[0].result or {}).get("status") != "preempted"  # done before the stop came
                        if growing and not stop.is_set() and not ended:
                            raise Regroup(self._grow(group))
                        return {**(polls[0].result or {}), "exit_code": signals.exit_code}
                    if not growing and not stop.is_set() and self._may_grow(group):
                        group.request_stop()  # every rank stops at the next step boundary, with a snapshot
                        growing, self.grow_asked = True, time.time()
                    time.sleep(max(self.poll_s, TRAINING_POLL_S) if "first_step" in polls[0].marks else self.poll_s)
        finally:
            progress.close()

    def _may_grow(self, group: Group) -> bool:
        return self.cfg.scaling.elastic and group.size < self.cfg.scaling.num_workers and group.can_grow()

    def _grow(self, group: Group) -> dict[str, Any]:
        old = group.size
        new = group.grow()
        self._say(f"resources returned: growing from {old} to {new} workers at step {self.last_step}")
        # recovery_s is then the pause: from asking the ranks to stop to the first step of the larger group
        return {"reason": "resources returned", "died_at": self.grow_asked, "last_step": self.last_step}

    def _show(self, record: dict[str, Any], progress: Progress) -> None:
        """A metrics record to the display; a resize record is said in one line and kept for summary.json."""
        if record.get("event") != "resize":
            progress.update(record)
            return
        self.resizes.append(record)
        took = f" in {record['recovery_s']:.1f} s" if record.get("recovery_s") is not None else ""
        lost = f", {record['steps_lost']} step(s) lost" if record.get("steps_lost") is not None else ""
        self._say(
            f"resized {record['old_world']} -> {record['new_world']} workers at step {record['step']}: recovered"
            f"{took} from {record['resumed_from']}{lost} ({record['reason']})"
        )

    def _note_startup(self, rank0: RankStatus) -> None:
        if "first_step" in rank0.marks and 0 not in self.startup.ranks:
            self.startup.add_rank(0, rank0.marks)
            self.startup.write(self.run_dir)

    def _finish(self, result: dict[str, Any]) -> dict[str, Any]:
        """The one place a Ray run's summary.json is written."""
        if self.restarts:
            result["restarts"] = self.restarts
        if self.resizes:
            result["resizes"] = self.resizes
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
