"""Where start-up time goes: wall-clock marks of the driver and of each rank, written to RUN_DIR/startup.json.

Marks are seconds since the driver process started; a rank's marks named *_s are durations instead
(compile_s: seconds torch.compile took in the first step). The driver also records which modules it had
loaded when the ranks started: the promise is that it never loads torch or the user's model module.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import psutil

FILE = "startup.json"


def process_start() -> float:
    """When this process started (wall clock), so imports before main() count too."""
    try:
        return psutil.Process().create_time()
    except Exception:  # /proc unreadable: count from the first mark instead
        return time.time()


class Startup:
    """Named marks (seconds since the process started) and the driver's loaded modules."""

    def __init__(self) -> None:
        self.origin = process_start()
        self.marks: dict[str, float] = {}
        self.modules: dict[str, bool] = {}
        self.ranks: dict[int, dict[str, float]] = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.time() - self.origin, 3)

    def note_modules(self, names: list[str]) -> None:
        """Record whether each module is loaded in this process right now."""
        self.modules = {n: n in sys.modules for n in names}

    def add_rank(self, rank: int, marks: dict[str, float]) -> None:
        """A rank's wall-clock marks, as seconds since the driver started (its *_s durations as they are)."""
        self.ranks[rank] = {k: v if k.endswith("_s") else round(v - self.origin, 3) for k, v in marks.items()}

    def as_dict(self) -> dict[str, Any]:
        return {
            "driver": self.marks,
            "driver_modules_at_rank_start": self.modules,
            "ranks": {str(r): m for r, m in sorted(self.ranks.items())},
        }

    def write(self, run_dir: Path) -> None:
        try:
            (run_dir / FILE).write_text(json.dumps(self.as_dict(), indent=1) + "\n")
        except OSError:
            pass  # a record for people, never a reason to fail a run
