"""Matplotlib figures written to PNG files, shared by compare, doctor, lr-find and sweep.

Figures are built without pyplot: no backend is chosen and no global figure list is kept, so importing
this module (or making a figure) changes nothing for a notebook or another library in the same process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.figure import Figure


def figure(rows: int, cols: int, size: tuple[float, float] = (11, 8)) -> tuple[Figure, Any]:
    """A figure and its rows x cols grid of axes (always 2-D)."""
    fig = Figure(figsize=size)
    return fig, fig.subplots(rows, cols, squeeze=False)


def save(fig: Figure, path: Path) -> Path:
    """Lay the figure out and write it as a PNG."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
