"""The Ray connection: join a cluster, or start Shoal's own on this machine. The only reader of RAY_*.

Shoal's own (embedded) cluster listens on loopback only and uses token authentication with a token
of its own: nothing it opens is reachable from the network, and no other process on the machine
can join it without the token. It starts only what a local run needs: the GCS, the raylet (which
always starts Ray's dashboard agent and runtime-env agent) and the log monitor that forwards the ranks'
output; no autoscaler monitor, and no API server (dashboard.py) unless scaling.dashboard asks for the
dashboard. With scaling.keep_alive_s > 0 it outlives the run for the next one (shoal.keeper). Joining a
real cluster (scaling.address or RAY_ADDRESS) uses the cluster's addresses and its token (--token-file,
RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal import keeper
from shoal.errors import ClusterError
from shoal.raynode import LOOPBACK, start_node


@dataclass
class Cluster:
    """A connection to Ray; an embedded cluster is ours to shut down."""

    embedded: bool
    owns_connection: bool
    temp_dir: str | None = None
    node: Any = None  # the Ray node this process started (an embedded cluster that stops with the run)
    lease: keeper.Lease | None = None  # this run's hold on the kept cluster it joined or started
    note: str = ""  # what the user should know about the cluster (lines), or ""
    token_file: Path | None = None  # the embedded dashboard's sign-in token, removed with the cluster

    def close(self) -> None:
        import ray

        if self.owns_connection and ray.is_initialized():
            ray.shutdown()
        if self.node is not None:
            self.node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.lease is not None:
            _rank_env.clear()
            self.lease.release()  # the keeper's idle clock starts now
        if self.token_file is not None:
            self.token_file.unlink(missing_ok=True)


def requested_address(address: str | None) -> str | None:
    """The cluster to join: scaling.address, else RAY_ADDRESS; None = start an embedded one."""
    return address or os.environ.get("RAY_ADDRESS") or None


def on_this_machine(address: str | None) -> bool:
    """Whether the cluster's nodes see this machine's files (embedded, "auto", or an address of this host)."""
    if address is None or address == "auto":
        return True
    host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
    return host in _own_hosts()


def _own_hosts() -> set[str]:
    hosts = {"localhost", LOOPBACK, "::1", socket.gethostname()}
    try:
        hosts.add(socket.gethostbyname(socket.gethostname()))
    except OSError:
        pass
    return hosts


def connect(
    address: str | None, dashboard: bool = False, keep_alive_s: float = 0.0, num_cpus: int | None = None
) -> Cluster:
    """Join `address` (see requested_address), reuse this process's connection, join or start the kept local
    cluster (keep_alive_s > 0), or start an embedded cluster that stops with this run (of num_cpus CPUs, else
    this machine's count)."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # one line per rank, not "[repeated 2x]"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15, below every other process: training ranks would give their cores
    # to the driver, Ray's daemons and anything else that runs. A cluster Shoal starts runs them at 0.
    os.environ.setdefault("RAY_worker_niceness", "0")
    if not dashboard:
        # nobody looks at node stats without the dashboard: its agent's psutil walk over every process runs
        # each minute, not every 5 s, and it checks its parent every 2 s, not 0.4 s (together 1-2% of a core)
        os.environ.setdefault("REPORTER_UPDATE_INTERVAL_MS", "60000")
        os.environ.setdefault("RAY_DASHBOARD_AGENT_CHECK_PARENT_INTERVAL_S", "2")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = requested_address(address)
    note = ""
    if address is None and keep_alive_s > 0 and "ray" not in sys.modules:  # the token must precede `import ray`
        kept, note = _join_kept(dashboard, keep_alive_s)
        if kept is not None:
            kept.note = note
            return kept
    if "ray" not in sys.modules:  # Ray's core reads these when it loads
        _auth_env(address)
    import ray

    if ray.is_initialized():
        return Cluster(embedded=False, owns_connection=False)
    if address:
        check_reachable(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ClusterError(
                f"scaling.address: cannot connect to Ray at {address}: {str(e).splitlines()[0]}"
            ) from None
        return Cluster(embedded=False, owns_connection=True)
    # A new cluster of our own, in its own temp dir: never attach by accident to another on this machine.
    temp_dir = tempfile.mkdtemp(prefix="shoal-ray-")
    node = start_node(num_cpus or os.cpu_count() or 1, dashboard, temp_dir)
    ray.init(address=node.address, logging_level=logging.WARNING, log_to_driver=True)
    conn = Cluster(embedded=True, owns_connection=True, temp_dir=temp_dir, node=node, note=note)
    if dashboard:
        conn.token_file = _token_file()
        conn.note = "\n".join(filter(None, [note, _dashboard_note(f"http://{node.webui_url}", conn.token_file)]))
    return conn


def _token_file() -> Path:
    """The token a browser signs in to the embedded dashboard with, in a file only this user can read."""
    path = keeper.state_dir() / f"token-{os.getpid()}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.environ["RAY_AUTH_TOKEN"])
    return path


def _dashboard_note(url: str, token_in: Path) -> str:
    return f"[shoal] Ray dashboard: {url} on this machine only (sign in with the token in {token_in})"


def _join_kept(dashboard: bool, keep_alive_s: float) -> tuple[Cluster | None, str]:
    """Join the kept local cluster, starting it if none is up; (None, why) when this run needs its own."""
    num_cpus = os.cpu_count() or 1
    key = keeper.cluster_key(num_cpus, dashboard)
    try:
        held = keeper.lease(key)
    except ClusterError as e:
        return None, f"[shoal] {e}: this run starts a Ray cluster of its own"
    if held is None:
        return None, "[shoal] the kept local Ray cluster is in use or of another kind: this run starts its own"
    try:
        if held.state is None:
            _auth_env(None)  # a fresh token, inherited by the keeper
            keeper.start(held, key, os.environ["RAY_AUTH_TOKEN"], num_cpus, dashboard, keep_alive_s)
            import ray  # noqa: F401  (while the keeper starts the node)

            state = keeper.wait_started(held)
            how = f"started a local Ray cluster that stays up {keep_alive_s:g} s after the run for the next one"
        else:
            state = held.state
            how = "joined the local Ray cluster an earlier run left up"
        _join_env(state["token"])
        note = f"[shoal] {how} (`shoal down` stops it; scaling.keep_alive_s: 0 turns this off)"
        if state.get("dashboard"):
            note += "\n" + _dashboard_note(state["dashboard"], held.folder / keeper.STATE)
        return _init_kept(state, held), note
    except BaseException:
        held.release()
        raise


def _join_env(token: str) -> None:
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _init_kept(state: dict[str, Any], held: keeper.Lease) -> Cluster:
    import ray

    global _rank_env
    ray.init(address=state["gcs"], logging_level=logging.WARNING, log_to_driver=True)
    # The kept node's processes have the environment of the run that started it; the ranks take on this
    # run's, as in a cluster this run started. (A runtime_env would do it too, but its workers cannot be
    # the ones Ray has ready: a second or more of start-up.)
    _rank_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_") and k not in PER_PROCESS_ENV}
    return Cluster(embedded=True, owns_connection=True, lease=held)


PER_PROCESS_ENV = frozenset({"CUDA_VISIBLE_DEVICES", "PWD", "OLDPWD", "SHLVL", "_"})
_rank_env: dict[str, str] = {}


def rank_env() -> dict[str, str]:
    """What a rank actor sets in its environment as it starts: this run's environment on the kept cluster,
    nothing on a cluster whose processes already have it (embedded) or should not (a remote one)."""
    return dict(_rank_env)


def _auth_env(address: str | None) -> None:
    """Token authentication for the connection about to be made (before `import ray`).

    Embedded: a fresh token of this cluster's own, in the environment its processes inherit, and
    Ray's local-only mode, which puts the node (every server Ray starts) on 127.0.0.1. Setting
    the mode explicitly also keeps Ray's "token authentication is enabled" notice out of the output.
    Joining: clusters started with `ray start` expect the token; a token-mode client also joins open ones.
    """
    if address is None:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # node IP = loopback (Ray's laptop mode)
    elif "RAY_AUTH_MODE" not in os.environ and read_token(None):
        os.environ["RAY_AUTH_MODE"] = "token"


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds when HOST:PORT does not answer (Ray itself retries for a minute)."""
    if address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    if not port.isdigit():
        return
    try:
        with socket.create_connection((host or LOOPBACK, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(
            f"scaling.address: nothing answers at {address} ({e.strerror or e}); is the Ray head node up?"
        ) from None


def read_token(token_file: str | None) -> str | None:
    """The cluster's auth token, from the first place that has one."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.exists():
            raise ClusterError(f"--token-file: {path} not found")
        return path.read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for candidate in (os.environ.get("RAY_AUTH_TOKEN_PATH"), "~/.ray/auth_token"):
        if candidate and Path(candidate).expanduser().exists():
            return Path(candidate).expanduser().read_text().strip()
    return None


def jobs_api_address(address: str | None) -> str:
    """The Jobs API URL: --address, else RAY_ADDRESS (an http(s) URL or HOST:PORT)."""
    address = address or os.environ.get("RAY_ADDRESS", "")
    if not address:
        raise ClusterError(
            "no cluster: pass --address http://HEAD:8265 (the Ray dashboard / Jobs API) or set RAY_ADDRESS"
        )
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")
