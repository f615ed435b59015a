"""Columnar sources of `shoal shard` as streams of Arrow record batches: parquet, Arrow IPC / Feather,
Hugging Face `datasets` directories (save_to_disk's Arrow files, the Hub's parquet layout), JSONL and CSV.

Each is read with pyarrow's streaming readers (a parquet file row group by row group, CSV and JSONL
block by block), so memory holds one batch, never the file. Each is cut into pieces that can be read
independently, by the file alone: a parquet file's row groups, an Arrow IPC file's record batches (an
IPC stream, as `save_to_disk` writes, is one piece), CSV and JSONL byte ranges of PIECE_BYTES cut at
line ends (as pyarrow's own parallel reader assumes, a value holds no newline). Errors name the file
and, for parquet, the row group; nothing is downloaded.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.ipc as ipc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from shoal.errors import DataError

BATCH_BYTES = 4 << 20  # a parquet batch's decoded size: a few of them are in memory at once (stream.prefetch)
# CSV and JSONL read per block: pyarrow's streaming readers run fastest and smallest near 512 KiB
# (8 MiB blocks took 3x the memory and more time), widened for rows too long for it
BLOCK_BYTES = 512 << 10
SPLIT_NAMES = ("train", "validation", "valid", "val", "test")
PIECE_BYTES = 8 << 20  # a CSV or JSONL piece: small enough to balance 2 processes on a file of tens of MB

Pieces = Callable[..., Iterator[tuple[int, pa.RecordBatch, str]]]


@dataclass
class Batches:
    """A columnar source: its schema, and its record batches by piece, each with where it came from."""

    source: str
    schema: pa.Schema
    # (columns, those to read as float32, pieces) -> (piece, batch, where it came from), pieces in the order given
    read_pieces: Pieces
    rows: int | None
    nbytes: int
    features: dict[str, Any] = field(default_factory=dict)  # Hugging Face feature descriptions by column
    piece_sizes: list[int] = field(default_factory=lambda: [1])  # bytes (or rows) per piece

    @property
    def pieces(self) -> int:
        return len(self.piece_sizes)

    def read(self, columns: list[str] | None, floats: Any = ()) -> Iterator[tuple[pa.RecordBatch, str]]:
        """Every batch of the source in order, with where it came from."""
        for _, batch, where in self.read_pieces(columns, floats, range(self.pieces)):
            yield batch, where


def sniff(path: Path) -> str | None:
    """The columnar kind of a file by its first bytes: parquet, arrow (IPC file), arrow-stream, or None."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:4] == b"PAR1":
        return "parquet"
    if head[:6] == b"ARROW1":
        return "arrow"
    if head[:4] == b"\xff\xff\xff\xff":
        return "arrow-stream"
    return None


def directory(path: Path) -> Batches | None:
    """A Hugging Face `datasets` directory or a directory of parquet / Arrow files; None if it is neither."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        return directory(path / _pick_split(path, splits, [path / s for s in splits]))
    if (path / "state.json").exists():
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state.get("_data_files", [])]
        return arrow_files(str(path), files, _hf_features(path / "dataset_info.json"))
    parquet = sorted(p for p in path.rglob("*.parquet") if p.is_file())
    if parquet:
        return parquet_files(str(path), _train_files(path, parquet))
    arrow = sorted(p for p in path.rglob("*") if p.suffix in (".arrow", ".feather") and p.is_file())
    return arrow_files(str(path), arrow) if arrow else None


def pattern(text: str) -> Batches:
    """The parquet or Arrow files a glob matches, read as one source."""
    files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
    if not files:
        raise DataError(f"{text}: the pattern matches no file")
    kinds = {sniff(f) for f in files}
    if kinds == {"parquet"}:
        return parquet_files(text, files)
    if kinds <= {"arrow", "arrow-stream"}:
        return arrow_files(text, files)
    raise DataError(f"{text}: a pattern must match only parquet or only Arrow files (matched {files[0]} and more)")


def _pick_split(path: Path, names: list[str], dirs: list[Path]) -> str:
    """The split a multi-split data set is read from: train, else the only one."""
    if "train" in names:
        return "train"
    if len(names) == 1:
        return names[0]
    raise DataError(f"{path}: holds splits {names} and none is 'train'; give the split's directory instead")


def _train_files(root: Path, files: list[Path]) -> list[Path]:
    """The Hub's layout (data/train-00000-of-00002.parquet, or train/0000.parquet): the train split's files."""
    split = {f: _split_of(f.relative_to(root)) for f in files}
    if "train" in split.values():
        return [f for f in files if split[f] == "train"]
    return files


def _split_of(rel: Path) -> str | None:
    for part in [*rel.parent.parts, rel.name.split("-")[0].split(".")[0]]:
        if part in SPLIT_NAMES:
            return part
    return None


def _hf_features(info: Path) -> dict[str, Any]:
    try:
        return json.loads(info.read_text()).get("features") or {}
    except (OSError, ValueError):
        return {}


def _schema_features(schema: pa.Schema) -> dict[str, Any]:
    """The Hugging Face features a parquet file from the Hub carries in its schema metadata."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(raw).get("info", {}).get("features") or {} if raw else {}
    except ValueError:
        return {}


