"""Text through a real tokenizer: a byte-level BPE trained by `shoal tokenizer train` on a generated
corpus; shards of its ids decode back to every document; the transformer_lm trains on them below the
unigram baseline; `shoal check` and the loader find ids past the vocabulary; bad tokenizers exit 2."""

from __future__ import annotations

import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_data_writer import read_all, rows, shard
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from shoal.config import DataConfig, load_config
from shoal.data import tokens
from shoal.data.shards import open_shards
from shoal.dist import WorldInfo
from shoal.errors import DataError

from conftest import REPO, shoal_cli

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")

DETERMINERS = ["the", "a", "every", "some"]
ADJECTIVES = ["red", "quick", "lazy", "small", "old", "bright", "quiet"]
NOUNS = ["cat", "dog", "fox", "bird", "horse", "river", "garden", "teacher", "engine", "window"]
VERBS = ["sees", "follows", "likes", "finds", "watches", "carries", "ignores"]


def sentence(rng: random.Random) -> str:
    """det [adj] noun verb det noun: a grammar a model with context predicts far better than word counts."""
    words = [rng.choice(DETERMINERS), *([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else [])]
    words += [rng.choice(NOUNS), rng.choice(VERBS), rng.choice(DETERMINERS), rng.choice(NOUNS)]
    return " ".join(words).capitalize() + "."


def documents(n: int, lines: int, seed: int = 0) -> list[str]:
    """n documents of generated lines (some ending without a newline, one with blank lines and a non-ASCII word)."""
    rng = random.Random(seed)
    docs = ["\n".join(sentence(rng) for _ in range(rng.randint(lines // 2, lines))) for _ in range(n)]
    docs = [d + "\n" if i % 3 else d for i, d in enumerate(docs)]
    docs[1] = docs[1].replace(".\n", ".\n\n  ", 3) + "Café über naïve.\n"
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A directory of generated documents, one a file, and the BPE `shoal tokenizer train` makes on it."""
    root = tmp_path_factory.mktemp("corpus")
    docs = documents(24, 60)
    (root / "docs").mkdir()
    for i, doc in enumerate(docs):
        (root / "docs" / f"doc{i:03d}.txt").write_text(doc)
    (root / "docs" / ".hidden.txt").write_text("not a document")
    (root / "tok").mkdir()  # --out a directory: DIR/tokenizer.json, as `--tokenizer DIR` reads it
    proc = shoal_cli("tokenizer", "train", str(root / "docs"), "--vocab-size", "400", "--out", str(root / "tok"))
    assert proc.returncode == 0, proc.stderr
    vocab = Tokenizer.from_file(str(root / "tok" / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    assert f"a vocabulary of {vocab} tokens" in proc.stdout and "computing the merges" in proc.stdout
    return root, docs


def token_sequence(out_dir) -> tuple[np.ndarray, dict]:
    """The ids of unshuffled shards in order: the blocks concatenated, each one's shared first token once."""
    x, y, manifest = read_all(out_dir)
    return np.concatenate([x.reshape(-1), y[-1, -1:]]), manifest


def decoded(out_dir, tokenizer: Tokenizer) -> list[str]:
    """The documents every end-of-text id closes, decoded (the unfinished tail after the last is left out)."""
    ids, manifest = token_sequence(out_dir)
    eot = manifest["tokenizer"]["eot_id"]
    ends = np.flatnonzero(ids == eot)
    starts = np.r_[0, ends[:-1] + 1]
    return [tokenizer.decode(ids[a:b].tolist(), skip_special_tokens=False) for a, b in zip(starts, ends)]


def test_trained_tokenizer_is_byte_level_bpe_with_end_of_text(corpus):
    root, docs = corpus
    tok = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    assert 300 <= tok.get_vocab_size(with_added_tokens=True) <= 400
    assert tok.token_to_id("<|endoftext|>") is not None
    assert tok.decode(tok.encode(docs[1]).ids) == docs[1]  # byte level: every text round-trips
    assert len(tok.encode(docs[0]).ids) < len(docs[0].encode()) / 2  # merges learnt: fewer ids than bytes


def test_directory_of_text_files_decodes_back_to_every_document(corpus, tmp_path):
    root, docs = corpus
    out = tmp_path / "out"
    args = ["--tokenizer", str(root / "tok"), "--seq-len", "32", "--no-shuffle", "--val-fraction", "0"]
    shard(str(root / "docs"), str(out), *args)
    manifest = json.loads((out / "manifest.json").read_text())
    tok = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    got = decoded(out, tok)
    assert len(got) >= len(docs) - 1 and got == docs[: len(got)]  # the last may be cut by the final block
    assert manifest["fields"]["x"] == {"dtype": "<u2", "shape": [32]} and manifest["task"] == "lm"
    assert manifest["vocab_size"] == tok.get_vocab_size(with_added_tokens=True) and manifest["documents"] == len(docs)
    entry = manifest["tokenizer"]
    assert entry["file"] == "tokenizer.json" and entry["special"] == {"<|endoftext|>": entry["eot_id"]}
    copied = (out / "tokenizer.json").read_bytes()
    assert copied == (root / "tok" / "tokenizer.json").read_bytes()
    assert entry["sha256"] == tokens.hashlib.sha256(copied).hexdigest()


def test_one_text_file_is_one_document_encoded_in_pieces_like_the_whole(corpus, tmp_path, monkeypatch):
    root, docs = corpus
    text = "".join(docs)
    (tmp_path / "all.txt").write_text(text)
    monkeypatch.setattr(tokens, "PIECE_CHARS", 300)  # many pieces, cut at line ends, a few to a batch
    monkeypatch.setattr(tokens, "BATCH_CHARS", 2000)
    shard(str(tmp_path / "all.txt"), str(tmp_path / "out"), "--tokenizer", str(root / "tok" / "tokenizer.json"))
    tok = Tokenizer.from_file(str(root / "tok" / "tokenizer.json"))
    shard(str(tmp_path / "all.txt"), str(tmp_path / "plain"), "--tokenizer", str(root / "tok"), "--no-shuffle")
    ids, manifest = token_sequence(tmp_path / "plain")  # train, then val: the file's order
    whole = tok.encode(text, add_special_tokens=False).ids + [manifest["tokenizer"]["eot_id"]]
    assert ids.tolist() == whole[: len(ids)] and len(whole) - len(ids) < 64
    shuffled = read_all(tmp_path / "out")[0]
    assert rows(shuffled) == rows(read_all(tmp_path / "plain")[0])  # the same blocks, shuffled and split


def test_text_column_rows_are_documents_and_shuffled_blocks_are_the_same_multiset(corpus, tmp_path):
    root, docs = corpus
    pq.write_table(pa.table({"id": list(range(len(docs))), "body": docs}), tmp_path / "d.parquet", row_group_size=5)
    tok_args = ["--tokenizer", str(root / "tok"), "--text-column", "body", "--seq-len", "16"]
    shard(str(tmp_path / "d.parquet"), str(tmp_path / "plain"), *tok_args, "--no-shuffle", "--val-fraction", "0")
    got = decoded(tmp_path / "plain", Tokenizer.from_file(str(root / "tok" / "tokenizer.json")))
    assert len(got) >= len(docs) - 1 and got == docs[: len(got)]
    assert json.loads((tmp_path / "plain" / "manifest.json").read_text())["columns"] == {"text": "body"}
    shard(str(tmp_path / "d.parquet"), str(tmp_path / "mixed"), *tok_args, "--seed", "3")
    plain, mixed = read_all(tmp_path / "plain"), read_all(tmp_path / "mixed")
    assert rows(np.c_[plain[0], plain[1]]) == rows(np.c_[mixed[0], mixed[1]])
    assert not np.array_equal(plain[0], mixed[0])


def test_jsonl_column_trains_a_tokenizer_and_shards_through_it(tmp_path):
    docs = documents(6, 10, seed=1)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"t": d, "n": i}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "tok.json"
    proc = shoal_cli(
        "tokenizer", "train", str(tmp_path / "d.jsonl"), "--text-column", "t", "--vocab-size", "300", "--out", str(out)
    )
    assert proc.returncode == 0, proc.stderr
    shard(
        str(tmp_path / "d.jsonl"),
        str(tmp_path / "s"),
        "--tokenizer",
        str(out),
        "--text-column",
        "t",
        "--seq-len",
        "8",
        "--no-shuffle",
        "--val-fraction",
        "0",
    )
    got = decoded(tmp_path / "s", Tokenizer.from_file(str(out)))
    assert len(got) >= len(docs) - 1 and got == docs[: len(got)]


def test_directory_of_text_files_as_bytes_with_task_lm(corpus, tmp_path):
    root, docs = corpus
    shard(
        str(root / "docs"),
        str(tmp_path / "b"),
        "--task",
        "lm",
        "--seq-len",
        "64",
        "--no-shuffle",
        "--val-fraction",
        "0",
    )
    ids, manifest = token_sequence(tmp_path / "b")
    assert (
        manifest["tokenizer"] == "bytes" and manifest["vocab_size"] == 256 and manifest["fields"]["x"]["dtype"] == "|u1"
    )
    whole = "".join(d + "\n" for d in docs).encode()  # a newline after each document, as a text column's
    assert ids.astype(np.uint8).tobytes() == whole[: len(ids)] and len(whole) - len(ids) < 64


def test_ids_are_stored_in_the_smallest_unsigned_type():
    assert [tokens.id_dtype(n) for n in (2, 256, 257, 300, 65536, 65537, 128_256)] == [
        np.uint8,
        np.uint8,
        np.uint16,
        np.uint16,
        np.uint16,
        np.uint32,
        np.uint32,
    ]


def test_blocks_are_the_whole_sequence_cut_as_it_arrives():
    ids = np.arange(1000, dtype=np.uint16)
    whole = tokens.Blocks(10, ids.dtype).add(ids)
    cut = tokens.Blocks(10, ids.dtype)
    parts = [cut.add(ids[a:b]) for a, b in [(0, 3), (3, 4), (4, 250), (250, 999), (999, 1000)]]
    x = np.concatenate([p.x for p in parts if p is not None])
    assert np.array_equal(x, whole.x) and np.array_equal(whole.x[1:, 0], whole.y[:-1, -1])  # one shared token
    assert whole.x.shape == (99, 10) and np.array_equal(whole.y[:, :], whole.x + 1)


def test_pieces_cut_between_lines_and_in_long_lines(monkeypatch):
    monkeypatch.setattr(tokens, "PIECE_CHARS", 8)
    monkeypatch.setattr(tokens, "LONG_LINE", 40)
    text = "alpha beta\ngamma  \ndelta\n\n epsilon\nzeta " + "word " * 30 + "x" * 100 + "\nend"
    raw = text.encode()
    got = list(tokens.pieces(raw[i : i + 7] for i in range(0, len(raw), 7)))
    assert "".join(got) == text and len(got) > 4
    assert all(p[-1] == "\n" and not p[-2].isspace() for p in got[:2])  # between two lines of text only
    assert max(map(len, got)) <= 40
    rows = list(tokens.row(text))  # a row held whole: the same cuts
    assert [t for t, _ in rows] == got and [end for _, end in rows] == [False] * (len(got) - 1) + [True]
    assert list(tokens.row("short")) == [("short", True)]


def test_train_on_tokenised_shards_beats_the_unigram_baseline(corpus, tmp_path):
    from shoal.engine import train
    from shoal.job import build_job

    root, _ = corpus
    out = tmp_path / "s"
    shard(str(root / "docs"), str(out), "--tokenizer", str(root / "tok"), "--seq-len", "32", "--val-fraction", "0.1")
    manifest = json.loads((out / "manifest.json").read_text())
    train_set, val_set = open_shards(DataConfig(format="shards", path=str(out)))
    unigram = _unigram_loss(train_set, val_set, manifest["vocab_size"])
    cfg = load_config(None, [
        "data.format=shards", f"data.path={out}", "data.batch_size=32", "model.name=transformer_lm",
        "model.width=32", "model.depth=1", "model.heads=2", "scaling.num_workers=1", "train.max_steps=80",
        "train.eval_every=80", "optim.lr=0.03", "schedule.warmup_steps=5", "log.tensorboard=false",
        f"run.dir={tmp_path / 'run'}",
    ])  # fmt: skip
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    embeddings = [m for m in job.strategy.bare_model.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings[0].num_embeddings == manifest["vocab_size"]  # the vocabulary from the manifest
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small trains 10x faster on one thread of a shared machine
    try:
        val_loss = train(job, lambda r: None)["val_loss"]
    finally:
        torch.set_num_threads(threads)
    assert val_loss < unigram - 0.3, (val_loss, unigram)


def _unigram_loss(train_set, val_set, vocab: int) -> float:
    """Cross-entropy of the training split's token frequencies on the validation targets (shoal check's)."""
    y_train = train_set.get_batch(np.arange(len(train_set)))[1].numpy().reshape(-1)
    y_val = val_set.get_batch(np.arange(len(val_set)))[1].numpy().reshape(-1)
    p = (np.bincount(y_train, minlength=vocab) + 1.0) / (len(y_train) + vocab)
    return float(-np.log(p[y_val]).mean())


def test_ids_past_the_vocabulary_are_found_by_check_and_the_loader(corpus, tmp_path):
    from shoal import check

    root, _ = corpus
    out = tmp_path / "s"
    shard(str(root / "docs"), str(out), "--tokenizer", str(root / "tok"), "--seq-len", "32", "--val-fraction", "0")
    manifest = json.loads((out / "manifest.json").read_text())
    high = int(read_all(out)[0].max())
    manifest["vocab_size"] = high  # the shards hold id `high`, one past the vocabulary the manifest states
    (out / "manifest.json").write_text(json.dumps(manifest))
    cfg = load_config(None, ["data.format=shards", f"data.path={out}", "model.name=transformer_lm",
                             "model.width=16", "model.depth=1", "model.heads=2"])  # fmt: skip
    result = check.run(cfg, tmp_path / "check", say=lambda *_: None)
    finding = next(f for f in result.findings if f.kind == "labels_out_of_range")
    assert f"token ids outside [0, vocab_size={high})" in finding.message and "train-000000.tar#" in finding.message
    assert "vocab_size" in finding.fix
    train_set, _ = open_shards(DataConfig(format="shards", path=str(out)))
    with pytest.raises(DataError, match=rf"shard train-000000.*is outside \[0, {high}\) \(vocab_size={high} in the"):
        train_set.get_batch(np.arange(len(train_set)))


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _main_error(argv: list[str], capsys) -> str:
    """`shoal ARGV` in this process: exit 2 and its one line (the subprocess cases check for tracebacks)."""
    from shoal.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (code, err)
    return err[0]


def test_bad_tokenizers_exit_2_naming_the_file(corpus, tmp_path, capsys, monkeypatch):
    root, _ = corpus
    docs = str(root / "docs")
    (tmp_path / "broken.json").write_text('{"version": "1.0", "model": ')
    (tmp_path / "empty").mkdir()
    no_eot = Tokenizer(models.BPE())
    no_eot.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    no_eot.train_from_iterator(["a b c"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>"]))
    no_eot.save(str(tmp_path / "noeot.json"))
    cases = [
        ([docs, "o1", "--tokenizer", str(tmp_path / "missing.json")], "missing.json: no such tokenizer file"),
        ([docs, "o2", "--tokenizer", str(tmp_path / "broken.json")], "broken.json: not a readable `tokenizers`"),
        ([docs, "o3", "--tokenizer", str(tmp_path / "empty")], "empty: holds no tokenizer.json"),
        ([docs, "o4", "--tokenizer", str(tmp_path / "noeot.json")], "noeot.json: no end-of-text token"),
        ([docs, "o5", "--tokenizer", str(tmp_path / "noeot.json"), "--eot-token", "<eos>"], "'<eos>' is not in"),
        ([docs, "o6", "--eot-token", "<pad>"], "--eot-token: only with --tokenizer"),
        (["digits", "o7", "--tokenizer", str(root / "tok")], "--tokenizer encodes text"),
    ]
    monkeypatch.chdir(tmp_path)
    for argv, needle in cases:
        line = _main_error(["shard", *argv], capsys)
        assert needle in line, line
    for argv, needle in cases[0], cases[3]:  # the command itself: one line, no traceback
        assert needle in _one_line_error(shoal_cli("shard", *argv, cwd=tmp_path))
    assert "--eot-token" in _main_error(["shard", *cases[3][0]], capsys)
    shard(docs, "o8", "--tokenizer", str(tmp_path / "noeot.json"), "--eot-token", "<pad>")
    assert json.loads((tmp_path / "o8" / "manifest.json").read_text())["tokenizer"]["special"] == {"<pad>": 0}


def test_tokenizer_train_bad_input_exits_2(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text\n")
    (tmp_path / "d.npz").write_bytes(b"PK")
    cases = [
        ([str(tmp_path / "a.txt"), "--vocab-size", "100"], "--vocab-size: at least 257"),
        ([str(tmp_path / "nope.txt"), "--vocab-size", "300"], "nope.txt: no such file or directory"),
        ([str(tmp_path / "d.npz"), "--vocab-size", "300"], "d.npz: not a text corpus"),
    ]
    for argv, needle in cases:
        assert needle in _main_error(["tokenizer", "train", *argv, "--out", str(tmp_path / "t.json")], capsys)
    assert "--vocab-size" in _one_line_error(
        shoal_cli("tokenizer", "train", *cases[0][0], "--out", str(tmp_path / "t.json"))
    )
    assert not (tmp_path / "t.json").exists()


def test_tokenised_shards_written_to_s3_carry_their_tokenizer(corpus, s3):
    server, bucket = s3
    root, _ = corpus
    url = f"s3://{bucket}/lm"
    proc = shoal_cli("shard", str(root / "docs"), url, "--tokenizer", str(root / "tok"), "--seq-len", "32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    fs = server.filesystem()
    manifest = json.loads(fs.cat_file(f"{bucket}/lm/manifest.json"))
    copied = fs.cat_file(f"{bucket}/lm/{manifest['tokenizer']['file']}")
    assert copied == (root / "tok" / "tokenizer.json").read_bytes()
    assert manifest["tokenizer"]["sha256"] == tokens.hashlib.sha256(copied).hexdigest()


def test_an_npz_of_token_ids_becomes_lm_blocks_with_its_vocabulary(tmp_path):
    ids = np.random.default_rng(0).integers(0, 1000, 5000).astype(np.int64)
    np.savez(tmp_path / "ids.npz", tokens=ids, vocab_size=np.array(1024))
    shard(str(tmp_path / "ids.npz"), str(tmp_path / "out"), "--seq-len", "32", "--no-shuffle", "--val-fraction", "0")
    got, manifest = token_sequence(tmp_path / "out")
    assert manifest["task"] == "lm" and manifest["vocab_size"] == 1024 and manifest["fields"]["x"]["dtype"] == "<u2"
    assert got.tolist() == ids[: len(got)].tolist() and len(ids) - len(got) < 32

    blocks = ids[: 32 * 100].reshape(100, 32)
    np.savez(tmp_path / "xy.npz", x=blocks[:, :-1], y=blocks[:, 1:])
    shard(str(tmp_path / "xy.npz"), str(tmp_path / "xy"), "--task", "lm", "--val-fraction", "0")
    assert json.loads((tmp_path / "xy" / "manifest.json").read_text())["vocab_size"] == int(blocks.max()) + 1

    np.savez(tmp_path / "bad.npz", tokens=ids, vocab_size=np.array(500))
    proc = shoal_cli("shard", str(tmp_path / "bad.npz"), str(tmp_path / "bad"))
    assert proc.returncode == 2 and "outside the vocabulary ('vocab_size' 500)" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "bad" / "manifest.json").exists()


# ---------------------------------------------------------------- labelled text: rows of ids for a classifier

ROW_LEN = 16


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """A parquet table of texts of one to six sentences (many past ROW_LEN tokens) with string labels, in
    row groups of 7 (several pieces), and a BPE trained on it; also a copy of the BPE with a [PAD] token."""
    root = tmp_path_factory.mktemp("reviews")
    rng = random.Random(5)
    texts = [" ".join(sentence(rng) for _ in range(rng.randint(1, 6))) for _ in range(60)]
    texts[3] = ""  # an empty row: all pads
    labels = [rng.choice(["neg", "pos", "mixed"]) for _ in texts]
    table = pa.table({"text": texts, "label": labels, "score": [rng.random() for _ in texts]})
    pq.write_table(table, root / "r.parquet", row_group_size=7)
    tok = tokens.train_bpe(texts, 320, root / "tok.json", say=lambda *_: None)
    tok.add_special_tokens(["[PAD]"])
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=40)  # as some files carry: unused
    tok.enable_truncation(8)
    tok.save(str(root / "padded.json"))
    return root, texts, labels


def test_labelled_text_rows_are_padded_ids_that_decode_to_each_rows_first_tokens(reviews, tmp_path):
    root, texts, labels = reviews
    args = ["--tokenizer", str(root / "tok.json"), "--text-column", "text", "--label-column", "label"]
    out = shard(str(root / "r.parquet"), str(tmp_path / "s"), *args, "--seq-len", str(ROW_LEN), "--no-shuffle",
                "--val-fraction", "0")  # fmt: skip
    x, y, manifest = read_all(tmp_path / "s")
    tok = Tokenizer.from_file(str(root / "tok.json"))
    full = [tok.encode(t).ids for t in texts]
    kept = [min(len(ids), ROW_LEN) for ids in full]
    pad = manifest["pad_id"]
    assert pad == manifest["tokenizer"]["eot_id"] == tok.token_to_id("<|endoftext|>")  # no [PAD]: GPT-2's way
    assert x.dtype == np.int64 and x.shape == (len(texts), ROW_LEN)
    for row, ids, n, text in zip(x, full, kept, texts):
        assert row[:n].tolist() == ids[:n] and (row[n:] == pad).all()
        assert tok.decode(row[row != pad].tolist()) == tok.decode(ids[:ROW_LEN])  # the text's first ROW_LEN tokens
        assert len(ids) > ROW_LEN or tok.decode(row[:n].tolist()) == text
    assert manifest["classes"] == sorted(set(labels)) and y.tolist() == [manifest["classes"].index(v) for v in labels]
    cut = sum(len(ids) > ROW_LEN for ids in full)
    assert 0 < cut < len(texts) and manifest["lengths"] == {
        "mean": round(sum(kept) / len(kept), 3),
        "max": ROW_LEN,
        "truncated": cut,
        "longest": max(map(len, full)),
    }
    assert f"{cut} of {len(texts)} rows had more than --seq-len {ROW_LEN} tokens" in out.stdout
    assert manifest["task"] == "classification" and manifest["num_classes"] == 3
    assert manifest["fields"]["x"] == {"dtype": "<u2", "shape": [ROW_LEN]}
    assert manifest["vocab_size"] == tok.get_vocab_size(with_added_tokens=True)
    assert manifest["columns"] == {"text": "text", "label": "label"} and (tmp_path / "s" / "tokenizer.json").exists()
    spec = open_shards(DataConfig(format="shards", path=str(tmp_path / "s")))[0].spec
    assert (spec.input_shape, spec.num_classes, spec.pad_id) == ((ROW_LEN,), 3, pad)
    assert spec.vocab_size == manifest["vocab_size"] and spec.token_ids


def test_labelled_text_with_two_workers_is_the_samples_of_one_and_pads_with_pad(reviews, tmp_path):
    root, texts, _ = reviews
    args = ["--tokenizer", str(root / "padded.json"), "--label-column", "label", "--seq-len", "12", "--seed", "4"]
    shard(str(root / "r.parquet"), str(tmp_path / "one"), *args)
    shard(str(root / "r.parquet"), str(tmp_path / "two"), *args, "--workers", "2")
    one, two = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1]) and one[2]["lengths"] == two[2]["lengths"]
    pad = Tokenizer.from_file(str(root / "padded.json")).token_to_id("[PAD]")
    assert one[2]["pad_id"] == pad != one[2]["tokenizer"]["eot_id"] and one[2]["tokenizer"]["special"]["[PAD]"] == pad
    assert (one[0] == pad).all(axis=1).sum() == 1  # the empty row, shuffled somewhere
    assert one[2]["lengths"]["max"] == 12 and one[0].shape[1] == 12  # not the file's truncation (8) or padding (40)
    lm = ["--tokenizer", str(root / "padded.json"), "--seq-len", "8", "--no-shuffle", "--val-fraction", "0"]
    shard(str(root / "r.parquet"), str(tmp_path / "lm"), *lm)  # no label: a language model's documents
    ids, manifest = token_sequence(tmp_path / "lm")
    plain = Tokenizer.from_file(str(root / "tok.json"))
    whole = [i for t in texts for i in [*plain.encode(t).ids, manifest["tokenizer"]["eot_id"]]]
    assert ids.tolist() == whole[: len(ids)] and len(whole) - len(ids) < 8 and "pad_id" not in manifest


def test_labelled_text_mistakes_exit_2_naming_the_option(reviews, tmp_path, capsys, monkeypatch):
    root, _, _ = reviews
    monkeypatch.chdir(tmp_path)  # the relative OUT_DIRs below
    src, tok = str(root / "r.parquet"), str(root / "tok.json")
    line = _one_line_error(
        shoal_cli(
            "shard", src, str(tmp_path / "o1"), "--tokenizer", tok, "--label-column", "label", "--pad-token", "<x>"
        )
    )
    assert "--pad-token '<x>' is not in the tokenizer's vocabulary" in line
    cases = [
        ([src, "o2", "--label-column", "label", "--pad-token", "<x>"], "--pad-token: only with --tokenizer"),
        ([src, "o3", "--tokenizer", tok, "--pad-token", "<|endoftext|>"], "--pad-token pads the rows of a labelled"),
        (
            [src, "o4", "--label-column", "label", "--text-column", "text"],
            "a text column with labels needs --tokenizer",
        ),
        ([src, "o5", "--tokenizer", tok, "--label-column", "score"], "labelled text is classification data"),
    ]
    for argv, needle in cases:
        assert needle in _main_error(["shard", *argv], capsys)


def test_check_and_validate_take_labelled_text_shards(reviews, tmp_path, capsys):
    from shoal import check
    from shoal.cli import main

    root, _, _ = reviews
    out = tmp_path / "s"
    shard(str(root / "r.parquet"), str(out), "--tokenizer", str(root / "tok.json"), "--label-column", "label")
    data = ["data.format=shards", f"data.path={out}", f"run.dir={tmp_path / 'run'}", "check.overfit_steps=20"]
    manifest = json.loads((out / "manifest.json").read_text())
    target = [
        "model.target=helpers:token_bag",
        f"model.kwargs.vocab_size={manifest['vocab_size']}",
        f"model.kwargs.pad_id={manifest['pad_id']}",
    ]
    assert main(["check", QUICKSTART, *data, *target, "--out", str(tmp_path / "c")]) in (0, 1)  # findings, no error
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["numbers"]["model"]["initial_loss"] > 0 and "linear_accuracy" not in report["numbers"]["baselines"]
    assert "majority_accuracy" in report["numbers"]["baselines"] and "features" not in report["numbers"]
    assert main(["validate", QUICKSTART, *data, *target]) == 0
    capsys.readouterr()
    assert main(["validate", QUICKSTART, *data, *target, "data.augment=[noise]"]) == 2
    assert "data.augment[0]: noise: the inputs are rows of token ids" in capsys.readouterr().err
    result = check.run(load_config(QUICKSTART, data), tmp_path / "mlp", say=lambda *_: None)  # the quickstart's mlp
    finding = next(f for f in result.findings if f.kind == "model_does_not_build")
    assert "mlp does not classify token ids" in finding.message and "model.target" in finding.message
    capsys.readouterr()


# ---------------------------------------------------------------- rows that are token ids already

IDS_VOCAB = 300  # past 256: the rows are stored as uint16
ID_ROWS, ID_LEN = 70, 16


@pytest.fixture(scope="module")
def id_rows(tmp_path_factory):
    """A parquet table as `dataset.map(tokenizer)` leaves it: ragged input_ids (every third row already
    right-padded with 0s, its attention_mask 0 there), token_type_ids of 0s, string labels and an index column,
    in row groups of 9 (several pieces)."""
    path = tmp_path_factory.mktemp("ids") / "ids.parquet"
    rng = np.random.default_rng(3)
    ids, mask = [], []
    for i in range(ID_ROWS):
        n, pads = int(rng.integers(0, 30)), int(rng.integers(1, 4)) if i % 3 == 0 else 0
        ids.append(rng.integers(1, IDS_VOCAB, n).tolist() + [0] * pads)
        mask.append([1] * n + [0] * pads)
    labels = [["neg", "pos", "mixed"][int(c)] for c in rng.integers(0, 3, ID_ROWS)]
    table = pa.table({
        "input_ids": pa.array(ids, pa.list_(pa.int32())), "attention_mask": mask,
        "token_type_ids": [[0] * len(r) for r in ids], "label": labels, "idx": list(range(ID_ROWS)),
    })  # fmt: skip
    pq.write_table(table, path, row_group_size=9)
    return path, ids, mask, labels


def test_rows_of_ids_are_cut_to_seq_len_and_right_padded_their_mask_and_token_types_not_stored(id_rows, tmp_path):
    path, ids, mask, labels = id_rows
    out = shard(str(path), str(tmp_path / "s"), "--vocab-size", str(IDS_VOCAB), "--seq-len", str(ID_LEN),
                "--no-shuffle", "--val-fraction", "0")  # fmt: skip
    x, y, manifest = read_all(tmp_path / "s")
    real = [sum(m) for m in mask]
    kept = [min(n, ID_LEN) for n in real]
    assert manifest["pad_id"] == 0 and x.shape == (ID_ROWS, ID_LEN)  # the default pad id: BERT's [PAD]
    for row, r, n in zip(x, ids, kept):
        assert row[:n].tolist() == r[:n] and (row[n:] == 0).all()
    assert manifest["classes"] == sorted(set(labels)) and y.tolist() == [manifest["classes"].index(v) for v in labels]
    cut = sum(n > ID_LEN for n in real)
    assert 0 < cut < ID_ROWS and manifest["lengths"] == {
        "mean": round(sum(kept) / ID_ROWS, 3), "max": ID_LEN, "truncated": cut, "longest": max(real),
    }  # fmt: skip
    assert f"{cut} of {ID_ROWS} rows had more than --seq-len {ID_LEN} tokens" in out.stdout
    assert manifest["fields"]["x"] == {"dtype": "<u2", "shape": [ID_LEN]} and manifest["vocab_size"] == IDS_VOCAB
    assert (manifest["task"], manifest["num_classes"], manifest["tokenizer"]) == ("classification", 3, "ids")
    assert manifest["columns"] == {
        "ids": "input_ids",
        "label": "label",
        "checked": ["attention_mask", "token_type_ids"],
    }
    spec = open_shards(DataConfig(format="shards", path=str(tmp_path / "s")))[0].spec
    assert (spec.input_shape, spec.num_classes, spec.pad_id, spec.vocab_size) == ((ID_LEN,), 3, 0, IDS_VOCAB)


def test_rows_of_ids_with_two_workers_are_the_samples_of_one(id_rows, tmp_path):
    path = str(id_rows[0])
    args = ["--vocab-size", str(IDS_VOCAB + 1), "--seq-len", "12", "--seed", "4", "--pad-id", str(IDS_VOCAB)]
    shard(path, str(tmp_path / "one"), *args)
    shard(path, str(tmp_path / "two"), *args, "--workers", "2")
    one, two = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1]) and one[2]["lengths"] == two[2]["lengths"]
    pad = one[2]["pad_id"]
    assert pad == IDS_VOCAB and (one[0] == pad).any() and not (one[0] == 0).any()  # the rows' own 0s were padding


def test_a_datasets_directory_of_ids_is_a_language_models_documents_packed_into_blocks(reviews, tmp_path):
    from datasets import Dataset

    rng = np.random.default_rng(8)
    docs = [rng.integers(1, 50, int(rng.integers(0, 20))).tolist() for _ in range(40)]
    # `labels`, a causal LM's copy of the ids, is not a class label: these rows have none
    Dataset.from_dict({"input_ids": docs, "attention_mask": [[1] * len(d) for d in docs], "labels": docs}).save_to_disk(
        str(tmp_path / "hf")
    )
    plain = ["--seq-len", "8", "--no-shuffle", "--val-fraction", "0"]
    shard(str(tmp_path / "hf"), str(tmp_path / "s"), "--vocab-size", "50", "--eot-id", "0", *plain)
    ids, manifest = token_sequence(tmp_path / "s")
    whole = [i for d in docs for i in [*d, 0]]  # --eot-id after every row
    assert ids.tolist() == whole[: len(ids)] and len(whole) - len(ids) < 8 and "pad_id" not in manifest
    assert (manifest["task"], manifest["vocab_size"], manifest["fields"]["x"]["dtype"]) == ("lm", 50, "|u1")
    root = reviews[0]  # a tokenizer is read for its vocabulary, never run; no end-of-text id unless asked for
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"input_ids": d, "text": "unused"}) + "\n" for d in docs))
    for name, extra, eot in (("t", [], []), ("e", ["--eot-token", "<|endoftext|>"], [0])):
        shard(str(tmp_path / "d.jsonl"), str(tmp_path / name), "--tokenizer", str(root / "tok.json"), *extra, *plain)
        ids, manifest = token_sequence(tmp_path / name)
        eot = [manifest["tokenizer"]["eot_id"]] if eot else []
        whole = [i for d in docs for i in [*d, *eot]]
        assert ids.tolist() == whole[: len(ids)] and len(whole) - len(ids) < 8
        assert manifest["vocab_size"] == Tokenizer.from_file(str(root / "tok.json")).get_vocab_size(True)
        assert manifest["columns"] == {"ids": "input_ids"} and (tmp_path / name / "tokenizer.json").exists()


