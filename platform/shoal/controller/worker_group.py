"""Rank actors in a placement group: start them with the environment torchrun would give, poll them,
stop them, kill them. The driver side never imports torch."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
import traceback
from typing import Any

from shoal import cluster
from shoal.config import JobConfig, config_from_dict
from shoal.controller.failure import RankError, RankState, RankStatus
from shoal.dist import ranks_env_from_counts
from shoal.errors import ClusterError
from shoal.imports import import_object
from shoal.run import Hooks, Run

PASSTHROUGH_ENV = (
    "GLOO_SOCKET_IFNAME",
    "NCCL_SOCKET_IFNAME",
    "NCCL_DEBUG",
    "NCCL_IB_DISABLE",
    "TORCH_DISTRIBUTED_DEBUG",
    "PYTHONHASHSEED",
)


class RankActor:
    """One rank in its own process; training runs in a thread so `poll` answers meanwhile."""

    def __init__(self, rank: int, env: dict[str, str] | None = None) -> None:
        os.environ.update(env or {})  # before torch loads: the run's environment on a kept cluster
        self.rank = rank
        self.records: list[dict[str, Any]] = []
        self.state = RankState.IDLE
        self.result: dict[str, Any] | None = None
        self.error: RankError | None = None
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.step = -1  # last finished step: the controller's hang watch
        self.marks = {"actor_ready": time.time()}
        # torch and the engine load while the driver finishes placing the group and picking a port
        self._warming = threading.Thread(target=_warm_imports, daemon=True, name="shoal-imports")
        self._warming.start()

    def __repr__(self) -> str:  # Ray prefixes forwarded log lines with this
        return f"rank {self.rank}"

    def ready(self) -> bool:
        """Answers once torch and the engine are loaded: a spare rank is worth growing the group with."""
        self._warming.join()
        return True

    def free_port(self, host: str) -> int:
        with socket.socket() as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    def start(
        self,
        env: dict[str, str],
        cfg: dict[str, Any],
        resume: bool,
        cwd: str,
        sys_path: list[str],
        entry: str,
        extra: dict[str, Any],
        resize: dict[str, Any] | None = None,
    ) -> None:
        """Set the torchrun environment and start `entry(run, **extra)` (run_worker or the PS worker) in a thread.
        A rank kept through a resize starts again here, in the same process, at its new rank."""
        os.environ.update(env)
        self.rank = int(env["RANK"])
        self.records, self.result, self.error, self.step = [], None, None, -1
        self.stop = threading.Event()
        if os.path.isdir(cwd):
            os.chdir(cwd)  # relative paths in the config mean the same as on the driver
        sys.path[:0] = [p for p in sys_path if p not in sys.path]
        self.state = RankState.RUNNING
        args = (config_from_dict(cfg), resume, entry, extra, resize)
        threading.Thread(target=self._train, args=args, daemon=True, name="shoal-train").start()

    def _train(
        self, cfg: JobConfig, resume: bool, entry: str, extra: dict[str, Any], resize: dict[str, Any] | None
    ) -> None:
        from shoal.worker import setup_logging

        setup_logging(None)
        try:
            train = import_object(entry, "entry")
            hooks = Hooks(self._report, self.stop, self._step, self._mark)
            run = Run(cfg, resume, hooks, under_controller=True, resize=resize)
            result = train(run, **extra)
            with self.lock:
                self.result, self.state = result, RankState.DONE
        except BaseException as exc:  # reported to the driver, which stops the group
            error = RankError.raised(self.rank, exc)
            # a user's mistake is one line at the driver; a failed collective is a peer's failure seen from here
            # (its message still reaches the driver): only a rank's own crash prints its traceback
            if not (error.user_error or error.in_collective):
                print(traceback.format_exc(), file=sys.stderr, flush=True)
            with self.lock:
                self.error, self.state = error, RankState.FAILED

    def _step(self, step: int) -> None:
        self.step = step

    def _mark(self, name: str, seconds: float | None = None) -> None:
        self.marks[name] = time.time() if seconds is None else seconds

    def _report(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.records.append(record)

    def poll(self) -> RankStatus:
        """State, new records since the last poll, and the result or error once there is one."""
        with self.lock:
            records, self.records = self.records, []
            return RankStatus(self.state, self.step, records, self.result, self.error, dict(self.marks))

    def request_stop(self) -> None:
        self.stop.set()


def _warm_imports() -> None:
    try:
        import torch._dynamo  # noqa: F401  (the optimizers' first call imports it: about a second)

        import shoal.engine  # noqa: F401  (torch, the optimizers, the data path)
    except Exception:  # the real import in the training thread reports any problem
        pass


class WorkerGroup:
    """N rank actors in a placement group, numbered node after node as torchrun numbers ranks."""

    def __init__(self, cfg: JobConfig, entry: str = "shoal.worker:run_worker"):
        import ray
        from ray.util.placement_group import placement_group

        self.cfg, self.entry = cfg, entry
        s = cfg.scaling
        self.size = s.num_workers
        bundle = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.gpus_per_worker else {})}
        strategy = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}[s.placement]
        self.pg = placement_group([dict(bundle) for _ in range(s.num_workers)], strategy=strategy)
        try:
            ray.get(self.pg.ready(), timeout=s.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.pg)
            raise ClusterError(
                f"scaling: waited {s.placement_timeout_s:g}s for {s.num_workers} x {bundle} ({s.placement}); available now: "
                f"{ray.available_resources()}. Free resources, lower scaling.num_workers, or raise scaling.placement_timeout_s"
            ) from None
        # Ranks fill node after node; known before the actors exist, so each is created with its rank
        # (Ray prefixes its log lines with it).
        nodes = _node_of_bundles(self.pg)
        bundles, self.node_counts = order_by_node([nodes[i] for i in range(s.num_workers)])
        self.master_addr = _node_ips()[nodes[bundles[0]]]
        self.bundles = list(bundles)  # the bundle of each rank, in rank order
        self.actors = [self._actor(rank, b) for rank, b in enumerate(self.bundles)]
        self.spares: list[tuple[int, Any, Any]] = []  # (bundle, actor, ready ref): ranks to grow back with

    def _actor(self, rank: int, bundle: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        s = self.cfg.scaling
        return (
            ray.remote(RankActor)
            .options(
                num_cpus=s.cpus_per_worker,
                num_gpus=s.gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundle),
                max_concurrency=4,
            )
            .remote(rank, cluster.rank_env())
        )

    def start(self, resume: bool, extra: dict[str, Any] | None = None, resize: dict[str, Any] | None = None) -> None:
        """Give every rank its torchrun environment and start training."""
        import ray

        nodes = _node_of_bundles(self.pg)
        order, counts = order_by_node([nodes[b] for b in self.bundles])
        self.bundles = [self.bundles[i] for i in order]
        self.actors = [self.actors[i] for i in order]
        master_addr = _node_ips()[nodes[self.bundles[0]]]
        port = ray.get(self.actors[0].free_port.remote(master_addr))
        worlds = ranks_env_from_counts(counts, master_addr, port)
        env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
        cfg = self.cfg.to_dict()
        ray.get(
            [
                a.start.remote(
                    {**env, **w.to_env()}, cfg, resume, os.getcwd(), list(sys.path), self.entry, extra or {}, resize
                )
                for a, w in zip(self.actors, worlds)
            ]
        )

    # ---------------------------------------------------------------- elastic: shrink, and grow back

    def shrink(self, lost: set[int]) -> None:
        """Drop the ranks `lost` (killed, if their process lingers); the others stay, torch loaded, for the next start.
        A spare rank is asked for in each freed bundle: the group grows back once the cluster can place it."""
        import ray

        for rank in sorted(lost):
            ray.kill(self.actors[rank], no_restart=True)
            spare = self._actor(-1, self.bundles[rank])
            self.spares.append((self.bundles[rank], spare, spare.ready.remote()))
        keep = [r for r in range(len(self.actors)) if r not in lost]
        self.actors = [self.actors[r] for r in keep]
        self.bundles = [self.bundles[r] for r in keep]
        self.size = len(self.actors)

    def can_grow(self) -> bool:
        """Whether a spare rank is placed and loaded (it answers `ready`)."""
        import ray

        if not self.spares:
            return False
        ready, _ = ray.wait([ref for _, _, ref in self.spares], num_returns=len(self.spares), timeout=0)
        return bool(ready)

    def grow(self) -> int:
        """Take in every spare that is ready; the ranks now."""
        import ray

        waiting = []
        for bundle, actor, ref in self.spares:
            done, _ = ray.wait([ref], timeout=0)
            if done:
                self.actors.append(actor)
                self.bundles.append(bundle)
            else:
                waiting.append((bundle, actor, ref))
        self.spares = waiting
        self.size = len(self.actors)
        return self.size

    def idle(self, timeout_s: float) -> set[int]:
        """Ranks whose training thread is still running after timeout_s (stuck past a peer's death)."""
        deadline = time.monotonic() + timeout_s
        busy = set(range(len(self.actors)))
        while busy and time.monotonic() < deadline:
            for rank, status in enumerate(self.poll()):
                if status.state != RankState.RUNNING or status.error is not None:
                    busy.discard(rank)
            if busy:
                time.sleep(0.05)
        return busy

    def poll(self) -> list[RankStatus]:
        """Every rank's status; a dead actor is 'failed' naming its rank, a silent one 'unanswered'."""
        import ray

        refs = [a.poll.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=10)
        out: list[RankStatus] = []
        for rank, ref in enumerate(refs):
            if ref not in ready:
                out.append(RankStatus(RankState.RUNNING, unanswered=True))
                continue
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as e:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else "the process died"
                out.append(RankStatus(RankState.FAILED, error=RankError.died(rank, reason)))
        return out

    def request_stop(self) -> None:
        for a in self.actors:
            a.request_stop.remote()

    def kill(self) -> None:
        import ray

        for a in [*self.actors, *(actor for _, actor, _ in self.spares)]:
            ray.kill(a, no_restart=True)
        ray.util.remove_placement_group(self.pg)


def _node_of_bundles(pg: Any) -> dict[int, str]:
    """The node each bundle of a placement group is on now (a rescheduled bundle may have moved)."""
    import ray

    return dict(ray.util.placement_group_table(pg)["bundles_to_node_id"])


def _node_ips() -> dict[str, str]:
    import ray

    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


def order_by_node(bundle_nodes: list[str]) -> tuple[list[int], list[int]]:
    """Bundle indices in rank order (node of bundle 0 first, node after node) and ranks per node."""
    order = list(dict.fromkeys(bundle_nodes))
    ranked = sorted(range(len(bundle_nodes)), key=lambda i: (order.index(bundle_nodes[i]), i))
    counts = [bundle_nodes.count(node) for node in order]
    return ranked, counts


def check_resources(cfg: JobConfig, extra_cpus: float = 0.0, extra_what: str = "") -> None:
    """Fail at once, with requested vs available, if the cluster can never hold the workers (and servers)."""
    import ray

    s = cfg.scaling
    total = ray.cluster_resources()
    for key, per in (("CPU", s.cpus_per_worker), ("GPU", s.gpus_per_worker)):
        extra = extra_cpus if key == "CPU" else 0.0
        need = s.num_workers * per + extra
        have = total.get(key, 0.0)
        if need > have + 1e-9:
            knob = "scaling.cpus_per_worker" if key == "CPU" else "scaling.gpus_per_worker"
            asked = f"{s.num_workers} workers x {per:g} {key}" + (f" + {extra_what}" if extra else "")
            raise ClusterError(
                f"scaling: {asked} = {need:g} {key} requested, but the cluster has {have:g} {key}; "
                f"lower scaling.num_workers or {knob}"
            )
    if s.placement == "strict_spread":
        nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
        if nodes < s.num_workers:
            raise ClusterError(
                f"scaling.placement: strict_spread puts one rank per node: {s.num_workers} workers, {nodes} nodes alive"
            )
