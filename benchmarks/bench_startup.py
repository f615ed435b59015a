"""Time from typing the command to the end of the first optimizer step, and where it goes.

`shoal train` (embedded Ray cluster, 2 workers), `shoal train` joining a Ray cluster that is already
running (`scaling.address`, started once by this script with `ray start --head`) and
`torchrun --nproc_per_node=2 -m shoal worker`, on the quickstart job; rounds alternate so all see
the same machine. The first step's end is the wall-clock `time` of the first record in
metrics.jsonl (log.every=1). The breakdown comes from the run's startup.json: the driver's stages
(imports and checks, ray.init, placing the group, starting the ranks) and rank 0's (actor ready,
torch imported, process group, job built, first step), as seconds since the command started.

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

from _common import machine, median, start_ray_head, stop_ray_head, table

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
COMMON = ["train.max_steps=20", "log.every=1", "log.progress=none"]
STAGES = [
    "checked",
    "ray_ready",
    "group_placed",
    "ranks_started",
    "rank0:actor_ready",
    "rank0:torch_imported",
    "rank0:process_group",
    "rank0:built",
    "rank0:first_step",
]


def run(cmd: list[str], run_dir: Path) -> tuple[float, float, dict[str, float]]:
    """(seconds to the end of step 1, seconds to process exit, stages since the command started)."""
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    end = time.time()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    stages: dict[str, float] = {}
    trace = run_dir / "startup.json"
    if trace.exists():
        data = json.loads(trace.read_text())
        # seconds since the driver process started, a few ms after `start`
        stages.update(data["driver"])
        stages.update({f"rank0:{k}": v for k, v in data["ranks"].get("0", {}).items()})
    return first["time"] - start, end - start, stages


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    shoal_bin = str(Path(sys.executable).with_name("shoal"))
    torchrun_bin = str(Path(sys.executable).with_name("torchrun"))
    names = ["shoal train (embedded Ray)", "shoal train (running Ray cluster)", "torchrun -m shoal worker"]
    results: dict[str, list[tuple[float, float, dict[str, float]]]] = {n: [] for n in names}
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    (tmp / "ray").mkdir()
    head, address = start_ray_head(tmp / "ray", num_cpus=2)
    try:
        for r in range(args.rounds):
            d1, d2, d3 = tmp / f"ray-{r}", tmp / f"joined-{r}", tmp / f"tr-{r}"
            results[names[0]].append(
                run([shoal_bin, "train", str(QUICKSTART), *COMMON, f"run.dir={d1}", "scaling.address=null"], d1)
            )
            results[names[1]].append(
                run([shoal_bin, "train", str(QUICKSTART), *COMMON, f"run.dir={d2}", f"scaling.address={address}"], d2)
            )
            results[names[2]].append(
                run(
                    [
                        torchrun_bin,
                        "--standalone",
                        "--nproc_per_node=2",
                        "-m",
                        "shoal",
                        "worker",
                        str(QUICKSTART),
                        *COMMON,
                        f"run.dir={d3}",
                    ],
                    d3,
                )
            )
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s" for k, v in results.items()), flush=True)
    finally:
        stop_ray_head(head)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nquickstart, 2 workers; {machine()}")
    rows = [[k, median([a for a, _, _ in v]), median([b for _, b, _ in v])] for k, v in results.items()]
    print(table(["command", "to first step (s, median)", "whole run (s, median)"], rows))
    torchrun = rows[2][1]
    print(f"\nembedded / torchrun: {rows[0][1] / torchrun:.2f}; joined / torchrun: {rows[1][1] / torchrun:.2f}")
    print("\nwhere the embedded run's start-up goes (seconds since the command started, median):")
    stage_rows = []
    for stage in STAGES:
        values = [s[stage] for _, _, s in results[names[0]] if stage in s]
        if values:
            stage_rows.append([stage, median(values)])
    print(table(["stage", "s"], stage_rows))


if __name__ == "__main__":
    main()
