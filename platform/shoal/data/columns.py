"""Which columns of a columnar source become x and y, and how a record batch becomes arrays.

`--x-columns` (numbers, or lists of numbers of one size, become the feature array), `--label-column`
(integers, or strings coded as class ids whose names go to the manifest), `--text-column` (documents
for a language model), `--ids-column` (lists of token ids, default a column named input_ids: see
token_ids.py), `--image-column` (encoded image bytes, as Hugging Face's Image feature stores them). Defaults: the label is the column named `label`, else `y`, else the last; x is every other
column. A column that is missing, ragged where a fixed size is needed, or of a type that cannot be a
feature stops the conversion with one line naming it and what was found.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoal.data.shuffle import mix64
from shoal.data.stream import LabelsSeen
from shoal.errors import DataError


@dataclass(frozen=True)
class Columns:
    """The columns the user named (None: the default)."""

    x: tuple[str, ...] | None = None
    label: str | None = None
    text: str | None = None
    image: str | None = None
    ids: str | None = None
    split_key: str | None = None


@dataclass
class Plan:
    """What is read from a source: the mode, the columns, the task."""

    mode: str  # features | text | image | ids
    x: list[str]
    label: str | None
    task: str
    uint8: bool = False  # features all uint8: stored as bytes, scaled to [0, 1] when read

    def needed(self, cols: Columns) -> list[str]:
        keep = [*self.x, *([self.label] if self.label else []), *([cols.split_key] if cols.split_key else [])]
        return list(dict.fromkeys(keep))


def plan(schema: pa.Schema, cols: Columns, task: str | None, source: str, tokenized: bool = False) -> Plan:
    """The reading plan for this schema, the user's columns checked against it. With a tokenizer
    (`tokenized`) the documents' column is --text-column, else `text`; it is a language model's text
    unless a label column is named or the task is classification: then each row is a labelled sample."""
    names = schema.names
    if cols.label and cols.label not in names and _index(cols.label, len(names)) is not None:
        cols = replace(cols, label=names[_index(cols.label, len(names))])  # an index, as CSV users give it
    for flag, name in _named(cols):
        if name not in names:
            raise DataError(f"{source}: no column {name!r} ({flag}); its columns are: {', '.join(names)}")
    ids = cols.ids or (None if cols.text or cols.x or cols.image else _ids_like(schema))
    if ids:
        return _ids_plan(schema, cols, ids, task, source)
    text = cols.text or ("text" if (task == "lm" or tokenized) and "text" in names else None)
    if text:
        return _text_plan(schema, cols, text, task, source)
    if tokenized:
        raise DataError(
            f"{source}: --tokenizer needs a column of documents: name it with --text-column (its columns "
            f"are: {', '.join(names)})"
        )
    image = cols.image or (None if cols.x else _image_like(schema))
    label = _label_column(schema, cols, image, source)
    label_task = _label_task(schema.field(label), task, source)
    if image:
        _need_type(
            schema,
            image,
            _is_image(schema.field(image).type),
            "encoded images (binary, or a struct with 'bytes')",
            source,
        )
        return Plan("image", [image], label, label_task)
    x = list(cols.x) if cols.x else [n for n in names if n not in (label, cols.split_key)]
    if not x:
        raise DataError(f"{source}: no feature column left beside the label {label!r}; name them with --x-columns")
    for name in x:
        _need_type(schema, name, _is_numeric(schema.field(name).type), "numbers or lists of numbers", source)
    return Plan("features", x, label, label_task, uint8=all(_leaf(schema.field(n).type) == pa.uint8() for n in x))


def _text_plan(schema: pa.Schema, cols: Columns, text: str, task: str | None, source: str) -> Plan:
    """A text column: a language model's documents, or (with a label) the inputs of a text classifier."""
    t = schema.field(text).type
    _need_type(schema, text, pa.types.is_string(t) or pa.types.is_large_string(t), "text (strings)", source)
    if task == "lm" or (task is None and not cols.label):
        return Plan("text", [text], None, "lm")
    label = _label_column(schema, cols, text, source)  # named, or label / labels / y
    label_task = _label_task(schema.field(label), task, source)
    if label_task != "classification":
        raise DataError(
            f"{source}: label column {label!r} holds {schema.field(label).type}; labelled text is classification "
            "data, with integer or string labels"
        )
    return Plan("text", [text], label, label_task)


