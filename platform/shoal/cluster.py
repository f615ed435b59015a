"""The Ray connection: join a cluster, or start Shoal's own on this machine. The only reader of RAY_*.

Shoal's own (embedded) cluster listens on loopback only and uses token authentication with a token
of its own: nothing it opens is reachable from the network, and no other process on the machine
can join it without the token. Joining a real cluster (scaling.address or RAY_ADDRESS) uses the
cluster's addresses and its token (--token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token).
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

from shoal.errors import ClusterError

LOOPBACK = "127.0.0.1"


@dataclass
class Cluster:
    """A connection to Ray; an embedded cluster is ours to shut down."""

    embedded: bool
    owns_connection: bool
    temp_dir: str | None = None

    def close(self) -> None:
        import ray

        if self.owns_connection and ray.is_initialized():
            ray.shutdown()
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


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


def connect(address: str | None, dashboard: bool = False) -> Cluster:
    """Join `address` (see requested_address), reuse this process's connection, or start an embedded cluster."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # one line per rank, not "[repeated 2x]"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    address = requested_address(address)
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
    ray.init(
        address="local",
        num_cpus=os.cpu_count() or 1,
        include_dashboard=dashboard,
        dashboard_host=LOOPBACK,
        # a port of its own: Ray's default (8265) is taken by any other cluster on the machine, and its
        # retries cost start-up seconds
        dashboard_port=None if dashboard else free_port(),
        _temp_dir=temp_dir,
        logging_level=logging.WARNING,
        log_to_driver=True,
    )
    return Cluster(embedded=True, owns_connection=True, temp_dir=temp_dir)


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


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


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
