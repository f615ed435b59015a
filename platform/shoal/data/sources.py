"""The sources `shoal shard` reads, recognised by content, each as a Stream of chunks (stream.py).

Files by their first bytes: parquet (PAR1), Arrow IPC / Feather (ARROW1, or an IPC stream as
Hugging Face writes it); then by suffix: .npz, .csv, .jsonl / .ndjson, text. Directories: a
Hugging Face `datasets` directory (save_to_disk's output, or parquet files as the Hub lays them
out), a directory of parquet or Arrow files, else a folder of images in class subfolders. A glob
pattern of parquet or Arrow files. And the built-in sets digits and synthetic. Nothing is read
whole: columnar files and CSV/JSONL stream record batches, text streams in pieces, images one
file at a time (.npz arrays are in memory by their nature).
"""

from __future__ import annotations

import codecs
import io
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from shoal.config import DataConfig
from shoal.data import arrow_sources as arrow
from shoal.data.columns import Columns, FeatureReader, Labels, Plan, class_names, key_hashes, plan
from shoal.data.stream import Chunk, Stream, prefetch, random_access
from shoal.errors import DataError

TEXT_SUFFIXES = ("", ".txt", ".text", ".md", ".rst")
ACCEPTED = (
    "digits, synthetic, a parquet or Arrow / Feather file, directory or glob, a Hugging Face datasets "
    "directory, a .npz (arrays x and y), .csv, .jsonl or .ndjson file, a UTF-8 text file "
    f"({', '.join(s or 'no suffix' for s in TEXT_SUFFIXES)}), or a folder of class subfolders of images"
)
TEXT_PIECE = 4 << 20


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
    columns: Columns | None = None,
) -> Stream:
    """The stream SOURCE names: a built-in set, a file, a directory or a glob of columnar files."""
    cols = columns or Columns(label=label_column)
    stream = _stream(source, cols, num_samples, input_shape, num_classes, task, seq_len, image_size, seed)
    if "columns" not in stream.extra:
        _no_columns_named(source, cols)
    return stream


def _no_columns_named(source: str, cols: Columns) -> None:
    """Column options on a source without named columns (except a CSV-style --label-column) are a mistake."""
    named = [
        flag
        for flag, value in (
            ("--x-columns", cols.x),
            ("--text-column", cols.text),
            ("--image-column", cols.image),
            ("--split-key", cols.split_key),
            ("--label-column", cols.label),
        )
        if value
    ]
    if named:
        raise DataError(
            f"{source}: {named[0]} names a column, and this source has none (columns are read from parquet, Arrow, "
            "Hugging Face datasets, CSV and JSONL sources)"
        )


def _stream(
    source: str,
    cols: Columns,
    num_samples: int,
    input_shape: list[int] | None,
    num_classes: int,
    task: str | None,
    seq_len: int,
    image_size: Any,
    seed: int,
) -> Stream:
    if source == "digits":
        return _digits()
    if source == "synthetic":
        return _synthetic(num_samples, input_shape or [32], num_classes, task or "classification", seq_len, seed)
    path = Path(source)
    if not path.exists() and any(c in source for c in "*?["):
        return columnar(arrow.pattern(source), cols, task, seq_len, image_size, seed)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory (or built-in data set: digits, synthetic)")
    if path.is_dir():
        batches = arrow.directory(path)
        return columnar(batches, cols, task, seq_len, image_size, seed) if batches else _images(path, image_size)
    return _file(path, cols, task, seq_len, image_size, seed)


def _file(path: Path, cols: Columns, task: str | None, seq_len: int, image_size: Any, seed: int) -> Stream:
    kind = arrow.sniff(path)
    suffix = path.suffix.lower()
    if kind == "parquet":
        return columnar(arrow.parquet_files(str(path), [path]), cols, task, seq_len, image_size, seed)
    if kind is not None:
        return columnar(arrow.arrow_files(str(path), [path]), cols, task, seq_len, image_size, seed)
    if suffix == ".npz":
        return _npz(path, task)
    if suffix == ".csv":
        return columnar(arrow.csv_file(path), cols, task, seq_len, image_size, seed)
    if suffix in (".jsonl", ".ndjson"):
        return columnar(arrow.jsonl_file(path), cols, task, seq_len, image_size, seed)
    if suffix in TEXT_SUFFIXES:
        return _text(path, seq_len)
    raise DataError(f"{path}: {suffix or 'this'} files are not a source `shoal shard` reads; it accepts {ACCEPTED}")


# ---------------------------------------------------------------- columnar sources


