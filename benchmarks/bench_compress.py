"""The compress report's size and latency table for the quickstart MLP and a small transformer_lm, each
trained here first (one process), then `shoal compress --sparsity 0.5,0.9 --quantize dynamic`.

    python benchmarks/bench_compress.py [--work DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from shoal.compress import Options, run
from shoal.config import load_config
from shoal.worker import run_worker

from _common import machine

JOBS = {
    "quickstart MLP": [],
    "transformer_lm": [
        "data.dataset=synthetic",
        "data.task=lm",
        "data.vocab_size=64",
        "data.seq_len=32",
        "data.num_samples=4000",
        "model.name=transformer_lm",
        "model.width=128",
        "model.depth=2",
        "model.tie_embeddings=false",
        "train.max_steps=300",
    ],
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="shoal-bench-compress-"))
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    print(machine())
    for name, overrides in JOBS.items():
        run_dir = work / name.split()[0]
        run_worker(
            load_config(
                config,
                [*overrides, f"run.dir={run_dir}", "log.tensorboard=false", "log.progress=none", "run.overwrite=true"],
            )
        )
        report = run(
            run_dir, run_dir / "compress", Options(sparsities=[0.5, 0.9], quantize="dynamic"), say=lambda line: None
        )
        print(f"\n### {name}\n")
        print((run_dir / "compress" / "report.md").read_text().split("\n\n")[2])
        del report


if __name__ == "__main__":
    main()
