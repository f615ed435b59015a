"""`shoal tokenizer train`: a byte-level BPE tokenizer from a corpus, for `shoal shard --tokenizer`.

The modules that do the work (tokenizers, numpy, pyarrow) are imported inside the handler: the
driver's start-up (`shoal --help`) loads none of them."""

from __future__ import annotations

import argparse
from itertools import chain
from pathlib import Path

from shoal.cli.command import Command
from shoal.cli.output import say


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "corpus",
        nargs="+",
        metavar="CORPUS",
        help="text files, directories of them, or parquet / Arrow / Hugging Face datasets / CSV / JSONL "
        "sources with a text column",
    )
    p.add_argument("--vocab-size", type=int, required=True, metavar="N", help="tokens in the vocabulary (>= 257)")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="where to write tokenizer.json (a directory: DIR/tokenizer.json, as save_pretrained lays it out)",
    )
    p.add_argument(
        "--text-column", default=None, metavar="NAME", help="the documents' column of a columnar source (default: text)"
    )


def train(args: argparse.Namespace) -> int:
    from shoal.data.sources import text_documents
    from shoal.data.tokens import TOKENIZER_FILE, train_bpe

    out = Path(args.out)
    out = out / TOKENIZER_FILE if out.is_dir() else out
    texts = chain.from_iterable([text_documents(c, args.text_column) for c in args.corpus])  # each checked now
    tokenizer = train_bpe(texts, args.vocab_size, out, say=say)
    say(f"[shoal] wrote {out}: a vocabulary of {tokenizer.get_vocab_size(with_added_tokens=True):,} tokens")
    return 0


TRAIN = Command("train", "train a byte-level BPE tokenizer on text files or a text column", _train_args, train)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `shoal tokenizer train ...` on the `shoal` command's subparsers."""
    t = subparsers.add_parser("tokenizer", help="tokenizers for `shoal shard --tokenizer` (train)")
    actions = t.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    actions.required = True
    TRAIN.add_parser(actions)
    return t
