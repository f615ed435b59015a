"""Sources whose rows are token ids already, as `dataset.map(tokenizer)` leaves them: a column of lists of
integer ids (`input_ids`, or --ids-column), often beside `attention_mask` and `token_type_ids`.

With a label the rows are a text classifier's samples, stored as the tokenizer path stores them (tokens.Rows):
each row's ids cut to seq_len and right-padded with the pad id. Without one they are a language model's
documents, packed into blocks of seq_len + 1 (tokens.Blocks), an end-of-text id after each only when one is
asked for. Neither mask nor token types is stored: a reader recomputes the mask from pad_id, and a single
sequence's token types are 0s, the model's default. So a row whose stored form would give the model another
input is refused: a mask that is not 1s then 0s (left padding, holes), a second segment's token types, a pad
id among a row's tokens. Every id is checked against the vocabulary (the tokenizer's, or --vocab-size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shoal.data.arrow_sources import Batches
from shoal.data.columns import Columns, Labels, Plan, class_names, key_hashes, no_nulls, numbers
from shoal.data.stream import Chunk, Lengths, Stream, prefetch
from shoal.data.tokens import Blocks, Vocabulary, id_dtype
from shoal.errors import DataError

MASK, TYPES = "attention_mask", "token_type_ids"
DEFAULT_PAD_ID = 0  # BERT's [PAD], and most encoders' (a row that holds it among its tokens is refused)


@dataclass(frozen=True)
class IdOptions:
    """What the user said about rows of ids (None: not given)."""

    vocab_size: int | None = None
    pad_id: int | None = None
    eot_id: int | None = None
    seq_len: int | None = None  # --seq-len as given: a classifier's rows need it

    def named(self) -> list[str]:
        """The options given that only rows of ids take."""
        pairs = (("--vocab-size", self.vocab_size), ("--pad-id", self.pad_id), ("--eot-id", self.eot_id))
        return [flag for flag, value in pairs if value is not None]


@dataclass(frozen=True)
class Ids:
    """How one source's rows of ids are read and stored."""

    column: str
    size: int  # the vocabulary: ids in [0, size)
    vocabulary: str  # where it came from, for messages
    seq_len: int
    pad_id: int | None  # a classifier's rows
    eot_id: int | None  # a language model's documents: put after each
    mask: str | None  # the source's attention_mask column
    types: str | None  # its token_type_ids column

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(self.size)


def refuse_unused(source: str, stream: Stream, opts: IdOptions | None) -> None:
    """--vocab-size, --pad-id and --eot-id on a source without a column of ids: one line."""
    named = opts.named() if opts else []
    if named and "ids" not in stream.extra.get("columns", {}):
        raise DataError(
            f"{source}: {named[0]} applies to rows of token ids (a column of lists of integer ids: input_ids, or "
            f"--ids-column), and this source is {stream.task} data"
        )


def stream(
    batches: Batches, p: Plan, cols: Columns, seed: int, tokenizer: Vocabulary | None, opts: IdOptions
) -> Stream:
    """The stream of a source's rows of ids: a classifier's padded rows (with a label) or packed blocks."""
    ids = resolve(batches, p, tokenizer, opts)
    rows = IdRows(ids)
    columns = [*p.needed(cols), *(c for c in (ids.mask, ids.types) if c)]
    entry = {"columns": _columns_entry(p, cols, ids), "tokenizer": tokenizer.entry() if tokenizer else "ids"}
    if p.task == "lm":
        if cols.split_key:
            raise DataError(
                "--split-key: not with a language model's ids (a block spans rows); the split is by position"
            )
        return _documents(batches, columns, rows, entry)
    return padded(batches, columns, p, cols, seed, rows.padded, ids.size, {**entry, "pad_id": ids.pad_id})


