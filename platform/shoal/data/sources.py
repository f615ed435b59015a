"""The sources `shoal shard` reads, recognised by content, each as a Stream of chunks (stream.py).

Files by their first bytes: parquet (PAR1), Arrow IPC / Feather (ARROW1, or an IPC stream as
Hugging Face writes it); then by suffix: .npz, .csv, .jsonl / .ndjson, text. Directories: a
Hugging Face `datasets` directory (save_to_disk's output, or parquet files as the Hub lays them
out), a directory of parquet or Arrow files, else a folder of images in class subfolders. A glob
pattern of parquet or Arrow files. And the built-in sets digits and synthetic. With a tokenizer
(or task lm) a directory without parquet or Arrow files is a directory of text files, each one a
document. Nothing is read whole: columnar files and CSV/JSONL stream record batches, text streams
in pieces (tokens.py encodes them), images one file at a time (.npz arrays are in memory by their nature).
"""

from __future__ import annotations

import codecs
import io
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from shoal.data import arrow_sources as arrow
from shoal.data import token_ids, tokens
from shoal.data.columns import Columns, FeatureReader, Labels, Plan, class_names, key_hashes, no_nulls, plan
from shoal.data.stream import Chunk, Lengths, Stream, prefetch, random_access
from shoal.data.token_ids import IdOptions
from shoal.data.tokens import Bytes, Coder, Item, Vocabulary
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
    seq_len: int | None = 64,
    label_column: str | None = None,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    columns: Columns | None = None,
    tokenizer: Vocabulary | None = None,
    ids: IdOptions | None = None,
) -> Stream:
    """The stream SOURCE names: a built-in set, a file, a directory or a glob of columnar files; text
    through the tokenizer when one is given (else as bytes); rows of token ids as they are. seq_len None:
    not given (64, except where rows of ids need it)."""
    cols = columns or Columns(label=label_column)
    ids = replace(ids or IdOptions(), seq_len=seq_len)
    length = seq_len or 64
    table = partial(
        columnar, cols=cols, task=task, seq_len=length, image_size=image_size, seed=seed, tokenizer=tokenizer, ids=ids
    )
    # with a tokenizer, text is a language model's unless a label is named (or --task classification)
    task = task or ("lm" if tokenizer and not cols.label else None)
    stream = _stream(source, table, num_samples, input_shape, num_classes, task, length, image_size, seed, tokenizer)
    if "columns" not in stream.extra:
        _no_columns_named(source, cols)
    token_ids.refuse_unused(source, stream, ids)
    if tokenizer is not None and not isinstance(stream.extra.get("tokenizer"), dict):
        raise DataError(
            f"{source}: --tokenizer encodes text (a text file, a directory of them, or a --text-column), and this "
            f"source is {stream.task} data"
        )
    if tokenizer is not None and tokenizer.pad_token and "pad_id" not in stream.extra:
        raise DataError(
            f"{source}: --pad-token pads the rows of a labelled text column (text classification); a language "
            "model's blocks are packed, never padded"
        )
    return stream


