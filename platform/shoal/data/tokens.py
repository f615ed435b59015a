"""Text as token ids: documents through a Hugging Face `tokenizers` tokenizer (or as bytes) into
blocks for language models, rows of a labelled text column into padded rows for classifiers, and
`shoal tokenizer train`'s byte-level BPE.

A document (a text file, a file of a directory, a row of a text column) is encoded in pieces of
about PIECE_CHARS cut at line ends, through `encode_batch` in batches of about BATCH_CHARS (its
threads share out a batch), the end-of-text id after its last piece. The ids of consecutive documents
are packed into blocks of seq_len + 1 tokens (x the first seq_len, y shifted by one, consecutive
blocks sharing one token: no padding), in the smallest unsigned type that holds the vocabulary.
Memory holds a batch of pieces and its ids, never a document.

A row of a classification table is encoded alone, as the tokenizer encodes one sequence (with the special
tokens its post-processor adds, such as BERT's [CLS] and [SEP]; no end-of-text id), cut to seq_len ids
by the tokenizer's own truncation (which keeps those special tokens) and right-padded with the pad id.
"""

from __future__ import annotations

import codecs
import hashlib
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from shoal.data.stream import Chunk, Lengths
from shoal.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
# the end-of-text token, the first of these a tokenizer has among its special tokens (else --eot-token)
EOT_TOKENS = ("<|endoftext|>", "</s>", "<eos>", "[SEP]", "<|end_of_text|>")
BPE_EOT = "<|endoftext|>"
# the pad id of classification rows: the first of these among the added tokens (else --pad-token, else end-of-text)
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>")
# a document is encoded in pieces of about this many characters: encode_batch runs longest on long
# inputs (64K-character pieces took twice as long as 1K ones, or as the same text's lines)
PIECE_CHARS = 1 << 10
BATCH_CHARS = 1 << 20  # characters per encode_batch call: a thousand pieces to share among its threads
BATCH_PIECES = 8192  # and at most this many pieces (short rows of a text column)
LONG_LINE = 16 << 10  # text without a line end this long is cut at a space
# a cut between two lines, where neither side is whitespace: byte-level BPE (GPT-2's pre-tokenizer,
# and the GPT-4 / Llama 3 patterns) ends a pre-token there, so the pieces' ids are the whole text's
LINE_CUT = re.compile(r"(?<=\S)\n(?=\S)")
SPACE_CUT = re.compile(r"(?<=\S)(?=\s)")

Item = tuple[str, bool]  # (a piece of a document's text, whether it is the document's last)


class Coder(Protocol):
    """Text to token ids: a tokenizer's, or UTF-8 bytes."""

    size: int  # the vocabulary: ids are in [0, size)

    @property
    def dtype(self) -> np.dtype: ...

    def encode(self, texts: list[str], ends: list[bool]) -> np.ndarray:
        """The ids of the pieces in order, an end-of-document mark after each piece that ends one."""
        ...


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds ids 0 .. vocab_size - 1."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise DataError(f"a vocabulary of {vocab_size:,} ids does not fit 32 bits")


@dataclass(frozen=True)
class Bytes:
    """UTF-8 bytes as tokens (vocabulary 256), a newline after each document."""

    size: int = 256

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def encode(self, texts: list[str], ends: list[bool]) -> np.ndarray:
        data = "".join(t + "\n" if end else t for t, end in zip(texts, ends)).encode()
        return np.frombuffer(data, dtype=np.uint8)


