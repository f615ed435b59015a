"""Columnar sources of `shoal shard` as streams of Arrow record batches: parquet, Arrow IPC / Feather,
Hugging Face `datasets` directories (save_to_disk's Arrow files, the Hub's parquet layout), JSONL and CSV.

Each is read with pyarrow's streaming readers (a parquet file row group by row group, CSV and JSONL
block by block), so memory holds one batch, never the file. Errors name the file and, for parquet,
the row group; nothing is downloaded.
"""

from __future__ import annotations

import csv
import glob
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


@dataclass
class Batches:
    """A columnar source: its schema, and its record batches, each with where it came from (for messages)."""

    source: str
    schema: pa.Schema
    # (columns, those to read as float32) -> (batch, where it came from)
    read: Callable[..., Iterator[tuple[pa.RecordBatch, str]]]
    rows: int | None
    nbytes: int
    features: dict[str, Any] = field(default_factory=dict)  # Hugging Face feature descriptions by column


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
    opened = [_open_parquet(f) for f in files]
    schema = opened[0].schema_arrow
    for f, pf in zip(files[1:], opened[1:]):
        if not pf.schema_arrow.equals(schema, check_metadata=False):
            raise DataError(f"{f}: its columns differ from {files[0]}'s ({pf.schema_arrow.names} vs {schema.names})")

    def read(columns: list[str] | None, floats: Any = ()) -> Iterator[tuple[pa.RecordBatch, str]]:
        for f, pf in zip(files, opened):
            rows = _batch_rows(pf)
            for g in range(pf.num_row_groups):
                where = f"{f}, row group {g}"
                try:
                    for batch in pf.iter_batches(batch_size=rows, row_groups=[g], columns=columns):
                        yield batch, where
                except (OSError, pa.ArrowException) as e:
                    raise DataError(f"{where}: corrupt or unreadable ({_short(e)})") from None

    rows = sum(pf.metadata.num_rows for pf in opened)
    return Batches(source, schema, read, rows, sum(f.stat().st_size for f in files), _schema_features(schema))


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
    if not files:
        raise DataError(f"{source}: no Arrow data files")
    first = _open_arrow(files[0])
    schema = first.schema

    def read(columns: list[str] | None, floats: Any = ()) -> Iterator[tuple[pa.RecordBatch, str]]:
        for f in files:
            reader = _open_arrow(f)
            try:
                for i, batch in enumerate(_ipc_batches(reader)):
                    yield (batch.select(columns) if columns else batch), f"{f}, batch {i}"
            except (OSError, pa.ArrowException) as e:
                raise DataError(f"{f}: corrupt or unreadable Arrow data ({_short(e)})") from None

    rows = sum(map(_file_rows, files)) if all(sniff(f) == "arrow" for f in files) else None
    return Batches(source, schema, read, rows, sum(f.stat().st_size for f in files), features or {})


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


def _ipc_batches(reader: Any) -> Iterator[pa.RecordBatch]:
    if isinstance(reader, ipc.RecordBatchFileReader):
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
    else:
        yield from reader


# ---------------------------------------------------------------- CSV and JSONL


def csv_file(path: Path) -> Batches:
    """A CSV file; a first row of numbers only is data (columns then named 0, 1, ...), else the header."""
    first = _first_row(path)
    header = not all(_is_number(v) for v in first)
    names = first if header else [str(i) for i in range(len(first))]
    block = max(BLOCK_BYTES, 64 * sum(len(v) + 1 for v in first))
    read_opts = pa_csv.ReadOptions(block_size=block, column_names=names, skip_rows=1 if header else 0)
    schema = _csv_reader(path, read_opts, pa_csv.ConvertOptions()).schema

    def read(columns: list[str] | None, floats: list[str] = ()) -> Iterator[tuple[pa.RecordBatch, str]]:
        # features as float32 from the start: a column that looks integral in the first block must not
        # fail on a later 0.5 (the streaming reader fixes each column's type from the first block)
        opts = pa_csv.ConvertOptions(column_types={c: pa.float32() for c in floats}, include_columns=columns or names)
        yield from _blocks(path, lambda: _csv_reader(path, read_opts, opts))

    return Batches(str(path), schema, read, None, path.stat().st_size)


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

    def reader() -> Any:
        try:
            return pa_json.open_json(path, read_options=opts)
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}: not readable as JSON lines ({_short(e)})") from None

    schema = reader().schema

    def read(columns: list[str] | None, floats: Any = ()) -> Iterator[tuple[pa.RecordBatch, str]]:
        for batch, where in _blocks(path, reader):
            yield (batch.select(columns) if columns else batch), where

    return Batches(str(path), schema, read, None, path.stat().st_size)


def _blocks(path: Path, open_reader: Callable[[], Any]) -> Iterator[tuple[pa.RecordBatch, str]]:
    reader = open_reader()
    i = 0
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise DataError(f"{path}, block {i}: {_short(e)}") from None
        yield batch, f"{path}"
        i += 1


def _short(e: Exception) -> str:
    """An Arrow error's first line (they can run to several)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
