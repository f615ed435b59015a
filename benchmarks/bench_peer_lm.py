"""Shoal against the loop a user writes for a small GPT: tokens per second, alternated, medians of rounds.

The model is benchmarks/peer_gpt.py (nanoGPT's shape: 4 layers, 4 heads, width 128, 64-token blocks,
tied embeddings), plain PyTorch. The plain loop is what small-GPT scripts run and nothing else: random
64-token windows from an in-memory uint16 array (torch.from_numpy), forward, cross-entropy, backward,
clip_grad_norm_(1.0), AdamW (weight decay on matrices only), a cosine schedule with warmup; batch 12.
Shoal trains the same class (`model.target: peer_gpt:GPT`) on the same text written once as packed
shards by `shoal shard`, with the same optimizer, clipping and schedule, and every other setting at its
default (health probes, metrics, checkpoints) as a user runs it:

- `shoal worker job.yaml`: one process, no Ray;
- `shoal train job.yaml`, embedded Ray cluster, 1 worker with both CPUs (threads_per_worker 2);
- `shoal train job.yaml`, 2 workers of 1 CPU each, 6 samples per rank (the same 12 per step).

Each runs in its own process; the order rotates every round. Tokens/s is measured from the step `--warmup`
to the last step (Shoal: the `time` of its metrics records; the plain loop: its own clock at the same steps).
`--set KEY=VALUE` (repeatable) changes Shoal's job, e.g. `--set optim.implementation=for_loop`.

    python benchmarks/bench_peer_lm.py [--rounds 5] [--steps 600] [--modes plain,worker,train1,train2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from _common import machine, median, table

HERE = Path(__file__).resolve().parent
BATCH, SEQ, LR, WARMUP_LR, MIN_LR_RATIO, WD, BETAS = 12, 64, 1e-3, 50, 0.1, 0.1, (0.9, 0.95)


def corpus(out: Path, size: int = 3_000_000) -> tuple[Path, Path]:
    """Real text (Python's standard library sources), as nanoGPT's prepare step leaves it: train.bin and
    val.bin of uint16 token ids (bytes here), and the same text as a file for `shoal shard`."""
    import numpy as np

    chunks, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        chunks.append(f.read_bytes())
        total += len(chunks[-1])
        if total >= size:
            break
    text = b"".join(chunks)[:size]
    (out / "corpus.txt").write_bytes(text)
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    ids.tofile(out / "train.bin")
    return out / "corpus.txt", out / "train.bin"


def lr_at(step: int, steps: int) -> float:
    """Linear warmup, then cosine to MIN_LR_RATIO (nanoGPT's get_lr; step is 1-based)."""
    if step <= WARMUP_LR:
        return LR * step / WARMUP_LR
    progress = (step - WARMUP_LR) / max(1, steps - WARMUP_LR)
    return LR * (MIN_LR_RATIO + (1 - MIN_LR_RATIO) * 0.5 * (1 + math.cos(math.pi * progress)))


def plain(bin_path: Path, steps: int, seed: int, out: Path) -> None:
    """The user's loop (runs in its own process: `--plain`). Writes the clock at every step."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from peer_gpt import GPT

    torch.manual_seed(seed)
    data = np.fromfile(bin_path, dtype=np.uint16)
    model = GPT()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WD}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS)
    marks, tail = [], torch.zeros(())
    for step in range(1, steps + 1):
        ix = torch.randint(len(data) - SEQ - 1, (BATCH,))
        x = torch.stack([torch.from_numpy(data[i : i + SEQ].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1 : i + 1 + SEQ].astype(np.int64)) for i in ix])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > steps - 100:
            tail += loss.detach()
        marks.append(time.time())
    out.write_text(json.dumps({"marks": marks, "tail_loss": float(tail) / min(100, steps)}))


def job_yaml(shards: Path, steps: int, seed: int, run_dir: Path, workers: int) -> Path:
    """Shoal's job: the same model, optimizer, clipping and schedule; defaults for the rest."""
    job = {
        "seed": seed,
        "data": {"format": "shards", "path": str(shards), "batch_size": BATCH // workers},
        "model": {"target": "peer_gpt:GPT"},
        "optim": {"name": "adamw", "lr": LR, "betas": list(BETAS), "weight_decay": WD},
        "schedule": {"name": "cosine", "warmup_steps": WARMUP_LR, "min_lr_ratio": MIN_LR_RATIO},
        "train": {"max_steps": steps, "clip_grad_norm": 1.0, "eval_every": 0},
        "scaling": {"num_workers": workers, "cpus_per_worker": 2 // workers},
        "log": {"progress": "none"},
        "run": {"dir": str(run_dir)},
    }
    path = run_dir.parent / f"{run_dir.name}.json"  # JSON is YAML
    path.write_text(json.dumps(job))
    return path


def shoal(mode: str, shards: Path, steps: int, seed: int, work: Path, sets: list[str]) -> tuple[list, float]:
    """(clock at each metrics record as (step, time), last logged loss) of one Shoal run in its own process."""
    run_dir = work / f"{mode}-{seed}"
    workers = 2 if mode == "train2" else 1
    job = job_yaml(shards, steps, seed, run_dir, workers)
    command = ["worker" if mode == "worker" else "train", str(job), *sets]  # Shoal's own KEY=VALUE overrides
    proc = subprocess.run([sys.executable, "-m", "shoal", *command], cwd=HERE, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"shoal {' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    marks = [(r["step"], r["time"]) for r in records]
    return marks, [r["loss"] for r in records if "loss" in r][-1]


def rate(marks: list[tuple[int, float]], warmup: int, steps: int) -> float:
    """Tokens/s between the first mark at or after `warmup` and the last one before the last step (whose
    record Shoal writes after the end-of-run evaluation)."""
    points = [(s, t) for s, t in marks if warmup <= s < steps]
    (s0, t0), (s1, t1) = points[0], points[-1]
    return (s1 - s0) * BATCH * SEQ / (t1 - t0)


def one(
    mode: str, args: argparse.Namespace, seed: int, work: Path, shards: Path, bin_path: Path
) -> tuple[float, float]:
    if mode == "plain":
        out = work / f"plain-{seed}.json"
        cmd = [sys.executable, __file__, "--plain", str(bin_path), "--steps", str(args.steps), "--seed", str(seed)]
        subprocess.run([*cmd, "--out", str(out)], cwd=HERE, check=True)
        result = json.loads(out.read_text())
        return rate(list(enumerate(result["marks"], start=1)), args.warmup, args.steps), result["tail_loss"]
    marks, loss = shoal(mode, shards, args.steps, seed, work, args.set)
    return rate(marks, args.warmup, args.steps), loss


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--warmup", type=int, default=100, help="steps left out of the rate (start-up, first steps)")
    p.add_argument("--modes", default="plain,worker,train1,train2")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a change to Shoal's job")
    p.add_argument("--plain", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain:
        return plain(args.plain, args.steps, args.seed, args.out)
    modes = args.modes.split(",")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        text, bin_path = corpus(work)
        shards = work / "shards"
        subprocess.run(
            [sys.executable, "-m", "shoal", "shard", str(text), str(shards), "--seq-len", str(SEQ)],
            check=True,
            capture_output=True,
        )
        results = alternate(modes, args.rounds, lambda mode, r: one(mode, args, r, work, shards, bin_path))
    title = f"small GPT 4x4x128, {BATCH}x{SEQ} tokens/step, {args.steps} steps, {args.set or 'defaults'}; {machine()}"
    report(results, modes, "plain" if "plain" in modes else modes[0], title)


Results = dict[str, list[tuple[float, float]]]  # mode -> per round (tokens/s, final loss)


def alternate(modes: list[str], rounds: int, run: Callable[[str, int], tuple[float, float]]) -> Results:
    """run(mode, round) for every mode in every round, the order rotated each round; a line per round."""
    results: Results = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes[r % len(modes) :] + modes[: r % len(modes)]:
            results[mode].append(run(mode, r))
        line = ", ".join(f"{m} {results[m][-1][0]:,.0f}" for m in modes)
        print(f"round {r + 1}: tokens/s {line}", flush=True)
    return results


def report(results: Results, modes: list[str], base: str, title: str) -> None:
    """Per mode: median tokens/s, its ratio to `base` per round (median, range) and the mean final loss."""
    rows = []
    for m in modes:
        ratios = [a[0] / b[0] for a, b in zip(results[m], results[base])]
        rows.append(
            [
                m,
                f"{median([t for t, _ in results[m]]):,.0f}",
                f"{median(ratios):.3f}",
                f"{min(ratios):.2f}-{max(ratios):.2f}",
                f"{sum(loss for _, loss in results[m]) / len(results[m]):.3f}",
            ]
        )
    print(f"\n{title}")
    print(table(["mode", "tokens/s (median)", f"/ {base} (median of rounds)", "rounds", "final loss (mean)"], rows))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
