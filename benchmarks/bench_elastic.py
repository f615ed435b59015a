"""Elastic training: how long from a rank's death to the next step on fewer ranks, the steps lost, and what
the memory snapshots cost per step.

Recovery: `shoal train` with 2 ranks and scaling.min_workers=1 on the local cluster it keeps up; once the
run has logged `--kill-at` steps, one rank's process (a RankActor under the kept cluster) is SIGKILLed
from here; the figure is the time from that signal to the first step completed at world size 1 (the
resize record in metrics.jsonl), and its steps lost. The run is then stopped (SIGTERM: it saves and ends).

Snapshot cost: one process trains the job with checkpoint.memory_every off, 1, and unset on an elastic
job (auto: the fewest steps between snapshots within 3% of the step), in alternating rounds; the
figure is the median step time with snapshots over the median without.

For the quickstart (MLP on digits) and `transformer_lm` (128 wide, 4 blocks, 16 x 64 tokens).

    python benchmarks/bench_elastic.py [--rounds 5] [--kill-at 30]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from shoal.metrics import read_metrics

from _common import machine, median, table

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
JOBS = {
    "quickstart": [],
    "transformer_lm": [
        "data.dataset=synthetic",
        "data.task=lm",
        "data.vocab_size=256",
        "data.seq_len=64",
        "data.num_samples=20000",
        "data.batch_size=16",
        "model.name=transformer_lm",
        "model.width=128",
        "model.depth=4",
        "model.heads=4",
    ],
}
QUIET = ["train.eval_every=0", "log.progress=none", "log.tensorboard=false", "checkpoint.at_end=false"]
ELASTIC = ["scaling.min_workers=1", "scaling.max_failures=3"]


def rank_processes(state_dir: Path) -> list[psutil.Process]:
    """The rank actors of the cluster this script keeps up (only processes it started)."""
    keeper = psutil.Process(json.loads((state_dir / "cluster.json").read_text())["pid"])
    out = []
    for p in keeper.children(recursive=True):
        try:
            if "RankActor" in p.name() or any("RankActor" in c for c in p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


def wait_for(check, proc: subprocess.Popen, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        if proc.poll() is not None:
            sys.exit(f"the run ended before {what}:\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    sys.exit(f"no {what} within {timeout_s:g}s")


def recovery(job: str, run_dir: Path, state_dir: Path, kill_at: int) -> dict:
    """Kill one of 2 ranks once `kill_at` steps are logged; (seconds to the next step at world 1, steps lost, ...)."""
    shoal = str(Path(sys.executable).with_name("shoal"))
    sets = [*JOBS[job], *QUIET, *ELASTIC, "train.max_steps=1000000", "log.every=1", f"run.dir={run_dir}"]
    proc = subprocess.Popen(
        [shoal, "train", str(QUICKSTART), *sets], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        wait_for(lambda: any(r.get("step", 0) >= kill_at for r in read_metrics(run_dir)), proc, 300, f"step {kill_at}")
        victim = max(rank_processes(state_dir), key=lambda p: p.pid)
        killed = time.time()
        victim.send_signal(signal.SIGKILL)
        found = wait_for(
            lambda: [r for r in read_metrics(run_dir) if r.get("event") == "resize"], proc, 120, "resize record"
        )[0]
    finally:
        proc.send_signal(signal.SIGTERM)  # a stop: every rank finishes its step and ends
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {**found, "from_kill_s": found["time"] - killed}


def step_time(job: str, run_dir: Path, memory: str) -> float:
    """Mean seconds per step of one process training the job (memory: off, 1 or auto), past the first fifth (and
    auto's calibration): a mean, since with auto only every k-th step holds a snapshot."""
    import torch

    from shoal.config import load_config
    from shoal.dist import WorldInfo
    from shoal.engine import train
    from shoal.job import build_job
    from shoal.snapshot import AUTO

    torch.set_num_threads(1)
    steps = 400 if job == "quickstart" else 60
    sets = [*JOBS[job], *QUIET, f"train.max_steps={steps}", "log.every=1", f"run.dir={run_dir}"]
    sets += ["scaling.num_workers=1"] + ([] if memory == "off" else ["checkpoint.memory_every=1"])
    job_ = build_job(load_config(QUICKSTART, sets), WorldInfo(), torch.device("cpu"), run_dir)
    if memory == "auto":  # the cadence an elastic job gets with checkpoint.memory_every unset
        job_.snapshots.every = AUTO
    marks: list[float] = []
    train(job_, lambda record: marks.append(time.perf_counter()))
    first = steps // 5
    return (marks[-1] - marks[first]) / (len(marks) - 1 - first)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--kill-at", type=int, default=30)
    p.add_argument("--skip-recovery", action="store_true")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    state_dir = tmp / "state"
    os.environ["SHOAL_STATE_DIR"] = str(state_dir)
    os.environ.pop("RAY_ADDRESS", None)
    shoal = str(Path(sys.executable).with_name("shoal"))
    rec: dict[str, list[dict]] = {job: [] for job in JOBS}
    cost: dict[tuple[str, str], list[float]] = {(job, m): [] for job in JOBS for m in ("off", "1", "auto")}
    try:
        for r in range(args.rounds):
            for job in JOBS if r % 2 == 0 else reversed(list(JOBS)):
                if not args.skip_recovery:
                    got = recovery(job, tmp / f"{job}-kill-{r}", state_dir, args.kill_at)
                    rec[job].append(got)
                    print(
                        f"round {r + 1} {job}: recovered {got['from_kill_s']:.2f} s after the kill "
                        f"(printed {got['recovery_s']} s), {got['steps_lost']} step(s) lost, from {got['resumed_from']}",
                        flush=True,
                    )
                for memory in ("off", "1", "auto") if r % 2 == 0 else ("auto", "1", "off"):
                    cost[(job, memory)].append(step_time(job, tmp / f"{job}-{memory}-{r}", memory))
                off = cost[(job, "off")][-1]
                print(
                    f"round {r + 1} {job}: step {off * 1e3:.3f} ms; with snapshots every step "
                    f"{cost[(job, '1')][-1] / off:.3f}x, auto {cost[(job, 'auto')][-1] / off:.3f}x",
                    flush=True,
                )
    finally:
        subprocess.run([shoal, "down"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report(rec, cost, args)


def report(rec: dict[str, list[dict]], cost: dict[tuple[str, str], list[float]], args: argparse.Namespace) -> None:
    print(f"\n{args.rounds} rounds, alternated; {machine()}")
    rows = []
    for job in JOBS:
        off = median(cost[(job, "off")])
        every, auto = median(cost[(job, "1")]) / off - 1, median(cost[(job, "auto")]) / off - 1
        kill = median([g["from_kill_s"] for g in rec[job]]) if rec[job] else float("nan")
        lost = max((g["steps_lost"] for g in rec[job]), default=float("nan"))
        rows.append([job, kill, lost, off * 1e3, 100 * every, 100 * auto])
    heads = ["job", "kill -> next step s (goal <= 5)", "steps lost (max)", "step ms", "snapshot every step %", "auto %"]
    print(table(heads, rows))


if __name__ == "__main__":
    main()
