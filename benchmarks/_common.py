"""Shared by the benchmark scripts: spawn ranks, start a Ray head, summarise rounds. Needs no test extras:
the benchmarks run where users run Shoal; the rank spawner is the tests' (tests/_ranks.py, which imports no pytest)."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # appended: tests/ never shadows a module

from _ranks import spawn_local as spawn_ranks  # noqa: E402

__all__ = ["spawn_ranks", "median", "table", "machine", "start_ray_head", "stop_ray_head"]


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        out.append("| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(out)


def machine() -> str:
    return f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}"


def _free_port() -> int:
    """A free port above Ray's worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 20000:
            return port


def start_ray_head(temp_dir: Path, num_cpus: int) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` as a child of ours, with a token of its own; returns (process, GCS address).

    Stopping the child (stop_ray_head) stops exactly the processes it started, never another cluster.
    """
    import secrets

    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token))  # for the head and every client we start
    gcs, client = _free_port(), _free_port()
    ray_bin = str(Path(sys.executable).with_name("ray"))
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            f"--port={gcs}",
            f"--ray-client-server-port={client}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=false",
            f"--dashboard-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
            f"--temp-dir={temp_dir}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", gcs), timeout=1):
                return proc, f"127.0.0.1:{gcs}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
    stop_ray_head(proc)
    raise RuntimeError(f"ray start --head did not come up; see {temp_dir / 'head.log'}")


def stop_ray_head(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
