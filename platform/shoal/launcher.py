"""The Ray launcher: start (or join) a Ray cluster, place N rank actors, give each the environment
torchrun would, run `worker.run_worker` in each, and watch them.

The driver never imports torch. It polls every rank a few times a second: rank 0's records drive
the progress display, and a rank that fails (or whose process dies) stops the whole group within
seconds, with that rank's error.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from shoal import cluster, preflight, rundir
from shoal.config import JobConfig, ScalingConfig, config_from_dict
from shoal.dist import ranks_env_from_counts
from shoal.errors import ClusterError, ShoalError, WorkerFailed
from shoal.progress import Progress
from shoal.signals import StopOnSignal
from shoal.startup import Startup

log = logging.getLogger("shoal")
POLL_S = 0.25
FAILURE_GRACE_S = 1.5


class RankActor:
    """One DDP rank in its own process; training runs in a thread so `poll` answers meanwhile."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.records: list[dict[str, Any]] = []
        self.state = "idle"
        self.result: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.step = -1  # last finished step: the driver's hang watch

    def __repr__(self) -> str:  # Ray prefixes forwarded log lines with this
        return f"rank {self.rank}"

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def start(self, env: dict[str, str], cfg: dict[str, Any], run_dir: str, resume: bool, cwd: str, sys_path: list[str]) -> None:
        """Set the torchrun environment and start training in a thread."""
        os.environ.update(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths in the config mean the same as on the driver
        sys.path[:0] = [p for p in sys_path if p not in sys.path]
        self.state = "running"
        threading.Thread(target=self._train, args=(cfg, run_dir, resume), daemon=True, name="shoal-train").start()

    def _train(self, cfg: dict[str, Any], run_dir: str, resume: bool) -> None:
        from shoal.worker import run_worker, setup_logging

        setup_logging(None)
        try:
            result = run_worker(config_from_dict(cfg), run_dir=Path(run_dir), resume=resume, report=self._report, stop=self.stop, on_step=self._step)
            with self.lock:
                self.result, self.state = result, "done"
        except BaseException as exc:  # reported to the driver, which stops the group
            tb = traceback.format_exc()
            if not isinstance(exc, ShoalError):
                print(tb, file=sys.stderr, flush=True)
            with self.lock:
                self.error = {
                    "type": type(exc).__name__,
                    "message": str(exc),
                    "user_error": isinstance(exc, ShoalError),
                    "exit_code": getattr(exc, "exit_code", 1),
                    "traceback": tb,
                }
                self.state = "failed"

    def _step(self, step: int) -> None:
        self.step = step

    def _report(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.records.append(record)

    def poll(self) -> dict[str, Any]:
        """State, new records since the last poll, and the result or error once there is one."""
        with self.lock:
            records, self.records = self.records, []
            return {"state": self.state, "records": records, "result": self.result, "error": self.error, "step": self.step}

    def request_stop(self) -> None:
        self.stop.set()


def check_resources(scaling: ScalingConfig) -> None:
    """Fail at once, with requested vs available, if the cluster can never hold the workers."""
    import ray

    total = ray.cluster_resources()
    n = scaling.num_workers
    for key, per in (("CPU", scaling.cpus_per_worker), ("GPU", scaling.gpus_per_worker)):
        need = n * per
        have = total.get(key, 0.0)
        if need > have + 1e-9:
            knob = "scaling.cpus_per_worker" if key == "CPU" else "scaling.gpus_per_worker"
            raise ClusterError(
                f"scaling: {n} workers x {per:g} {key} = {need:g} {key} requested, but the cluster has {have:g} {key}; "
                f"lower scaling.num_workers or {knob}"
            )
    if scaling.placement == "strict_spread":
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        if nodes < n:
            raise ClusterError(f"scaling.placement: strict_spread puts one rank per node: {n} workers, {nodes} nodes alive")


class WorkerGroup:
    """N rank actors in a placement group, ordered by node like torchrun's ranks."""

    def __init__(self, cfg: JobConfig):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        s = cfg.scaling
        bundle = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}
        strategy = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}[s.placement]
        self.pg = placement_group([dict(bundle) for _ in range(s.num_workers)], strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=s.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise ClusterError(
                f"scaling: waited {s.placement_timeout_s:g}s for {s.num_workers} x {bundle} "
                f"({s.placement}); available now: {ray.available_resources()}. "
                "Free resources, lower scaling.num_workers, or raise scaling.placement_timeout_s"
            ) from None
        # Ranks fill node after node, as torchrun numbers them; known before the actors exist, so
        # each actor is created with its rank (Ray prefixes its log lines with it).
        bundle_nodes = ray.util.placement_group_table(self.pg)["bundles_to_node_id"]
        node_ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
        bundles, counts = order_by_node([bundle_nodes[i] for i in range(s.num_workers)])
        remote = ray.remote(RankActor)
        self.actors = [
            remote.options(
                num_cpus=s.cpus_per_worker,
                num_gpus=s.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=b),
                max_concurrency=4,
            ).remote(rank)
            for rank, b in enumerate(bundles)
        ]
        port = ray.get(self.actors[0].free_port.remote())
        self.worlds = ranks_env_from_counts(counts, node_ips[bundle_nodes[bundles[0]]], port)

    def start(self, cfg: JobConfig, run_dir: Path, resume: bool) -> None:
        import ray

        cfg_dict = cfg.to_dict()
        if cfg.scaling.threads_per_worker is None:
            cfg_dict["scaling"]["threads_per_worker"] = max(1, int(cfg.scaling.cpus_per_worker))
        env = dict(_passthrough_env())
        ray.get(
            [
                a.start.remote({**env, **w.to_env()}, cfg_dict, str(run_dir), resume, os.getcwd(), list(sys.path))
                for a, w in zip(self.actors, self.worlds)
            ]
        )

    def poll(self) -> list[dict[str, Any]]:
        """Every rank's poll; a dead actor becomes 'failed' naming its rank, a silent one 'unanswered'."""
        import ray

        refs = [a.poll.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        out: list[dict[str, Any]] = []
        for ref in refs:
            if ref not in ready:
                out.append({"state": "running", "records": [], "result": None, "error": None, "unanswered": True})
                continue
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else "the process died"
                out.append({"state": "failed", "records": [], "result": None,
                            "error": {"type": "WorkerDied", "message": f"process died ({reason})", "user_error": False, "exit_code": 1}})
        return out

    def request_stop(self) -> None:
        for a in self.actors:
            a.request_stop.remote()

    def kill(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(self.pg)


def order_by_node(bundle_nodes: list[str]) -> tuple[list[int], list[int]]:
    """Bundle indices in rank order (node of bundle 0 first, node after node) and ranks per node."""
    order = list(dict.fromkeys(bundle_nodes))
    ranked = sorted(range(len(bundle_nodes)), key=lambda i: (order.index(bundle_nodes[i]), i))
    counts = [bundle_nodes.count(node) for node in order]
    return ranked, counts


def _passthrough_env() -> dict[str, str]:
    """Network and library settings the ranks should see as the driver does."""
    keys = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "NCCL_IB_DISABLE", "TORCH_DISTRIBUTED_DEBUG", "PYTHONHASHSEED")
    return {k: os.environ[k] for k in keys if k in os.environ}


class RankFailure(Exception):
    """A rank failed, died, hung or stopped answering (the launcher decides whether to restart)."""

    def __init__(self, rank: int, message: str, user_error: bool = False, exit_code: int = 1):
        super().__init__(message)
        self.rank, self.message, self.user_error, self.exit_code = rank, message, user_error, exit_code


def run(cfg: JobConfig, *, resume: bool = False, progress_stream: Any = None) -> dict[str, Any]:
    """Train with Ray: returns rank 0's summary, or raises the failing rank's error.

    A rank that fails, dies or hangs stops the whole group; with scaling.max_failures > 0 the
    group is started again and resumes from the latest complete checkpoint. The budget counts
    restarts of the whole job (not per node, as torchrun's agents do).
    """
    out = progress_stream or sys.stdout
    startup = Startup()
    address = cluster.requested_address(cfg.scaling.address)
    path = preflight.check(cfg, resume=resume, local_files=cluster.on_this_machine(address))  # before Ray starts
    startup.mark("checked")
    conn = cluster.connect(address, cfg.scaling.dashboard)
    startup.mark("ray_ready")
    restarts = 0
    try:
        if cfg.strategy == "async_ps":
            return _run_async_ps(cfg, path, resume, out)
        check_resources(cfg.scaling)
        cfg = rundir.prepare(path, cfg, resume)
        print(f"[shoal] run directory: {path}", file=out, flush=True)
        while True:
            group = WorkerGroup(cfg)
            try:
                startup.mark("actors_placed")
                startup.note_modules(["torch", *_user_modules(cfg)])
                group.start(cfg, path, resume or restarts > 0)
                startup.mark("ranks_started")
                startup.write(path)
                result = _watch(group, cfg, path, progress_stream)
                break
            except RankFailure as f:
                if f.user_error or restarts >= cfg.scaling.max_failures:
                    _fail(f, path, restarts, cfg.scaling.max_failures)
                restarts += 1
                print(f"[shoal] {f.message}; restarting all workers from the latest checkpoint "
                      f"(restart {restarts} of scaling.max_failures={cfg.scaling.max_failures})", file=out, flush=True)
            finally:
                group.kill()
        if restarts:
            result["restarts"] = restarts
            summary = rundir.read_summary(path) or {}
            rundir.write_summary(path, {**summary, "restarts": restarts})
        return result
    finally:
        conn.close()


def _user_modules(cfg: JobConfig) -> list[str]:
    """The modules of model.target and data.decode: loaded in the ranks, never in the driver."""
    return [t.partition(":")[0] for t in (cfg.model.target, cfg.data.decode) if t]


def _run_async_ps(cfg: JobConfig, path: Path, resume: bool, out: Any) -> dict[str, Any]:
    """strategy: async_ps, with the same restart budget as AllReduce mode."""
    from shoal.ps import check_resources_ps, run_async_ps

    check_resources_ps(cfg)
    cfg = rundir.prepare(path, cfg, resume)
    print(f"[shoal] run directory: {path} (strategy async_ps)", file=out, flush=True)
    restarts = 0
    while True:
        try:
            result = run_async_ps(cfg, path, resume or restarts > 0, out)
            break
        except WorkerFailed as e:
            if restarts >= cfg.scaling.max_failures:
                _fail(RankFailure(0, str(e)), path, restarts, cfg.scaling.max_failures)
            restarts += 1
            print(f"[shoal] {e}; restarting from the latest checkpoint (restart {restarts} of scaling.max_failures={cfg.scaling.max_failures})", file=out, flush=True)
    if restarts:
        result["restarts"] = restarts
        summary = rundir.read_summary(path) or {}
        rundir.write_summary(path, {**summary, "restarts": restarts})
    return result


def _fail(f: RankFailure, path: Path, restarts: int, budget: int) -> None:
    message = f.message
    if not f.user_error and budget:
        message += f" (after {restarts} restart(s); scaling.max_failures={budget})"
    _mark_failed(path, message, restarts)
    if f.user_error:
        exc = ShoalError(message)
        exc.exit_code = f.exit_code
        raise exc
    raise WorkerFailed(message)


def _watch(group: WorkerGroup, cfg: JobConfig, path: Path, stream: Any) -> dict[str, Any]:
    """Poll every rank until all finish or one fails; drive the progress display from rank 0."""
    progress = Progress(cfg.train.max_steps, cfg.log.progress, cfg.log.print_every_s, stream)
    stop = threading.Event()
    hang = HangWatch(len(group.actors), cfg.scaling.hang_timeout_s, cfg.scaling.timeout_s)
    try:
        # first SIGTERM/SIGINT: every rank finishes its step, saves and stops; a second one kills
        with StopOnSignal(stop, on_first=group.request_stop) as signals:
            while True:
                polls = group.poll()
                for record in polls[0]["records"]:
                    progress.update(record)
                failed = [(rank, p) for rank, p in enumerate(polls) if p["state"] == "failed"]
                if failed:
                    # the peers of a dead rank fail too, in their collectives; look again briefly so
                    # the report names the root cause rather than whichever rank noticed first
                    time.sleep(FAILURE_GRACE_S)
                    later = group.poll()
                    failed = [(rank, p) for rank, p in enumerate(later) if p["state"] == "failed"] or failed
                    raise _failure(failed)
                hang.check(polls)
                if all(p["state"] == "done" for p in polls):
                    return {**polls[0]["result"], "exit_code": signals.exit_code}
                time.sleep(POLL_S)
    except KeyboardInterrupt:
        _mark_failed(path, "interrupted (stopped at once, no checkpoint)")
        raise
    finally:
        progress.close()


class HangWatch:
    """A rank that makes no step for hang_timeout_s, or does not answer for timeout_s, has failed."""

    def __init__(self, ranks: int, hang_timeout_s: float | None, timeout_s: float):
        now = time.monotonic()
        self.hang_timeout_s, self.timeout_s = hang_timeout_s, timeout_s
        self.steps = [-1] * ranks
        self.moved = [now] * ranks
        self.answered = [now] * ranks

    def check(self, polls: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for rank, p in enumerate(polls):
            if p.get("unanswered"):
                if now - self.answered[rank] > self.timeout_s:
                    raise RankFailure(rank, f"rank {rank} did not answer for {self.timeout_s:g}s (node lost?; scaling.timeout_s)")
                continue
            self.answered[rank] = now
            if p.get("step", -1) != self.steps[rank] or p["state"] != "running":
                self.steps[rank], self.moved[rank] = p.get("step", -1), now
            elif self.hang_timeout_s and now - self.moved[rank] > self.hang_timeout_s:
                raise RankFailure(rank, f"rank {rank} made no progress for {self.hang_timeout_s:g}s at step {self.steps[rank]} (hang; scaling.hang_timeout_s)")


def _failure(failed: list[tuple[int, dict[str, Any]]]) -> RankFailure:
    """The root cause: a user error (bad data, config), then a dead process, then an error of the
    rank's own, and only last a peer's failed collective."""

    def rank_of(item: tuple[int, dict[str, Any]]) -> tuple[int, int]:
        rank, p = item
        err = p["error"]
        if err["user_error"]:
            return (0, rank)
        if err["type"] == "WorkerDied":
            return (1, rank)
        collective = any(w in err["message"] for w in ("gloo", "NCCL", "Connection reset", "Connection closed", "timed out"))
        return (3 if collective else 2, rank)

    rank, poll = min(failed, key=rank_of)
    err = poll["error"]
    if err["user_error"]:
        return RankFailure(rank, err["message"], user_error=True, exit_code=err["exit_code"])
    return RankFailure(rank, f"rank {rank} failed: {err['type']}: {err['message']}")


def _mark_failed(path: Path, message: str, restarts: int = 0) -> None:
    summary = rundir.read_summary(path) or {}
    if summary.get("status") != "completed":  # the driver names the root cause; rank 0 only saw its part
        noticed = {"rank0_error": summary["error"]} if summary.get("error") and summary["error"] != message else {}
        rundir.write_summary(path, {"status": "failed", "error": message, "restarts": restarts, **noticed})
