"""What training through Ray costs: `shoal train` (2 ranks as Ray actors on the local cluster it keeps up)
against `torchrun --standalone --nproc_per_node=2 -m shoal worker` on the same small language model (synthetic
tokens, transformer_lm), in alternating rounds.

Two figures: tokens/s (the summary's samples/s x seq_len; the median of the per-round ratios), and the CPU
that Ray's own processes (the GCS, the raylet, its agents, the log monitor: every process of the kept
cluster but the ranks) take while the ranks train, as a share of the whole machine, read with psutil
from the first logged step to the last. The kept cluster lives in a state folder of this script's own
(SHOAL_STATE_DIR) and is stopped at the end.

    python benchmarks/bench_ray.py [--rounds 5] [--steps 400]
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

import psutil

from _common import machine, median, table

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SEQ = 64
JOB = [
    "data.dataset=synthetic",
    "data.task=lm",
    "data.vocab_size=256",
    f"data.seq_len={SEQ}",
    "data.num_samples=20000",
    "data.batch_size=8",
    "model.name=transformer_lm",
    "model.width=128",
    "model.depth=2",
    "model.heads=4",
    "train.eval_every=0",
    "log.every=10",
    "log.progress=none",
    "log.tensorboard=false",
    "checkpoint.at_end=false",
]


def ray_cpu_seconds(state_dir: Path) -> float:
    """CPU seconds so far of the kept cluster's processes, the ranks (rank actors) left out."""
    state = json.loads((state_dir / "cluster.json").read_text())
    keeper = psutil.Process(state["pid"])
    total = 0.0
    for p in [keeper, *keeper.children(recursive=True)]:
        try:
            if "RankActor" in p.name() or any("RankActor" in c for c in p.cmdline()):
                continue
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            continue
    return total


def train_on_ray(run_dir: Path, steps: int, state_dir: Path) -> tuple[float, float]:
    """(tokens/s, Ray's share of the machine's CPU while the ranks trained)."""
    shoal = str(Path(sys.executable).with_name("shoal"))
    cmd = [shoal, "train", str(QUICKSTART), *JOB, f"train.max_steps={steps}", f"run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO)
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    first = (time.monotonic(), ray_cpu_seconds(state_dir))
    last = first
    while proc.poll() is None:
        if (run_dir / "summary.json").exists():
            break
        last = (time.monotonic(), ray_cpu_seconds(state_dir))
        time.sleep(0.25)
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err[-3000:]}")
    share = (last[1] - first[1]) / max(last[0] - first[0], 1e-9) / (os.cpu_count() or 1)
    return tokens_per_s(run_dir), share


def train_with_torchrun(run_dir: Path, steps: int) -> float:
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "shoal", "worker", str(QUICKSTART), *JOB]
    proc = subprocess.run([*cmd, f"train.max_steps={steps}", f"run.dir={run_dir}"], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"torchrun failed:\n{proc.stderr[-3000:]}")
    return tokens_per_s(run_dir)


def tokens_per_s(run_dir: Path) -> float:
    return json.loads((run_dir / "summary.json").read_text())["samples_per_s"] * SEQ


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="shoal-bench-"))
    state_dir = tmp / "state"
    os.environ["SHOAL_STATE_DIR"] = str(state_dir)
    os.environ.pop("RAY_ADDRESS", None)
    shoal = str(Path(sys.executable).with_name("shoal"))
    rows, ratios, shares = [], [], []
    try:
        train_on_ray(tmp / "warm", 20, state_dir)  # starts the kept cluster: every timed run joins it
        for r in range(args.rounds):
            order = ["ray", "torchrun"] if r % 2 == 0 else ["torchrun", "ray"]
            got: dict[str, float] = {}
            for which in order:
                if which == "ray":
                    got["ray"], share = train_on_ray(tmp / f"ray-{r}", args.steps, state_dir)
                    shares.append(share)
                else:
                    got["torchrun"] = train_with_torchrun(tmp / f"tr-{r}", args.steps)
            ratios.append(got["ray"] / got["torchrun"])
            rows.append([r + 1, got["ray"], got["torchrun"], ratios[-1], 100 * shares[-1]])
            print(f"round {r + 1}: ray {got['ray']:,.0f} tok/s, torchrun {got['torchrun']:,.0f} tok/s", flush=True)
    finally:
        subprocess.run([shoal, "down"], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\ntransformer_lm 128 x 2, 2 ranks x 8 x {SEQ} tokens per step, {args.steps} steps; {machine()}")
    print(table(["round", "shoal train tok/s", "torchrun tok/s", "ratio", "Ray CPU % of machine"], rows))
    print(f"\nshoal train / torchrun tokens/s: {median(ratios):.3f} (median of {len(ratios)})")
    print(f"Ray's processes while training: {100 * median(shares):.2f}% of the machine's CPU (median)")


if __name__ == "__main__":
    main()
