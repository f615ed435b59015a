"""AllReduce against the asynchronous parameter server on the same 2 workers.

For a small model (the quickstart MLP on digits) and a large, communication-bound one (MLP
784-1024-1024-10 on synthetic data), with and without a straggler (worker 1 sleeps
--straggle seconds per step: the model of straggler.py): samples/s, and seconds of training to a
target validation loss.
Each configuration runs `shoal compare` on a time budget; the embedded Ray cluster is shared.

    python benchmarks/bench_ps.py [--seconds 40] [--straggle 0.05]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from _common import machine, table

REPO = Path(__file__).resolve().parents[1]

MODELS = {  # (overrides, model sizes for the straggler's MLP)
    "small (digits MLP 64-128-128-10)": ([], {"in_features": 64, "classes": 10, "width": 128}),
    "large (MLP 784-1024-1024-10)": (
        [
            "data.dataset=synthetic",
            "data.num_samples=40000",
            "data.input_shape=[784]",
            "model.width=1024",
            "data.batch_size=64",
            "optim.name=sgd",
            "optim.lr=0.02",
            "optim.momentum=0.9",
            "schedule.name=constant",
        ],
        {"in_features": 784, "classes": 10, "width": 1024},
    ),
}


def time_to_val(records: list[dict], target: float) -> float | None:
    for r in records:
        if isinstance(r.get("val_loss"), float) and r["val_loss"] <= target:
            return r.get("elapsed_s")
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--straggle", type=float, default=0.05)
    args = p.parse_args()
    from shoal.cluster import connect
    from shoal.compare import run_both
    from shoal.config import load_config
    from shoal.metrics import read_metrics

    rows = []
    cluster = None
    with tempfile.TemporaryDirectory(prefix="shoal-bench-ps-") as tmp:
        for model, (overrides, sizes) in MODELS.items():
            for straggle in (0.0, args.straggle):
                kwargs = json.dumps({**sizes, "rank": 1, "delay_s": straggle})
                extra = ["model.target=straggler:slow_mlp", f"model.kwargs={kwargs}"] if straggle else []
                run_dir = Path(tmp) / f"run-{len(rows)}"
                cfg = load_config(
                    REPO / "configs" / "quickstart.yaml",
                    [
                        *overrides,
                        *extra,
                        f"run.dir={run_dir}",
                        "log.progress=none",
                        "log.tensorboard=false",
                        "train.eval_every=25",
                        "train.eval_batches=10",
                        "checkpoint.at_end=false",
                    ],
                )
                if cluster is None:
                    cluster = connect(cfg.scaling.address)
                report = run_both(cfg, f"{args.seconds}s")
                curves = {s: read_metrics(run_dir / "compare" / s) for s in ("allreduce", "async_ps")}
                finals = [
                    min((r["val_loss"] for r in c if isinstance(r.get("val_loss"), float)), default=float("nan"))
                    for c in curves.values()
                ]
                target = max(finals) * 1.05
                for s, c in curves.items():
                    row = report["strategies"][s]
                    rows.append(
                        [model, f"{straggle:g}", s, row["samples_per_s"], time_to_val(c, target), row["staleness_mean"]]
                    )
                print(json.dumps(rows[-2:]), flush=True)
    if cluster is not None:
        cluster.close()
    print(f"\n2 workers x 1 CPU, {args.seconds:g} s budget per run; target = worse best val_loss x 1.05; {machine()}")
    print(
        table(["model", "straggler delay s", "strategy", "samples/s", "s to target val_loss", "staleness mean"], rows)
    )


if __name__ == "__main__":
    main()
