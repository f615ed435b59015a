"""Start a Ray head node on this machine with only what a local run needs; the embedded cluster's (cluster.py)
and the kept cluster's (keeper.py) alike.

The node listens on loopback only. It has the GCS, the raylet (which always starts Ray's dashboard agent
and runtime-env agent: Ray 2.60's raylet refuses an empty agent command) and the log monitor that forwards
the ranks' output to the driver; no autoscaler monitor (nothing to scale on one machine), and no API
server (dashboard.py) unless the dashboard is asked for: Ray starts that one even with
include_dashboard=False, with its usage-stats module only, and waits for it to publish its URL.
"""

from __future__ import annotations

import socket
from typing import Any

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def start_node(num_cpus: int, dashboard: bool, temp_dir: str) -> Any:
    """Start a Ray head node on loopback with only what a local run needs (see the module's docstring).

    Ray's reaper and the kernel's parent-death signal stop the node's processes with the process that
    started it, however that one ends.
    """
    from ray._private.parameter import RayParams

    params = RayParams(
        node_ip_address=LOOPBACK,
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host=LOOPBACK,
        # a port of its own: Ray's default (8265) is taken by any other cluster on the machine, and its
        # retries cost start-up seconds
        dashboard_port=None if dashboard else free_port(),
        temp_dir=temp_dir,
        no_monitor=True,  # the autoscaler's monitor: nothing to scale on one machine
        include_log_monitor=True,  # forwards the ranks' output to the driver
    )
    return _lean_node_class()(params, head=True, shutdown_at_exit=False, spawn_reaper=True)


def _lean_node_class() -> type:
    """Ray's Node, without the API server (dashboard.py) when the dashboard is off.

    Ray starts that process even with include_dashboard=False (with its usage-stats module only) and waits
    for it to publish its URL; with usage stats off it serves nothing a local run uses.
    """
    from ray._private.node import Node

    class LeanNode(Node):
        def start_api_server(self, *, include_dashboard: bool | None, raise_on_failure: bool) -> None:
            if include_dashboard:
                super().start_api_server(include_dashboard=include_dashboard, raise_on_failure=raise_on_failure)

    return LeanNode
