"""`shoal shard`: every source kind round-trips through real tar shards; bad sources exit 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shoal.config import DataConfig
from shoal.data.shards import open_shards

from conftest import shoal_cli


def read_all(out_dir) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every sample of both splits, in id order, and the manifest."""
    train, val = open_shards(DataConfig(format="shards", path=str(out_dir)))
    xs, ys = [], []
    for src in (train, val):
        if src is not None:
            x, y, skipped = src.get_batch(np.arange(len(src)))
            assert skipped == 0
            xs.append(x.numpy())
            ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys), json.loads((out_dir / "manifest.json").read_text())


def rows(x: np.ndarray) -> list:
    return sorted(map(tuple, x.reshape(len(x), -1).round(5).tolist()))


class _Out:
    def __init__(self, stdout: str):
        self.stdout = stdout


def shard(*args: str) -> _Out:
    """`shoal shard ARGS` in this process (the exit-status tests below use real subprocesses)."""
    import contextlib
    import io

    from shoal.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["shard", *args])
    assert code == 0, buf.getvalue()
    return _Out(buf.getvalue())


def test_npz_round_trip_with_shuffle_and_split(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((250, 3, 4)).astype(np.float32)
    y = rng.integers(0, 5, 250)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    proc = shard(
        str(tmp_path / "d.npz"),
        str(tmp_path / "out"),
        "--samples-per-shard",
        "64",
        "--block-size",
        "16",
        "--val-fraction",
        "0.2",
    )
    assert "train: 200 samples in 4 shards" in proc.stdout and "val: 50 samples in 1 shards" in proc.stdout
    gx, gy, manifest = read_all(tmp_path / "out")
    assert manifest["task"] == "classification" and manifest["num_classes"] == 5
    assert manifest["fields"]["x"]["shape"] == [3, 4]
    assert rows(np.concatenate([gx.reshape(250, -1), gy[:, None]], 1)) == rows(
        np.concatenate([x.reshape(250, -1), y[:, None]], 1)
    )
    assert [s["samples"] for s in manifest["splits"]["train"]["shards"]] == [64, 64, 64, 8]


def test_csv_with_header_and_label_column(tmp_path):
    (tmp_path / "d.csv").write_text("a,label,b\n1,0,2\n3,1,4\n5,1,6\n7,0,8\n")
    shard(str(tmp_path / "d.csv"), str(tmp_path / "out"), "--label-column", "label", "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "out")
    assert rows(np.concatenate([gx, gy[:, None]], 1)) == rows(
        np.array([[1, 2, 0], [3, 4, 1], [5, 6, 1], [7, 8, 0]], dtype=np.float32)
    )


def test_jsonl_regression(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"x": [i, i + 1], "y": i * 0.5}) for i in range(10)) + "\n")
    shard(str(tmp_path / "d.jsonl"), str(tmp_path / "out"), "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "out")
    assert m["task"] == "regression"
    assert gy.dtype == np.float32 and sorted(gy.tolist()) == [i * 0.5 for i in range(10)]


def test_text_becomes_next_token_blocks(tmp_path):
    text = "the quick brown fox jumps over the lazy dog. " * 20
    (tmp_path / "t.txt").write_text(text)
    shard(str(tmp_path / "t.txt"), str(tmp_path / "out"), "--seq-len", "16", "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "out")
    assert m["task"] == "lm" and m["vocab_size"] == 256 and gx.shape[1] == 16
    assert np.array_equal(gx[:, 1:], gy[:, :-1])  # targets are the inputs shifted by one
    assert bytes(gx[0].astype(np.uint8)).decode() in text


def test_image_folder(tmp_path):
    from PIL import Image

    for c, color in (("cat", 30), ("dog", 200)):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (6, 5), (color, i, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    shard(str(tmp_path / "imgs"), str(tmp_path / "out"), "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "out")
    assert m["classes"] == ["cat", "dog"] and gx.shape == (6, 3, 5, 6)
    assert gx.max() <= 1.0  # uint8 pixels scaled to [0, 1]
    assert all((gx[gy == 1][:, 0] > 0.5).ravel()) and all((gx[gy == 0][:, 0] < 0.5).ravel())


def test_builtin_digits_and_synthetic(tmp_path):
    shard("digits", str(tmp_path / "d"), "--val-fraction", "0.2")
    gx, gy, m = read_all(tmp_path / "d")
    assert len(gx) == 1797 and m["num_classes"] == 10
    shard(
        "synthetic",
        str(tmp_path / "s"),
        "--num-samples",
        "1000",
        "--input-shape",
        "7",
        "--num-classes",
        "3",
        "--bytes-per-shard",
        "8KB",
    )
    gx, gy, m = read_all(tmp_path / "s")
    assert gx.shape == (1000, 7) and set(gy.tolist()) <= {0, 1, 2}
    assert len(m["splits"]["train"]["shards"]) > 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["nothing.npz", "{out}"], "nothing.npz: no such file"),
        (["{npz_bad}", "{out}"], "needs arrays 'x' and 'y'"),
        (["digits", "{out}", "--bytes-per-shard", "lots"], "--bytes-per-shard"),
        (["digits", "{out}", "--val-fraction", "1.5"], "--val-fraction"),
    ],
)
def test_bad_sources_exit_2_with_one_line(tmp_path, args, needle):
    np.savez(tmp_path / "bad.npz", a=np.zeros(3))
    argv = [a.format(out=tmp_path / "out", npz_bad=tmp_path / "bad.npz") for a in args]
    proc = shoal_cli("shard", *argv)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr


def test_existing_shards_are_not_overwritten_unless_asked(tmp_path):
    shard("digits", str(tmp_path / "d"))
    before = (tmp_path / "d" / "manifest.json").read_text()
    proc = shoal_cli("shard", "synthetic", str(tmp_path / "d"))
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (tmp_path / "d" / "manifest.json").read_text() == before
    shard("synthetic", str(tmp_path / "d"), "--overwrite", "--num-samples", "100")
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["source"] == "synthetic"


def test_shards_train_like_memory_data(tmp_path):
    """Same samples either way: one epoch from shards sees the same multiset as the source."""
    shard("digits", str(tmp_path / "d"), "--val-fraction", "0")
    train, _ = open_shards(DataConfig(format="shards", path=str(tmp_path / "d")))
    x, y, _ = train.get_batch(np.arange(len(train)))
    from shoal.data.memory import digits_arrays

    dx, dy = digits_arrays()
    assert torch.equal(torch.sort(y).values, torch.sort(torch.from_numpy(dy)).values)
    assert np.isclose(x.sum().item(), dx.sum(), rtol=1e-5)


def test_negative_labels_are_refused_naming_the_source_and_label(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((6, 3), np.float32), y=np.array([0, 1, 2, -1, 1, 0]))
    proc = shoal_cli("shard", str(tmp_path / "neg.npz"), str(tmp_path / "out"))
    assert proc.returncode == 2
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and str(tmp_path / "neg.npz") in line and "sample 3 has label -1" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def _png(path) -> None:
    from PIL import Image

    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)


