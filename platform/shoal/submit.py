"""`shoal submit` and `shoal jobs`: run a job on a remote Ray cluster through Ray's Jobs API.

The job runs the same launcher as `shoal train`, on the cluster: its runtime environment carries
the resolved config (in an environment variable), the user's working directory (their model code)
and optional pip requirements. Ray's Jobs API runs any code it is sent, so clusters use Ray's
token authentication: the token comes from --token-file, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token, and is sent as a bearer token.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from shoal.cluster import jobs_api_address as resolve_address
from shoal.cluster import on_this_machine, read_token
from shoal.config import JobConfig
from shoal.errors import ClusterError

CONFIG_ENV = "SHOAL_JOB_CONFIG"
DEFAULT_EXCLUDES = [".git", ".venv", "runs", "__pycache__", "*.tar", "data"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def client(address: str | None, token_file: str | None = None, timeout_s: float = 5.0) -> Any:
    """A JobSubmissionClient for the cluster, failing within seconds with a clear reason."""
    url = resolve_address(address)
    _check_reachable(url, timeout_s)
    token = read_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    from ray.job_submission import JobSubmissionClient  # kept out of the CLI start-up

    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:  # Ray raises its own AuthenticationError, ConnectionError, RuntimeError
        raise _client_error(url, str(e)) from None


def _check_reachable(url: str, timeout_s: float) -> None:
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (443 if parsed.scheme == "https" else 8265)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ClusterError(
            f"cannot reach the Ray Jobs API at {url} ({e.strerror or e}); is the head node up with its dashboard?"
        ) from None


def _client_error(url: str, text: str) -> ClusterError:
    """What Ray's failure to make a client means: a rejected token, a missing one, or else its first line."""
    if "Invalid authentication token" in text or "Forbidden" in text:
        return ClusterError(f"the cluster at {url} rejected the authentication token (wrong cluster or stale token)")
    if "Missing authentication token" in text or "Unauthorized" in text or "couldn't find" in text.lower():
        return ClusterError(
            f"the cluster at {url} asks for an authentication token and none was found: "
            "pass --token-file, or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (the head node's ~/.ray/auth_token)"
        )
    return ClusterError(f"cannot use the Ray Jobs API at {url}: {text.splitlines()[0]}")


def submit(
    cfg: JobConfig,
    *,
    address: str | None,
    token_file: str | None,
    working_dir: str | None,
    pip: list[str],
    python: str | None,
    wait: bool,
    start_timeout_s: float,
    excludes: list[str],
    resume: bool = False,
) -> int:
    """Submit the job; print its id; follow its logs unless told not to; return an exit status."""
    c = client(address, token_file)
    runtime_env = _runtime_env(cfg, working_dir, DEFAULT_EXCLUDES + list(excludes), pip)
    job_id = _submit_job(c, cfg, address, python, runtime_env, resume)
    print(f"[shoal] submitted job {job_id}", flush=True)
    if not wait:
        print(f"[shoal] follow it with: shoal jobs logs {job_id} --address {resolve_address(address)}", flush=True)
        return 0
    return follow(c, job_id, start_timeout_s)


def _runtime_env(cfg: JobConfig, working_dir: str | None, excludes: list[str], pip: list[str]) -> dict[str, Any]:
    """The job's runtime environment: the working directory (checked for size), the config, pip requirements."""
    workdir = Path(working_dir or os.getcwd()).resolve()
    _check_upload_size(workdir, excludes)
    runtime_env: dict[str, Any] = {
        "working_dir": str(workdir),
        "excludes": excludes,
        "env_vars": {CONFIG_ENV: cfg.to_yaml(), "PYTHONUNBUFFERED": "1"},
    }
    if pip:
        runtime_env["pip"] = list(pip)
    return runtime_env