def resolve(batches: Batches, p: Plan, tokenizer: Vocabulary | None, opts: IdOptions) -> Ids:
    """The vocabulary, pad and end-of-text ids and length of these rows, from the tokenizer or the options."""
    source, column, lm = batches.source, p.x[0], p.task == "lm"
    if tokenizer is None and opts.vocab_size is None:
        raise DataError(
            f"{source}: column {column!r} holds token ids; give their vocabulary with --vocab-size N (or the "
            "tokenizer that made them with --tokenizer PATH)"
        )
    if not lm and opts.seq_len is None:
        raise DataError(
            f"{source}: rows of token ids for a classifier need --seq-len N (ids kept per row, then padded)"
        )
    if lm and opts.pad_id is not None:
        raise DataError(
            f"{source}: --pad-id pads a classifier's rows; a language model's blocks are packed, never padded"
        )
    if not lm and opts.eot_id is not None:
        raise DataError(f"{source}: --eot-id ends a language model's documents; a classifier's row is one sequence")
    size = tokenizer.size if tokenizer else int(opts.vocab_size or 0)
    where = f"{tokenizer.file.name}'s vocabulary" if tokenizer else "--vocab-size"
    pad = None if lm else opts.pad_id if opts.pad_id is not None else tokenizer.pad_id if tokenizer else DEFAULT_PAD_ID
    eot = opts.eot_id if opts.eot_id is not None else tokenizer.eot_id if tokenizer and tokenizer.eot_token else None
    for flag, value in (("--pad-id", pad), ("--eot-id", eot)):
        if value is not None and not 0 <= value < size:
            raise DataError(f"{source}: {flag} {value} is outside the vocabulary [0, {size:,}) ({where})")
    mask, types = (_beside(batches, c, column) for c in (MASK, TYPES))
    return Ids(column, size, where, opts.seq_len or 64, pad, eot, mask, None if lm else types)


def _beside(batches: Batches, name: str, column: str) -> str | None:
    """The source's column `name` (attention_mask, token_type_ids) when it has one beside the ids: lists of
    integers, else one line."""
    if name not in batches.schema.names or name == column:
        return None
    t = batches.schema.field(name).type
    lists = pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
    if not (lists and (pa.types.is_integer(t.value_type) or pa.types.is_boolean(t.value_type))):
        raise DataError(
            f"{batches.source}: column {name!r} holds {t}; beside the ids in {column!r} it must hold lists of integers"
        )
    return name


def _columns_entry(p: Plan, cols: Columns, ids: Ids) -> dict[str, Any]:
    """The manifest's record of the columns read (the mask and token types only checked)."""
    entry: dict[str, Any] = {"ids": ids.column}
    if p.label:
        entry["label"] = p.label
    if cols.split_key:
        entry["split_key"] = cols.split_key
    checked = [c for c in (ids.mask, ids.types) if c]
    return {**entry, **({"checked": checked} if checked else {})}


RowsOf = Callable[[pa.RecordBatch, str, int, Lengths], np.ndarray]  # (batch, where, row0, lengths seen) -> rows


def padded(
    batches: Batches,
    columns: list[str],
    p: Plan,
    cols: Columns,
    seed: int,
    rows_of: RowsOf,
    vocab_size: int,
    extra: dict[str, Any],
) -> Stream:
    """A classifier's samples, rows of ids padded to one length by `rows_of` (each row's lengths counted by
    piece), read in the source's pieces, made by a thread ahead of the writer's spilling."""
    labels = Labels(p.label or "", p.task, class_names(batches.features, p.label or ""))
    lengths: dict[int, Lengths] = {}

    def read(pieces: Sequence[int]) -> Iterator[tuple[int, Chunk]]:
        piece, row0 = -1, 0
        for i, batch, where in batches.read_pieces(columns, [], pieces):
            if i != piece:  # a piece read from its start: counted anew
                piece, row0, lengths[i] = i, 0, Lengths()
            keys = key_hashes(batch.column(cols.split_key), seed) if cols.split_key else None
            y = labels.y(batch.column(p.label), where, row0)
            yield i, Chunk(rows_of(batch, where, row0, lengths[i]), y, keys)
            row0 += batch.num_rows

    return Stream(
        None,
        p.task,
        vocab_size=vocab_size,
        rows=batches.rows,
        nbytes=batches.nbytes,
        labels=labels,
        extra=extra,
        pieces=batches.pieces,
        piece_reader=lambda pieces: prefetch(read(pieces), depth=2),
        piece_sizes=batches.piece_sizes,
        lengths=lengths,
    )