@pytest.mark.parametrize(
    "name, make, needle",
    [
        ("weights.pt", lambda p: torch.save({"w": torch.zeros(3)}, p), ".pt files are not a source"),
        ("picture.png", _png, ".png files are not a source"),
        ("archive.zip", lambda p: p.write_bytes(b"PK\x03\x04" + bytes(60)), ".zip files are not a source"),
        ("notes.txt", lambda p: p.write_bytes(b"abc\x00def" * 50), "NUL byte at offset 3"),
        ("latin.txt", lambda p: p.write_bytes(b"caf\xe9 " * 50), "not UTF-8 text (invalid byte at offset 3)"),
        ("blob", lambda p: p.write_bytes(bytes(range(256)) * 4), "NUL byte at offset 0"),
    ],
)
def test_a_file_that_is_not_a_known_source_or_text_is_refused(tmp_path, name, make, needle):
    make(tmp_path / name)
    proc = shoal_cli("shard", str(tmp_path / name), str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and needle in proc.stderr and str(tmp_path / name) in proc.stderr
    assert "it accepts digits, synthetic, a .npz" in proc.stderr or "NUL" in proc.stderr or "UTF-8" in proc.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_utf8_text_without_a_suffix_still_shards(tmp_path):
    text = "naïve café, 東京 — plain UTF-8 text. " * 20
    (tmp_path / "corpus").write_text(text, encoding="utf-8")
    shard(str(tmp_path / "corpus"), str(tmp_path / "out"), "--seq-len", "16", "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "out")
    assert m["task"] == "lm" and np.array_equal(gx[:, 1:], gy[:, :-1])
    raw = text.encode()
    assert all(bytes(block.astype(np.uint8)) in raw for block in gx)  # byte blocks of the file, multi-byte chars too
    assert len(gx) == (len(raw) - 1) // 16
