"""Spawn real ranks (gloo on CPU) running a module-level function; a hang becomes a failure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shoal.dist import spawn_local


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120) -> list[Any]:
    """Run fn(*args) on world_size gloo ranks; returns each rank's result in rank order (a failure fails the test)."""
    try:
        return spawn_local(fn, world_size, *args, timeout_s=timeout_s)
    except (TimeoutError, RuntimeError) as e:
        raise AssertionError(str(e)) from None
