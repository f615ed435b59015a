"""SIGTERM and SIGINT ask for a graceful stop: finish the step, save a checkpoint, exit as preempted.

The handler only sets an event; the training loop agrees on it with the other ranks and stops at a
step boundary. A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

log = logging.getLogger("shoal")

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class StopOnSignal:
    """Installs the handlers (main thread only) and remembers which signal asked for the stop."""

    def __init__(self, stop: threading.Event, on_first: Callable[[], None] | None = None):
        self.stop = stop
        self.on_first = on_first
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in EXIT_CODES:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def _handle(self, signum: int, frame: object) -> None:
        if self.stop.is_set():
            log.warning("second %s: stopping now, without a checkpoint", signal.Signals(signum).name)
            raise KeyboardInterrupt
        self.signum = signum
        self.stop.set()
        log.warning(
            "%s received: finishing the current step and saving a checkpoint (send it again to stop at once)",
            signal.Signals(signum).name,
        )
        if self.on_first is not None:
            self.on_first()

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 143) if self.signum is not None else 0
