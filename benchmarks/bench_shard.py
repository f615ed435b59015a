"""`shoal shard` against pyarrow reading the same file: rows/s, MB/s and peak RSS at two source sizes.

For each format (CSV, parquet) and size a source of 64 float features plus an integer label is
generated once. Each round runs, alternating which goes first, in fresh processes:
- the baseline: pyarrow alone reads and decodes the whole file (`pyarrow.csv.read_csv` /
  `pyarrow.parquet.read_table`, its multi-threaded readers), what a user would otherwise run;
- `shoal shard FILE OUT` (default options: shuffled, 10% validation, 256 MB of shuffle memory).
The ratio is the baseline's time / shard's time (so >= 0.5 is the goal: at least half pyarrow's rate
while also shuffling and writing shards). Peak RSS is each process's maximum resident set (wait4).

    python benchmarks/bench_shard.py [--sizes 150,1500] [--formats csv,parquet] [--rounds 3] [--work DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from _common import machine, median, table

DIM = 64
BASELINE = {
    "csv": "import pyarrow.csv as c, sys; t = c.read_csv(sys.argv[1]); print(t.num_rows)",
    "parquet": "import pyarrow.parquet as p, sys; t = p.read_table(sys.argv[1]); print(t.num_rows)",
}


def generate(path: Path, fmt: str, megabytes: int) -> int:
    """A source of about this many MB; returns its rows."""
    rng = np.random.default_rng(0)
    names = [f"f{j}" for j in range(DIM)] + ["label"]
    schema = pa.schema([(n, pa.float32()) for n in names[:-1]] + [("label", pa.int32())])
    writer = pa_csv.CSVWriter(str(path), schema) if fmt == "csv" else pq.ParquetWriter(str(path), schema)
    rows = 0
    with writer:
        while not path.exists() or path.stat().st_size < megabytes * 1e6:
            x = np.round(rng.standard_normal((100_000, DIM)), 3).astype(np.float32)
            label = rng.integers(0, 10, len(x), dtype=np.int32)
            writer.write(pa.record_batch([*(pa.array(x[:, j]) for j in range(DIM)), pa.array(label)], schema=schema))
            rows += len(x)
    return rows


# the measured command runs under a small parent: Linux carries a process's peak RSS across exec, so a
# child forked from this (numpy-loaded) process would count its memory too
WRAPPER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "_, s, u = os.wait4(p.pid, 0); print(u.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(s))"
)


def timed(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of a command."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    return wall, int(proc.stdout.split()[-1]) / 1024


def measure(source: Path, fmt: str, out: Path, rounds: int) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {"base_s": [], "base_rss": [], "shard_s": [], "shard_rss": []}
    for r in range(rounds):
        order = ["base", "shard"] if r % 2 == 0 else ["shard", "base"]
        for what in order:
            if what == "base":
                wall, rss = timed([sys.executable, "-c", BASELINE[fmt], str(source)])
            else:
                shutil.rmtree(out, ignore_errors=True)
                wall, rss = timed([sys.executable, "-m", "shoal", "shard", str(source), str(out)])
            runs[f"{what}_s"].append(wall)
            runs[f"{what}_rss"].append(rss)
    shutil.rmtree(out, ignore_errors=True)
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="150,1500", help="source sizes in MB, comma-separated")
    ap.add_argument("--formats", default="csv,parquet")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", default=None, help="directory for the sources and shards (default: a temporary one)")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_"))
    work.mkdir(parents=True, exist_ok=True)
    rows_out = []
    for fmt in args.formats.split(","):
        for mb in map(int, args.sizes.split(",")):
            source = work / f"source-{mb}.{fmt}"
            rows = generate(source, fmt, mb) if not source.exists() else pq_or_csv_rows(source, fmt)
            size = source.stat().st_size / 1e6
            runs = measure(source, fmt, work / "out", args.rounds)
            base, shard = median(runs["base_s"]), median(runs["shard_s"])
            ratios = [b / s for b, s in zip(runs["base_s"], runs["shard_s"])]
            rows_out.append(
                [
                    fmt,
                    f"{size:,.0f} MB, {rows:,} rows",
                    f"{rows / shard:,.0f} rows/s, {size / shard:.1f} MB/s",
                    f"{rows / base:,.0f} rows/s, {size / base:.1f} MB/s",
                    f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
                    f"{max(runs['shard_rss']):,.0f} MiB",
                    f"{max(runs['base_rss']):,.0f} MiB",
                ]
            )
            print(
                table(
                    ["format", "source", "shoal shard", "pyarrow read", "ratio", "shard peak RSS", "pyarrow peak RSS"],
                    rows_out[-1:],
                ),
                flush=True,
            )
    print(f"\n{machine()}, {args.rounds} rounds, medians\n")
    print(
        table(
            ["format", "source", "shoal shard", "pyarrow read", "ratio", "shard peak RSS", "pyarrow peak RSS"], rows_out
        )
    )


def pq_or_csv_rows(source: Path, fmt: str) -> int:
    """Rows of a source generated by an earlier run (kept with --work)."""
    if fmt == "parquet":
        return pq.ParquetFile(source).metadata.num_rows
    with open(source, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1


if __name__ == "__main__":
    main()
