"""Time from typing the command to the end of the first optimizer step.

`shoal train` (embedded Ray cluster, 2 workers), `shoal train` joining a Ray cluster that is already
running (`scaling.address`, the cluster started once by this script with `ray start --head`) and
`torchrun --nproc_per_node=2 -m shoal worker`, on the quickstart job; rounds alternate so all see
the same machine. The first step's end is the wall-clock `time` of the first record in
metrics.jsonl (log.every=1).

    python benchmarks/bench_startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, median, table

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
COMMON = ["train.max_steps=20", "log.every=1", "log.progress=none"]


def first_step_s(cmd: list[str], run_dir: Path) -> tuple[float, float]:
    """(seconds to the end of step 1, seconds to process exit)."""
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    end = time.time()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    return first["time"] - start, end - start


def start_head(temp_dir: Path) -> tuple[subprocess.Popen, str]:
    """A Ray head of our own (`ray start --block`, so SIGTERM to it stops exactly its processes)."""
    ports = []
    for _ in range(3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    gcs, agent, client = ports
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen(
        [ray_bin, "start", "--block", "--head", "--disable-usage-stats", f"--port={gcs}", "--num-cpus=2", "--include-dashboard=false",
         f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, "RAY_AUTH_MODE": "token"},  # as launch/ray_head.sh starts one
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", gcs), timeout=1).close()
            time.sleep(3)  # the raylet registers after the GCS opens its port
            return proc, f"127.0.0.1:{gcs}"
        except OSError:
            time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    sys.exit("ray start --head did not open its port within 60 s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    shoal_bin = str(Path(sys.executable).with_name("shoal"))
    torchrun_bin = str(Path(sys.executable).with_name("torchrun"))
    results: dict[str, list[tuple[float, float]]] = {
        "shoal train (embedded Ray)": [], "shoal train (running Ray cluster)": [], "torchrun -m shoal worker": []}
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    head, address = start_head(tmp / "ray")
    try:
        for r in range(args.rounds):
            d1, d2, d3 = tmp / f"ray-{r}", tmp / f"tr-{r}", tmp / f"joined-{r}"
            results["shoal train (embedded Ray)"].append(first_step_s([shoal_bin, "train", str(QUICKSTART), *COMMON, f"run.dir={d1}"], d1))
            results["shoal train (running Ray cluster)"].append(
                first_step_s([shoal_bin, "train", str(QUICKSTART), *COMMON, f"run.dir={d3}", f"scaling.address={address}"], d3)
            )
            results["torchrun -m shoal worker"].append(
                first_step_s([torchrun_bin, "--standalone", "--nproc_per_node=2", "-m", "shoal", "worker", str(QUICKSTART), *COMMON, f"run.dir={d2}"], d2)
            )
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.1f} s" for k, v in results.items()), flush=True)
    finally:
        head.send_signal(signal.SIGTERM)
        head.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nquickstart, 2 workers; {machine()}")
    rows = [[k, median([a for a, _ in v]), median([b for _, b in v])] for k, v in results.items()]
    print(table(["command", "to first step (s, median)", "whole run (s, median)"], rows))


if __name__ == "__main__":
    main()
