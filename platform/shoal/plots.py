"""Matplotlib (Agg, no screen) helpers shared by compare, doctor, lr-find and sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def figure(rows: int, cols: int, size: tuple[float, float] = (11, 8)) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
    return fig, axes


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