def _no_columns_named(source: str, cols: Columns) -> None:
    """Column options on a source without named columns (except a CSV-style --label-column) are a mistake."""
    named = [
        flag
        for flag, value in (
            ("--x-columns", cols.x),
            ("--text-column", cols.text),
            ("--image-column", cols.image),
            ("--ids-column", cols.ids),
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
    table: Callable[[arrow.Batches], Stream],
    num_samples: int,
    input_shape: list[int] | None,
    num_classes: int,
    task: str | None,
    seq_len: int,
    image_size: Any,
    seed: int,
    tokenizer: Vocabulary | None,
) -> Stream:
    """The stream of SOURCE; `table` makes a columnar source's."""
    if source == "digits":
        return _digits()
    if source == "synthetic":
        return _synthetic(num_samples, input_shape or [32], num_classes, task or "classification", seq_len, seed)
    path = Path(source)
    if not path.exists() and any(c in source for c in "*?["):
        return table(arrow.pattern(source))
    if not path.exists():
        raise DataError(f"{source}: no such file or directory (or built-in data set: digits, synthetic)")
    if path.is_dir():
        batches = arrow.directory(path)
        if batches:
            return table(batches)
        return _text_dir(path, seq_len, tokenizer) if task == "lm" else _images(path, image_size)
    return _file(path, table, task, seq_len, tokenizer)


def _file(
    path: Path, table: Callable[[arrow.Batches], Stream], task: str | None, seq_len: int, tokenizer: Vocabulary | None
) -> Stream:
    kind = arrow.sniff(path)
    suffix = path.suffix.lower()
    if kind == "parquet":
        return table(arrow.parquet_files(str(path), [path]))
    if kind is not None:
        return table(arrow.arrow_files(str(path), [path]))
    if suffix == ".npz":
        return _npz(path, task, seq_len)
    if suffix == ".csv":
        return table(arrow.csv_file(path))
    if suffix in (".jsonl", ".ndjson"):
        return table(arrow.jsonl_file(path))
    if suffix in TEXT_SUFFIXES:
        return _text(path, seq_len, tokenizer)
    raise DataError(f"{path}: {suffix or 'this'} files are not a source `shoal shard` reads; it accepts {ACCEPTED}")


# ---------------------------------------------------------------- columnar sources


def columnar(
    batches: arrow.Batches,
    cols: Columns,
    task: str | None,
    seq_len: int,
    image_size: Any,
    seed: int,
    tokenizer: Vocabulary | None = None,
    ids: IdOptions | None = None,
) -> Stream:
    """A stream of the columns the plan picks from a columnar source's record batches."""
    p = plan(batches.schema, cols, task, batches.source, tokenized=tokenizer is not None)
    if p.mode == "ids":
        return token_ids.stream(batches, p, cols, seed, tokenizer, ids or IdOptions())
    if p.mode == "text" and p.label:
        return _labelled_text(batches, p, cols, seq_len, seed, tokenizer)
    if p.mode == "text":
        if cols.split_key:
            raise DataError("--split-key: not with text (a block of tokens spans documents); the split is by position")
        return _text_column(batches, p, seq_len, tokenizer)
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


def _text_column(batches: arrow.Batches, p: Plan, seq_len: int, tokenizer: Vocabulary | None) -> Stream:
    """The documents of a text column, one a row, through the tokenizer (an end-of-text id after each)
    or as UTF-8 bytes (a newline after each), cut into blocks."""

    def documents() -> Iterator[Item]:
        for batch, _ in batches.read(p.x):
            for d in batch.column(0).to_pylist():
                if d is not None:
                    yield from tokens.row(d)

    coder = tokenizer or Bytes()
    return _coded(documents, coder, seq_len, batches.source, batches.nbytes, {"columns": {"text": p.x[0]}})


def _labelled_text(
    batches: arrow.Batches, p: Plan, cols: Columns, seq_len: int, seed: int, tokenizer: Vocabulary | None
) -> Stream:
    """Rows of a text column and a label column as classification samples: each row's text encoded alone
    into seq_len ids, right-padded with the pad id (tokens.Rows), read in the source's pieces."""
    if tokenizer is None:
        raise DataError(
            f"{batches.source}: a text column with labels needs --tokenizer to encode it (without one, a text "
            "column is a language model's documents: leave out --label-column and --task)"
        )
    coder = tokens.Rows(tokenizer, seq_len)

    def rows_of(batch: pa.RecordBatch, where: str, row0: int, seen: Lengths) -> np.ndarray:
        text = batch.column(p.x[0])
        no_nulls(text, p.x[0], where, row0)
        return coder.encode(text.to_pylist(), seen)

    extra = {"columns": _columns_entry(p, cols), "tokenizer": tokenizer.entry(), "pad_id": tokenizer.pad_id}
    return token_ids.padded(batches, p.needed(cols), p, cols, seed, rows_of, tokenizer.size, extra)


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


def _npz(path: Path, task: str | None, seq_len: int) -> Stream:
    """Arrays x and y, or token ids: a 1-D `tokens` array (with an optional scalar `vocab_size`), as
    small-GPT scripts keep their tokenised corpus, cut into --seq-len blocks."""
    data = _npz_arrays(path)
    vocab = int(data["vocab_size"]) if "vocab_size" in data else 0
    if "tokens" in data:
        return _token_array(data["tokens"], vocab, seq_len, path)
    if "x" not in data or "y" not in data:
        raise DataError(f"{path}: a .npz source needs arrays 'x' and 'y', or 'tokens' (has {sorted(data)})")
    x, y = data["x"], data["y"]
    if task == "lm":
        vocab = _vocab_of(np.concatenate([x.reshape(-1), y.reshape(-1)]), vocab, path)
        dtype = tokens.id_dtype(vocab)
        return _arrays(x.astype(dtype), y.astype(dtype), "lm", source=str(path), vocab_size=vocab)
    task, classes = _infer_task(y, task)
    x = x.astype(np.float32) if x.dtype.kind == "f" else x
    y = y.astype(np.int64) if task == "classification" else y.astype(np.float32)
    scale = 1 / 255 if x.dtype == np.uint8 else None
    return _arrays(x, y, task, classes, source=str(path), x_scale=scale, nbytes=path.stat().st_size)


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an .npz, read without unpickling: an object array (pickled Python objects, which
    could run code) or a damaged archive is refused in one line."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files if name in ("x", "y", "tokens", "vocab_size")}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataError(
                f"{path}: holds an object array (pickled Python objects), which is not read; save numeric arrays"
            ) from None
        raise DataError(f"{path}: not a readable .npz ({e})") from None
    except (OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{path}: not a readable .npz ({e})") from None


def _token_array(ids: np.ndarray, vocab: int, seq_len: int, path: Path) -> Stream:
    """A 1-D array of token ids as packed lm blocks, the vocabulary its `vocab_size` or max id + 1."""
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'tokens' must be a 1-D array of integer ids (got {ids.dtype} of shape {list(ids.shape)})"
        )
    vocab = _vocab_of(ids, vocab, path)
    chunk = tokens.Blocks(seq_len, tokens.id_dtype(vocab)).add(ids.astype(tokens.id_dtype(vocab)))
    if chunk is None:
        raise DataError(f"{path}: {len(ids)} tokens make no block of {seq_len + 1} (lower --seq-len)")
    return _arrays(chunk.x, chunk.y, "lm", source=str(path), vocab_size=vocab, extra={"tokenizer": "ids"})


