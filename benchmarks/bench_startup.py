"""Time from typing the command to the end of the first optimizer step, and where it goes.

On the quickstart job (2 workers), rounds alternate so all see the same machine:
- `shoal train`, first run: no local cluster is up (`shoal down` before it), so it starts the one it keeps
  up for the next run (scaling.keep_alive_s, the default);
- `shoal train`, next run: joins the cluster the first run left up;
- `shoal train scaling.keep_alive_s=0`: an embedded cluster of its own, stopped with the run;
- `torchrun --standalone --nproc_per_node=2 -m shoal worker`.
The first step's end is the wall-clock `time` of the first record in metrics.jsonl (log.every=1). The
breakdown comes from the run's startup.json: the driver's stages (imports and checks, the cluster ready,
placing the group, starting the ranks) and rank 0's (actor ready, torch imported, process group, job built,
first step), as seconds since the command started. The kept cluster lives in a state folder of this
script's own (SHOAL_STATE_DIR) and is stopped at the end.

    python benchmarks/bench_startup.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, median, table

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
COMMON = ["train.max_steps=20", "log.every=1", "log.progress=none"]
FIRST, NEXT, OWN, TORCHRUN = (
    "shoal train, first run (starts the kept cluster)",
    "shoal train, next run (joins it)",
    "shoal train, scaling.keep_alive_s=0 (a cluster of its own)",
    "torchrun -m shoal worker",
)
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


def commands(r: int, tmp: Path) -> dict[str, tuple[list[str], Path]]:
    """Round r's commands and their run directories, in the order they run."""
    shoal_bin = str(Path(sys.executable).with_name("shoal"))
    torchrun_bin = str(Path(sys.executable).with_name("torchrun"))
    dirs = {name: tmp / f"{i}-{r}" for i, name in enumerate((FIRST, NEXT, OWN, TORCHRUN))}
    train = [shoal_bin, "train", str(QUICKSTART), *COMMON]
    return {
        FIRST: ([*train, f"run.dir={dirs[FIRST]}"], dirs[FIRST]),
        NEXT: ([*train, f"run.dir={dirs[NEXT]}"], dirs[NEXT]),
        OWN: ([*train, f"run.dir={dirs[OWN]}", "scaling.keep_alive_s=0"], dirs[OWN]),
        TORCHRUN: (
            [torchrun_bin, "--standalone", "--nproc_per_node=2", "-m", "shoal", "worker", str(QUICKSTART), *COMMON]
            + [f"run.dir={dirs[TORCHRUN]}"],
            dirs[TORCHRUN],
        ),
    }


def shoal_down() -> None:
    subprocess.run([str(Path(sys.executable).with_name("shoal")), "down"], capture_output=True, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    results: dict[str, list[tuple[float, float, dict[str, float]]]] = {n: [] for n in (FIRST, NEXT, OWN, TORCHRUN)}
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    os.environ["SHOAL_STATE_DIR"] = str(tmp / "state")  # never the user's kept cluster
    os.environ.pop("RAY_ADDRESS", None)
    loads = [os.getloadavg()[0]]
    try:
        for r in range(args.rounds):
            shoal_down()  # the first run finds no cluster up
            for name, (cmd, run_dir) in commands(r, tmp).items():
                results[name].append(run(cmd, run_dir))
            loads.append(os.getloadavg()[0])
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1][0]:.2f} s" for k, v in results.items()), flush=True)
    finally:
        shoal_down()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, loads)


def report(results: dict[str, list[tuple[float, float, dict[str, float]]]], loads: list[float]) -> None:
    print(f"\nquickstart, 2 workers; {machine()}; 1-minute load average {min(loads):.2f}-{max(loads):.2f}")
    rows = [[k, median([a for a, _, _ in v]), median([b for _, b, _ in v])] for k, v in results.items()]
    print(table(["command", "to first step (s, median)", "whole run (s, median)"], rows))
    torchrun = rows[-1][1]
    print("\n" + "; ".join(f"{name} / torchrun: {first / torchrun:.2f}" for name, first, _ in rows[:-1]))
    for name in (FIRST, NEXT):
        print(f"\nwhere '{name}' goes (seconds since the command started, median):")
        stage_rows = []
        for stage in STAGES:
            values = [s[stage] for _, _, s in results[name] if stage in s]
            if values:
                stage_rows.append([stage, median(values)])
        print(table(["stage", "s"], stage_rows))


if __name__ == "__main__":
    main()
