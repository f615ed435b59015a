"""`shoal shard` against pyarrow reading the same file: rows/s, MB/s and peak RSS at two source sizes.

For each format (CSV, parquet) and size a source of 64 float features plus an integer label is
generated once. Each round runs, alternating which goes first, in fresh processes:
- the baselines: pyarrow alone reads and decodes the whole file, into one table (`read_csv` /
  `read_table`, its multi-threaded readers) and as a stream of batches (`open_csv` /
  `ParquetFile.iter_batches`, what bounded memory allows), what a user would otherwise run;
- `shoal shard FILE OUT` (default options: shuffled, 10% validation, 256 MB of shuffle memory).
The ratio is the faster baseline's wall time / shard's per round (and the same of CPU seconds, steadier
on a shared machine) (>= 0.5 is the goal: at least half
pyarrow's rate while also shuffling and writing shards). Peak RSS is each process's maximum resident
set (wait4, under a small parent).

With --workers 1,2 it measures instead `shoal shard FILE OUT --workers N` for each N on the same file,
alternating which N goes first each round: rows/s (median) and the speed-up over the first N (the
median of the per-round ratios). On a machine of C cores the speed-up is at most about C, less what the
driver's planning, the spawned processes' start (about a second) and the shared disk take.

    python benchmarks/bench_shard.py [--sizes 150,1500] [--formats csv,parquet] [--rounds 3] [--work DIR]
    python benchmarks/bench_shard.py --workers 1,2 [--sizes 150] [--formats csv,parquet] [--rounds 5]

`--tokens` measures text instead: `shoal shard SOURCE OUT --tokenizer T` tokens/s against the same
tokenizer's `encode_batch` on the same text (read in batches of about 4 MB, its ids taken, what a
user's own loop runs) with the same threads (RAYON_NUM_THREADS, TOKENIZERS_PARALLELISM=true, set
for both), alternated, medians (>= 0.8 is the goal). The source is generated (sentences of a
10,000-word vocabulary) as one text file (one document, cut at line ends) and as a parquet text
column (a document a row), and a byte-level BPE of --vocab-size is trained on its first MB by
`shoal tokenizer train`.

    python benchmarks/bench_shard.py --tokens [--sizes 30] [--formats txt,parquet] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
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
BASELINES = {  # (format, kind) -> pyarrow reading and decoding the whole file, as a user would
    ("csv", "table"): "import pyarrow.csv as c, sys; print(c.read_csv(sys.argv[1]).num_rows)",
    ("csv", "stream"): "import pyarrow.csv as c, sys; print(sum(b.num_rows for b in c.open_csv(sys.argv[1])))",
    ("parquet", "table"): "import pyarrow.parquet as p, sys; print(p.read_table(sys.argv[1]).num_rows)",
    ("parquet", "stream"): (
        "import pyarrow.parquet as p, sys; print(sum(b.num_rows for b in p.ParquetFile(sys.argv[1]).iter_batches()))"
    ),
}
KINDS = ("table", "stream", "shard")


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
    "_, s, u = os.wait4(p.pid, 0); print(u.ru_maxrss, u.ru_utime + u.ru_stime); sys.exit(os.waitstatus_to_exitcode(s))"
)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, float, float]:
    """(wall seconds, peak RSS in MiB, CPU seconds) of a command (these variables set for it)."""
    start = time.perf_counter()
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, env=full_env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
    rss, cpu = proc.stdout.split()[-2:]
    return wall, int(rss) / 1024, float(cpu)


def measure(source: Path, fmt: str, out: Path, rounds: int) -> dict[str, list[float]]:
    runs: dict[str, list[float]] = {f"{k}_{m}": [] for k in KINDS for m in ("s", "rss", "cpu")}
    for r in range(rounds):
        for kind in KINDS[r % 3 :] + KINDS[: r % 3]:  # each goes first in turn
            if kind == "shard":
                shutil.rmtree(out, ignore_errors=True)
                wall, rss, cpu = timed([sys.executable, "-m", "shoal", "shard", str(source), str(out)])
            else:
                wall, rss, cpu = timed([sys.executable, "-c", BASELINES[(fmt, kind)], str(source)])
            for m, v in (("s", wall), ("rss", rss), ("cpu", cpu)):
                runs[f"{kind}_{m}"].append(v)
    shutil.rmtree(out, ignore_errors=True)
    return runs


def measure_workers(source: Path, out: Path, rounds: int, workers: list[int]) -> dict[int, list[float]]:
    """Wall seconds of `shoal shard --workers N` per round, for each N, each going first in turn."""
    runs: dict[int, list[float]] = {w: [] for w in workers}
    for r in range(rounds):
        for w in workers[r % len(workers) :] + workers[: r % len(workers)]:
            shutil.rmtree(out, ignore_errors=True)
            wall, _, _ = timed([sys.executable, "-m", "shoal", "shard", str(source), str(out), "--workers", str(w)])
            runs[w].append(wall)
    shutil.rmtree(out, ignore_errors=True)
    return runs


def workers_row(fmt: str, size: float, rows: int, runs: dict[int, list[float]]) -> list[str]:
    """rows/s for each N, and each N's speed-up over the first (median of the rounds' ratios)."""
    first, *rest = runs
    rates = [f"{rows / median(runs[w]):,.0f} rows/s" for w in runs]
    speedups = [f"{median([a / b for a, b in zip(runs[first], runs[w])]):.2f}x" for w in rest]
    return [fmt, f"{size:,.0f} MB, {rows:,} rows", *rates, *speedups]


def row(fmt: str, size: float, rows: int, runs: dict[str, list[float]]) -> list[str]:
    """The table row of one source: rates, the ratio against the faster baseline, peaks."""
    best = [min(t, s) for t, s in zip(runs["table_s"], runs["stream_s"])]
    ratios = [b / s for b, s in zip(best, runs["shard_s"])]
    cpu = [min(t, s) / c for t, s, c in zip(runs["table_cpu"], runs["stream_cpu"], runs["shard_cpu"])]

    def rate(kind: str) -> str:
        t = median(runs[f"{kind}_s"])
        cpu_s = median(runs[f"{kind}_cpu"])
        return f"{rows / t:,.0f} rows/s, {size / t:.1f} MB/s, {cpu_s:.1f} CPU s, {max(runs[f'{kind}_rss']):,.0f} MiB"

    return [
        fmt,
        f"{size:,.0f} MB, {rows:,} rows",
        rate("shard"),
        rate("table"),
        rate("stream"),
        f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
        f"{median(cpu):.2f}",
    ]


HEADERS = [
    "format",
    "source",
    "shoal shard (rate, CPU, peak RSS)",
    "pyarrow table",
    "pyarrow stream",
    "wall-time ratio",
    "CPU-time ratio",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=None, help="source sizes in MB, comma-separated (default 150,1500; 30 text)")
    ap.add_argument("--formats", default=None, help="default csv,parquet (txt,parquet with --tokens)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", default=None, help="e.g. 1,2: compare `shoal shard --workers N` instead")
    ap.add_argument("--work", default=None, help="directory for the sources and shards (default: a temporary one)")
    ap.add_argument("--tokens", action="store_true", help="text through a tokenizer against its encode_batch")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="--tokens: the tokenizer's threads")
    ap.add_argument("--vocab-size", type=int, default=8192, help="--tokens: the BPE's vocabulary")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.tokens:
        tokens_main(args, work)
        return
    args.sizes, args.formats = args.sizes or "150,1500", args.formats or "csv,parquet"
    workers = [int(w) for w in args.workers.split(",")] if args.workers else None
    headers = HEADERS if workers is None else ["format", "source", *(f"--workers {w}" for w in workers)]
    headers += [f"speed-up {w} vs {workers[0]}" for w in workers[1:]] if workers else []
    rows_out = []
    for fmt in args.formats.split(","):
        for mb in map(int, args.sizes.split(",")):
            source = work / f"source-{mb}.{fmt}"
            rows = generate(source, fmt, mb) if not source.exists() else pq_or_csv_rows(source, fmt)
            size = source.stat().st_size / 1e6
            if workers:
                rows_out.append(
                    workers_row(fmt, size, rows, measure_workers(source, work / "out", args.rounds, workers))
                )
            else:
                rows_out.append(row(fmt, size, rows, measure(source, fmt, work / "out", args.rounds)))
            print(table(headers, rows_out[-1:]), flush=True)
    print(f"\n{machine()}, {args.rounds} rounds, medians\n")
    print(table(headers, rows_out))


# ---------------------------------------------------------------- --tokens

# the user's loop: the text in batches of about 4 MB through encode_batch, every id taken
ENCODE_BATCH = {
    "txt": (
        "import sys; from tokenizers import Tokenizer; t = Tokenizer.from_file(sys.argv[2]); n = 0\n"
        "with open(sys.argv[1]) as f:\n"
        "    while lines := f.readlines(4 << 20):\n"
        "        n += sum(len(e.ids) for e in t.encode_batch(lines, add_special_tokens=False))\n"
        "print(n)"
    ),
    "parquet": (
        "import sys, pyarrow.parquet as pq; from tokenizers import Tokenizer; t = Tokenizer.from_file(sys.argv[2])\n"
        "n = 0\n"
        "for b in pq.ParquetFile(sys.argv[1]).iter_batches(columns=['text']):\n"
        "    n += sum(len(e.ids) for e in t.encode_batch(b.column(0).to_pylist(), add_special_tokens=False))\n"
        "print(n)"
    ),
}
TOKEN_KINDS = ("encode_batch", "shard")


def text_source(path: Path, fmt: str, megabytes: int) -> None:
    """Generated sentences over a 10,000-word vocabulary (Zipf-distributed), as a text file or a parquet
    text column of documents of 20-200 lines."""
    rng = np.random.default_rng(0)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(10_000)]
    weights = 1 / np.arange(1, len(words) + 1)
    weights /= weights.sum()
    docs, size = [], 0
    while size < megabytes * 1e6:
        lengths = rng.integers(4, 20, size=int(rng.integers(20, 200)))
        ids = iter(rng.choice(len(words), size=int(lengths.sum()), p=weights).tolist())
        lines = (" ".join(words[next(ids)] for _ in range(k)).capitalize() + "." for k in lengths)
        docs.append("\n".join(lines) + "\n")
        size += len(docs[-1])
    if fmt == "txt":
        path.write_text("".join(docs))
    else:
        pq.write_table(pa.table({"text": docs}), path, row_group_size=256)


def token_run(kind: str, fmt: str, source: Path, tok: Path, out: Path, env: dict) -> tuple[float, float, float]:
    if kind == "shard":
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "shoal", "shard", str(source), str(out), "--tokenizer", str(tok)]
        cmd += ["--seq-len", "1024"]
    else:
        cmd = [sys.executable, "-c", ENCODE_BATCH[fmt], str(source), str(tok)]
    return timed(cmd, env)


def token_count(fmt: str, source: Path, tok: Path, env: dict) -> int:
    out = subprocess.run(
        [sys.executable, "-c", ENCODE_BATCH[fmt], str(source), str(tok)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(out.stdout.split()[-1])


def tokens_main(args: argparse.Namespace, work: Path) -> None:
    env = {"RAYON_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "true"}
    headers = ["source", "shoal shard --tokenizer", "encode_batch", "wall-time ratio", "CPU-time ratio"]
    out_rows = []
    for fmt in (args.formats or "txt,parquet").split(","):
        for mb in map(int, (args.sizes or "30").split(",")):
            source = work / f"text-{mb}.{fmt}"
            if not source.exists():
                text_source(source, fmt, mb)
            tok = work / f"tok-{mb}.json"
            if not tok.exists():
                sample = work / "sample.txt"
                sample.write_text(_first_mb(source, fmt))
                cmd = ["tokenizer", "train", str(sample), "--vocab-size", str(args.vocab_size), "--out", str(tok)]
                subprocess.run([sys.executable, "-m", "shoal", *cmd], check=True, capture_output=True)
            n = token_count(fmt, source, tok, env)
            runs: dict[str, list[float]] = {f"{k}_{m}": [] for k in TOKEN_KINDS for m in ("s", "rss", "cpu")}
            for r in range(args.rounds):
                for kind in TOKEN_KINDS[r % 2 :] + TOKEN_KINDS[: r % 2]:
                    for m, v in zip(("s", "rss", "cpu"), token_run(kind, fmt, source, tok, work / "out", env)):
                        runs[f"{kind}_{m}"].append(v)
            out_rows.append(_token_row(fmt, source, n, runs))
            print(table(headers, out_rows[-1:]), flush=True)
    print(f"\n{machine()}, {args.threads} tokenizer threads, {args.rounds} rounds, medians\n")
    print(table(headers, out_rows))


def _first_mb(source: Path, fmt: str) -> str:
    if fmt == "txt":
        with open(source) as f:
            return f.read(1 << 20)
    return "".join(pq.ParquetFile(source).read_row_group(0).column("text").to_pylist())[: 1 << 20]


def _token_row(fmt: str, source: Path, n: int, runs: dict[str, list[float]]) -> list[str]:
    ratios = [b / s for b, s in zip(runs["encode_batch_s"], runs["shard_s"])]
    cpu = [b / s for b, s in zip(runs["encode_batch_cpu"], runs["shard_cpu"])]

    def rate(kind: str) -> str:
        t = median(runs[f"{kind}_s"])
        return f"{n / t:,.0f} tokens/s, {median(runs[f'{kind}_cpu']):.1f} CPU s, {max(runs[f'{kind}_rss']):,.0f} MiB"

    return [
        f"{fmt}, {source.stat().st_size / 1e6:,.0f} MB, {n:,} tokens",
        rate("shard"),
        rate("encode_batch"),
        f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})",
        f"{median(cpu):.2f}",
    ]


def pq_or_csv_rows(source: Path, fmt: str) -> int:
    """Rows of a source generated by an earlier run (kept with --work)."""
    if fmt == "parquet":
        return pq.ParquetFile(source).metadata.num_rows
    with open(source, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 24), b"")) - 1


if __name__ == "__main__":
    main()
