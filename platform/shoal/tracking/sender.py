"""A background thread that sends to a tracker, so a tracker that is down or slow never stops or slows training.

Calls are queued and sent in order. A failed call is retried with a growing pause (the first failure is
reported once as a warning); while the tracker is unreachable, metric batches pile up to MAX_PENDING
and the oldest are dropped past it (they stay in metrics.jsonl). `close` waits at most a bounded time."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("shoal")
MAX_PENDING = 20_000
RETRY_PAUSES = (0.5, 1.0, 2.0, 4.0)


class Sender:
    def __init__(self, name: str, hint: str):
        self.name, self.hint = name, hint
        self.queue: queue.Queue[tuple[Callable[[], Any], bool] | None] = queue.Queue()
        self.warned = False
        self.down = False  # after a call failed every retry: calls get one try each until one succeeds
        self.dropped = 0
        self.failed: Exception | None = None
        self.thread = threading.Thread(target=self._run, name=f"shoal-{name}", daemon=True)
        self.thread.start()

    def put(self, call: Callable[[], Any], droppable: bool = True) -> None:
        if droppable and self.queue.qsize() >= MAX_PENDING:
            self.dropped += 1
            return
        self.queue.put((call, droppable))

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            call, droppable = item
            pauses = (None,) if self.down else (*RETRY_PAUSES, None)
            for pause in pauses:
                try:
                    call()
                    self.down = False
                    break
                except Exception as e:  # a tracker's failure is never the run's
                    self._warn(e)
                    if pause is None:
                        self.dropped += int(droppable)
                        self.failed, self.down = e, True
                        break
                    time.sleep(pause)

    def _warn(self, e: Exception) -> None:
        if not self.warned:
            self.warned = True
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning(
                "%s: %s (%s: %s); training goes on, the numbers stay in metrics.jsonl; retrying in the background",
                self.name,
                self.hint,
                type(e).__name__,
                first,
            )

    def close(self, timeout_s: float) -> bool:
        """Send what is queued, waiting at most timeout_s; False if some of it was not sent."""
        self.queue.put(None)
        self.thread.join(timeout_s)
        done = not self.thread.is_alive()
        if not done or self.dropped:
            log.warning(
                "%s: %s; %d batch(es) not sent (they are in metrics.jsonl)",
                self.name,
                "gave up waiting for the tracker" if not done else "the tracker was unreachable for a while",
                self.queue.qsize() + self.dropped,
            )
        return done and not self.dropped