def _documents(batches: Batches, columns: list[str], rows: IdRows, extra: dict[str, Any]) -> Stream:
    """A language model's blocks: the rows' ids one after another (an end-of-text id after each, if asked for),
    one piece (a block spans rows)."""
    ids = rows.ids

    def blocks() -> Iterator[Chunk]:
        cut, piece, row0, made = Blocks(ids.seq_len, ids.dtype), -1, 0, False
        for i, batch, where in batches.read_pieces(columns, [], range(batches.pieces)):
            piece, row0 = i, (row0 if i == piece else 0)
            chunk = cut.add(rows.documents(batch, where, row0))
            row0 += batch.num_rows
            if chunk is not None:
                made = True
                yield chunk
        if not made:
            raise DataError(
                f"{batches.source}: {cut.tokens:,} ids make no block of {ids.seq_len + 1} tokens (lower --seq-len)"
            )

    return Stream(lambda: prefetch(blocks(), depth=2), "lm", vocab_size=ids.size, extra=extra, nbytes=batches.nbytes)


# ---------------------------------------------------------------- record batches -> rows


@dataclass
class Ragged:
    """A column of lists: every value, and each row's length."""

    values: np.ndarray  # int64
    lengths: np.ndarray

    @cached_property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    @cached_property
    def positions(self) -> np.ndarray:
        """Each value's position in its row."""
        return np.arange(int(self.lengths.sum())) - np.repeat(self.starts, self.lengths)

    def row_of(self, i: int) -> int:
        return int(np.searchsorted(np.cumsum(self.lengths), i, side="right"))

    def row_sums(self, values: np.ndarray) -> np.ndarray:
        cum = np.concatenate([[0], np.cumsum(values)])
        return cum[self.starts + self.lengths] - cum[self.starts]


