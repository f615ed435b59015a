"""Shoal (1 worker, both cores) against a plain single-process PyTorch loop on a small GPT.

Same model (Shoal's transformer_lm: width 128, 4 layers, 4 heads, tied embeddings, about 0.8M
parameters), the same byte-level text written once as packed shards (`shoal shard`), 12 x 64
tokens per step, AdamW, fp32, CPU. The plain loop has nanoGPT's shape: random rows of the samples
held in memory, forward, cross_entropy, backward, step. Shoal runs as users run it (`shoal worker`
defaults: health probes, metrics, TensorBoard). Round r seeds both with r (initial weights, data
order) and alternates which runs first; the figure is the median of the per-round ratios of
tokens/s, and the validation loss at the end is compared as the mean over the rounds' seeds.

    python benchmarks/bench_lm.py [--rounds 3] [--steps 1000]
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from _common import machine, median, table

BATCH, SEQ, WIDTH, DEPTH, HEADS, LR = 12, 64, 128, 4, 4, 2e-3


def corpus(out: Path, size: int = 3_000_000) -> Path:
    """Byte-level text: Python's own standard library sources, about `size` bytes."""
    chunks, total = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_bytes()
        chunks.append(text)
        total += len(text)
        if total >= size:
            break
    path = out / "corpus.txt"
    path.write_bytes(b"".join(chunks)[:size])
    return path


def config(shards: Path, steps: int, run_dir: Path, seed: int = 0):
    from shoal.config import JobConfig

    return JobConfig().replace(
        {
            "seed": seed,
            "data.format": "shards",
            "data.path": str(shards),
            "data.batch_size": BATCH,
            "model.name": "transformer_lm",
            "model.width": WIDTH,
            "model.depth": DEPTH,
            "model.heads": HEADS,
            "optim.name": "adamw",
            "optim.lr": LR,
            "train.max_steps": steps,
            "train.eval_every": 0,
            "log.progress": "none",
            "run.dir": str(run_dir),
        }
    )


def tokens_per_s(marks: dict[int, float], warmup: int, steps: int) -> float:
    points = sorted(s for s in marks if s >= warmup)
    per_step = median([(marks[b] - marks[a]) / (b - a) for a, b in zip(points, points[1:])])
    return BATCH * SEQ / per_step


def run_shoal(shards: Path, steps: int, warmup: int, run_dir: Path, seed: int = 0) -> tuple[float, float]:
    """(tokens/s, final validation loss) of `shoal worker` in this process (a world of one)."""
    from shoal.worker import run_worker

    marks: dict[int, float] = {}
    summary = run_worker(
        config(shards, steps, run_dir, seed), report=lambda r: marks.setdefault(r["step"], time.perf_counter())
    )
    return tokens_per_s(marks, warmup, steps), summary["val_loss"]


def run_plain(shards: Path, steps: int, warmup: int, seed: int = 0) -> tuple[float, float]:
    """(tokens/s, final validation loss) of a plain loop over the same model and samples."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from shoal.data.shards import open_shards
    from shoal.models import TransformerLM

    cfg = config(shards, steps, Path("unused"))
    train, val = open_shards(cfg.data)
    x_all, y_all, _ = train.get_batch(np.arange(len(train)))
    vx, vy, _ = val.get_batch(np.arange(len(val)))
    torch.manual_seed(seed)
    model = TransformerLM(train.spec.vocab_size, SEQ, cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    marks = {}
    for step in range(1, steps + 1):
        idx = torch.randint(len(x_all), (BATCH,), generator=gen)
        logits = model(x_all[idx])
        loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), y_all[idx].view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # the norm Shoal logs: the same work
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0:
            marks[step] = time.perf_counter()
    model.eval()
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(vx[i : i + 64]).flatten(0, 1), vy[i : i + 64].flatten(), reduction="sum").item()
            for i in range(0, len(vx), 64)
        ]
    return tokens_per_s(marks, warmup, steps), sum(losses) / vy.numel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=100)
    args = p.parse_args()
    from shoal.cli import main as shoal_main

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if (
            shoal_main(
                ["shard", str(corpus(work)), str(work / "shards"), "--seq-len", str(SEQ), "--val-fraction", "0.02"]
            )
            != 0
        ):
            sys.exit("shoal shard failed")
        rows, ratios = [], []
        for r in range(args.rounds):
            run_dir, shards = work / f"run-{r}", work / "shards"
            if r % 2:
                sh, pl = (
                    run_shoal(shards, args.steps, args.warmup, run_dir, r),
                    run_plain(shards, args.steps, args.warmup, r),
                )
            else:
                pl, sh = (
                    run_plain(shards, args.steps, args.warmup, r),
                    run_shoal(shards, args.steps, args.warmup, run_dir, r),
                )
            ratios.append(sh[0] / pl[0])
            rows.append([r + 1, pl[0], sh[0], sh[0] / pl[0], pl[1], sh[1]])
            print(
                f"round {r + 1}: plain {pl[0]:,.0f} tokens/s (val {pl[1]:.3f}), shoal {sh[0]:,.0f} tokens/s (val {sh[1]:.3f}), ratio {sh[0] / pl[0]:.3f}",
                flush=True,
            )
    print(f"\ntransformer_lm {WIDTH}x{DEPTH}, {BATCH}x{SEQ} tokens/step, {args.steps} steps; {machine()}")
    print(
        table(["round", "plain tokens/s", "Shoal tokens/s", "Shoal / plain", "plain val loss", "Shoal val loss"], rows)
    )
    print(
        f"\nmedian ratio Shoal / plain: {median(ratios):.3f}; mean validation loss plain {sum(r[4] for r in rows) / len(rows):.4f}, "
        f"Shoal {sum(r[5] for r in rows) / len(rows):.4f}"
    )


if __name__ == "__main__":
    main()
