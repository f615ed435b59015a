"""Progress of rank 0's training: a bar on a terminal, periodic plain lines otherwise.

Fed the same records that go to metrics.jsonl, by rank 0 itself (torchrun, plain worker) or by
the Ray driver polling rank 0. Knows nothing of torch.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def _fmt(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "samples_per_s" in record:
        parts.append(f"{record['samples_per_s']:,.0f} samples/s")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tokens/s")
    if "mem_mb" in record:
        parts.append(f"peak {record['mem_mb']:,.0f} MiB")
    for key in ("val_loss", "val_accuracy"):
        if key in record:
            parts.append(f"{key} {record[key]:.4f}")
    return "  ".join(parts)


class Progress:
    """update(record) after each logged step; eval records are always printed."""

    def __init__(self, total_steps: int, mode: str = "auto", every_s: float = 10.0, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.total = total_steps
        self.every_s = every_s
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "lines"
        self.mode = mode
        self.start = time.monotonic()
        self.last_print = 0.0
        self._bar = None
        self._task = None
        if mode == "bar":
            # rich only for a bar on a terminal: the driver's start-up (and every run in a log file) goes without it
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task("train", total=total_steps, info="")

    def update(self, record: dict[str, Any]) -> None:
        """Show one record: advance the bar, or print a line if enough time passed (or it is an eval)."""
        if self.mode == "none":
            return
        step = int(record["step"])
        if self._bar is not None:
            elapsed = time.monotonic() - self.start
            steps_s = step / elapsed if elapsed > 0 else 0.0
            info = (
                f"loss {record['loss']:.4f}  {steps_s:.1f} steps/s  {record.get('samples_per_s', 0):,.0f} samples/s"
                + (f"  peak {record['mem_mb']:,.0f} MiB" if "mem_mb" in record else "")
                if "loss" in record
                else ""
            )
            self._bar.update(self._task, completed=step, info=info)
            if "val_loss" in record:
                self._bar.console.print(_fmt(record))
            return
        now = time.monotonic()
        is_eval = "val_loss" in record
        if is_eval or step >= self.total or now - self.last_print >= self.every_s or self.last_print == 0.0:
            eta = (now - self.start) / max(step, 1) * (self.total - step)
            print(f"[shoal] {_fmt(record)}  ({step}/{self.total}, eta {eta:.0f}s)", file=self.stream, flush=True)
            self.last_print = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