def _vocab_of(ids: np.ndarray, vocab: int, path: Path) -> int:
    """The vocabulary given (checked to hold every id), else the largest id + 1."""
    if len(ids) and ids.min() < 0:
        raise DataError(f"{path}: token id {int(ids.min())} is negative; ids must be 0, 1, ..., vocab_size - 1")
    top = int(ids.max()) + 1 if len(ids) else 1
    if vocab and top > vocab:
        raise DataError(f"{path}: token id {top - 1} is outside the vocabulary ('vocab_size' {vocab})")
    return vocab or top


def _text(path: Path, seq_len: int, tokenizer: Vocabulary | None) -> Stream:
    """A text file: through the tokenizer, one document; as bytes, the file's bytes as they are."""
    size = path.stat().st_size
    _check_text_start(path)
    if tokenizer is not None:
        return _coded(lambda: tokens.document(_text_bytes(path)), tokenizer, seq_len, str(path), size)
    if (size - 1) // seq_len < 1:
        raise DataError(f"{path}: {size} bytes of text make no block of {seq_len + 1} tokens (lower --seq-len)")

    def chunks() -> Iterator[Chunk]:
        cut = tokens.Blocks(seq_len, np.dtype(np.uint8))
        for piece in _text_bytes(path):
            chunk = cut.add(np.frombuffer(piece, dtype=np.uint8))
            if chunk is not None:
                yield chunk

    return Stream(chunks, "lm", vocab_size=256, extra={"tokenizer": "bytes"}, rows=(size - 1) // seq_len, nbytes=size)


def _text_dir(path: Path, seq_len: int, tokenizer: Vocabulary | None) -> Stream:
    """A directory of text files, each a document, in the sorted order of their paths."""
    files = text_files(path)

    def documents() -> Iterator[Item]:
        for f in files:
            yield from tokens.document(_text_bytes(f))

    size = sum(f.stat().st_size for f in files)
    return _coded(documents, tokenizer or Bytes(), seq_len, str(path), size, {"documents": len(files)})


def text_files(path: Path) -> list[Path]:
    """The text files under a directory (by suffix, hidden ones left out), sorted by their paths."""
    found = {}
    for f in path.rglob("*"):
        rel = f.relative_to(path)
        if f.suffix.lower() in TEXT_SUFFIXES and not any(p.startswith(".") for p in rel.parts) and f.is_file():
            found[rel.as_posix()] = f
    if not found:
        raise DataError(
            f"{path}: no text files ({', '.join(s or 'no suffix' for s in TEXT_SUFFIXES)}), parquet or Arrow files"
        )
    return [found[k] for k in sorted(found)]


def _coded(
    documents: Callable[[], Iterator[Item]], coder: Coder, seq_len: int, source: str, nbytes: int, extra: Any = None
) -> Stream:
    """The blocks of documents through a coder, encoded by a thread ahead of the writer (encode_batch
    releases the GIL, so tokenising overlaps the writer's spilling)."""

    def chunks() -> Iterator[Chunk]:
        yield from prefetch(tokens.blocks(documents(), coder, seq_len, source), depth=2)

    entry = coder.entry() if isinstance(coder, Vocabulary) else "bytes"
    extra = {"tokenizer": entry, **(extra or {})}
    return Stream(chunks, "lm", vocab_size=coder.size, extra=extra, nbytes=nbytes)


def text_documents(source: str, text_column: str | None = None) -> Iterator[str]:
    """A corpus's text in pieces, for `shoal tokenizer train`: a text file, a directory of them, or the
    text column of a columnar source (parquet, Arrow, Hugging Face datasets, CSV, JSONL; a glob of them)."""
    path = Path(source)
    if not path.exists() and any(c in source for c in "*?["):
        batches: arrow.Batches | None = arrow.pattern(source)
    elif not path.exists():
        raise DataError(f"{source}: no such file or directory")
    elif path.is_dir():
        batches = arrow.directory(path)
    else:
        batches = _file_batches(path)
    if batches is not None:
        return _column_texts(batches, text_column)
    files = text_files(path) if path.is_dir() else [path]
    if path.is_file():
        _check_text_start(path)
    return (piece for f in files for piece in tokens.pieces(_text_bytes(f)))


def _file_batches(path: Path) -> arrow.Batches | None:
    """A file's record batches when it is columnar; None for a text file; an error for anything else."""
    kind, suffix = arrow.sniff(path), path.suffix.lower()
    if kind == "parquet":
        return arrow.parquet_files(str(path), [path])
    if kind is not None:
        return arrow.arrow_files(str(path), [path])
    if suffix == ".csv":
        return arrow.csv_file(path)
    if suffix in (".jsonl", ".ndjson"):
        return arrow.jsonl_file(path)
    if suffix in TEXT_SUFFIXES:
        return None
    raise DataError(f"{path}: not a text corpus (text files, or parquet, Arrow, CSV or JSONL with --text-column)")


def _column_texts(batches: arrow.Batches, text_column: str | None) -> Iterator[str]:
    """The documents of the text column (checked before the first is read)."""
    names = batches.schema.names
    if text_column is None and "text" not in names:
        raise DataError(
            f"{batches.source}: no column 'text'; name the documents' column with --text-column "
            f"(its columns are: {', '.join(names)})"
        )
    p = plan(batches.schema, Columns(text=text_column), "lm", batches.source)
    return (d for batch, _ in batches.read(p.x) for d in batch.column(0).to_pylist() if d is not None)


def _text_bytes(path: Path) -> Iterator[bytes]:
    """A text file's bytes in pieces of TEXT_PIECE, each checked to be text as it is read."""
    check = _TextCheck(path)
    with open(path, "rb") as f:
        while piece := f.read(TEXT_PIECE):
            check(piece)
            yield piece
    check(b"", final=True)


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
    from shoal.config import DataConfig  # pydantic's models: built only for this source
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