def columnar(
    batches: arrow.Batches, cols: Columns, task: str | None, seq_len: int, image_size: Any, seed: int
) -> Stream:
    """A stream of the columns the plan picks from a columnar source's record batches."""
    p = plan(batches.schema, cols, task, batches.source)
    if p.mode == "text":
        if cols.split_key:
            raise DataError("--split-key: not with text (a block of tokens spans documents); the split is by position")
        return _text_column(batches, p, seq_len)
    labels = Labels(p.label or "", p.task, class_names(batches.features, p.label or ""))
    x_of = _ImageColumn(p.x[0], image_size).x if p.mode == "image" else FeatureReader(p, batches.source).x
    floats = [n for n in p.x if _scalar_number(batches.schema.field(n).type)] if p.mode == "features" else []

    def read(pieces: Sequence[int]) -> Iterator[tuple[int, Chunk]]:
        piece, row0 = -1, 0  # row0 counts within the piece, as its `where` does
        for i, batch, where in prefetch(batches.read_pieces(p.needed(cols), floats, pieces), depth=2):
            piece, row0 = i, (row0 if i == piece else 0)
            keys = key_hashes(batch.column(cols.split_key), seed) if cols.split_key else None
            yield i, Chunk(x_of(batch, where, row0), labels.y(batch.column(p.label), where, row0), keys)
            row0 += batch.num_rows

    scaled = p.mode == "image" or p.uint8
    return Stream(
        None,
        p.task,
        x_scale=1 / 255 if scaled else None,
        rows=batches.rows,
        nbytes=batches.nbytes,
        labels=labels,
        extra={"columns": _columns_entry(p, cols)},
        pieces=batches.pieces,
        piece_reader=read,
        piece_sizes=batches.piece_sizes,
    )


def _scalar_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t)


def _columns_entry(p: Plan, cols: Columns) -> dict[str, Any]:
    """The manifest's record of which columns were read."""
    entry: dict[str, Any] = {p.mode if p.mode != "features" else "x": p.x if p.mode == "features" else p.x[0]}
    if p.label:
        entry["label"] = p.label
    if cols.split_key:
        entry["split_key"] = cols.split_key
    return entry


def _text_column(batches: arrow.Batches, p: Plan, seq_len: int) -> Stream:
    """The documents of a text column as UTF-8 bytes, a newline after each, cut into blocks."""

    def chunks() -> Iterator[Chunk]:
        cut = _ByteBlocks(seq_len)
        for batch, _ in batches.read(p.x):
            docs = [d for d in batch.column(0).to_pylist() if d is not None]
            chunk = cut.add("".join(d + "\n" for d in docs).encode())
            if chunk is not None:
                yield chunk

    extra = {"tokenizer": "bytes", "columns": {"text": p.x[0]}}
    return Stream(chunks, "lm", vocab_size=256, extra=extra, nbytes=batches.nbytes)


class _ImageColumn:
    """Encoded images of a column -> [n, C, H, W] uint8, every image in the first one's mode and size."""

    def __init__(self, column: str, size: Any):
        self.column, self.size = column, size
        self.load: Callable[[Any, str], np.ndarray] | None = None

    def x(self, batch: Any, where: str, row0: int) -> np.ndarray:
        out = []
        for r, value in enumerate(batch.column(self.column).to_pylist()):
            data = value.get("bytes") if isinstance(value, dict) else value
            if not data:
                raise DataError(f"{where}: column {self.column!r} has no image bytes at row {row0 + r:,}")
            if self.load is None:
                self.load = _first_image(io.BytesIO(data), self.size)
            out.append(self.load(io.BytesIO(data), f"{where}: column {self.column!r}, row {row0 + r:,}"))
        return np.stack(out)


# ---------------------------------------------------------------- arrays, text and images


def _digits() -> Stream:
    from shoal.data.memory import digits_arrays  # loads torch: not at `shoal shard`'s start-up

    x, y = digits_arrays()
    return _arrays(x, y, "classification", 10)


def _arrays(x: np.ndarray, y: np.ndarray, task: str, num_classes: int = 0, source: str = "", **kw: Any) -> Stream:
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples, y has {len(y)}")
    if task == "classification" and len(y) and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(
            f"{source}: sample {i} has label {int(y[i])}; class labels must be integers 0, 1, ..., C-1 (remap them before sharding)"
        )
    fetch = lambda idx: (x[idx], y[idx])  # noqa: E731
    return Stream(**random_access(len(x), fetch), task=task, num_classes=num_classes, rows=len(x), **kw)


def _infer_task(y: np.ndarray, task: str | None) -> tuple[str, int]:
    if task:
        return task, int(y.max()) + 1 if task == "classification" else 0
    if np.issubdtype(y.dtype, np.integer) or (y.ndim == 1 and np.all(np.mod(y, 1) == 0)):
        return "classification", int(y.max()) + 1
    return "regression", 0


def _npz(path: Path, task: str | None) -> Stream:
    with np.load(path) as data:
        if "x" not in data or "y" not in data:
            raise DataError(f"{path}: a .npz source needs arrays 'x' and 'y' (has {sorted(data.files)})")
        x, y = data["x"], data["y"]
    task, classes = _infer_task(y, task)
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    y = y.astype(np.int64) if task == "classification" else y.astype(np.float32)
    scale = 1 / 255 if x.dtype == np.uint8 else None
    return _arrays(x, y, task, classes, source=str(path), x_scale=scale, nbytes=path.stat().st_size)


