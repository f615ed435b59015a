"""`shoal shard` writes a data set as shards; `shoal check` finds data, loss, model and config
mistakes before training.

The modules that do the work are imported inside the handlers: they load numpy and torch, which
the driver's start-up (`shoal --help`) must not."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.cli.command import Command, config_args, load_job, out_arg, out_path
from shoal.cli.output import note, say
from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.data.columns import Columns
    from shoal.data.tokens import Vocabulary
    from shoal.data.writer import ShardOptions


def _check_args(p: argparse.ArgumentParser) -> None:
    config_args(p)
    out_arg(p, "DIR", "where to write the report (default: RUN_DIR/check)")


def check_job(args: argparse.Namespace) -> int:
    cfg = load_job(args)
    from shoal import check

    result = check.run(cfg, out_path(args, cfg, "check"), say=note)
    say("\n".join(check.summary_lines(result)))
    return result.exit_code


def _shard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "source",
        metavar="SOURCE",
        help="digits | synthetic | a parquet or Arrow/Feather file, directory or glob | a Hugging Face datasets "
        "directory | a .npz, .csv, .jsonl or text file | a folder of class subfolders of images",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="a directory, or s3://bucket/prefix (see Object storage)")
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--samples-per-shard", type=int, default=None, metavar="N", help="samples per shard (default 10000)"
    )
    size.add_argument("--bytes-per-shard", default=None, metavar="SIZE", help="shard size instead, e.g. 64MB")
    p.add_argument("--block-size", type=int, default=64, help="samples packed per tar entry (default 64)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share written as the val split (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
    p.add_argument("--no-shuffle", action="store_true", help="keep the source's order")
    p.add_argument("--overwrite", action="store_true", help="replace shards already in OUT_DIR")
    p.add_argument(
        "--shuffle-memory",
        default="256MB",
        metavar="SIZE",
        help="rows the external shuffle holds in memory at once, per worker (default 256MB; a bucket bigger than this is split again)",
    )
    p.add_argument(
        "--split-key",
        default=None,
        metavar="COLUMN",
        help="split train/val by a hash of this column, so a record keeps its split as the data grows",
    )
    _parallel_args(p)
    _source_args(p)
    _column_args(p)
    _text_args(p)
    _id_args(p)


def _parallel_args(p: argparse.ArgumentParser) -> None:
    """How many processes convert, and where."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="convert with N processes, each reading some pieces of the source and writing its own shards "
        "(default 1; with --ray, the cluster's CPUs); the samples and their order are the same for every N",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run the conversion as Ray tasks of one CPU each: on the cluster at ADDRESS (or RAY_ADDRESS), else on "
        "a local one started for it; SOURCE and OUT_DIR must be on storage every node sees (put --ray after "
        "OUT_DIR, or write --ray=ADDRESS)",
    )


def _source_args(p: argparse.ArgumentParser) -> None:
    """How `shoal shard` reads or makes its source."""
    p.add_argument("--num-samples", type=int, default=100_000, help="synthetic: samples")
    p.add_argument("--input-shape", type=int, nargs="+", default=[32], help="synthetic: sample shape")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic: classes")
    p.add_argument(
        "--task", choices=["classification", "regression", "lm"], default=None, help="task (default: inferred)"
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="text and synthetic lm: tokens per sample (default 64); text classification: ids per row (cut, then "
        "padded; required for rows of token ids)",
    )
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="images: resize to H x W")


def _column_args(p: argparse.ArgumentParser) -> None:
    """Which columns of a columnar source (parquet, Arrow, datasets, CSV, JSONL) become x and y."""
    p.add_argument(
        "--x-columns",
        action="append",
        default=None,
        metavar="A,B,...",
        help="feature columns, comma-separated or repeated: numbers or lists of numbers of one size "
        "(default: every column but the label)",
    )
    p.add_argument(
        "--label-column",
        default=None,
        metavar="NAME",
        help="label column: integers, or strings made class ids (default: 'label', else 'y', else the last)",
    )
    p.add_argument("--text-column", default=None, metavar="NAME", help="a column of documents for a language model")
    p.add_argument("--image-column", default=None, metavar="NAME", help="a column of encoded images (bytes)")


