"""The local Ray cluster that outlives a run (scaling.keep_alive_s > 0): started by the first `shoal train`,
joined by the next ones, stopped by `shoal down` or once no run has used it for keep_alive_s seconds.

A small detached process (this module's `main`, in a session of its own) owns the cluster: it starts the Ray
node on loopback with a token of its own, writes the address and token to a state file only the user can
read (0600, in a per-user folder: $SHOAL_STATE_DIR, else $XDG_RUNTIME_DIR/shoal, else /tmp/shoal-UID), and
watches a lock file. A run holds that lock exclusively while it uses the cluster, so the keeper knows when
it is idle and never stops under a run; a second run that finds the lock taken starts a cluster of its own,
as every run did before (it neither waits for the first run's CPUs nor oversubscribes the shared cluster).
Stopping is by PID: the keeper's, whose Ray processes share its fate (Ray's reaper and the kernel's parent-
death signal). Nothing here imports Ray, so `shoal down` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from shoal.errors import ClusterError

STATE = "cluster.json"
LOCK = "cluster.lock"
LOG = "keeper.log"
POLL_S = 2.0  # the idle clock's resolution: a few seconds against a keep-alive of minutes
LOCK_WAIT_S = 1.0  # how long a run waits for the keeper's own brief look at the lock
START_TIMEOUT_S = 120.0


def state_dir() -> Path:
    """This user's folder for the kept cluster's state (created 0700; one of another user is refused)."""
    base = os.environ.get("SHOAL_STATE_DIR")
    if base:
        path = Path(base)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "shoal"
    else:
        path = Path(tempfile.gettempdir()) / f"shoal-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ClusterError(f"{path}: the local cluster's state folder must be a folder of yours, mode 0700")
    return path


def cluster_key(num_cpus: int, dashboard: bool) -> str:
    """What a run needs of a kept cluster to join it: same Python, same Shoal, same resources and devices."""
    import shoal

    return json.dumps(
        [sys.executable, shoal.__file__, num_cpus, dashboard, os.environ.get("CUDA_VISIBLE_DEVICES")],
    )


@dataclass
class Lease:
    """A run's exclusive hold on the kept cluster, and the cluster's state once it is up."""

    fd: int
    folder: Path
    state: dict[str, Any] | None = None
    keeper: subprocess.Popen | None = field(default=None, repr=False)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the file releases the lock
            self.fd = -1


def lease(key: str) -> Lease | None:
    """The lock on the kept cluster with its state when one of this kind is up; None when another run holds it
    or a cluster of another kind (key) is up."""
    folder = state_dir()
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + LOCK_WAIT_S
    while not _try_lock(fd):
        if time.monotonic() > deadline:
            os.close(fd)
            return None
        time.sleep(0.05)
    state = read_state(folder)
    if state is not None and state.get("key") != key:
        os.close(fd)
        return None
    return Lease(fd, folder, state)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def read_state(folder: Path) -> dict[str, Any] | None:
    """The running keeper's state; a file left by a keeper that is gone is removed."""
    path = folder / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not keeper_alive(state):
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    return state


def keeper_alive(state: dict[str, Any]) -> bool:
    """Whether the state's keeper process still runs (its PID not reused by another process)."""
    try:
        return abs(psutil.Process(int(state["pid"])).create_time() - float(state["started"])) < 0.01
    except (psutil.Error, KeyError, TypeError, ValueError):
        return False


def start(held: Lease, key: str, token: str, num_cpus: int, dashboard: bool, keep_alive_s: float) -> None:
    """Start the keeper; the caller holds the lease and has put the new cluster's token in the environment
    (for Ray's processes)."""
    log = os.open(held.folder / LOG, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    command = [sys.executable, "-m", "shoal.keeper", "--key", key, "--num-cpus", str(num_cpus)]
    command += ["--keep-alive-s", str(keep_alive_s), *(["--dashboard"] if dashboard else [])]
    try:
        held.keeper = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=log, stderr=log, start_new_session=True, cwd=held.folder, text=True
        )
    finally:
        os.close(log)
    held.keeper.stdin.write(token)  # type: ignore[union-attr]  (for the state file; never on a command line)
    held.keeper.stdin.close()  # type: ignore[union-attr]


