"""The controller's decisions without Ray: the failure policy, the root cause among failed ranks,
the hang watch, and the state transitions of the restart loop driven by scripted groups."""

from __future__ import annotations

import io
import json

import pytest

from shoal.config import load_config
from shoal.controller.controller import Controller, State
from shoal.controller.failure import (
    RAISE,
    RESTART,
    Failure,
    HangWatch,
    RankError,
    RankState,
    RankStatus,
    decide,
    root_cause,
)
from shoal.controller.worker_group import order_by_node
from shoal.errors import ShoalError, WorkerFailed

from conftest import REPO

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def failed(rank: int, kind: str, message: str, user: bool = False) -> RankStatus:
    return RankStatus(
        RankState.FAILED, error=RankError(rank, kind, message, user_error=user, exit_code=2 if user else 1)
    )


@pytest.mark.parametrize(
    "failure, restarts, budget, expected",
    [
        (Failure(1, "rank 1 failed: boom"), 0, 0, RAISE),
        (Failure(1, "rank 1 failed: boom"), 0, 2, RESTART),
        (Failure(1, "rank 1 failed: boom"), 1, 2, RESTART),
        (Failure(1, "rank 1 failed: boom"), 2, 2, RAISE),  # the budget counts restarts of the whole job
        (Failure(0, "data: bad label", user_error=True, exit_code=2), 0, 5, RAISE),  # a user error never restarts
    ],
)
def test_failure_policy(failure, restarts, budget, expected):
    assert decide(failure, restarts, budget) == expected


def test_root_cause_prefers_user_errors_then_dead_processes_then_own_errors_over_collectives():
    collective = RankError(0, "RuntimeError", "[gloo] Connection closed by peer")
    own = RankError(2, "RuntimeError", "planted failure on rank 2")
    died = RankError.died(1, "SIGKILL")
    user = RankError(3, "DataError", "shard x: label 11 is outside [0, 10)", user_error=True, exit_code=2)
    assert root_cause([collective, own]) == Failure(2, "rank 2 failed: RuntimeError: planted failure on rank 2")
    assert root_cause([collective, died, own]).rank == 1
    f = root_cause([collective, died, user])
    assert f == Failure(3, "shard x: label 11 is outside [0, 10)", user_error=True, exit_code=2)


def test_hang_watch_names_the_rank_that_stopped_stepping_or_answering():
    watch = HangWatch(2, hang_timeout_s=3.0, timeout_s=10.0, now=0.0)
    assert watch.check([RankStatus(RankState.RUNNING, step=1), RankStatus(RankState.RUNNING, step=1)], now=1.0) is None
    assert (
        watch.check([RankStatus(RankState.RUNNING, step=2), RankStatus(RankState.RUNNING, step=1)], now=3.5) is None
    )  # rank 1 moved at t=1
    hung = watch.check([RankStatus(RankState.RUNNING, step=3), RankStatus(RankState.RUNNING, step=1)], now=4.5)
    assert hung is not None and hung.rank == 1 and "made no progress for 3s at step 1" in hung.message
    silent = HangWatch(1, None, timeout_s=10.0, now=0.0)
    assert silent.check([RankStatus(RankState.RUNNING, unanswered=True)], now=5.0) is None
    lost = silent.check([RankStatus(RankState.RUNNING, unanswered=True)], now=11.0)
    assert lost is not None and "did not answer for 10s" in lost.message


def test_ranks_fill_node_after_node_like_torchrun():
    bundles, counts = order_by_node(["b", "a", "b", "a", "c"])
    assert bundles == [0, 2, 1, 3, 4]  # node of bundle 0 first, then in order of appearance
    assert counts == [2, 2, 1]


class ScriptedGroup:
    """A group whose ranks answer from a script: a list of poll rounds, each a list of statuses."""

    def __init__(self, rounds: list[list[RankStatus]], log: list[str]):
        self.rounds, self.log, self.size = list(rounds), log, len(rounds[0])

    def start(self, resume: bool) -> None:
        self.log.append(f"start resume={resume}")

    def poll(self) -> list[RankStatus]:
        return self.rounds.pop(0) if len(self.rounds) > 1 else self.rounds[0]

    def request_stop(self) -> None:
        self.log.append("stop")

    def kill(self) -> None:
        self.log.append("kill")