def _text_args(p: argparse.ArgumentParser) -> None:
    """How text becomes token ids (default: UTF-8 bytes, vocabulary 256)."""
    p.add_argument(
        "--tokenizer",
        default=None,
        metavar="PATH",
        help="a Hugging Face `tokenizers` tokenizer.json, or a directory holding one, to encode text with",
    )
    p.add_argument(
        "--eot-token",
        default=None,
        metavar="TOKEN",
        help="the token put after each document (default: the tokenizer's <|endoftext|>, </s>, <eos>, [SEP] "
        "or <|end_of_text|>)",
    )
    p.add_argument(
        "--pad-token",
        default=None,
        metavar="TOKEN",
        help="text classification: the token that pads each row to --seq-len ids (default: the tokenizer's [PAD], "
        "<pad> or <|pad|>, else its end-of-text token)",
    )


def _id_args(p: argparse.ArgumentParser) -> None:
    """Rows that are token ids already (a tokenizer's input_ids): their vocabulary, pad and end-of-text ids."""
    p.add_argument(
        "--ids-column",
        default=None,
        metavar="NAME",
        help="a column of token ids (lists of integers, as a tokenizer's input_ids): a classifier's rows beside a "
        "label, else a language model's documents (default: a column named input_ids)",
    )
    p.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        metavar="N",
        help="rows of token ids without --tokenizer: their vocabulary (every id must be below N)",
    )
    p.add_argument(
        "--pad-id",
        type=int,
        default=None,
        metavar="N",
        help="rows of token ids for a classifier: the id that pads each row to --seq-len (default: the tokenizer's "
        "pad, else 0)",
    )
    p.add_argument(
        "--eot-id",
        type=int,
        default=None,
        metavar="N",
        help="rows of token ids for a language model: an id put after each row (default: none; --eot-token with "
        "--tokenizer names it by its token)",
    )


def _check_token_args(args: argparse.Namespace) -> None:
    """Token options that contradict each other or are out of range, before anything is read."""
    if args.eot_token and not args.tokenizer:
        raise ShoalError("--eot-token: only with --tokenizer (bytes end a document with a newline)")
    if args.pad_token and not args.tokenizer:
        raise ShoalError("--pad-token: only with --tokenizer (it names one of the tokenizer's tokens)")
    if args.seq_len is not None and args.seq_len < 1:
        raise ShoalError(f"--seq-len: must be at least 1 (got {args.seq_len})")
    for flag, value, other, named in (
        ("--vocab-size", args.vocab_size, "--tokenizer", args.tokenizer),
        ("--pad-id", args.pad_id, "--pad-token", args.pad_token),
        ("--eot-id", args.eot_id, "--eot-token", args.eot_token),
    ):
        if value is not None and named:
            raise ShoalError(f"{flag}: not with {other} (both give the same id or vocabulary; name one)")
        if value is not None and value < (1 if flag == "--vocab-size" else 0):
            raise ShoalError(f"{flag}: must be at least {1 if flag == '--vocab-size' else 0} (got {value})")


def shard(args: argparse.Namespace) -> int:
    from shoal.data import storage
    from shoal.data.locate import MANIFEST
    from shoal.data.writer import check_options

    if not 0 <= args.val_fraction < 1:
        raise ShoalError(f"--val-fraction: must be in [0, 1) (got {args.val_fraction})")
    _check_token_args(args)
    opts = _shard_options(args)
    check_options(opts)
    tokenizer = _tokenizer(args)
    if storage.is_remote(args.out_dir):
        return _shard_to_storage(args, opts, tokenizer)
    out = Path(args.out_dir)
    if tokenizer is not None and (args.overwrite or not (out / MANIFEST).exists()):
        tokenizer.write_copy(out)  # before the shards: the manifest, written last, names it and its hash
    _said(_write(args, opts, out, tokenizer), str(out / MANIFEST))
    return 0


def _write(args: argparse.Namespace, opts: ShardOptions, out: Path, tokenizer: Vocabulary | None) -> dict:
    """The conversion into the local directory `out`; returns the manifest."""
    from functools import partial

    from shoal.data.writer import load_source, write_shards

    reopen = partial(load_source, args.source, **_source_kwargs(args, tokenizer))  # the same source, in another process
    return write_shards(reopen(), out, opts, source=args.source, reopen=reopen)