def _ids_plan(schema: pa.Schema, cols: Columns, ids: str, task: str | None, source: str) -> Plan:
    """A column of token ids: a classifier's rows beside a label, else (or with --task lm) a language model's
    documents. A `labels` column of lists (a causal LM's copy of the ids) is not a label."""
    _need_type(schema, ids, _is_ids(schema.field(ids).type), "lists of integer token ids", source)
    if cols.text:
        raise DataError(f"{source}: --text-column and --ids-column: name one (text to encode, or ids already encoded)")
    found = [n for n in ("label", "labels", "y") if n in schema.names and not _is_list(schema.field(n).type)]
    label = cols.label or next(iter(found), None)
    if task == "lm" or (task is None and label is None):
        return Plan("ids", [ids], None, "lm")
    if label is None:
        raise DataError(f"{source}: --task {task} needs a label beside the ids in {ids!r}; name it with --label-column")
    if _label_task(schema.field(label), task, source) != "classification":
        raise DataError(
            f"{source}: label column {label!r} holds {schema.field(label).type}; labelled token ids are classification "
            "data, with integer or string labels"
        )
    return Plan("ids", [ids], label, "classification")


def _ids_like(schema: pa.Schema) -> str | None:
    """The column a tokenizer's output names input_ids, when it holds lists of integers."""
    return "input_ids" if "input_ids" in schema.names and _is_ids(schema.field("input_ids").type) else None


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_ids(t: pa.DataType) -> bool:
    return _is_list(t) and pa.types.is_integer(t.value_type)


def _index(text: str, n: int) -> int | None:
    """A column index among n ('0', '-1'), or None when the text is not one."""
    try:
        i = int(text)
    except ValueError:
        return None
    return i if -n <= i < n else None


def _named(cols: Columns) -> list[tuple[str, str]]:
    named = [("--x-columns", n) for n in cols.x or ()]
    for flag, name in (
        ("--label-column", cols.label),
        ("--text-column", cols.text),
        ("--image-column", cols.image),
        ("--ids-column", cols.ids),
    ):
        if name is not None:
            named.append((flag, name))
    return named + ([("--split-key", cols.split_key)] if cols.split_key else [])


def _need_type(schema: pa.Schema, name: str, ok: bool, wanted: str, source: str) -> None:
    if not ok:
        raise DataError(f"{source}: column {name!r} holds {schema.field(name).type}; it must hold {wanted}")


def _label_column(schema: pa.Schema, cols: Columns, image: str | None, source: str) -> str:
    if cols.label:
        return cols.label
    names = schema.names
    for name in ("label", "labels", "y"):
        if name in names:
            return name
    rest = [n for n in names if n not in (image, cols.split_key)]
    if image or not rest:
        raise DataError(f"{source}: no column 'label' or 'y'; name the label column with --label-column")
    return rest[-1]


def _label_task(f: pa.Field, task: str | None, source: str) -> str:
    """The task the label column's type means, or the one asked for if the type allows it."""
    t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
    if pa.types.is_floating(t) or (_is_numeric(t) and not _is_scalar_number(t)):
        if task == "classification":
            raise DataError(
                f"{source}: label column {f.name!r} holds {f.type}; classification needs integer or string "
                "labels (or --task regression)"
            )
        return "regression"
    if pa.types.is_integer(t) or pa.types.is_boolean(t) or pa.types.is_string(t) or pa.types.is_large_string(t):
        if task == "regression" and not pa.types.is_integer(t):
            raise DataError(f"{source}: label column {f.name!r} holds {f.type}; regression needs numbers")
        return task or "classification"
    raise DataError(
        f"{source}: label column {f.name!r} holds {f.type}; a label must be an integer, a string or a float"
    )


def _is_scalar_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_numeric(t: pa.DataType) -> bool:
    """A number, or a (fixed-size or not) list of numbers, nested as deep as wanted."""
    if _is_list(t):
        return _is_numeric(t.value_type)
    return _is_scalar_number(t)


