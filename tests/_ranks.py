"""Spawn real ranks (gloo on CPU, this machine) running a module-level function.

spawn_local raises on a hang or a failed rank (the benchmarks use it too); spawn_ranks turns those into test failures.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import socket
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.dist import WorldInfo, destroy_process_group


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
    rank = int(os.environ["RANK"])
    node = str(rank // per_node)
    os.environ.update(
        {"LOCAL_WORLD_SIZE": str(per_node), "LOCAL_RANK": str(rank % per_node), "GROUP_RANK": node, "NODE_RANK": node}
    )
    return fn(*args)


def spawn_local(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120) -> list[Any]:
    """Run fn(*args) on world_size gloo ranks on this machine; each rank's result, in rank order.

    fn must be importable (module level). A rank that hangs past timeout_s is killed and reported,
    never left running.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        ctx = multiprocessing.get_context("spawn")
        procs = [ctx.Process(target=_local_rank, args=(r, world_size, port, fn, args, out)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        if hung:
            raise TimeoutError(f"ranks {hung} still running after {timeout_s}s (hang)")
        results, failures = [], []
        for r in range(world_size):
            path = Path(out, f"rank{r}.pkl")
            if not path.exists():
                failures.append(f"rank {r} exited with code {procs[r].exitcode} and no result")
                continue
            status, value = pickle.loads(path.read_bytes())
            results.append(value)
            if status != "ok":
                failures.append(f"rank {r} failed: {value}")
        if failures:  # the root cause first: a rank's own error before a peer's lost connection
            failures.sort(key=lambda f: "Connection closed" in f or "Connection reset" in f)
            raise RuntimeError("\n".join(failures))
        return results


def _local_rank(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(WorldInfo(rank, world_size, rank, world_size, 0, "127.0.0.1", port).to_env())
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch  # after OMP_NUM_THREADS is set: a first import here sizes torch's thread pool by it

    torch.set_num_threads(1)
    if sys.platform == "linux":
        # a spawned child inherits "spawn" as its default; ranks under torchrun or Ray start loader
        # workers with the platform default (fork), and so should these
        multiprocessing.set_start_method("fork", force=True)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as e:  # reported to the parent
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        destroy_process_group()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def spawn_sequence(
    calls: list[tuple[Callable[..., Any], tuple]], world_size: int, timeout_s: float = 300, per_node: int | None = None
) -> list[list[Any]]:
    """Run several calls one after the other on one spawned group of world_size ranks (one start of torch and
    the processes for them all); each call's results in rank order, in call order.

    A call that joins the group (init_process_group) keeps it for the next; one that leaves it (run_worker
    does) lets the next join again, on a fresh port: a port just closed may not be bound again at once."""
    ports = _free_ports(len(calls))
    per_rank = spawn_ranks(_in_sequence, world_size, calls, ports, timeout_s=timeout_s, per_node=per_node)
    return [[per_rank[r][i] for r in range(world_size)] for i in range(len(calls))]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _in_sequence(calls: list[tuple[Callable[..., Any], tuple]], ports: list[int]) -> list[Any]:
    import torch.distributed as dist

    out = []
    for (fn, args), port in zip(calls, ports, strict=True):
        if not dist.is_initialized():
            os.environ["MASTER_PORT"] = str(port)
        out.append(fn(*args))
    return out
