"""What the `shoal` command prints, and the exit status a run's outcome maps to."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import Any

# A run's final status -> the process exit status. A status not listed (a new one) is a failure.
EXIT_CODES: dict[str, int] = {"completed": 0, "preempted": 143, "diverged": 1, "failed": 1}
FAILED = 1
INTERRUPTED = 130  # Ctrl-C twice: 128 + SIGINT, as a shell reports it


def say(text: str, *, err: bool = False, end: str = "\n") -> None:
    """Print a result on stdout, or a note, progress line or error on stderr, at once."""
    print(text, end=end, file=sys.stderr if err else sys.stdout, flush=True)


# Notes and progress go to stderr, so stdout carries only the command's result.
note: Callable[[str], None] = partial(say, err=True)


def exit_code(summary: dict[str, Any]) -> int:
    """The process exit status of a run: 0 completed, the stopping signal's when preempted, 1 otherwise."""
    status = summary.get("status")
    code = EXIT_CODES.get(status, FAILED)
    if status == "preempted":
        return int(summary.get("exit_code") or code)  # 143 also on ranks the signal did not reach
    return code


def say_result(summary: dict[str, Any]) -> None:
    """The run's outcome in two lines, and how to continue a preempted run."""
    parts = [f"status {summary.get('status')}", f"steps {summary.get('steps')}"]
    for key in ("train_loss", "val_loss", "val_accuracy"):
        if isinstance(summary.get(key), float):
            parts.append(f"{key} {summary[key]:.4f}")
    if "samples_per_s" in summary:
        parts.append(f"{summary['samples_per_s']:,.0f} samples/s")
    say("[shoal] " + "  ".join(parts))
    say(f"[shoal] run directory: {summary.get('run_dir')}")
    if summary.get("status") == "preempted":
        say(
            f"[shoal] preempted at step {summary.get('steps')}: checkpoint saved; continue with --resume run.dir={summary.get('run_dir')}"
        )