def _leaf(t: pa.DataType) -> pa.DataType:
    return _leaf(t.value_type) if hasattr(t, "value_type") and not pa.types.is_dictionary(t) else t


def _is_image(t: pa.DataType) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _image_like(schema: pa.Schema) -> str | None:
    """A column stored as Hugging Face stores an Image feature: struct<bytes, path>."""
    for f in schema:
        if pa.types.is_struct(f.type) and {"bytes", "path"} <= {c.name for c in f.type}:
            return f.name
    return None


# ---------------------------------------------------------------- batches -> arrays


class FeatureReader:
    """Record batches -> float32 (or uint8) feature arrays of one shape in every batch."""

    def __init__(self, plan: Plan, source: str):
        self.plan, self.source = plan, source
        self.shapes: dict[str, tuple[int, ...]] = {}

    def x(self, batch: pa.RecordBatch, where: str, row0: int) -> np.ndarray:
        dtype = np.uint8 if self.plan.uint8 else np.float32
        parts = [self._column(batch.column(name), name, where, row0) for name in self.plan.x]
        if len(parts) == 1:
            x = parts[0].astype(dtype, copy=False)
            return x if x.ndim > 1 else x[:, None]
        if all(p.ndim == 1 for p in parts):
            return _rows_of_columns(parts, dtype)
        widths = [int(np.prod(p.shape[1:])) for p in parts]
        out = np.empty((batch.num_rows, sum(widths)), dtype=dtype)
        at = 0
        for p, w in zip(parts, widths):  # each column written into place once, cast on the way
            out[:, at : at + w] = p.reshape(len(p), w)
            at += w
        return out

    def _column(self, arr: pa.Array, name: str, where: str, row0: int) -> np.ndarray:
        values, shape = _values(arr, name, where, row0)
        known = self.shapes.setdefault(name, shape)
        if known != shape:
            raise DataError(
                f"{where}: column {name!r} is ragged: rows from {row0:,} hold {list(shape)} values, earlier rows "
                f"{list(known)}; features need one size in every row"
            )
        return values


TILE_ROWS = 4096  # rows of the columns gathered at once: a tile of 64 float32 columns is 1 MiB, within L2


