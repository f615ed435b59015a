"""A background thread that sends to a tracker, so a tracker that is down or slow never stops or slows training.

Calls are queued and sent in order. A failed call is retried with a growing pause (the first failure is reported
once as a warning). A call that failed because the tracker did not answer (no connection, a timeout) is kept and
tried again every PROBE_S until the tracker answers; then the queue goes on in order, so a tracker that is down when
the run starts, or goes away for a while, still gets every record, with its step. Meanwhile calls pile up to
MAX_PENDING; past it new metrics records are dropped (they stay in metrics.jsonl). A call the tracker refused (it
answered with an error) is dropped after its retries, and the calls after it get one try each until one succeeds.

`close` sends what is left, but holds the end of the run only briefly: it gives up once the tracker has not answered
for `down_s` (counted from the start of the close), and after `timeout_s` in any case (a large upload to a tracker that
answers), and then says in one warning line what was not sent and why."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("shoal")
MAX_PENDING = 20_000
RETRY_PAUSES = (0.5, 1.0, 2.0, 4.0)
PROBE_S = RETRY_PAUSES[-1]  # while the tracker does not answer, the waiting call is tried again this often
CLOSING_PAUSE_S = 0.25  # ... and this often once the run is ending


def unanswered(e: BaseException | None) -> bool:
    """The tracker did not answer (connection refused or broken, a timeout), as opposed to answering with an error:
    an OSError anywhere in the chain of causes (requests' errors are OSErrors; MLflow wraps them)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


@dataclass
class _Call:
    send: Callable[[], Any]
    droppable: bool  # a metrics record (dropped past MAX_PENDING); others are the run's start, artifacts, end
    what: str


class Sender:
    def __init__(self, name: str, hint: str):
        self.name, self.hint = name, hint
        self.queue: queue.Queue[_Call | None] = queue.Queue()
        self.current: _Call | None = None  # the call being sent (kept here while the tracker does not answer)
        self.warned = False
        self.said_back = False
        self.down = False  # after a call failed every retry: calls get one try each until one succeeds
        self.dropped = 0  # metrics records not sent
        self.lost: list[str] = []  # the other calls not sent
        self.failed: Exception | None = None
        self.failing_since: float | None = None  # time.monotonic() of the first failure since the last success
        self.closing = threading.Event()
        self.gave_up = threading.Event()
        self._wake = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"shoal-{name}", daemon=True)
        self.thread.start()

    def put(self, call: Callable[[], Any], droppable: bool = True, what: str = "a metrics record") -> None:
        if droppable and self.queue.qsize() >= MAX_PENDING:
            self.dropped += 1
            return
        self.queue.put(_Call(call, droppable, what))

    def _run(self) -> None:
        while not self.gave_up.is_set():
            item = self.queue.get()
            if item is None:
                return
            self.current = item
            self._send(item)
            self.current = None

    def _send(self, item: _Call) -> None:
        retries = iter(() if self.down else RETRY_PAUSES)
        while not self.gave_up.is_set():
            try:
                item.send()
            except Exception as e:  # a tracker's failure is never the run's
                if not self._failed(item, e, retries):
                    return
                continue
            if self.down and not self.said_back:
                self.said_back = True
                log.info("%s: the tracker answers again; sending what was queued", self.name)
            self.down, self.failing_since = False, None
            return

    def _failed(self, item: _Call, e: Exception, retries: Iterator[float]) -> bool:
        """Notes a failed call and pauses before its next try; False when the call is dropped instead."""
        self._warn(e)
        self.failed = e
        if self.failing_since is None:
            self.failing_since = time.monotonic()
        pause = next(retries, None)
        if pause is None:
            self.down = True
            if not unanswered(e):  # the tracker answered, with an error: this call will not go through
                self._drop(item)
                return False
            pause = PROBE_S  # not answering: keep the call (and those behind it) until it answers
        self._pause(pause)
        return True

    def _pause(self, seconds: float) -> None:
        if self.closing.is_set():
            seconds = min(seconds, CLOSING_PAUSE_S)
        self._wake.wait(seconds)
        self._wake.clear()

    def _drop(self, item: _Call) -> None:
        if item.droppable:
            self.dropped += 1
        else:
            self.lost.append(item.what)

    def _warn(self, e: Exception) -> None:
        if not self.warned:
            self.warned = True
            log.warning(
                "%s: %s (%s); training goes on, the numbers stay in metrics.jsonl; retrying in the background",
                self.name,
                self.hint,
                _first_line(e),
            )

    def stop(self) -> None:
        """No more calls: the thread ends once it has sent what is queued (see close)."""
        if not self.closing.is_set():
            self.closing.set()
            self.queue.put(None)
            self._wake.set()  # a call waiting for its next try gets it now

    def close(self, timeout_s: float, down_s: float, start: float | None = None) -> bool:
        """Send what is queued; give up once the tracker has not answered for down_s since start (time.monotonic(),
        default now), or at start + timeout_s. False, after one warning line, if something was not sent."""
        self.stop()
        why = self._wait_sent(timeout_s, down_s, time.monotonic() if start is None else start)
        if self.thread.is_alive():
            self._give_up()
        elif self.dropped or self.lost:
            why = f"some calls failed during the run (last: {_first_line(self.failed)})"
        else:
            return True  # everything went, even if the last call made it just as the wait ended
        not_sent = [f"{self.dropped} metrics record(s) not sent (they are in metrics.jsonl)"]
        if self.lost:
            not_sent.append(f"nor {', '.join(dict.fromkeys(self.lost))}")
        log.warning("%s: %s: %s", self.name, why, ", ".join(not_sent))
        return False

    def _wait_sent(self, timeout_s: float, down_s: float, start: float) -> str:
        """Waits for the thread to send the queue; why it stopped waiting before it had ('' when it had)."""
        while self.thread.is_alive():
            now = time.monotonic()
            since = self.failing_since
            if since is not None and now - max(since, start) >= down_s:
                return f"{self.hint} ({_first_line(self.failed)}); gave up after {down_s:g} s at the end of the run"
            if now - start >= timeout_s:
                return f"still sending after {timeout_s:g} s at the end of the run; gave up"
            self.thread.join(0.05)
        return ""

    def _give_up(self) -> None:
        """Stops the thread's sending; what it still held counts as not sent."""
        self.gave_up.set()
        self._wake.set()
        with self.queue.mutex:
            left = [c for c in (self.current, *self.queue.queue) if c is not None]
        for c in left:
            self._drop(c)


def _first_line(e: BaseException | None) -> str:
    if e is None:
        return "no answer yet"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__
