"""Spawn real ranks (gloo on CPU) running a module-level function; a hang becomes a failure."""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, out_dir: str) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
    )
    import multiprocessing
    import sys

    import torch

    torch.set_num_threads(1)
    if sys.platform == "linux":
        # a spawned child inherits "spawn" as its default; ranks under torchrun or Ray start loader
        # workers with the platform default (fork), and so should these
        multiprocessing.set_start_method("fork", force=True)
    try:
        result: Any = ("ok", fn(*args))
    except BaseException as e:  # reported to the parent test
        result = ("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
    finally:
        from shoal.dist import destroy_process_group

        destroy_process_group()
    Path(out_dir, f"rank{rank}.pkl").write_bytes(pickle.dumps(result))


def spawn_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120) -> list[Any]:
    """Run fn(*args) on world_size gloo ranks; returns each rank's result in rank order."""
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, out)) for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
        assert not hung, f"ranks {hung} still running after {timeout_s}s (hang)"
        results = []
        for r in range(world_size):
            path = Path(out, f"rank{r}.pkl")
            assert path.exists(), f"rank {r} exited with code {procs[r].exitcode} and no result"
            status, value = pickle.loads(path.read_bytes())
            assert status == "ok", f"rank {r} failed: {value}"
            results.append(value)
        return results