class _ByteBlocks:
    """Bytes in, blocks of seq_len + 1 byte tokens out (x the first seq_len, y the last), consecutive
    blocks sharing one byte: the blocks a whole file gives, cut as its pieces arrive."""

    def __init__(self, seq_len: int):
        self.seq_len, self.buf = seq_len, b""

    def add(self, data: bytes) -> Chunk | None:
        self.buf += data
        n = (len(self.buf) - 1) // self.seq_len
        if n < 1:
            return None
        arr = np.frombuffer(self.buf, dtype=np.uint8, count=n * self.seq_len + 1)
        rows = np.lib.stride_tricks.sliding_window_view(arr, self.seq_len + 1)[:: self.seq_len].copy()
        self.buf = self.buf[n * self.seq_len :]
        return Chunk(rows[:, :-1], rows[:, 1:])


def _text(path: Path, seq_len: int) -> Stream:
    size = path.stat().st_size
    if (size - 1) // seq_len < 1:
        raise DataError(f"{path}: {size} bytes of text make no block of {seq_len + 1} tokens (lower --seq-len)")
    _check_text_start(path)

    def chunks() -> Iterator[Chunk]:
        cut, check = _ByteBlocks(seq_len), _TextCheck(path)
        with open(path, "rb") as f:
            while piece := f.read(TEXT_PIECE):
                check(piece)
                chunk = cut.add(piece)
                if chunk is not None:
                    yield chunk
        check(b"", final=True)

    return Stream(chunks, "lm", vocab_size=256, extra={"tokenizer": "bytes"}, rows=(size - 1) // seq_len, nbytes=size)


def _check_text_start(path: Path) -> None:
    """The first piece checked before anything is written: a binary file is refused at once."""
    with open(path, "rb") as f:
        _TextCheck(path)(f.read(TEXT_PIECE), final=path.stat().st_size <= TEXT_PIECE)


class _TextCheck:
    """Text means UTF-8 without NUL bytes: a binary file given by mistake is refused, not trained on as bytes."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.decoder = codecs.getincrementaldecoder("utf-8")("strict")

    def __call__(self, piece: bytes, final: bool = False) -> None:
        nul = piece.find(b"\0")
        if nul >= 0:
            raise DataError(
                f"{self.path}: holds a NUL byte at offset {self.offset + nul}, so it is binary, not text; {ACCEPTED}"
            )
        pending = len(self.decoder.getstate()[0])
        try:
            self.decoder.decode(piece, final=final)
        except UnicodeDecodeError as e:
            at = self.offset - pending + e.start
            raise DataError(f"{self.path}: not UTF-8 text (invalid byte at offset {at}); {ACCEPTED}") from None
        self.offset += len(piece)


def _images(path: Path, size: tuple[int, int] | None) -> Stream:
    classes, files = _image_files(path)
    load = _first_image(files[0][0], size)
    labels = np.array([c for _, c in files], dtype=np.int64)

    def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([load(files[i][0], str(files[i][0])) for i in idx]), labels[idx]

    return Stream(
        **random_access(len(files), fetch, chunk=256),
        task="classification",
        num_classes=len(classes),
        x_scale=1 / 255,
        extra={"classes": classes},
        rows=len(files),
    )


def _image_files(path: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, (file, class index) per image) of a folder of class subfolders."""
    classes = sorted(d.name for d in path.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{path}: an image folder needs one subfolder per class (or parquet / Arrow files)")
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((path / name).iterdir()) if f.is_file()]
    if not files:
        raise DataError(f"{path}: no image files in the class subfolders")
    return classes, files


def _first_image(first: Any, size: Any) -> Callable[[Any, str], np.ndarray]:
    """The loader for every image, in the first one's colour mode and (unless given) size."""
    try:
        with Image.open(first) as im:
            mode = "RGB" if im.mode not in ("L", "1") else "L"
            size = size or im.size[::-1]
    except OSError as e:
        raise DataError(f"{first}: not a readable image ({e})") from None
    if isinstance(first, io.BytesIO):
        first.seek(0)
    return _image_loader(mode, size)


def _image_loader(mode: str, size: Any) -> Callable[[Any, str], np.ndarray]:
    """Reads an image (a path or a file object) as a [C, H, W] uint8 array in this colour mode and size."""

    def load(f: Any, where: str) -> np.ndarray:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size[::-1] != tuple(size):
                    im = im.resize(size[::-1])
                a = np.asarray(im, dtype=np.uint8)
        except OSError as e:
            raise DataError(f"{where}: not a readable image ({e})") from None
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    return load


def _synthetic(n: int, shape: list[int], classes: int, task: str, seq_len: int, seed: int) -> Stream:
    from shoal.data.memory import SyntheticData  # loads torch, as in _digits

    cfg = DataConfig(
        dataset="synthetic",
        num_samples=n,
        input_shape=shape,
        num_classes=classes,
        task=task,
        seq_len=seq_len,
        val_fraction=0.0,
    )
    data = SyntheticData(cfg, "train", seed, materialize=False)

    def fetch(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = data.get_batch(np.asarray(idx, dtype=np.int64))
        return x.numpy(), y.numpy()

    return Stream(
        **random_access(n, fetch),
        task=task,
        num_classes=classes if task == "classification" else 0,
        vocab_size=cfg.vocab_size if task == "lm" else 0,
        rows=n,
    )