@dataclass(frozen=True)
class Vocabulary:
    """A tokenizer.json loaded for `shoal shard --tokenizer`: the tokenizer, its end-of-text and pad ids
    and special tokens, and the file's bytes (copied into the shards' directory, hashed in the manifest)."""

    file: Path
    raw: bytes = field(repr=False)
    tokenizer: Tokenizer = field(repr=False)
    eot_id: int
    special: dict[str, int]
    size: int
    pad_id: int = 0
    pad_token: str | None = None  # as --pad-token named it (None: found, or the end-of-text token)
    eot_token: str | None = None  # as --eot-token named it (None: found)

    @property
    def dtype(self) -> np.dtype:
        return id_dtype(self.size)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    def entry(self) -> dict[str, Any]:
        """The manifest's `tokenizer` entry."""
        return {"file": TOKENIZER_FILE, "sha256": self.sha256, "eot_id": self.eot_id, "special": self.special}

    def encode(self, texts: list[str], ends: list[bool]) -> np.ndarray:
        # no post-processor's [CLS]/<s>: a piece is not a sequence of its own, the end-of-text id marks documents
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        eot = (self.eot_id,)
        ids = chain.from_iterable(chain(e.ids, eot) if end else e.ids for e, end in zip(encodings, ends))
        return np.fromiter(ids, dtype=self.dtype)

    def write_copy(self, out_dir: Path) -> Path:
        """The tokenizer's bytes as OUT_DIR/tokenizer.json (written whole, then renamed into place)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f".{TOKENIZER_FILE}.tmp"
        tmp.write_bytes(self.raw)
        return tmp.replace(out_dir / TOKENIZER_FILE)


def load_tokenizer(path: str, eot_token: str | None = None, pad_token: str | None = None) -> Vocabulary:
    """The tokenizer.json PATH names (or the one in directory PATH), with its end-of-text and pad ids."""
    file = _tokenizer_file(Path(path).expanduser())
    try:
        raw = file.read_bytes()
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as e:  # OSError, UnicodeDecodeError, and tokenizers' plain Exception on bad JSON
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{file}: not a readable `tokenizers` tokenizer.json ({first})") from None
    # padding or truncation a tokenizer.json may carry would pad or cut each piece of a document: off
    tokenizer.no_padding()
    tokenizer.no_truncation()
    special = {t.content: i for i, t in sorted(tokenizer.get_added_tokens_decoder().items()) if t.special}
    eot_id = _eot_id(file, tokenizer, special, eot_token)
    pad_id = _pad_id(file, tokenizer, eot_id, pad_token)
    for named, i in ((eot_token, eot_id), (pad_token, pad_id)):
        if named:
            special.setdefault(named, i)
    size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(tokenizer.get_vocab(True).values()) + 1)
    return Vocabulary(file, raw, tokenizer, eot_id, special, size, pad_id, pad_token, eot_token)


def _tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise DataError(
                f"{path}: holds no {TOKENIZER_FILE} (--tokenizer takes a `tokenizers` tokenizer.json, or a "
                "directory holding one as save_pretrained writes it)"
            )
        return path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such tokenizer file (--tokenizer takes a tokenizer.json or a directory with one)")
    return path


def _eot_id(file: Path, tokenizer: Tokenizer, special: dict[str, int], eot_token: str | None) -> int:
    """--eot-token's id when given, else the first of EOT_TOKENS among the special tokens."""
    if eot_token:
        found = tokenizer.token_to_id(eot_token)
        if found is None:
            raise DataError(f"{file}: --eot-token {eot_token!r} is not in the tokenizer's vocabulary")
        return found
    for token in EOT_TOKENS:
        if token in special:
            return special[token]
    raise DataError(
        f"{file}: no end-of-text token among its special tokens ({', '.join(EOT_TOKENS)}); name the one that "
        "ends a document with --eot-token TOKEN"
    )


def _pad_id(file: Path, tokenizer: Tokenizer, eot_id: int, pad_token: str | None) -> int:
    """--pad-token's id when given, else the first of PAD_TOKENS among the added tokens, else the
    end-of-text id (as GPT-2's users pad)."""
    if pad_token:
        found = tokenizer.token_to_id(pad_token)
        if found is None:
            raise DataError(f"{file}: --pad-token {pad_token!r} is not in the tokenizer's vocabulary")
        return found
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
    return next((added[t] for t in PAD_TOKENS if t in added), eot_id)


# ---------------------------------------------------------------- rows into padded rows


class Rows:
    """Texts (one a row) into rows of seq_len ids: each encoded alone with the tokenizer's special tokens,
    cut by its truncation and right-padded with the pad id. A copy of the tokenizer (without the padding and
    truncation its file may set: load_tokenizer turned them off) carries this truncation."""

    def __init__(self, vocab: Vocabulary, seq_len: int):
        self.tokenizer = Tokenizer.from_str(vocab.tokenizer.to_str())
        self.special = self.tokenizer.num_special_tokens_to_add(False)  # [CLS] and [SEP]: 2, a bare BPE: 0
        if seq_len <= self.special:
            raise DataError(
                f"--seq-len: {seq_len} leaves no room for text beside the {self.special} special tokens "
                f"{vocab.file.name} adds to every row"
            )
        self.tokenizer.enable_truncation(seq_len)
        self.seq_len, self.pad_id, self.dtype = seq_len, vocab.pad_id, vocab.dtype

    def encode(self, texts: list[str], seen: Lengths) -> np.ndarray:
        """[len(texts), seq_len] ids, each row's lengths (kept, and before the cut) added to `seen`."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        kept = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        full = np.fromiter((self._full(e) for e in encodings), dtype=np.int64, count=len(encodings))
        out = np.full((len(texts), self.seq_len), self.pad_id, dtype=self.dtype)
        flat = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=self.dtype, count=int(kept.sum()))
        out[np.arange(self.seq_len) < kept[:, None]] = flat  # row-major: each row's ids, then its pads
        seen.add(kept, full)
        return out

    def _full(self, e: Any) -> int:
        """A row's length before the cut: the kept part and each overflowing one, special tokens counted once."""
        if not e.overflowing:
            return len(e.ids)
        return sum(len(o.ids) - self.special for o in (e, *e.overflowing)) + self.special


