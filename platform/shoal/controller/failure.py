"""Pure decisions about failures: which rank's error is the root cause, whether a rank hangs, and
whether to restart or give up. Plain values in, decisions out: unit-tested without Ray."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from shoal.errors import ShoalError

RESTART, RESIZE, RAISE = "restart", "resize", "raise"
COLLECTIVE_WORDS = ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe", "timed out")
DIED = "WorkerDied"  # RankError.kind of a rank whose process is gone


@dataclass(frozen=True)
class RankError:
    """Why a rank failed: what it raised, or that its process died."""

    rank: int
    kind: str  # the exception's class name, or DIED
    message: str
    user_error: bool = False  # a ShoalError: bad data or config; a restart cannot help
    exit_code: int = 1
    at: float = field(default_factory=time.time, compare=False)  # wall clock when it was seen

    @classmethod
    def raised(cls, rank: int, exc: BaseException) -> RankError:
        user = isinstance(exc, ShoalError)
        return cls(rank, type(exc).__name__, str(exc), user, getattr(exc, "exit_code", 1))

    @classmethod
    def died(cls, rank: int, reason: str) -> RankError:
        return cls(rank, DIED, f"process died ({reason})")

    @property
    def in_collective(self) -> bool:
        """A failed collective: usually the victim of another rank's death."""
        return any(w in self.message for w in COLLECTIVE_WORDS)


class RankState(str, Enum):
    """Where one rank's actor stands."""

    IDLE = "idle"  # created, not yet running the job
    RUNNING = "running"
    DONE = "done"  # returned its summary
    FAILED = "failed"  # raised, or its process died


@dataclass(frozen=True)
class RankStatus:
    """One rank's answer to a poll."""

    state: RankState
    step: int = -1  # last finished step
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics records since the last poll (rank 0)
    result: dict[str, Any] | None = None  # the rank's summary once done
    error: RankError | None = None  # once failed
    marks: dict[str, float] = field(default_factory=dict)  # start-up stages, wall clock (and *_s durations)
    unanswered: bool = False  # the poll timed out (node lost?)


@dataclass(frozen=True)
class Failure:
    """The reason a group stopped: the rank and its one-line message."""

    rank: int
    message: str
    user_error: bool = False  # a ShoalError: bad data or config; a restart cannot help
    exit_code: int = 1


class GroupFailed(Exception):
    def __init__(self, failure: Failure, lost: frozenset[int] = frozenset(), died_at: float | None = None):
        super().__init__(failure.message)
        self.failure = failure
        self.lost = lost  # ranks whose process is gone or does not answer (the rest may go on: elastic)
        self.died_at = died_at  # wall clock when the first rank noticed


def lost_ranks(statuses: Sequence[RankStatus]) -> frozenset[int]:
    """The ranks whose process died or that do not answer."""
    return frozenset(
        r for r, s in enumerate(statuses) if s.unanswered or (s.error is not None and s.error.kind == DIED)
    )


def decide(
    failure: Failure, restarts: int, max_failures: int, ranks_left: int | None = None, min_workers: int | None = None
) -> str:
    """RESTART every rank from the latest checkpoint, RESIZE (elastic: go on with the `ranks_left` whose process
    lives, when at least min_workers), or RAISE: a user error never restarts, and the budget counts restarts
    of the whole job (not per node, as torchrun's agents do)."""
    if failure.user_error or restarts >= max_failures:
        return RAISE
    if min_workers is not None and ranks_left is not None and ranks_left >= min_workers:
        return RESIZE
    return RESTART


def root_cause(errors: Sequence[RankError]) -> Failure:
    """The failure to report: a user error (bad data, config), then a dead process, then an error of
    the rank's own, and only last a peer's failed collective (the victim of another rank's death)."""

    def order(e: RankError) -> tuple[int, int]:
        if e.user_error:
            return (0, e.rank)
        if e.kind == DIED:
            return (1, e.rank)
        return (3 if e.in_collective else 2, e.rank)

    e = min(errors, key=order)
    if e.user_error:
        return Failure(e.rank, e.message, user_error=True, exit_code=e.exit_code)
    return Failure(e.rank, f"rank {e.rank} failed: {e.kind}: {e.message}")


class HangWatch:
    """A rank that finishes no step for hang_timeout_s, or does not answer for timeout_s, has failed."""

    def __init__(self, ranks: int, hang_timeout_s: float | None, timeout_s: float, now: float):
        self.hang_timeout_s, self.timeout_s = hang_timeout_s, timeout_s
        self.steps = [-1] * ranks
        self.moved = [now] * ranks
        self.answered = [now] * ranks

    def check(self, statuses: Sequence[RankStatus], now: float) -> Failure | None:
        for rank, s in enumerate(statuses):
            if s.unanswered:
                if now - self.answered[rank] > self.timeout_s:
                    return Failure(
                        rank, f"rank {rank} did not answer for {self.timeout_s:g}s (node lost?; scaling.timeout_s)"
                    )
                continue
            self.answered[rank] = now
            if s.step != self.steps[rank] or s.state != RankState.RUNNING:
                self.steps[rank], self.moved[rank] = s.step, now
            elif self.hang_timeout_s and now - self.moved[rank] > self.hang_timeout_s:
                return Failure(
                    rank,
                    f"rank {rank} made no progress for {self.hang_timeout_s:g}s at step {self.steps[rank]} "
                    "(hang; scaling.hang_timeout_s)",
                )
        return None