def ragged(arr: Any, name: str, where: str, row0: int) -> Ragged:
    """A column of lists of integers (of any lengths), nulls refused."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    no_nulls(arr, name, where, row0)
    lengths = numbers(pc.list_value_length(arr)).astype(np.int64) if len(arr) else np.zeros(0, np.int64)
    flat = arr.flatten()
    out = Ragged(np.zeros(0, np.int64), lengths)
    if flat.null_count:
        i = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{where}: row {row0 + out.row_of(i):,} of column {name!r} holds a missing value")
    out.values = numbers(flat).astype(np.int64) if len(flat) else out.values
    return out


class IdRows:
    """Record batches -> each row's real ids (its attention_mask's 1s; without a mask, a classifier's row up to
    its last id that is not the pad id), checked, as padded rows or as documents."""

    def __init__(self, ids: Ids):
        self.ids = ids

    def padded(self, batch: pa.RecordBatch, where: str, row0: int, seen: Lengths) -> np.ndarray:
        """[rows, seq_len] ids, right-padded; each row's kept and full lengths added to `seen`."""
        rows, real = self._real(batch, where, row0)
        ids = self.ids
        kept = np.minimum(real, ids.seq_len)
        take = rows.positions < np.repeat(kept, rows.lengths)
        pads = np.flatnonzero(take & (rows.values == ids.pad_id))
        if len(pads):
            self._refuse(
                rows,
                int(pads[0]),
                where,
                row0,
                f"holds the pad id {ids.pad_id} among its tokens; a reader's mask (ids != pad_id) would hide it: "
                "give the id the rows are padded with, one no token of theirs is, as --pad-id (or --pad-token)",
            )
        out = np.full((len(real), ids.seq_len), ids.pad_id, dtype=ids.dtype)
        out[np.arange(ids.seq_len) < kept[:, None]] = rows.values[take]  # row-major: each row's ids, then its pads
        seen.add(kept, real)
        return out

    def documents(self, batch: pa.RecordBatch, where: str, row0: int) -> np.ndarray:
        """The rows' real ids one after another, the end-of-text id (if any) after each."""
        rows, real = self._real(batch, where, row0)
        ids = rows.values[rows.positions < np.repeat(real, rows.lengths)].astype(self.ids.dtype)
        return ids if self.ids.eot_id is None else np.insert(ids, np.cumsum(real), self.ids.eot_id)

    def _real(self, batch: pa.RecordBatch, where: str, row0: int) -> tuple[Ragged, np.ndarray]:
        """The ids, checked against the vocabulary, and each row's count of real ids."""
        ids = self.ids
        rows = ragged(batch.column(ids.column), ids.column, where, row0)
        bad = np.flatnonzero((rows.values < 0) | (rows.values >= ids.size))
        if len(bad):
            v = int(rows.values[bad[0]])
            self._refuse(rows, int(bad[0]), where, row0, f"holds id {v}, outside [0, {ids.size:,}) ({ids.vocabulary})")
        if ids.mask:
            real = self._masked(rows, ragged(batch.column(ids.mask), ids.mask, where, row0), where, row0)
        elif ids.pad_id is not None:
            real = _up_to_last_token(rows, ids.pad_id)
        else:
            real = rows.lengths
        if ids.types:
            self._single_sequence(rows, real, ragged(batch.column(ids.types), ids.types, where, row0), where, row0)
        return rows, real

    def _masked(self, rows: Ragged, mask: Ragged, where: str, row0: int) -> np.ndarray:
        """Each row's 1s in a mask that must be as long as its ids and 1s then 0s."""
        _same_lengths(rows, mask, self.ids.column, MASK, where, row0)
        odd = np.flatnonzero((mask.values != 0) & (mask.values != 1))
        if len(odd):
            self._refuse(
                mask, int(odd[0]), where, row0, f"holds {int(mask.values[odd[0]])}; a mask holds 0s and 1s", MASK
            )
        rise = np.flatnonzero(mask.values[1:] > mask.values[:-1]) + 1
        rise = rise[mask.positions[rise] > 0]  # a 1 after a 0 in the same row
        if len(rise):
            self._refuse(
                mask,
                int(rise[0]),
                where,
                row0,
                "is not 1s then 0s (a 1 after a 0: left padding, or a hole); rows are stored right-padded and the "
                "mask recomputed from pad_id, which would change this row's input: tokenize with right padding "
                "(padding_side='right') or none",
                MASK,
            )
        return mask.row_sums(mask.values)

    def _single_sequence(self, rows: Ragged, real: np.ndarray, types: Ragged, where: str, row0: int) -> None:
        """Token types must be a single sequence's 0s: they are not stored, and a model's default is 0s."""
        _same_lengths(rows, types, self.ids.column, TYPES, where, row0)
        second = np.flatnonzero((types.values != 0) & (types.positions < np.repeat(real, types.lengths)))
        if len(second):
            self._refuse(
                types,
                int(second[0]),
                where,
                row0,
                f"holds {int(types.values[second[0]])}: a second segment (a pair of texts); token_type_ids are not "
                "stored (a model gets a single sequence's 0s), so rows must be single sequences",
                TYPES,
            )

    def _refuse(self, rows: Ragged, i: int, where: str, row0: int, what: str, column: str | None = None) -> None:
        r = rows.row_of(i)
        at = i - int(rows.starts[r])
        raise DataError(f"{where}: row {row0 + r:,} of column {column or self.ids.column!r}, position {at}, {what}")


def _same_lengths(rows: Ragged, other: Ragged, column: str, name: str, where: str, row0: int) -> None:
    odd = np.flatnonzero(rows.lengths != other.lengths)
    if len(odd):
        r = int(odd[0])
        raise DataError(
            f"{where}: row {row0 + r:,} holds {int(other.lengths[r])} values in column {name!r} and "
            f"{int(rows.lengths[r])} in {column!r}; they must be as long"
        )


def _up_to_last_token(rows: Ragged, pad_id: int) -> np.ndarray:
    """Each row's length up to its last id that is not the pad id: without a mask, pads at a row's end are its
    padding (the rows were padded already)."""
    tokens = np.flatnonzero(rows.values != pad_id)
    ends = rows.starts + rows.lengths
    last = np.searchsorted(tokens, ends, side="left") - 1  # the last token before each row's end
    found = last >= 0
    at = np.where(found, tokens[np.maximum(last, 0)] if len(tokens) else 0, -1)
    return np.where(found & (at >= rows.starts), at - rows.starts + 1, 0)