# ---------------------------------------------------------------- parquet


def parquet_files(source: str, files: list[Path]) -> Batches:
    """Parquet files, a piece per row group."""
    opened = [_open_parquet(f) for f in files]
    schema = opened[0].schema_arrow
    for f, pf in zip(files[1:], opened[1:]):
        if not pf.schema_arrow.equals(schema, check_metadata=False):
            raise DataError(f"{f}: its columns differ from {files[0]}'s ({pf.schema_arrow.names} vs {schema.names})")
    groups = [(i, g) for i, pf in enumerate(opened) for g in range(pf.num_row_groups)]

    def read(columns: list[str] | None, floats: Any = (), pieces: Any = ()) -> Iterator[tuple[int, Any, str]]:
        for piece in pieces:
            i, g = groups[piece]
            where = f"{files[i]}, row group {g}"
            try:
                for batch in opened[i].iter_batches(batch_size=_batch_rows(opened[i]), row_groups=[g], columns=columns):
                    yield piece, batch, where
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{where}: corrupt or unreadable ({_short(e)})") from None

    sizes = [opened[i].metadata.row_group(g).total_byte_size for i, g in groups]
    rows = sum(pf.metadata.num_rows for pf in opened)
    nbytes = sum(f.stat().st_size for f in files)
    return Batches(source, schema, read, rows, nbytes, _schema_features(schema), sizes)


