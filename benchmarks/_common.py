"""Shared by the benchmark scripts: spawn ranks, summarise rounds."""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _ranks import spawn_ranks  # noqa: E402  (the same real-rank spawner the tests use)

__all__ = ["spawn_ranks", "median", "table"]


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(out)


def machine() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
