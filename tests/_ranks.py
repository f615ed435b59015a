"""Spawn real ranks (gloo on CPU) running a module-level function; a hang becomes a failure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from shoal.dist import spawn_local


def spawn_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120, per_node: int | None = None
) -> list[Any]:
    """Run fn(*args) on world_size gloo ranks; returns each rank's result in rank order (a failure fails the test).

    per_node: the ranks are told, as torchrun tells them, that they run world_size // per_node nodes of
    per_node ranks each (LOCAL_WORLD_SIZE, LOCAL_RANK, GROUP_RANK/NODE_RANK); all on this machine."""
    if per_node is not None:
        assert world_size % per_node == 0, (world_size, per_node)
        fn, args = _as_nodes_of, (per_node, fn, *args)
    try:
        return spawn_local(fn, world_size, *args, timeout_s=timeout_s)
    except (TimeoutError, RuntimeError) as e:
        raise AssertionError(str(e)) from None


def _as_nodes_of(per_node: int, fn: Callable[..., Any], *args: Any) -> Any:
    import os

    rank = int(os.environ["RANK"])
    node = str(rank // per_node)
    os.environ.update(
        {"LOCAL_WORLD_SIZE": str(per_node), "LOCAL_RANK": str(rank % per_node), "GROUP_RANK": node, "NODE_RANK": node}
    )
    return fn(*args)
