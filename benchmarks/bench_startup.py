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
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, median, table
from conftest import start_ray_head, stop_ray_node  # the tests' own `ray start --head` helper

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    shoal_bin = str(Path(sys.executable).with_name("shoal"))
    torchrun_bin = str(Path(sys.executable).with_name("torchrun"))
    results: dict[str, list[tuple[float, float]]] = {
        "shoal train (embedded Ray)": [], "shoal train (running Ray cluster)": [], "torchrun -m shoal worker": []}
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    (tmp / "ray").mkdir()
    head, cluster = start_ray_head(str(tmp / "ray"), num_cpus=2, env={"RAY_AUTH_MODE": "token"})  # as launch/ray_head.sh starts one
    address = cluster.gcs
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
        stop_ray_node(head)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nquickstart, 2 workers; {machine()}")
    rows = [[k, median([a for a, _ in v]), median([b for _, b in v])] for k, v in results.items()]
    print(table(["command", "to first step (s, median)", "whole run (s, median)"], rows))


if __name__ == "__main__":
    main()