def _shard_to_storage(args: argparse.Namespace, opts: ShardOptions, tokenizer: Vocabulary | None) -> int:
    """OUT_DIR in object storage: written to a local staging directory, then uploaded shard by shard,
    the manifest last. The bucket and credentials are checked before the source is read."""
    import shutil
    import tempfile

    from shoal.data import storage
    from shoal.data.locate import MANIFEST

    url = args.out_dir.rstrip("/")
    store = storage.Store()
    before = storage.prepare_prefix(store, url, MANIFEST, args.overwrite)
    staging = Path(tempfile.mkdtemp(prefix="shoal-shard-"))  # $TMPDIR: it holds the shards until uploaded
    try:
        extra = [tokenizer.write_copy(staging).name] if tokenizer is not None else []
        manifest = _write(args, opts, staging, tokenizer)
        names = extra + [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
        say(f"[shoal] uploading {len(names)} shards to {url}")
        storage.publish(store, staging, url, names, MANIFEST, before if args.overwrite else set())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _said(manifest, storage.join(url, MANIFEST))
    return 0


def _said(manifest: dict, where: str) -> None:
    for split, info in manifest["splits"].items():
        say(f"[shoal] {split}: {info['samples']:,} samples in {len(info['shards'])} shards")
    lengths = manifest.get("lengths") or {}
    if lengths.get("truncated"):
        rows = sum(info["samples"] for info in manifest["splits"].values())
        seq_len = manifest["fields"]["x"]["shape"][0]
        say(
            f"[shoal] {lengths['truncated']:,} of {rows:,} rows had more than --seq-len {seq_len} tokens and were "
            f"cut to it (the longest had {lengths['longest']:,})"
        )
    say(f"[shoal] wrote {where}")


def _tokenizer(args: argparse.Namespace) -> Vocabulary | None:
    """--tokenizer's tokenizer and its end-of-text and pad ids (None: text as bytes)."""
    if not args.tokenizer:
        return None
    from shoal.data.tokens import load_tokenizer

    return load_tokenizer(args.tokenizer, args.eot_token, args.pad_token)


def _source_kwargs(args: argparse.Namespace, tokenizer: Vocabulary | None) -> dict[str, Any]:
    """load_source's options for the samples SOURCE names, read or made (picklable: a worker process
    reopens the source with them)."""
    from shoal.data.token_ids import IdOptions

    return dict(
        num_samples=args.num_samples,
        input_shape=args.input_shape,
        num_classes=args.num_classes,
        task=args.task,
        seq_len=args.seq_len,
        label_column=args.label_column,
        image_size=tuple(args.image_size) if args.image_size else None,
        seed=args.seed,
        columns=_columns(args),
        tokenizer=tokenizer,
        ids=IdOptions(vocab_size=args.vocab_size, pad_id=args.pad_id, eot_id=args.eot_id),
    )


def _columns(args: argparse.Namespace) -> Columns:
    """--x-columns and friends; names may also be given comma-separated."""
    from shoal.data.columns import Columns

    x = tuple(n for arg in args.x_columns for n in arg.split(",") if n) if args.x_columns else None
    return Columns(
        x=x,
        label=args.label_column,
        text=args.text_column,
        image=args.image_column,
        ids=args.ids_column,
        split_key=args.split_key,
    )


def _shard_options(args: argparse.Namespace) -> ShardOptions:
    """The writer's ShardOptions from the command line."""
    from shoal.data.writer import ShardOptions, parse_bytes

    return ShardOptions(
        samples_per_shard=args.samples_per_shard,
        bytes_per_shard=parse_bytes(args.bytes_per_shard) if args.bytes_per_shard else None,
        block_size=args.block_size,
        shuffle=not args.no_shuffle,
        seed=args.seed,
        val_fraction=args.val_fraction,
        overwrite=args.overwrite,
        shuffle_memory=parse_bytes(args.shuffle_memory, "--shuffle-memory"),
        workers=args.workers,
        ray=args.ray,
    )


CHECK = Command(
    "check", "find data, loss, model and config mistakes before training (exit 1 if any)", _check_args, check_job
)
SHARD = Command("shard", "write a data set as webdataset tar shards plus manifest.json", _shard_args, shard)
