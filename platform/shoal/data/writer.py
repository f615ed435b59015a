"""`shoal shard SOURCE OUT_DIR`: write a data set as webdataset tar shards plus manifest.json.

Sources: a .npz file (arrays x and y), a folder of images in class subfolders, a CSV or JSONL
file, a text file (byte tokens cut into fixed-length blocks for a language model), or a built-in
data set (digits, synthetic). Samples are shuffled with a seed, split into train and validation,
and packed `block_size` to a tar key (see shards.py). The manifest is written last: a directory
without one was not finished.
"""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import Progress

from shoal import __version__
from shoal.config import DataConfig
from shoal.data.locate import MANIFEST, PACKED
from shoal.errors import ConfigError, DataError


@dataclass
class Table:
    """A whole source: fetch(idx) -> (x, y) arrays, plus what the manifest says about it."""

    n: int
    fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    task: str
    num_classes: int = 0
    vocab_size: int = 0
    x_scale: float | None = None
    extra: dict[str, Any] | None = None


@dataclass
class ShardOptions:
    samples_per_shard: int | None = 10_000
    bytes_per_shard: int | None = None
    block_size: int = 64
    shuffle: bool = True
    seed: int = 0
    val_fraction: float = 0.1
    overwrite: bool = False


def write_shards(table: Table, out_dir: Path, opts: ShardOptions, source: str, progress: bool = True) -> dict[str, Any]:
    """Shuffle, split and write the table; returns the manifest."""
    _prepare_out_dir(out_dir, opts)
    order = (
        np.random.Generator(np.random.PCG64([opts.seed, 0x5A2D])).permutation(table.n)
        if opts.shuffle
        else np.arange(table.n)
    )
    x0, y0 = table.fetch(order[:1])
    manifest = _manifest(table, opts, source, _fields(table, x0, y0))
    per_shard = _samples_per_shard(opts, x0[0].nbytes + y0[0].nbytes)
    bar = _Progress(table.n, progress)
    for split, ids in _splits(order, opts).items():
        if len(ids):
            shards = _write_split(table, out_dir, split, ids, per_shard, opts.block_size, bar)
            manifest["splits"][split] = {"samples": int(len(ids)), "shards": shards}
    bar.close()
    _write_manifest(out_dir, manifest)
    return manifest


def _write_manifest(out_dir: Path, manifest: dict[str, Any]) -> None:
    """Written last and renamed into place: a directory without one was not finished."""
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    tmp.replace(out_dir / MANIFEST)


def _prepare_out_dir(out_dir: Path, opts: ShardOptions) -> None:
    if opts.block_size < 1:
        raise ConfigError("--block-size must be >= 1")
    if (out_dir / MANIFEST).exists() and not opts.overwrite:
        raise DataError(f"{out_dir}: already holds shards ({MANIFEST}); pass --overwrite to replace them")
    out_dir.mkdir(parents=True, exist_ok=True)


def _splits(order: np.ndarray, opts: ShardOptions) -> dict[str, np.ndarray]:
    """The sample order cut into train and validation ids."""
    n = len(order)
    n_val = int(round(n * opts.val_fraction))
    return {
        "train": order[n_val:] if opts.shuffle else order[: n - n_val],
        "val": order[:n_val] if opts.shuffle else order[n - n_val :],
    }


def _fields(table: Table, x0: np.ndarray, y0: np.ndarray) -> dict[str, Any]:
    """The manifest's dtype and shape of x and y, from a first sample."""
    return {
        "x": {
            "dtype": x0.dtype.str,
            "shape": list(x0.shape[1:]),
            **({"scale": table.x_scale} if table.x_scale else {}),
        },
        "y": {"dtype": y0.dtype.str, "shape": list(y0.shape[1:])},
    }