# ---------------------------------------------------------------- documents into blocks


class Blocks:
    """Ids in, blocks of seq_len + 1 tokens out (x the first seq_len, y the last seq_len), consecutive
    blocks sharing one token: the blocks the whole sequence gives, cut as its pieces arrive."""

    def __init__(self, seq_len: int, dtype: np.dtype):
        self.seq_len, self.buf = seq_len, np.zeros(0, dtype=dtype)
        self.tokens = 0  # every id added

    def add(self, ids: np.ndarray) -> Chunk | None:
        self.tokens += len(ids)
        buf = np.concatenate([self.buf, ids]) if len(self.buf) else ids
        n = (len(buf) - 1) // self.seq_len
        if n < 1:
            self.buf = buf.copy()
            return None
        rows = np.lib.stride_tricks.sliding_window_view(buf[: n * self.seq_len + 1], self.seq_len + 1)
        rows = rows[:: self.seq_len].copy()
        self.buf = buf[n * self.seq_len :].copy()  # the shared token and the rest, not a view of the batch
        return Chunk(rows[:, :-1], rows[:, 1:])


def blocks(items: Iterable[Item], coder: Coder, seq_len: int, source: str) -> Iterator[Chunk]:
    """The blocks of the documents' pieces, encoded a batch at a time."""
    cut = Blocks(seq_len, coder.dtype)
    made = False
    for texts, ends in batches(items):
        chunk = cut.add(coder.encode(texts, ends))
        if chunk is not None:
            made = True
            yield chunk
    if not made:
        raise DataError(f"{source}: {cut.tokens:,} tokens make no block of {seq_len + 1} tokens (lower --seq-len)")


def batches(items: Iterable[Item]) -> Iterator[tuple[list[str], list[bool]]]:
    """The pieces in batches of about BATCH_CHARS characters (at most BATCH_PIECES pieces)."""
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for text, end in items:
        texts.append(text)
        ends.append(end)
        chars += len(text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_PIECES:
            yield texts, ends
            texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def pieces(raw: Iterable[bytes]) -> Iterator[str]:
    """UTF-8 text arriving in pieces of bytes as strings of about PIECE_CHARS, cut between lines (at a
    space in a line longer than LONG_LINE; anywhere only in a run of that many non-space characters)."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    carry = ""
    for data in raw:
        carry += decoder.decode(data)
        start = 0
        while (end := _cut(carry, start)) is not None:
            yield carry[start:end]
            start = end
        carry = carry[start:]
    carry += decoder.decode(b"", final=True)
    if carry:
        yield carry


def _cut(text: str, start: int) -> int | None:
    """Where the piece from `start` ends, PIECE_CHARS to LONG_LINE on; None when the text so far holds
    no cut and is shorter than LONG_LINE (wait for more)."""
    lo, hi = start + PIECE_CHARS, start + LONG_LINE
    m = LINE_CUT.search(text, lo, hi)
    if m is not None:
        return m.end()
    if len(text) < hi:
        return None
    m = SPACE_CUT.search(text, lo, hi)
    return m.end() if m is not None else lo


def row(text: str) -> Iterator[Item]:
    """A document held whole (a row of a text column) in pieces, the last marked: long inputs encode
    slower than the same text cut, and the cuts change no id."""
    start = 0
    while (end := _cut(text, start)) is not None:
        yield text[start:end], False
        start = end
    yield text[start:], True


def document(raw: Iterable[bytes]) -> Iterator[Item]:
    """One document's pieces as its bytes arrive, the last marked."""
    last = None
    for piece in pieces(raw):
        if last is not None:
            yield last, False
        last = piece
    yield (last or ""), True


# ---------------------------------------------------------------- `shoal tokenizer train`


def train_bpe(texts: Iterable[str], vocab_size: int, out: Path, say: Any = print) -> Tokenizer:
    """A byte-level BPE trained on the texts (streamed), with BPE_EOT as its special token, saved to OUT."""
    if vocab_size < 257:
        raise DataError(f"--vocab-size: at least 257 (the 256 byte symbols and {BPE_EOT}), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    # no prefix space: decode(encode(text)) is the text itself, the round trip `shoal shard` keeps
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(_counted(texts, say), trainer=trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return tokenizer


def _counted(texts: Iterable[str], say: Any, every_s: float = 5.0) -> Iterator[str]:
    """The texts, with a progress line every few seconds and one when they are all read."""
    chars = docs = 0
    last = time.monotonic()
    for text in texts:
        chars += len(text)
        docs += 1
        yield text
        if time.monotonic() - last > every_s:
            say(f"[shoal] read {chars:,} characters ({docs:,} pieces)")
            last = time.monotonic()
    say(f"[shoal] read {chars:,} characters ({docs:,} pieces); computing the merges")