def _submit_job(
    c: Any, cfg: JobConfig, address: str | None, python: str | None, runtime_env: dict[str, Any], resume: bool
) -> str:
    """Submits `shoal train` of the job's config; returns the job's id."""
    entry_python = python or _default_python(resolve_address(address))
    submission_id = f"shoal-{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        entrypoint = f"{entry_python} -m shoal train env:{CONFIG_ENV}" + (" --resume" if resume else "")
        return c.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
    except Exception as e:  # upload or validation failure from Ray
        raise ClusterError(f"submitting to {resolve_address(address)} failed: {str(e).splitlines()[0]}") from None


def _check_upload_size(workdir: Path, excludes: list[str], limit_mb: float = 100.0) -> None:
    """Refuse before uploading a directory that is far too big to be model code."""
    total = 0
    for root, dirs, files in os.walk(workdir):
        dirs[:] = [d for d in dirs if not any(fnmatch.fnmatch(d, e.rstrip("/")) for e in excludes)]
        for f in files:
            if not any(fnmatch.fnmatch(f, e) for e in excludes):
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except OSError:
                    pass
        if total > limit_mb * 2**20:
            raise ClusterError(
                f"the working directory {workdir} holds more than {limit_mb:g} MB to upload; run from your project "
                "directory, pass --working-dir, or leave data out with --exclude"
            )


def _default_python(url: str) -> str:
    """The interpreter the entrypoint runs: this one for a cluster on this machine, else `python`."""
    return sys.executable if on_this_machine(urlparse(url).hostname or "") else "python"


def follow(c: Any, job_id: str, start_timeout_s: float) -> int:
    """Wait for the job to start (bounded), stream its logs, return 0 on success."""
    status = _started_status(c, job_id, start_timeout_s)
    if status not in TERMINAL:
        asyncio.run(_tail(c, job_id))
    else:
        print(c.get_job_logs(job_id), end="", flush=True)
    for _ in range(50):  # the log stream ends slightly before the status settles
        status = _status(c, job_id)
        if status in TERMINAL:
            break
        time.sleep(0.2)
    info = c.get_job_info(job_id)
    print(
        f"[shoal] job {job_id}: {status}" + (f" ({info.message})" if status != "SUCCEEDED" and info.message else ""),
        flush=True,
    )
    return 0 if status == "SUCCEEDED" else 1


def _status(c: Any, job_id: str) -> str:
    return str(c.get_job_status(job_id)).split(".")[-1]


def _started_status(c: Any, job_id: str, start_timeout_s: float) -> str:
    """The job's first status past PENDING; stops it and raises if that takes longer than start_timeout_s."""
    started = time.monotonic()
    while True:
        status = _status(c, job_id)
        if status != "PENDING":
            return status
        if time.monotonic() - started > start_timeout_s:
            c.stop_job(job_id)
            info = c.get_job_info(job_id)
            raise ClusterError(
                f"job {job_id} did not start within {start_timeout_s:g}s (runtime environment or resources): {info.message or 'no message'}"
            )
        time.sleep(0.5)


async def _tail(c: Any, job_id: str) -> None:
    async for lines in c.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def jobs(action: str, job_id: str | None, address: str | None, token_file: str | None) -> int:
    """shoal jobs list | status ID | logs ID | stop ID."""
    c = client(address, token_file)
    if action == "list":
        for j in sorted(c.list_jobs(), key=lambda j: j.start_time or 0):
            print(f"{j.submission_id or j.job_id}\t{str(j.status).split('.')[-1]}\t{j.entrypoint}")
        return 0
    if job_id is None:
        raise ClusterError(f"shoal jobs {action} needs a job id")
    try:
        _job_action(c, action, job_id)
    except RuntimeError as e:
        raise ClusterError(f"job {job_id}: {str(e).splitlines()[0]}") from None
    return 0


def _job_action(c: Any, action: str, job_id: str) -> None:
    """status, logs or stop of one job, printed."""
    if action == "status":
        info = c.get_job_info(job_id)
        print(f"{job_id}\t{str(info.status).split('.')[-1]}\t{info.message or ''}")
    elif action == "logs":
        print(c.get_job_logs(job_id), end="")
    elif action == "stop":
        stopped = c.stop_job(job_id)
        print(f"{job_id}\t{'stop requested' if stopped else 'already finished'}")