def _manifest(table: Table, opts: ShardOptions, source: str, fields: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its splits, which write_shards fills in as it writes them."""
    return {
        "format": PACKED,
        "source": source,
        "task": table.task,
        "num_classes": table.num_classes or None,
        "vocab_size": table.vocab_size or None,
        "block_size": opts.block_size,
        "fields": fields,
        "seed": opts.seed,
        "shuffled": opts.shuffle,
        "shoal_version": __version__,
        "splits": {},
        **(table.extra or {}),
    }


def _write_split(
    table: Table, out_dir: Path, split: str, ids: np.ndarray, per_shard: int, block_size: int, bar: _Progress
) -> list[dict[str, Any]]:
    """Writes one split's shards; returns their manifest entries."""
    shards = []
    for s, start in enumerate(range(0, len(ids), per_shard)):
        name = f"{split}-{s:06d}.tar"
        chunk = ids[start : start + per_shard]
        _write_shard(table, out_dir / name, chunk, start, block_size, bar)
        shards.append({"name": name, "samples": int(len(chunk))})
    return shards


def _write_shard(table: Table, path: Path, chunk: np.ndarray, start: int, block_size: int, bar: _Progress) -> None:
    import webdataset as wds  # loads torch: not at `shoal shard`'s start-up

    with wds.TarWriter(str(path)) as sink:
        for b in range(0, len(chunk), block_size):
            x, y = table.fetch(chunk[b : b + block_size])
            sink.write(
                {
                    "__key__": f"{start + b:012d}",
                    "x.bin": np.ascontiguousarray(x).tobytes(),
                    "y.bin": np.ascontiguousarray(y).tobytes(),
                }
            )
            bar.advance(len(x))


def _samples_per_shard(opts: ShardOptions, per_sample: int) -> int:
    if opts.bytes_per_shard:
        samples = max(1, opts.bytes_per_shard // per_sample)
    else:
        samples = opts.samples_per_shard or 10_000
    return max(opts.block_size, samples // opts.block_size * opts.block_size)


class _Progress:
    """A bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        self.last = time.monotonic()
        if enabled and sys.stdout.isatty():
            self.bar = Progress()
            self.bar.start()
            self.task = self.bar.add_task("writing shards", total=total)

    def advance(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.done)
        elif self.enabled and time.monotonic() - self.last > 5:
            print(f"[shoal] wrote {self.done:,}/{self.total:,} samples", flush=True)
            self.last = time.monotonic()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled:
            print(f"[shoal] wrote {self.done:,}/{self.total:,} samples", flush=True)


# ---------------------------------------------------------------- sources


def load_source(
    source: str,
    *,
    num_samples: int = 100_000,
    input_shape: list[int] | None = None,
    num_classes: int = 10,
    task: str | None = None,
    seq_len: int = 64,
    label_column: str | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
) -> Table:
    """The table for SOURCE: digits, synthetic, or a .npz, .csv, .jsonl, text file or image folder."""
    if source == "digits":
        return _digits()
    if source == "synthetic":
        return _synthetic(num_samples, input_shape or [32], num_classes, task or "classification", seq_len, seed)
    return _file(source, task, seq_len, label_column, image_size)


def _digits() -> Table:
    from shoal.data.memory import digits_arrays  # torch, as webdataset in _write_shard

    x, y = digits_arrays()
    return _arrays(x, y, "classification", 10)


def _file(source: str, task: str | None, seq_len: int, label_column: str | None, image_size: Any) -> Table:
    """The table of a file or image folder, by its suffix."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory (or built-in data set: digits, synthetic)")
    if path.is_dir():
        return _images(path, image_size)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path, task)
    if suffix == ".csv":
        return _csv(path, label_column, task)
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl(path, task)
    if suffix in TEXT_SUFFIXES:
        return _text(path, seq_len)
    raise DataError(f"{path}: {suffix or 'this'} files are not a source `shoal shard` reads; it accepts {ACCEPTED}")


TEXT_SUFFIXES = ("", ".txt", ".text", ".md", ".rst")
ACCEPTED = (
    "digits, synthetic, a .npz (arrays x and y), .csv, .jsonl or .ndjson file, a UTF-8 text file "
    f"({', '.join(s or 'no suffix' for s in TEXT_SUFFIXES)}), or a folder of class subfolders of images"
)


def _arrays(x: np.ndarray, y: np.ndarray, task: str, num_classes: int = 0, source: str = "", **kw: Any) -> Table:
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples, y has {len(y)}")
    if task == "classification" and len(y) and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(
            f"{source}: sample {i} has label {int(y[i])}; class labels must be integers 0, 1, ..., C-1 (remap them before sharding)"
        )
    return Table(n=len(x), fetch=lambda idx: (x[idx], y[idx]), task=task, num_classes=num_classes, **kw)


def _infer_task(y: np.ndarray, task: str | None) -> tuple[str, int]:
    if task:
        return task, int(y.max()) + 1 if task == "classification" else 0
    if np.issubdtype(y.dtype, np.integer) or (y.ndim == 1 and np.all(np.mod(y, 1) == 0)):
        return "classification", int(y.max()) + 1
    return "regression", 0


def _labels(y: np.ndarray, task: str) -> np.ndarray:
    return y.astype(np.int64) if task == "classification" else y.astype(np.float32)


def _npz(path: Path, task: str | None) -> Table:
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise DataError(f"{path}: a .npz source needs arrays 'x' and 'y' (has {sorted(data.files)})")
        x, y = data["x"], data["y"]
    task, classes = _infer_task(y, task)
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    return _arrays(
        x, _labels(y, task), task, classes, source=str(path), x_scale=1 / 255 if x.dtype == np.uint8 else None
    )


def _csv(path: Path, label_column: str | None, task: str | None) -> Table:
    header, rows = _csv_rows(path)
    col = _label_index(path, header, len(rows[0]), label_column)
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as e:
        raise DataError(f"{path}: every value must be a number ({e})") from None
    y = table[:, col]
    x = np.delete(table, col, axis=1).astype(np.float32)
    task, classes = _infer_task(y, task)
    return _arrays(x, _labels(y, task), task, classes, source=str(path))


def _csv_rows(path: Path) -> tuple[list[str] | None, list[list[str]]]:
    """(header or None when the first row is all numbers, data rows)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise DataError(f"{path}: empty CSV")
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        return rows[0], rows[1:]
    return None, rows


def _label_index(path: Path, header: list[str] | None, width: int, label_column: str | None) -> int:
    """The label's column: --label-column by name or index, else the last."""
    if label_column is None:
        return width - 1
    col = (
        header.index(label_column)
        if header and label_column in header
        else int(label_column)
        if label_column.lstrip("-").isdigit()
        else -2
    )
    if col == -2:
        raise DataError(f"{path}: no column {label_column!r} (columns: {header})")
    return col


def _jsonl(path: Path, task: str | None) -> Table:
    xs, ys = [], []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                xs.append(obj["x"])
                ys.append(obj["y"])
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{i}: each line must be a JSON object with 'x' and 'y' ({e})") from None
    y = np.array(ys)
    task, classes = _infer_task(y, task)
    return _arrays(np.array(xs, dtype=np.float32), _labels(y, task), task, classes, source=str(path))


def _text(path: Path, seq_len: int) -> Table:
    raw = path.read_bytes()
    _check_text(path, raw)
    data = np.frombuffer(raw, dtype=np.uint8)
    n = (len(data) - 1) // seq_len
    if n < 1:
        raise DataError(f"{path}: {len(data)} bytes of text make no block of {seq_len + 1} tokens (lower --seq-len)")

    def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = idx[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
        seq = data[rows]
        return seq[:, :-1], seq[:, 1:]

    return Table(n=n, fetch=fetch, task="lm", vocab_size=256, extra={"tokenizer": "bytes"})


def _check_text(path: Path, raw: bytes) -> None:
    """Text means UTF-8 without NUL bytes: a binary file given by mistake is refused, not trained on as bytes."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path}: holds a NUL byte at offset {nul}, so it is binary, not text; {ACCEPTED}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {e.start}); {ACCEPTED}") from None


def _images(path: Path, size: tuple[int, int] | None) -> Table:
    classes, files = _image_files(path)
    with Image.open(files[0][0]) as first:
        mode = "RGB" if first.mode not in ("L", "1") else "L"
        size = size or first.size[::-1]
    load = _image_loader(mode, size)
    labels = np.array([c for _, c in files], dtype=np.int64)

    def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([load(files[i][0]) for i in idx]), labels[idx]

    return Table(
        n=len(files),
        fetch=fetch,
        task="classification",
        num_classes=len(classes),
        x_scale=1 / 255,
        extra={"classes": classes},
    )


def _image_files(path: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (file, class index) per image) of a folder of class subfolders."""
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{path}: an image folder needs one subfolder per class")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((path / name).iterdir()) if f.is_file()]
    if not files:
        raise DataError(f"{path}: no image files in the class subfolders")
    return classes, files


def _image_loader(mode: str, size: Any) -> Callable[[Path], np.ndarray]:
    """Reads an image as a [C, H, W] uint8 array in this colour mode and size."""

    def load(f: Path) -> np.ndarray:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size[::-1] != tuple(size):
                    im = im.resize(size[::-1])
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{f}: not a readable image ({e})") from None
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    return load


def _synthetic(n: int, shape: list[int], classes: int, task: str, seq_len: int, seed: int) -> Table:
    from shoal.data.memory import SyntheticData  # torch, as webdataset in _write_shard

    cfg = _synthetic_config(n, shape, classes, task, seq_len)
    data = SyntheticData(cfg, "train", seed, materialize=False)

    def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = data.get_batch(np.asarray(idx, dtype=np.int64))
        return x.numpy(), y.numpy()

    return Table(
        n=n,
        fetch=fetch,
        task=task,
        num_classes=classes if task == "classification" else 0,
        vocab_size=cfg.vocab_size if task == "lm" else 0,
    )


def _synthetic_config(n: int, shape: list[int], classes: int, task: str, seq_len: int) -> DataConfig:
    return DataConfig(
        dataset="synthetic",
        num_samples=n,
        input_shape=shape,
        num_classes=classes,
        task=task,
        seq_len=seq_len,
        val_fraction=0.0,
    )


def parse_bytes(text: str, option: str = "--bytes-per-shard") -> int:
    """'64MB' -> 67108864 (KB, MB, GB are powers of 1024)."""
    units = {"": 1, "B": 1, "KB": 2**10, "MB": 2**20, "GB": 2**30}
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]?B?)\s*", text.upper())
    if not m or m.group(2) not in units or float(m.group(1)) <= 0:
        raise ConfigError(f"{option}: expected a size like 64MB (got {text!r})")
    return int(float(m.group(1)) * units[m.group(2)])
