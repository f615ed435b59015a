"""Time and peak memory of `shoal check` on 200,000 and 2,000,000 samples in shards, default sample size, and the
time its label-noise estimate (5-fold confident learning on the sample) adds.

Each size is checked in its own process (`python -m shoal check`); peak memory is that process's maximum
resident set. The streaming pass reads every sample (statistics, NaN, labels, duplicates, leakage), so its
time grows with the data; memory should not (blocks are read one at a time; the hashes are bounded by
check.max_hashes).

    python benchmarks/bench_check.py [--sizes 200000,2000000] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine, table

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "large-synthetic.yaml"


def shard(out: Path, n: int) -> None:
    if (out / "manifest.json").exists():
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "shoal",
            "shard",
            "synthetic",
            str(out),
            "--num-samples",
            str(n),
            "--input-shape",
            "32",
            "--num-classes",
            "10",
            "--bytes-per-shard",
            "64MB",
            "--val-fraction",
            "0.005",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def check(path: Path, out: Path) -> tuple[float, float, dict]:
    code = (
        "import resource, runpy, sys; sys.argv = ['shoal', 'check', sys.argv[1], 'data.path=' + sys.argv[2], "
        "'--out', sys.argv[3]];\n"
        "try:\n    runpy.run_module('shoal', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code, str(CONFIG), str(path), str(out)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    peak_kb = int(next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("PEAK")))
    return seconds, peak_kb / 1024, json.loads((out / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="200000,2000000")
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="shoal-bench-check-"))
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        data = work / f"synthetic-{n}"
        shard(data, n)
        seconds, peak_mb, report = check(data, work / f"check-{n}")
        nums = report["numbers"]
        rows.append(
            [
                f"{n:,}",
                round(seconds, 1),
                round(nums["scan_seconds"], 1),
                round(nums.get("label_noise", {}).get("seconds", 0.0), 1),
                round(peak_mb),
                report["problems"],
                f"{nums['train_samples'] / nums['scan_seconds']:,.0f}",
            ]
        )
        print(rows[-1], flush=True)
    print(f"\n{machine()}; `shoal check configs/large-synthetic.yaml`, default check.sample_size\n")
    print(
        table(
            [
                "samples",
                "check s (process)",
                "streaming pass s",
                "label noise s",
                "peak RSS MB",
                "problems",
                "samples/s scanned",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
