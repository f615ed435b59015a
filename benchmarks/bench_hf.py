"""Shoal against the Hugging Face Trainer on the same GPT-2: tokens per second, alternated, medians of rounds.

Needs `pip install accelerate` (the Trainer's own dependency) beside transformers.

Data: real text (Python's standard library sources, 3 MB, as bench_peer_lm.py), a byte-level BPE of 2,048
tokens trained on it by `shoal tokenizer train`, sharded once by `shoal shard --tokenizer --seq-len 64`
(packed lm blocks: x = 64 ids, y = the next 64). Model: GPT-2 from a config, 4 layers, 4 heads, width 128,
n_positions 64, no dropout; batch 12; AdamW lr 1e-3, betas (0.9, 0.95), weight decay 0.1 on the matrices
(the Trainer decays all but biases and LayerNorm weights: the same set for GPT-2), gradients clipped at 1.0,
cosine schedule to zero after 50 warmup steps; both sides' AdamW is torch's fused one (the Trainer's default
`adamw_torch_fused`, Shoal's `optim.implementation: auto` on CPU).

- `hf`: the Trainer a user runs, `Trainer(model=AutoModelForCausalLM.from_config(GPT2Config(...)),
  args=TrainingArguments(...), train_dataset=ds)` on CPU, `ds` a torch Dataset of {input_ids, labels} over the
  shards' train blocks (their x) held in memory, labels = input_ids as run_clm.py makes them (the model
  shifts: 63 targets per block, against Shoal's 64; the forward is over the same 64 positions);
- `worker`: `shoal worker job.json` (one process, no Ray), `model.output: loss` (the model's own loss, Shoal
  passes labels and shift_labels);
- `train1`: `shoal train job.json`, embedded Ray cluster, 1 worker with both CPUs (cpus_per_worker 2);
- `worker-logits`: `shoal worker` without model.output (Shoal's cross-entropy on the logits).

Shoal's job keeps every other setting at its default (health probes, metrics, checkpoints) as a user runs
it; the Trainer its own (no logging integrations, no saving, no progress bar: `log.progress: none` on Shoal's
side). Both sides run torch's default threads outside Ray (2 here) and 2 under Ray. Each run is its own
process; the order rotates every round. Tokens/s is measured from step `--warmup` to the last step (Shoal:
the `time` of its metrics records; the Trainer: time.time() at on_step_end of a TrainerCallback, at the same
steps). The final loss is the mean of the logged training losses over the last 100 steps (both log every
10), per target: transformers 5.24's Trainer divides GPT-2's summed loss by the unshifted label count (64 a
block, for 63 targets), so its logged loss is 63/64 of the mean and is scaled back here (hf_trainer.py's
loss_scale, printed). Known differences: the Trainer's warmup starts at lr 0 (LambdaLR counts from 0; Shoal's
first step runs at lr/50) and its gradients are 63/64 of the mean's (the same miscount; AdamW is nearly
scale-free), its GPT2Config keeps use_cache (Shoal's from a mapping sets it off), and its shuffle is its own.

    python benchmarks/bench_hf.py [--rounds 5] [--steps 400] [--modes hf,worker,train1,worker-logits]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import bench_peer_lm
from bench_peer_lm import alternate, corpus, rate, report
from hf_trainer import BATCH, BETAS, CLIP, GPT2, LOG_EVERY, LR, SEQ, VOCAB, WARMUP_LR, WD

from _common import machine

HERE = Path(__file__).resolve().parent
assert (BATCH, SEQ) == (bench_peer_lm.BATCH, bench_peer_lm.SEQ)  # rate() counts bench_peer_lm's tokens per step
MODES = "hf,worker,train1,worker-logits"


def data(work: Path) -> tuple[Path, Path]:
    """(shard directory, .npy of its train blocks' input ids): the text tokenised and sharded once."""
    import numpy as np

    text, _ = corpus(work)
    tok, shards = work / "tok.json", work / "shards"
    for command in (
        ["tokenizer", "train", str(text), "--vocab-size", str(VOCAB), "--out", str(tok)],
        ["shard", str(text), str(shards), "--tokenizer", str(tok), "--seq-len", str(SEQ)],
    ):
        subprocess.run([sys.executable, "-m", "shoal", *command], check=True, capture_output=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    field = manifest["fields"]["x"]
    blocks = []
    for entry in manifest["splits"]["train"]["shards"]:
        with tarfile.open(shards / entry["name"]) as tar:
            for member in tar:
                if member.name.endswith(".x.bin"):
                    raw = tar.extractfile(member).read()
                    blocks.append(np.frombuffer(raw, dtype=field["dtype"]).reshape(-1, *field["shape"]))
    ids = np.concatenate(blocks).astype(np.int64)
    assert len(ids) == manifest["splits"]["train"]["samples"], (len(ids), manifest["splits"]["train"])
    np.save(work / "blocks.npy", ids)
    return shards, work / "blocks.npy"


def job_json(mode: str, shards: Path, steps: int, seed: int, run_dir: Path) -> Path:
    """Shoal's job: the same model, optimizer, clipping and schedule; defaults for the rest."""
    model = {
        "target": "transformers:AutoModelForCausalLM.from_config",
        "kwargs": {"config": {"model_type": "gpt2", **GPT2}},
    }
    if mode != "worker-logits":
        model["output"] = "loss"
    job = {
        "seed": seed,
        "data": {"format": "shards", "path": str(shards), "batch_size": BATCH},
        "model": model,
        "optim": {"name": "adamw", "lr": LR, "betas": list(BETAS), "weight_decay": WD},
        "schedule": {"name": "cosine", "warmup_steps": WARMUP_LR, "min_lr_ratio": 0.0},
        "train": {"max_steps": steps, "clip_grad_norm": CLIP, "eval_every": 0},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "log": {"progress": "none", "every": LOG_EVERY},
        "run": {"dir": str(run_dir)},
    }
    path = run_dir.parent / f"{run_dir.name}.json"  # JSON is YAML
    path.write_text(json.dumps(job))
    return path


def shoal(mode: str, shards: Path, steps: int, seed: int, work: Path) -> tuple[list, list]:
    """(clock at each metrics record as (step, time), logged losses as (step, loss)) of one Shoal run."""
    run_dir = work / f"{mode}-{seed}"
    job = job_json(mode, shards, steps, seed, run_dir)
    command = ["train" if mode == "train1" else "worker", str(job)]
    proc = subprocess.run([sys.executable, "-m", "shoal", *command], cwd=HERE, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"shoal {' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["time"]) for r in records], [(r["step"], r["loss"]) for r in records if "loss" in r]


def final_loss(losses: list[tuple[int, float]], steps: int) -> float:
    """Mean of the logged training losses over the last 100 steps (or the last one logged)."""
    tail = [loss for step, loss in losses if step > steps - 100] or [losses[-1][1]]
    return sum(tail) / len(tail)


def trainer(blocks: Path, steps: int, seed: int, work: Path) -> tuple[list, list]:
    """(clock at each step's end as (step, time), logged losses per target as (step, loss)) of one Trainer run."""
    out = work / f"hf-{seed}.json"
    cmd = [str(HERE / "hf_trainer.py"), str(blocks), "--steps", str(steps), "--seed", str(seed), "--out", str(out)]
    proc = subprocess.run([sys.executable, *cmd], cwd=HERE, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"the Trainer failed:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    scale = result["loss_scale"]
    if seed == 0:
        print(f"hf: {result['threads']} torch threads, {result['optim']}, loss_scale {scale:.4f}", flush=True)
    return [tuple(m) for m in result["marks"]], [(s, loss * scale) for s, loss in result["losses"]]


def one(mode: str, args: argparse.Namespace, seed: int, work: Path, shards: Path, blocks: Path) -> tuple[float, float]:
    """(tokens/s, final loss) of one run of `mode`."""
    if mode == "hf":
        marks, losses = trainer(blocks, args.steps, seed, work)
    else:
        marks, losses = shoal(mode, shards, args.steps, seed, work)
    return rate(marks, args.warmup, args.steps), final_loss(losses, args.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=100, help="steps left out of the rate (start-up, first steps)")
    p.add_argument("--modes", default=MODES)
    args = p.parse_args()
    modes = args.modes.split(",")
    if "hf" in modes and not all(importlib.util.find_spec(m) for m in ("transformers", "accelerate")):
        sys.exit("the hf mode needs transformers and accelerate: pip install transformers accelerate")
    if unknown := set(modes) - set(MODES.split(",")):
        sys.exit(f"--modes: {sorted(unknown)} unknown; modes are {MODES}")
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        shards, blocks = data(work)
        results = alternate(modes, args.rounds, lambda mode, r: one(mode, args, r, work, shards, blocks))
    title = f"GPT-2 4x4x128, vocab {VOCAB}, {BATCH}x{SEQ} tokens/step, {args.steps} steps; {machine()}"
    report(results, modes, "hf" if "hf" in modes else modes[0], title)
    losses = {m: sum(loss for _, loss in results[m]) / len(results[m]) for m in modes}
    if max(losses.values()) - min(losses.values()) > 0.1:
        print(f"final losses differ by more than 0.1: {losses}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
