"""Where `shoal shard`'s tasks (shard_tasks.py) run: in the driver (--workers 1), in N local processes
(--workers N), or as Ray tasks of one CPU each (--ray [ADDRESS]).

Every runner takes a list of tasks and returns their results in order. Tasks elsewhere write their rows
done to files under the spill folder, which the driver polls for the progress bar; the first task that
fails stops the others (local processes are terminated, Ray tasks cancelled) and its error is raised
here. Local processes are spawned, not forked: the driver has pyarrow's threads running by then.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

from shoal.data.shard_tasks import MARKER, Failed, Report, read_count, run_elsewhere
from shoal.errors import ClusterError

POLL_S = 0.5


class Bar(Protocol):
    def advance(self, n: int) -> None: ...


class Runner(Protocol):
    workers: int

    def run(self, fn: Callable[[Any, Report], Any], tasks: Sequence[Any], bar: Bar) -> list[Any]: ...

    def close(self) -> None: ...


def runner(workers: int | None, ray: str | None, root: Path) -> Runner:
    """The runner the options ask for (ray: None = none, "" = the local or RAY_ADDRESS cluster)."""
    if ray is not None:
        return RayTasks(ray or None, workers, root)
    if (workers or 1) == 1:
        return InDriver()
    return Processes(workers or 1, root)


class InDriver:
    """Tasks one after the other in this process."""

    workers = 1

    def run(self, fn: Callable[[Any, Report], Any], tasks: Sequence[Any], bar: Bar) -> list[Any]:
        return [fn(task, bar.advance) for task in tasks]

    def close(self) -> None:
        pass


class _Elsewhere:
    """What the process and Ray runners share: progress files, polling, the first failure raised."""

    def __init__(self, root: Path):
        self.root, self.runs = root, 0

    def _progress_files(self, n: int) -> list[Path]:
        self.runs += 1
        folder = self.root / "progress"
        folder.mkdir(parents=True, exist_ok=True)
        return [folder / f"run{self.runs}-task{i:04d}" for i in range(n)]

    def _gather(self, poll: Callable[[float], dict[int, Any]], files: list[Path], bar: Bar) -> list[Any]:
        """Results by task as poll hands them over; the bar advanced by the tasks' progress files meanwhile."""
        results: dict[int, Any] = {}
        shown = [0] * len(files)
        while len(results) < len(files):
            for i, value in poll(POLL_S).items():
                if isinstance(value, Failed):
                    raise value.error()
                results[i] = value
            for i, path in enumerate(files):
                now = read_count(path)
                if now > shown[i]:
                    bar.advance(now - shown[i])
                    shown[i] = now
        return [results[i] for i in range(len(files))]


class Processes(_Elsewhere):
    """Tasks in N spawned local processes."""

    def __init__(self, workers: int, root: Path):
        super().__init__(root)
        self.workers = workers
        self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        for _ in range(workers):  # each submit starts a process: they import while the driver checks the source
            self.pool.submit(warm_up)

    def run(self, fn: Callable[[Any, Report], Any], tasks: Sequence[Any], bar: Bar) -> list[Any]:
        files = self._progress_files(len(tasks))
        marker = str(self.root / MARKER)
        futures = {
            self.pool.submit(run_elsewhere, fn, t, str(f), marker): i for i, (t, f) in enumerate(zip(tasks, files))
        }
        pending = set(futures)

        def poll(timeout: float) -> dict[int, Any]:
            done, _ = wait(pending, timeout=timeout, return_when=FIRST_COMPLETED)
            pending.difference_update(done)
            return {futures[f]: _result(f) for f in done}

        return self._gather(poll, files, bar)

    def close(self) -> None:
        # running calls are not stopped by shutdown (before Python 3.14's terminate_workers): end them here
        processes = list(getattr(self.pool, "_processes", {}).values())
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in processes:
            if p.is_alive():
                p.terminate()
        for p in processes:
            p.join(timeout=10)


def warm_up() -> None:
    import shoal.data.sources  # noqa: F401  (what every task imports first, loaded before the first arrives)


def _result(future: Future) -> Any:
    from concurrent.futures.process import BrokenProcessPool

    try:
        return future.result()
    except BrokenProcessPool:
        raise ClusterError(
            "--workers: a worker process died (killed, or out of memory?); nothing was written"
        ) from None


class RayTasks(_Elsewhere):
    """Tasks of one CPU each on a Ray cluster: ADDRESS, else RAY_ADDRESS, else a local one started as
    `shoal train` starts its own, with `workers` CPUs (this machine's count when not given)."""

    def __init__(self, address: str | None, workers: int | None, root: Path):
        super().__init__(root)
        self.address, self.asked = address, workers
        self.conn: Any = None
        self.refs: list[Any] = []

    @property
    def workers(self) -> int:
        """Tasks at a time: as asked, else the cluster's CPUs (connecting first, once the source is checked)."""
        self._connect()
        return self.asked or max(1, int(self.ray.cluster_resources().get("CPU", 1)))

    def _connect(self) -> None:
        if self.conn is not None:
            return
        from shoal import cluster

        self.conn = cluster.connect(self.address, num_cpus=self.asked or os.cpu_count() or 1)
        import ray  # Ray only for --ray: keeps it out of the driver's start-up otherwise

        self.ray = ray
        self.task = ray.remote(num_cpus=1, max_retries=0)(run_elsewhere)

    def run(self, fn: Callable[[Any, Report], Any], tasks: Sequence[Any], bar: Bar) -> list[Any]:
        self._connect()
        files = self._progress_files(len(tasks))
        marker = str(self.root / MARKER)
        self.refs = [self.task.remote(fn, t, str(f), marker) for t, f in zip(tasks, files)]
        index = {ref: i for i, ref in enumerate(self.refs)}
        pending = list(self.refs)

        def poll(timeout: float) -> dict[int, Any]:
            done, rest = self.ray.wait(pending, num_returns=len(pending), timeout=timeout)
            pending[:] = rest
            return {index[ref]: self.ray.get(ref) for ref in done}

        results = self._gather(poll, files, bar)
        self.refs = []
        return results

    def close(self) -> None:
        if self.conn is None:
            return
        for ref in self.refs:  # a failure left these running
            self.ray.cancel(ref, force=True)
        self.conn.close()
