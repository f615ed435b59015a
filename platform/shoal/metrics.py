"""Rank 0's record of a run: metrics.jsonl and TensorBoard scalars."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from shoal.rundir import METRICS


class MetricsWriter:
    """Appends one JSON object per logged step and mirrors numbers to TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, truncate_after_step: int | None = None):
        self.path = run_dir / METRICS
        if truncate_after_step is not None:
            _truncate(self.path, truncate_after_step)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir), purge_step=truncate_after_step)

    def log(self, record: dict[str, Any]) -> None:
        """Write one record (must hold 'step')."""
        self._file.write(json.dumps(_clean(record)) + "\n")
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(_tb_tag(key), value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


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
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= after_step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of metrics.jsonl."""
    path = run_dir / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
