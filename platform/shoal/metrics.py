"""The record of a run: the metrics window between two log lines, and rank 0's metrics.jsonl and
TensorBoard scalars. Imports no torch until a writer with TensorBoard is made."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.rundir import METRICS


class Window:
    """Sums between two log lines: loss (kept wherever it is computed: a device tensor, or a float),
    elements it is summed over, samples, data wait, and time. Every strategy logs through one.

    `reduce(loss_sum, count, tokens) -> (loss_sum, count, tokens)` makes them global (a collective for ranks that each
    hold a part; identity where one process already holds the totals, as the PS recorder does).
    """

    def __init__(
        self,
        zero: Callable[[], Any],
        reduce: Callable[[Any, float, float], tuple[float, float, float]],
        holds_totals: bool = True,
    ):
        self.zero, self.reduce = zero, reduce
        self.holds_totals = holds_totals  # loading a saved window: only one rank carries the global sums
        self.reset()

    def reset(self) -> None:
        self.loss_sum: Any = self.zero()
        self.count = 0.0
        self.samples = 0
        self.tokens = 0.0  # this rank's real tokens (token data only)
        self.data_s = 0.0
        self.start = time.perf_counter()

    def add(self, loss_sum: Any, count: float, samples: int, data_s: float = 0.0, tokens: int = 0) -> None:
        self.loss_sum += loss_sum
        self.count += count
        self.samples += samples
        self.data_s += data_s
        self.tokens += tokens

    def figures(self) -> dict[str, float]:
        """loss (global mean), samples_per_s, tokens_per_s (real tokens, not padding: token data only), data_wait
        (share of the window spent waiting for data); then reset."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        loss_sum, count, tokens = self.reduce(self.loss_sum, self.count, self.tokens)
        out = {
            "loss": loss_sum / count if count else float("nan"),
            "samples_per_s": self.samples / elapsed,
            **({"tokens_per_s": tokens / elapsed} if tokens else {}),
            "data_wait": self.data_s / elapsed,
        }
        self.reset()
        return out

    def state_dict(self) -> dict[str, float]:
        """The window's global sums (a collective): a resumed run logs the same values."""
        loss_sum, count, tokens = self.reduce(self.loss_sum, self.count, self.tokens)
        return {"loss_sum": loss_sum, "count": count, "samples": self.samples, "tokens": tokens}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Continue a saved window; the rank that holds_totals carries the global sums, the others zeros."""
        self.reset()
        if self.holds_totals:
            self.loss_sum += state["loss_sum"]
            self.count = float(state["count"])
            self.tokens = float(state.get("tokens", 0.0))  # checkpoints before tokens were counted: none
        self.samples = int(state["samples"])


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, truncate_after_step: int | None = None, tracker: Any = None):
        self.run_dir = run_dir
        self.tracker = tracker  # log.mlflow / log.wandb: fed every record, in the background
        self.path = run_dir / METRICS
        if truncate_after_step is not None:
            _truncate(self.path, truncate_after_step)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # loads torch: compare, lr-find read metrics

            self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=truncate_after_step)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold 'step'); its 'histograms' (tag -> values) go to TensorBoard only."""
        histograms = record.pop("histograms", None)
        if histograms and self._tb is not None:
            for tag, values in histograms.items():
                self._tb.add_histogram(tag, values, int(record["step"]))
        self._file.write(json.dumps(_clean(record)) + "\n")
        if self.tracker is not None:
            self.tracker.log(record)
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(_tb_tag(key), value, step)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        """Close the files; the trackers get the summary (None: the run failed) and the reports."""
        self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
        if self.tracker is not None:
            self.tracker.finish(self.run_dir, summary)


def _tb_tag(key: str) -> str:
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    return f"train/{key}"


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN/Inf: write them as strings so the file stays valid JSON."""
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = str(v)
        out[k] = v
    return out


def _truncate(path: Path, after_step: int) -> None:
    """Drop records past `after_step` (a resumed run rewrites them)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if _step_of(line) <= after_step]
    path.write_text("".join(line + "\n" for line in keep))


def _step_of(line: str) -> float:
    """A record's step; a torn line (its writer was killed mid-write) counts as past every step, so it goes."""
    try:
        return json.loads(line).get("step", 0) if line.strip() else math.inf
    except ValueError:
        return math.inf


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of metrics.jsonl."""
    return read_jsonl(run_dir / METRICS)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file; a torn line (being written, or its writer killed mid-write) is left out."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


RESIZE_COLUMNS = ["step", "workers", "reason", "recovery s", "steps lost", "resumed from"]


def resizes(records: list[dict[str, Any]]) -> list[list[Any]]:
    """The elastic group's resizes (metrics.jsonl's resize records), as rows under RESIZE_COLUMNS."""
    return [
        [
            r["step"],
            f"{r['old_world']} -> {r['new_world']}",
            r.get("reason", ""),
            r.get("recovery_s"),
            r.get("steps_lost"),
            r.get("resumed_from", ""),
        ]
        for r in records
        if r.get("event") == "resize"
    ]