def _batch_rows(pf: pq.ParquetFile) -> int:
    """Rows per batch for about BATCH_BYTES decoded (wide rows, images, get fewer)."""
    meta = pf.metadata
    size = sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    per_row = max(1.0, size / max(1, meta.num_rows))
    return int(min(65_536, max(16, BATCH_BYTES // per_row)))


def _open_parquet(path: Path) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)  # not memory-mapped: mapped pages count in the process's RSS
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable parquet file ({_short(e)})") from None


# ---------------------------------------------------------------- Arrow IPC / Feather


def arrow_files(source: str, files: list[Path], features: dict[str, Any] | None = None) -> Batches:
    """Arrow IPC files (a piece per record batch) or streams (a piece per file)."""
    if not files:
        raise DataError(f"{source}: no Arrow data files")
    schema = _open_arrow(files[0]).schema
    counts = {f: _file_batches(f) if sniff(f) == "arrow" else None for f in files}
    pieces = [(f, b) for f, n in counts.items() for b in (range(n) if n is not None else [None])]

    def read(columns: list[str] | None, floats: Any = (), wanted: Any = ()) -> Iterator[tuple[int, Any, str]]:
        opened: tuple[Path | None, Any] = (None, None)  # pieces come in order: one file open at a time
        for piece in wanted:
            f, b = pieces[piece]
            try:
                opened = opened if opened[0] == f and b is not None else (f, _open_arrow(f))
                batches = [opened[1].get_batch(b)] if b is not None else opened[1]
                for i, batch in enumerate(batches):
                    yield (
                        piece,
                        (batch.select(columns) if columns else batch),
                        f"{f}, batch {b if b is not None else i}",
                    )
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{f}: corrupt or unreadable Arrow data ({_short(e)})") from None

    rows = sum(map(_file_rows, files)) if all(n is not None for n in counts.values()) else None
    sizes = [f.stat().st_size // (counts[f] or 1) for f, _ in pieces]
    return Batches(source, schema, read, rows, sum(f.stat().st_size for f in files), features or {}, sizes)


def _open_arrow(path: Path, mapped: bool = False) -> Any:
    """A reader of the file; read, not mapped (mapped pages would count in RSS as they are touched),
    except to count rows, which touches only the batches' headers."""
    try:
        source = pa.memory_map(str(path)) if mapped else pa.OSFile(str(path))
        return ipc.open_file(source) if sniff(path) == "arrow" else ipc.open_stream(source)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not a readable Arrow IPC / Feather file ({_short(e)})") from None


def _file_rows(path: Path) -> int:
    """Rows of an Arrow IPC file, from its memory-mapped batches (nothing is copied or read but headers)."""
    reader = _open_arrow(path, mapped=True)
    return sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))


def _file_batches(path: Path) -> int:
    return _open_arrow(path, mapped=True).num_record_batches


# ---------------------------------------------------------------- CSV and JSONL


def csv_file(path: Path) -> Batches:
    """A CSV file; a first row of numbers only is data (columns then named 0, 1, ...), else the header."""
    first = _first_row(path)
    header = not all(_is_number(v) for v in first)
    names = first if header else [str(i) for i in range(len(first))]
    block = max(BLOCK_BYTES, 64 * sum(len(v) + 1 for v in first))
    read_opts = pa_csv.ReadOptions(block_size=block, column_names=names, skip_rows=1 if header else 0)
    schema = _csv_reader(path, read_opts, pa_csv.ConvertOptions()).schema
    ranges = line_ranges(path, _first_line_end(path) if header else 0)
    piece_opts = pa_csv.ReadOptions(block_size=block, column_names=names)

    def read(columns: list[str] | None, floats: Any = (), pieces: Any = ()) -> Iterator[tuple[int, Any, str]]:
        # features as float32 from the start: a column that looks integral in one block must not fail on
        # a later 0.5; every other column in the type its first block gave, whichever piece is read first
        types = {**_fixed_types(schema, columns or names), **{c: pa.float32() for c in floats}}
        opts = pa_csv.ConvertOptions(column_types=types, include_columns=columns or names)
        reader = partial(pa_csv.open_csv, read_options=piece_opts, convert_options=opts)
        for piece in pieces:
            where, (lo, hi) = _piece_where(path, piece, ranges[piece]), ranges[piece]
            yield from ((piece, b, w) for b, w in _blocks(path, lo, hi, where, reader))

    return Batches(str(path), schema, read, None, path.stat().st_size, {}, [hi - lo for lo, hi in ranges])


def line_ranges(path: Path, start: int) -> list[tuple[int, int]]:
    """[lo, hi) byte ranges of about PIECE_BYTES from `start`, each cut just after a newline."""
    size = path.stat().st_size
    cuts = [start]
    with open(path, "rb") as f:
        for nominal in range(start + PIECE_BYTES, size, PIECE_BYTES):
            cut = _next_line(f, nominal, size)
            if cuts[-1] < cut < size:
                cuts.append(cut)
    cuts.append(max(size, start))
    return list(zip(cuts, cuts[1:]))


def _next_line(f: Any, pos: int, size: int) -> int:
    """The offset just after the first newline at or after pos - 1 (the file's end if none)."""
    f.seek(pos - 1)
    while piece := f.read(1 << 16):
        at = piece.find(b"\n")
        if at >= 0:
            return f.tell() - len(piece) + at + 1
    return size


def _first_line_end(path: Path) -> int:
    with open(path, "rb") as f:
        return len(f.readline())


def _range(path: Path, lo: int, hi: int) -> Any:
    """The bytes [lo, hi) of a file as a pyarrow stream (read whole: a piece is PIECE_BYTES)."""
    with pa.OSFile(str(path)) as f:
        return pa.BufferReader(f.read_at(hi - lo, lo))


def _piece_where(path: Path, piece: int, lo_hi: tuple[int, int]) -> str:
    """Where a piece's rows are, for messages: the file, and from the second piece on the byte they start at
    (row numbers count from there)."""
    return str(path) if piece == 0 else f"{path}, from byte {lo_hi[0]:,}"


def _fixed_types(schema: pa.Schema, columns: list[str]) -> dict[str, pa.DataType]:
    """The first block's type of each column (a column of nulls there is left to be inferred)."""
    return {c: schema.field(c).type for c in columns if not pa.types.is_null(schema.field(c).type)}


def _csv_reader(path: Path, read_opts: Any, convert: Any) -> Any:
    try:
        return pa_csv.open_csv(path, read_options=read_opts, convert_options=convert)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not readable as CSV ({_short(e)})") from None


def _first_row(path: Path) -> list[str]:
    with open(path, newline="") as f:
        row = next(csv.reader(f), None)
    if not row:
        raise DataError(f"{path}: empty CSV")
    return row


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def jsonl_file(path: Path) -> Batches:
    """A file of JSON objects, one a line; their keys are the columns."""
    with open(path, "rb") as f:
        opts = pa_json.ReadOptions(block_size=max(BLOCK_BYTES, 64 * len(f.readline())))
    try:
        schema = pa_json.open_json(path, read_options=opts).schema
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: not readable as JSON lines ({_short(e)})") from None
    # every piece parsed to the first block's types, whichever piece is read first
    parse = pa_json.ParseOptions(
        explicit_schema=pa.schema([schema.field(c) for c in _fixed_types(schema, schema.names)])
    )
    ranges = line_ranges(path, 0)
    reader = partial(pa_json.open_json, read_options=opts, parse_options=parse)

    def read(columns: list[str] | None, floats: Any = (), pieces: Any = ()) -> Iterator[tuple[int, Any, str]]:
        for piece in pieces:
            where, (lo, hi) = _piece_where(path, piece, ranges[piece]), ranges[piece]
            for batch, w in _blocks(path, lo, hi, where, reader):
                yield piece, (batch.select(columns) if columns else batch), w

    return Batches(str(path), schema, read, None, path.stat().st_size, {}, [hi - lo for lo, hi in ranges])


def _blocks(path: Path, lo: int, hi: int, where: str, open_reader: Callable[[Any], Any]) -> Iterator[tuple[Any, str]]:
    """The record batches of bytes [lo, hi) of a CSV or JSONL file, read block by block."""
    if hi == lo:
        return
    try:
        reader = open_reader(_range(path, lo, hi))
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{where}: not readable ({_short(e)})") from None
    i = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{where}, block {i}: {_short(e)}") from None
        yield batch, where
        i += 1


def _short(e: Exception) -> str:
    """An Arrow error's first line (they can run to several)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