def _id_table(path, ids, **columns):
    pq.write_table(pa.table({"input_ids": ids, **columns, "label": [i % 2 for i in range(len(ids))]}), path)
    return str(path)


def test_rows_of_ids_mistakes_exit_2_with_one_line_and_no_manifest(id_rows, reviews, tmp_path, capsys):
    path = str(id_rows[0])
    bad = pq.read_table(path).to_pydict()
    bad["input_ids"][65][2] = 999  # row group 7, row 2: found while the workers write, after the first pieces
    pq.write_table(pa.table(bad), tmp_path / "bad.parquet", row_group_size=9)
    line = _one_line_error(shoal_cli("shard", str(tmp_path / "bad.parquet"), str(tmp_path / "o"), "--vocab-size",
                                     str(IDS_VOCAB), "--seq-len", "8", "--workers", "2"))  # fmt: skip
    assert "bad.parquet, row group 7: row 2 of column 'input_ids', position 2, holds id 999, outside [0, 300)" in line
    assert not (tmp_path / "o" / "manifest.json").exists()
    rows = [[5, 6, 7], [8, 9]]
    left = _id_table(tmp_path / "left.parquet", rows, attention_mask=[[1, 1, 1], [0, 1]])
    hole = _id_table(tmp_path / "hole.parquet", rows, attention_mask=[[1, 0, 1], [1, 1]])
    pair = _id_table(tmp_path / "pair.parquet", rows, token_type_ids=[[0, 0, 0], [0, 1]])
    roberta = _id_table(tmp_path / "rob.parquet", [[0, 5, 2], [0, 7, 2]])  # <s> is 0, pads are 1
    short = _id_table(tmp_path / "short.parquet", rows, attention_mask=[[1, 1, 1], [1]])
    flat = _id_table(tmp_path / "flat.parquet", rows, attention_mask=[3, 2])
    ok = ["--vocab-size", "10", "--seq-len", "4"]
    cases = [
        (
            [left, "a", *ok],
            "left.parquet, row group 0: row 1 of column 'attention_mask', position 1, is not 1s then 0s",
        ),
        ([hole, "a", *ok], "row 0 of column 'attention_mask', position 2, is not 1s then 0s"),
        ([pair, "a", *ok], "row 1 of column 'token_type_ids', position 1, holds 1: a second segment"),
        ([roberta, "a", *ok], "row 0 of column 'input_ids', position 0, holds the pad id 0 among its tokens"),
        ([short, "a", *ok], "row 1 holds 1 values in column 'attention_mask' and 2 in 'input_ids'"),
        ([flat, "a", *ok], "column 'attention_mask' holds int64; beside the ids in 'input_ids' it must hold lists"),
        ([path, "a", "--vocab-size", "300"], "rows of token ids for a classifier need --seq-len N"),
        ([path, "a", "--seq-len", "8"], "give their vocabulary with --vocab-size N (or the tokenizer"),
        ([path, "a", *ok, "--task", "lm", "--pad-id", "1"], "--pad-id pads a classifier's rows"),
        ([path, "a", *ok, "--eot-id", "1"], "--eot-id ends a language model's documents"),
        ([path, "a", "--vocab-size", "300", "--seq-len", "4", "--pad-id", "300"], "--pad-id 300 is outside"),
        (["digits", "a", "--vocab-size", "10"], "digits: --vocab-size applies to rows of token ids"),
        ([path, "a", "--tokenizer", str(reviews[0] / "tok.json"), "--vocab-size", "9"], "--vocab-size: not with"),
        ([path, "a", "--ids-column", "label", *ok], "column 'label' holds string; it must hold lists of integer"),
    ]
    for argv, needle in cases:
        assert needle in _main_error(["shard", *argv], capsys), argv
    assert not list(tmp_path.glob("a/manifest.json"))
    roberta_ok = shard(roberta, str(tmp_path / "r"), *ok, "--pad-id", "1", "--no-shuffle", "--val-fraction", "0")
    assert "wrote" in roberta_ok.stdout and read_all(tmp_path / "r")[0].tolist() == [[0, 5, 2, 1], [0, 7, 2, 1]]


def test_a_bert_classifier_trains_on_rows_of_ids_with_the_mask_recomputed_from_pad_id(id_rows, tmp_path):
    pytest.importorskip("transformers")
    from test_hf import bert_cfg

    from shoal.engine import train
    from shoal.job import build_job

    shard(str(id_rows[0]), str(tmp_path / "s"), "--vocab-size", str(IDS_VOCAB), "--seq-len", "32")
    cfg = bert_cfg(tmp_path / "s", tmp_path / "run", **{"train.max_steps": 4, "data.batch_size": 16})
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    assert job.bare_model.config.vocab_size == IDS_VOCAB and job.bare_model.config.num_labels == 3
    x, _ = next(job.data.train)
    assert torch.equal(x["attention_mask"].bool(), x["input_ids"] != 0) and x["input_ids"].shape[1] <= 32
    assert x["attention_mask"].sum() < x["attention_mask"].numel()  # rows of several lengths: padding in the batch
    records = []
    summary = train(job, records.append)
    assert summary["steps"] == 4 and all(np.isfinite(r["loss"]) for r in records if "loss" in r), summary