def _rows_of_columns(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
    """Columns of numbers -> one row-major [n, columns] array, transposed a cache-sized tile at a time:
    2-3x the speed of a whole stack and transpose, whose strided pass misses the cache on every row."""
    n = len(parts[0])
    out = np.empty((n, len(parts)), dtype=dtype)
    tile = np.empty((len(parts), min(n, TILE_ROWS)), dtype=dtype)
    for start in range(0, n, TILE_ROWS):
        k = min(TILE_ROWS, n - start)
        for j, p in enumerate(parts):
            tile[j, :k] = p[start : start + k]
        out[start : start + k] = tile[:, :k].T
    return out


def _values(arr: pa.Array, name: str, where: str, row0: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(array [n, *shape], shape) of a column of numbers or of lists of numbers of one length."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    no_nulls(arr, name, where, row0)
    t = arr.type
    if _is_scalar_number(t):
        return numbers(arr), ()
    lengths = numbers(pc.list_value_length(arr)) if len(arr) else np.zeros(0, np.int64)
    size = int(lengths[0]) if len(lengths) else t.list_size if pa.types.is_fixed_size_list(t) else 0
    odd = np.flatnonzero(lengths != size)
    if len(odd):
        r = int(odd[0])
        raise DataError(
            f"{where}: column {name!r} is ragged: row {row0 + r:,} holds {int(lengths[r])} values, row {row0:,} "
            f"{size}; features need one size in every row"
        )
    inner, shape = _values(arr.flatten(), name, where, row0)
    return inner.reshape(len(arr), size, *shape), (size, *shape)


def numbers(arr: pa.Array) -> np.ndarray:
    """A column of integers or floats without nulls as a (read-only) numpy view of its buffer. pyarrow's own
    to_numpy imports pandas on its first call: half a second of CPU in every process that converts."""
    t = arr.type
    if arr.null_count or not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        return arr.to_numpy(zero_copy_only=False)
    kind = "f" if pa.types.is_floating(t) else "i" if pa.types.is_signed_integer(t) else "u"
    dtype = np.dtype(f"<{kind}{t.byte_width}")
    return np.frombuffer(arr.buffers()[1], dtype=dtype, count=len(arr), offset=arr.offset * dtype.itemsize)


def no_nulls(arr: pa.Array, name: str, where: str, row0: int) -> None:
    if arr.null_count:
        r = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: column {name!r} has a missing value at row {row0 + r:,}")


class Labels:
    """Class ids of a label column: strings coded in order of first appearance and renumbered in sorted
    order once every reader's pass is over (merge_labels); integers checked >= 0; floats passed on for
    regression."""

    def __init__(self, column: str, task: str, names: list[str] | None = None):
        self.column, self.task, self.preset = column, task, names
        self.index: dict[str, int] = {}
        self.max = -1

    def y(self, arr: pa.Array, where: str, row0: int) -> np.ndarray:
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        no_nulls(arr, self.column, where, row0)
        if self.task == "regression":
            values, _ = _values(arr, self.column, where, row0)
            return values.astype(np.float32, copy=False)
        t = arr.type.value_type if pa.types.is_dictionary(arr.type) else arr.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            return self._strings(arr)
        ids = numbers(arr).astype(np.int64)
        if len(ids) and ids.min() < 0:
            r = int(np.argmin(ids))
            raise DataError(
                f"{where}: row {row0 + r:,} has label {int(ids[r])} in column {self.column!r}; class labels must be "
                "integers 0, 1, ..., C-1 or strings"
            )
        self.max = max(self.max, int(ids.max()) if len(ids) else -1)
        return ids

    def _strings(self, arr: pa.Array) -> np.ndarray:
        enc = arr if pa.types.is_dictionary(arr.type) else pc.dictionary_encode(arr)
        lut = np.array([self.index.setdefault(v, len(self.index)) for v in enc.dictionary.to_pylist()], np.int64)
        return lut[numbers(enc.indices).astype(np.int64)] if len(lut) else np.zeros(0, np.int64)

    def seen(self) -> LabelsSeen:
        return LabelsSeen(self.task, list(self.index), self.max, self.preset)


def merge_labels(seen: list[LabelsSeen]) -> tuple[list[np.ndarray | None], int, list[str] | None]:
    """The final class ids of labels read by several readers: (per reader, its id -> final id table or None;
    the class count; the class names or None). String names are numbered in sorted order, whoever saw them."""
    first = seen[0]
    if first.task == "regression":
        return [None] * len(seen), 0, None
    names = sorted(set().union(*(s.names for s in seen)))
    if names:
        final = {name: i for i, name in enumerate(names)}
        return [np.array([final[n] for n in s.names], np.int64) for s in seen], len(names), names
    top = max(s.max for s in seen)
    if first.preset:
        return [None] * len(seen), max(len(first.preset), top + 1), list(first.preset)
    return [None] * len(seen), top + 1, None


def class_names(features: dict[str, Any], column: str) -> list[str] | None:
    """The names of a Hugging Face ClassLabel column, from the data set's feature description."""
    f = features.get(column)
    return list(f["names"]) if isinstance(f, dict) and f.get("_type") == "ClassLabel" and f.get("names") else None


def key_hashes(arr: pa.Array, seed: int) -> np.ndarray:
    """A uint64 hash of each key, stable across runs, machines and the data set's growth."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    salt = np.uint64(seed * 0x9E3779B97F4A7C15 % 2**64)
    if pa.types.is_integer(arr.type):
        return mix64(numbers(arr.fill_null(0)).astype(np.int64).view(np.uint64) ^ salt)
    keys = [str(v).encode() for v in arr.to_pylist()]
    digests = b"".join(
        hashlib.blake2b(k, digest_size=8, salt=(seed % 2**64).to_bytes(8, "little")).digest() for k in keys
    )
    return np.frombuffer(digests, dtype="<u8").copy()
