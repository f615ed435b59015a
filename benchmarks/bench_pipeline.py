"""Two pipeline stages against one rank on the same model, as the micro-batches per step grow.

transformer_lm (width 256, 8 layers, untied) on generated tokens, 32 x 64 tokens per step, SGD, one
thread per rank: 1 rank alone, then 2 stages (GPipe) with parallel.microbatches = 1, 2, 4, 8. For each:
samples/s (beside the same two ranks as data parallel, 16 samples each), and the pipeline's measured bubble (share of the step a stage waits, the mean of the two)
against the theory (P-1)/(M+P-1). On 2 cores two stages can at best double one rank's throughput.

    python benchmarks/bench_pipeline.py [--steps 30]
"""

from __future__ import annotations

import argparse
import time

from _common import machine, median, spawn_ranks, table

SHAPE = {
    "data.dataset": "synthetic",
    "data.task": "lm",
    "data.vocab_size": 256,
    "data.seq_len": 64,
    "data.num_samples": 20000,
    "model.name": "transformer_lm",
    "model.width": 256,
    "model.depth": 8,
    "model.heads": 4,
    "model.tie_embeddings": False,
    "data.batch_size": 32,
    "optim.name": "sgd",
    "optim.lr": 0.01,
    "train.eval_every": 0,
    "log.tensorboard": False,
}


def rank(steps: int, stages: int, microbatches: int, schedule: str, batch: int = 32) -> dict:
    import torch

    from shoal import dist
    from shoal.config import JobConfig
    from shoal.dist import WorldInfo
    from shoal.engine import train_step
    from shoal.job import build_job

    cfg = JobConfig().replace(
        {
            **SHAPE,
            "data.batch_size": batch,
            "parallel.pipeline_stages": stages,
            "parallel.microbatches": microbatches,
            "parallel.schedule": schedule,
        }
    )
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 600, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    figures = job.strategy.log_figures or dict  # the data-parallel baseline has no bubble
    times = []
    for i in range(steps):
        if i == 3:
            figures()  # start the bubble's window after warm-up
        t = time.perf_counter()
        train_step(job)
        times.append(time.perf_counter() - t)
    return {"bubble": None, "bubble_theory": None, "step_s": median(times[3:]), **figures()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument(
        "--schedule", default="gpipe", help="gpipe runs with 1 micro-batch too (1f1b needs as many as stages)"
    )
    args = p.parse_args()
    batch = SHAPE["data.batch_size"]
    one = spawn_ranks(rank, 1, args.steps, 1, 1, args.schedule, timeout_s=3600)[0]
    rows = [["1 rank", "-", batch / one["step_s"], 1.0, "-", "-"]]
    print(f"1 rank: {batch / one['step_s']:.1f} samples/s", flush=True)
    # the same two single-thread ranks as data parallel (allreduce, half the batch each): what the cores
    # give without a pipeline, the baseline a pipeline must beat when the model fits on one device
    dp = spawn_ranks(rank, 2, args.steps, 1, 1, args.schedule, batch // 2, timeout_s=3600)[0]
    rows.append(["2 ranks data parallel", "-", batch / dp["step_s"], batch / dp["step_s"] / rows[0][2], "-", "-"])
    print(f"2 ranks data parallel: {batch / dp['step_s']:.1f} samples/s", flush=True)
    for m in (1, 2, 4, 8):
        got = spawn_ranks(rank, 2, args.steps, 2, m, args.schedule, timeout_s=3600)[0]
        speed = batch / got["step_s"]
        rows.append([f"2 stages ({args.schedule})", m, speed, speed / rows[0][2], got["bubble"], got["bubble_theory"]])
        print(
            f"2 stages, {m} micro-batches: {speed:.1f} samples/s, bubble {got['bubble']:.2f} (theory {got['bubble_theory']:.2f})",
            flush=True,
        )
    print(f"\ntransformer_lm 256 x 8 (untied), {batch} x 64 tokens per step, 1 thread per rank; {machine()}")
    print(
        table(["layout", "parallel.microbatches", "samples/s", "vs 1 rank", "bubble measured", "bubble theory"], rows)
    )


if __name__ == "__main__":
    main()