def controller(tmp_path, groups: list[ScriptedGroup], **overrides) -> Controller:
    cfg = load_config(
        QUICKSTART, [f"run.dir={tmp_path}", "log.progress=none", *[f"{k}={v}" for k, v in overrides.items()]]
    )
    made = iter(groups)
    return Controller(cfg, tmp_path, lambda: next(made), io.StringIO(), poll_s=0.0, grace_s=0.0)


DONE = RankStatus(RankState.DONE, step=5, result={"status": "completed", "steps": 5})
RUN = RankStatus(RankState.RUNNING, step=1)
BOOM = failed(1, "RuntimeError", "boom")


def test_a_clean_run_goes_starting_running_finished_and_writes_the_summary(tmp_path):
    log: list[str] = []
    c = controller(tmp_path, [ScriptedGroup([[RUN, RUN], [DONE, DONE]], log)])
    result = c.run(resume=False)
    assert c.history == [State.STARTING, State.RUNNING, State.FINISHED]
    assert result["status"] == "completed" and log == ["start resume=False", "kill"]
    assert json.loads((tmp_path / "summary.json").read_text()) == {"status": "completed", "steps": 5}


def test_a_failure_within_the_budget_restarts_from_the_checkpoint_and_counts(tmp_path):
    log: list[str] = []
    groups = [ScriptedGroup([[RUN, BOOM]], log), ScriptedGroup([[DONE, DONE]], log)]
    c = controller(tmp_path, groups, **{"scaling.max_failures": 1})
    result = c.run(resume=False)
    assert c.history == [State.STARTING, State.RUNNING, State.RESTARTING, State.STARTING, State.RUNNING, State.FINISHED]
    assert log == ["start resume=False", "kill", "start resume=True", "kill"]  # the second start resumes
    assert result["restarts"] == 1 and json.loads((tmp_path / "summary.json").read_text())["restarts"] == 1
    assert "restarting all workers from the latest checkpoint (restart 1 of scaling.max_failures=1)" in c.out.getvalue()


def test_a_failure_past_the_budget_errors_with_the_root_cause(tmp_path):
    log: list[str] = []
    c = controller(tmp_path, [ScriptedGroup([[RUN, BOOM]], log)])
    with pytest.raises(WorkerFailed, match="rank 1 failed: RuntimeError: boom"):
        c.run(resume=False)
    assert c.history == [State.STARTING, State.RUNNING, State.ERRORED]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_a_user_error_is_raised_at_once_whatever_the_budget(tmp_path):
    bad = failed(0, "ConfigError", "model.target: factory raised", user=True)
    c = controller(tmp_path, [ScriptedGroup([[bad, RUN]], [])], **{"scaling.max_failures": 3})
    with pytest.raises(ShoalError, match="model.target: factory raised") as e:
        c.run(resume=False)
    assert e.value.exit_code == 2 and c.history == [State.STARTING, State.RUNNING, State.ERRORED]


def test_no_transition_outside_the_state_machine(tmp_path):
    c = controller(tmp_path, [])
    with pytest.raises(AssertionError):
        c.to(State.FINISHED)  # STARTING cannot finish without running


def test_a_rank_error_is_typed_from_what_the_rank_raised():
    user = RankError.raised(3, ShoalError("data: bad label"))
    assert (user.rank, user.kind, user.message, user.user_error, user.exit_code) == (
        3,
        "ShoalError",
        "data: bad label",
        True,
        2,
    )
    bug = RankError.raised(1, RuntimeError("[gloo] Connection reset by peer"))
    assert not bug.user_error and bug.exit_code == 1 and bug.in_collective
    assert RankError.died(2, "SIGKILL").message == "process died (SIGKILL)"


def test_only_finished_and_errored_end_a_run():
    assert {s for s in State if s.terminal} == {State.FINISHED, State.ERRORED}


@pytest.mark.parametrize(
    "left, min_workers, restarts, expected",
    [(1, 1, 0, "resize"), (1, 2, 0, RESTART), (2, 1, 0, "resize"), (1, 1, 2, RAISE), (1, None, 0, RESTART)],
)
def test_elastic_failures_resize_while_enough_ranks_are_left(left, min_workers, restarts, expected):
    f = Failure(1, "rank 1 failed: WorkerDied: process died (SIGKILL)")
    assert decide(f, restarts, 2, ranks_left=left, min_workers=min_workers) == expected
    assert decide(Failure(1, "bad shard", user_error=True), 0, 2, left, min_workers) == RAISE
