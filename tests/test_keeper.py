"""The local cluster that outlives a run (scaling.keep_alive_s): the next run joins it, the idle timeout and
`shoal down` stop it, two runs at once both finish, and it listens on loopback only. Every test keeps its
cluster in a state folder of its own and stops it by PID."""

from __future__ import annotations

import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from shoal import keeper

from conftest import REPO, TESTS, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
JOINED = "joined the local Ray cluster an earlier run left up"
STARTED = "started a local Ray cluster that stays up"


class Kept:
    """A test's state folder, the environment that points `shoal` at it, and the kept cluster's processes."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.env = {"SHOAL_STATE_DIR": str(folder), "RAY_ADDRESS": None, "RAY_AUTH_MODE": None}
        self.env.update({"RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": None})
        self.pids: set[int] = set()

    def state(self) -> dict:
        return json.loads((self.folder / "cluster.json").read_text())

    def tree(self) -> list[psutil.Process]:
        """The keeper and every process under it (the Ray node, its workers); remembered for the clean-up."""
        keeper = psutil.Process(self.state()["pid"])
        procs = [keeper, *keeper.children(recursive=True)]
        self.pids |= {p.pid for p in procs}
        return procs

    def raylets(self) -> list[int]:
        return [p.pid for p in self.tree() if _name(p) == "raylet"]

    def train(self, run: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
        overrides = tiny_overrides(run, **{"train.max_steps": 5, "scaling.keep_alive_s": 60})
        return shoal_cli("train", str(QUICKSTART), *overrides, *extra, env=self.env, timeout=timeout, cwd=run.parent)

    def popen(self, run: Path, *extra: str) -> subprocess.Popen:
        path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
        env = {k: v for k, v in {**os.environ, **self.env, "PYTHONPATH": path}.items() if v is not None}
        overrides = tiny_overrides(run, **{"train.max_steps": 100000, "scaling.keep_alive_s": 60})
        return subprocess.Popen(
            [sys.executable, "-m", "shoal", "train", str(QUICKSTART), *overrides, *extra],
            cwd=run.parent,
            env={k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _gone(pids: set[int], timeout_s: float) -> set[int]:
    """The pids still alive after waiting up to timeout_s."""
    deadline = time.monotonic() + timeout_s
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {p for p in alive if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        time.sleep(0.2)
    return alive


@pytest.fixture
def kept(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    k = Kept(folder)
    try:
        yield k
    finally:
        with pytest.MonkeyPatch.context() as env:  # what `shoal down` does, in this process
            env.setenv("SHOAL_STATE_DIR", str(folder))
            keeper.stop()
        for pid in _gone(k.pids, 5):  # whatever `shoal down` left: by the PIDs this test saw
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    out = []
    for p in procs:
        try:
            out += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections("inet") if c.status == "LISTEN"]
        except psutil.Error:
            continue
    return out


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def _ray_servers_not_needed(procs: list[psutil.Process]) -> list[str]:
    """The command lines of Ray processes a local run does without: the API server / dashboard, the autoscaler."""
    found = []
    for p in procs:
        try:
            line = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "dashboard/dashboard.py" in line or "autoscaler/_private/monitor.py" in line:
            found.append(line[:200])
    return found


def test_the_next_run_joins_the_kept_cluster_and_shoal_down_stops_it(kept, tmp_path):
    first = kept.train(tmp_path / "run1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert STARTED in first.stdout
    assert oct((kept.folder / "cluster.json").stat().st_mode & 0o777) == "0o600"  # address and token: yours only
    raylets = kept.raylets()
    assert len(raylets) == 1
    assert not _ray_servers_not_needed(kept.tree())
    listening = _listening(kept.tree())
    assert {"gcs_server", "raylet"} <= {name for name, _, _ in listening}
    assert all(_loopback(ip) for _, ip, _ in listening), listening

    second = kept.train(tmp_path / "run2", "optim.lr=0.01")
    assert second.returncode == 0, second.stderr[-3000:]
    assert JOINED in second.stdout
    assert kept.raylets() == raylets  # no new raylet: the same node ran both
    assert json.loads((tmp_path / "run2" / "summary.json").read_text())["status"] == "completed"

    pids = {p.pid for p in kept.tree()}
    down = shoal_cli("down", env=kept.env)
    assert down.returncode == 0 and "stopped the local Ray cluster" in down.stdout
    assert not _gone(pids, 20), "processes of the kept cluster outlived `shoal down`"
    assert not (kept.folder / "cluster.json").exists()
    again = shoal_cli("down", env=kept.env)
    assert again.returncode == 0 and "no local Ray cluster is up" in again.stdout


def test_the_idle_timeout_stops_the_kept_cluster(kept, tmp_path):
    proc = kept.train(tmp_path / "run", "scaling.keep_alive_s=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pids = {p.pid for p in kept.tree()}
    assert not _gone(pids, 30), "the kept cluster outlived its idle timeout"
    assert not (kept.folder / "cluster.json").exists()


def test_two_runs_at_once_both_finish_each_on_a_cluster_of_its_own(kept, tmp_path):
    (tmp_path / "long").mkdir()
    long = kept.popen(tmp_path / "long" / "run")
    try:
        metrics = tmp_path / "long" / "run" / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text()):
            assert long.poll() is None, long.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "the first run did not start training"
            time.sleep(0.2)
        raylets = kept.raylets()
        second = kept.train(tmp_path / "run2")
        assert second.returncode == 0, second.stderr[-3000:]
        assert "in use or of another kind: this run starts its own" in second.stdout
        assert long.poll() is None  # the first run trains on, on the kept cluster
        assert kept.raylets() == raylets
    finally:
        long.send_signal(signal.SIGTERM)
        out, _ = long.communicate(timeout=60)
    assert long.returncode == 143, out[-2000:]
    assert STARTED in out


def test_the_dashboard_answers_on_loopback_with_the_token_only(kept, tmp_path):
    proc = kept.train(tmp_path / "run", "scaling.dashboard=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = kept.state()
    assert state["dashboard"].startswith("http://127.0.0.1:")
    assert f"Ray dashboard: {state['dashboard']}" in proc.stdout
    assert any("dashboard.py" in " ".join(p.cmdline()) for p in kept.tree())
    url = state["dashboard"] + "/api/version"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code in (401, 403)
    signed = urllib.request.Request(url, headers={"Authorization": f"Bearer {state['token']}"})
    with urllib.request.urlopen(signed, timeout=10) as answer:
        assert answer.status == 200 and "ray_version" in json.loads(answer.read())