def wait_started(held: Lease, timeout_s: float = START_TIMEOUT_S) -> dict[str, Any]:
    """The state the keeper writes once its cluster is up; a keeper that fails says why."""
    assert held.keeper is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = read_state(held.folder)
        if state is not None and state["pid"] == held.keeper.pid:
            held.state = state
            return state
        if held.keeper.poll() is not None:
            break
        time.sleep(0.02)
    held.keeper.kill()
    tail = (held.folder / LOG).read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
    raise ClusterError(f"the local Ray cluster did not start: {tail[0]} (log: {held.folder / LOG})")


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write the state file (address and token) readable by this user only, in one step."""
    tmp = folder / f".{STATE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.replace(tmp, folder / STATE)


def stop(timeout_s: float = 30.0) -> dict[str, Any] | None:
    """Stop the kept cluster now (`shoal down`): its state as it was, or None when none is up."""
    folder = state_dir()
    state = read_state(folder)
    if state is None:
        return None
    keeper = psutil.Process(int(state["pid"]))
    keeper.terminate()
    try:
        keeper.wait(timeout_s)
    except psutil.TimeoutExpired:
        keeper.kill()  # its Ray processes die with it (parent-death signal, reaper)
    with contextlib.suppress(OSError):
        (folder / STATE).unlink()
    return state


# ---- the keeper process --------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop


def main(argv: list[str] | None = None) -> int:
    """Start the node, publish its state, and stop it when asked or idle for keep_alive_s."""
    p = argparse.ArgumentParser(prog="python -m shoal.keeper")
    p.add_argument("--key", required=True)
    p.add_argument("--num-cpus", type=int, required=True)
    p.add_argument("--keep-alive-s", type=float, required=True)
    p.add_argument("--dashboard", action="store_true")
    args = p.parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    folder = state_dir()
    token = sys.stdin.read().strip()
    try:
        with _node(args.num_cpus, args.dashboard) as (node, temp_dir):
            write_state(folder, _state_of(node, args.key, token, temp_dir))
            _watch(folder, node, args.keep_alive_s)
    except _Stop:
        pass
    finally:
        _forget(folder)
    return 0


@contextlib.contextmanager
def _node(num_cpus: int, dashboard: bool) -> Iterator[tuple[Any, str]]:
    import shutil

    from shoal.raynode import start_node

    temp_dir = tempfile.mkdtemp(prefix="shoal-ray-")
    node = None
    try:
        node = start_node(num_cpus, dashboard, temp_dir)
        yield node, temp_dir
    finally:
        with contextlib.suppress(_Stop):
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)  # a second signal must not cut the clean-up short
            if node is not None:
                node.kill_all_processes(check_alive=False, allow_graceful=True, wait=True)
            shutil.rmtree(temp_dir, ignore_errors=True)


def _state_of(node: Any, key: str, token: str, temp_dir: str) -> dict[str, Any]:
    me = psutil.Process()
    return {
        "pid": me.pid,
        "started": me.create_time(),
        "host": socket.gethostname(),
        "gcs": node.gcs_address,
        "token": token,
        "dashboard": f"http://{node.webui_url}" if node.webui_url else None,
        "temp_dir": temp_dir,
        "key": key,
    }


def _watch(folder: Path, node: Any, keep_alive_s: float) -> None:
    """Return once no run has held the lock for keep_alive_s (still holding it), or the node died."""
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    idle_since: float | None = None
    while node.remaining_processes_alive():
        time.sleep(POLL_S)
        if not _try_lock(fd):
            idle_since = None  # a run holds it
            continue
        now = time.monotonic()
        idle_since = now if idle_since is None else idle_since
        if now - idle_since >= keep_alive_s:
            _forget(folder)  # under the lock: a run that gets it next finds no cluster and starts one
            return
        fcntl.flock(fd, fcntl.LOCK_UN)


def _forget(folder: Path) -> None:
    """Remove the state file if it is this keeper's."""
    path = folder / STATE
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
