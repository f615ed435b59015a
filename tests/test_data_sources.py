"""`shoal shard` on data as users have it: parquet, a Hugging Face `datasets` directory, JSONL and CSV
train the quickstart MLP as the same data from .npz does; columns by name; bad columns and corrupt files
exit 2 naming them; the external shuffle is a permutation in bounded memory; the key split is stable."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_data_writer import read_all, shard

from shoal.config import DataConfig, load_config
from shoal.data.shards import open_shards
from shoal.data.shuffle import Spill, mix64
from shoal.dist import WorldInfo

from conftest import REPO, shoal_cli

NAMES = [f"c{i}" for i in range(10)]  # string labels whose sorted order is the digit's


@pytest.fixture(scope="module")
def digits():
    from shoal.data.memory import digits_arrays

    x, y = digits_arrays()
    return x.reshape(len(x), 64), y


def _npz(path, x, y):
    np.savez(path, x=x, y=y)
    return [str(path)]


def _parquet(path, x, y):
    table = pa.table({"id": np.arange(len(x)), "pixels": list(x), "label": [NAMES[i] for i in y]})
    pq.write_table(table, path, row_group_size=500)
    return [str(path), "--x-columns", "pixels"]


def _hf_dir(path, x, y):
    from datasets import Dataset

    Dataset.from_dict({"pixels": x.tolist(), "label": [NAMES[i] for i in y]}).save_to_disk(str(path))
    return [str(path)]


def _jsonl(path, x, y):
    lines = (json.dumps({"pixels": row.tolist(), "digit": NAMES[c]}) for row, c in zip(x, y))
    path.write_text("\n".join(lines) + "\n")
    return [str(path), "--x-columns", "pixels", "--label-column", "digit"]


def _csv(path, x, y):
    header = ",".join([f"p{i}" for i in range(64)] + ["name"])
    rows = (",".join([*(f"{v:g}" for v in row), NAMES[c]]) for row, c in zip(x, y))
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return [str(path), "--label-column", "name"]


def _val_accuracy(shards, run_dir) -> float:
    """The quickstart MLP trained on the shards in this process (one rank); its validation accuracy."""
    return _trained(shards, run_dir)["val_accuracy"]


def _trained(shards, run_dir, *extra: str) -> dict:
    """The summary of the quickstart MLP trained on the shards in this process (one rank)."""
    from shoal.engine import train
    from shoal.job import build_job

    cfg = load_config(
        None,
        [
            "data.format=shards",
            f"data.path={shards}",
            "scaling.num_workers=1",
            "train.max_steps=200",
            "train.eval_every=200",
            "log.tensorboard=false",
            f"run.dir={run_dir}",
            *extra,
        ],
    )
    return train(build_job(cfg, WorldInfo(), torch.device("cpu")), lambda r: None)


@pytest.fixture(scope="module")
def npz_accuracy(digits, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("npz")
    shard(*_npz(tmp / "d.npz", *digits), str(tmp / "out"), "--val-fraction", "0.2", "--block-size", "32")
    return _val_accuracy(tmp / "out", tmp / "run")


@pytest.mark.parametrize("name, make", [("d.parquet", _parquet), ("hf", _hf_dir), ("d.jsonl", _jsonl), ("d.csv", _csv)])
def test_each_source_trains_the_quickstart_mlp_like_npz(tmp_path, digits, npz_accuracy, name, make):
    x, y = digits
    args = make(tmp_path / name, x, y)
    shard(*args, str(tmp_path / "out"), "--val-fraction", "0.2", "--block-size", "32")
    gx, gy, manifest = read_all(tmp_path / "out")
    assert manifest["classes"] == NAMES and manifest["num_classes"] == 10 and manifest["task"] == "classification"
    assert gx.shape == (len(x), 64) and np.bincount(gy).tolist() == np.bincount(y).tolist()
    assert sorted(map(tuple, np.c_[gx, gy].tolist())) == sorted(map(tuple, np.c_[x, y].tolist()))
    accuracy = _val_accuracy(tmp_path / "out", tmp_path / "run")
    assert accuracy > 0.9 and accuracy == pytest.approx(npz_accuracy, abs=0.02)


def test_class_names_reach_shoal_check(tmp_path, digits):
    from shoal import check

    x, y = digits
    shard(*_parquet(tmp_path / "d.parquet", x, y), str(tmp_path / "out"), "--val-fraction", "0.2")
    cfg = load_config(str(REPO / "configs" / "digits-shards.yaml"), [f"data.path={tmp_path / 'out'}"])
    result = check.run(cfg, tmp_path / "check", say=lambda *_: None)
    line = next(s for s in check.summary_lines(result) if s.strip().startswith("classes:"))
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert line.strip().startswith("classes: 0 c0 (") and "9 c9 (" in line
    assert result.numbers["class_names"] == NAMES
    assert sum(result.numbers["classes"]) == manifest["splits"]["train"]["samples"]
    assert "| 3 | c3 |" in (tmp_path / "check" / "report.md").read_text()


def _report_page(run, data_path: str) -> str:
    """The HTML report of a one-record run whose config names data_path's shards."""
    from shoal import report

    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    (run / "config.yaml").write_text(f"data:\n  format: shards\n  path: {data_path}\n")
    return report.write(run).read_text()


def test_the_run_report_lists_the_class_names(tmp_path, digits):
    x, y = digits
    shard(*_parquet(tmp_path / "d.parquet", x, y), str(tmp_path / "out"))
    page = _report_page(tmp_path / "run", str(tmp_path / "out"))
    assert "<h2>Classes</h2>" in page and "c7" in page


def test_the_run_report_lists_the_class_names_of_shards_in_s3(tmp_path, digits, s3):
    _, bucket = s3
    x, y = digits
    proc = shoal_cli("shard", *_parquet(tmp_path / "d.parquet", x, y), f"s3://{bucket}/named")
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = _report_page(tmp_path / "run", f"s3://{bucket}/named")
    assert "<h2>Classes</h2>" in page and "c7" in page


def test_hub_parquet_layout_reads_the_train_split_and_classlabel_names(tmp_path):
    from datasets import ClassLabel, Dataset, Features, Sequence, Value

    features = Features({"x": Sequence(Value("float32"), length=3), "label": ClassLabel(names=["neg", "pos"])})
    for split, n in (("train", 40), ("test", 8)):
        ds = Dataset.from_dict({"x": [[i, i, i] for i in range(n)], "label": [i % 2 for i in range(n)]}, features)
        (tmp_path / "hub" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "hub" / "data" / f"{split}-00000-of-00001.parquet"))
    shard(str(tmp_path / "hub"), str(tmp_path / "out"), "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "out")
    assert len(gx) == 40 and m["classes"] == ["neg", "pos"] and m["num_classes"] == 2
    assert sorted(gx[:, 0].tolist()) == list(range(40))


def test_a_glob_of_parquet_files_and_an_arrow_file(tmp_path):
    for part in range(3):
        pq.write_table(
            pa.table({"a": np.arange(part * 10, part * 10 + 10.0), "y": np.arange(10) % 3}),
            tmp_path / f"p{part}.parquet",
        )
    shard(str(tmp_path / "p*.parquet"), str(tmp_path / "out"), "--val-fraction", "0")
    gx, _, _ = read_all(tmp_path / "out")
    assert sorted(gx[:, 0].tolist()) == list(range(30))
    table = pa.table({"v": pa.array([[i, -i] for i in range(12)], pa.list_(pa.int16(), 2)), "label": np.arange(12) % 4})
    with pa.ipc.new_file(str(tmp_path / "t.feather"), table.schema) as w:
        w.write_table(table)
    shard(str(tmp_path / "t.feather"), str(tmp_path / "out2"), "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "out2")
    assert m["num_classes"] == 4 and sorted(gx[:, 0].tolist()) == list(range(12)) and (gx[:, 1] == -gx[:, 0]).all()


def _bad_parquet(tmp_path, kind):
    path = tmp_path / "bad.parquet"
    if kind == "ragged":
        pq.write_table(pa.table({"x": [[1.0, 2.0]] * 5 + [[1.0, 2.0, 3.0]], "label": [0, 1] * 3}), path)
    elif kind == "floats":
        pq.write_table(pa.table({"x": [1.0, 2.0, 3.0], "label": [0.5, 1.0, 0.0]}), path)
    else:
        table = pa.table({"x": np.arange(30_000.0), "label": np.arange(30_000) % 3})
        pq.write_table(table, path, row_group_size=10_000)
        data = bytearray(path.read_bytes())
        if kind == "truncated":
            data = data[: len(data) // 2]
        else:  # zeros over the middle of the file: the second row group's pages
            data[len(data) // 2 : len(data) // 2 + 400] = bytes(400)
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "kind, extra, needle",
    [
        ("floats", ["--x-columns", "nope"], "no column 'nope' (--x-columns); its columns are: x, label"),
        ("floats", ["--label-column", "nope"], "no column 'nope' (--label-column)"),
        ("ragged", [], "column 'x' is ragged: row 5 holds 3 values, row 0 2"),
        ("floats", ["--task", "classification"], "label column 'label' holds double; classification needs integer"),
        ("corrupt", [], "row group 1: corrupt or unreadable"),
        ("truncated", [], "not a readable parquet file"),
    ],
)
def test_bad_sources_exit_2_naming_file_and_column(tmp_path, kind, extra, needle):
    path = _bad_parquet(tmp_path, kind)
    proc = shoal_cli("shard", str(path), str(tmp_path / "out"), *extra)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert len(line.splitlines()) == 1 and needle in line and str(path) in line, line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_npz_of_pickled_objects_or_a_damaged_one_is_refused_in_one_line(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([[1], ["a"]], dtype=object), y=np.array([0, 1]))
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 not really a zip")
    for name, needle in (
        ("obj.npz", "holds an object array (pickled Python objects)"),
        ("broken.npz", "not a readable .npz"),
    ):
        proc = shoal_cli("shard", str(tmp_path / name), str(tmp_path / "out"))
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert needle in proc.stderr.strip().splitlines()[-1] and name in proc.stderr


def test_a_string_column_is_not_a_feature(tmp_path):
    (tmp_path / "d.csv").write_text("name,size,label\nab,1,0\ncd,2,1\n")
    proc = shoal_cli("shard", str(tmp_path / "d.csv"), str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "column 'name' holds string; it must hold numbers or lists of numbers" in proc.stderr


# ---------------------------------------------------------------- the shuffle and the split


def _spilled(n: int, seed: int, buckets: int, memory: int, tmp_path) -> list[int]:
    spill = Spill(
        tmp_path / f"s{seed}-{buckets}-{memory}", np.dtype([("x", "<i8"), ("y", "<i8")]), buckets, seed, True, memory
    )
    try:
        for start in range(0, n, 1000):
            rows = np.zeros(min(1000, n - start), dtype=spill.dtype)
            rows["x"] = np.arange(start, start + len(rows))
            spill.add(rows, rows["x"].astype(np.uint64))
        return [int(v) for rows in spill.read() for v in rows["x"]]
    finally:
        spill.close()


def test_external_shuffle_is_a_seeded_permutation_even_past_its_memory(tmp_path):
    out = _spilled(10_000, 3, buckets=2, memory=2048, tmp_path=tmp_path)  # each bucket 40x the memory: split again
    assert sorted(out) == list(range(10_000)) and out != list(range(10_000))
    assert out == _spilled(10_000, 3, buckets=2, memory=2048, tmp_path=tmp_path)
    assert out != _spilled(10_000, 4, buckets=2, memory=2048, tmp_path=tmp_path)
    assert not list((tmp_path).glob("s3-*/*"))  # spill files are removed as they are read


def test_external_shuffle_draws_every_permutation_about_equally(tmp_path):
    counts = {p: 0 for p in itertools.permutations(range(4))}
    for seed in range(1200):
        counts[tuple(_spilled(4, seed, buckets=3, memory=1 << 20, tmp_path=tmp_path))] += 1
    expected = 1200 / 24
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert min(counts.values()) > 0 and chi2 < 60  # 23 degrees of freedom: p(chi2 > 60) < 1e-4


def test_split_by_key_keeps_each_record_in_its_split_as_the_data_grows(tmp_path):
    def split_ids(n: int, name: str) -> tuple[set, set]:
        table = pa.table(
            {"v": np.arange(n, dtype=np.float32), "user": [f"u{i}" for i in range(n)], "y": np.arange(n) % 2}
        )
        pq.write_table(table, tmp_path / f"{name}.parquet")
        shard(
            str(tmp_path / f"{name}.parquet"),
            str(tmp_path / name),
            "--split-key",
            "user",
            "--val-fraction",
            "0.25",
            "--x-columns",
            "v",
        )
        train, val = open_shards(DataConfig(format="shards", path=str(tmp_path / name)))
        return ({int(v) for v in src.get_batch(np.arange(len(src)))[0][:, 0].tolist()} for src in (train, val))

    train_a, val_a = split_ids(2000, "a")
    train_b, val_b = split_ids(3000, "b")
    assert train_a <= train_b and val_a <= val_b and not train_b & val_b
    assert 0.2 < len(val_b) / 3000 < 0.3
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["split"]["by"] == "key"


def test_text_column_and_image_column(tmp_path):
    import io

    from PIL import Image

    docs = [f"document {i}: " + "lorem ipsum " * (i % 5 + 1) for i in range(50)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "t.parquet")
    shard(
        str(tmp_path / "t.parquet"),
        str(tmp_path / "lm"),
        "--text-column",
        "text",
        "--seq-len",
        "16",
        "--val-fraction",
        "0",
    )
    gx, gy, m = read_all(tmp_path / "lm")
    joined = "".join(d + "\n" for d in docs).encode()
    assert m["task"] == "lm" and m["vocab_size"] == 256 and len(gx) == (len(joined) - 1) // 16
    assert all(bytes(b.astype(np.uint8)) in joined for b in gx) and np.array_equal(gx[:, 1:], gy[:, :-1])

    def png(shade: int) -> bytes:
        buf = io.BytesIO()
        Image.new("RGB", (5, 4), (shade, 0, 0)).save(buf, format="PNG")
        return buf.getvalue()

    images = [{"bytes": png(200 if i % 2 else 20), "path": None} for i in range(10)]
    table = pa.table({"image": images, "label": ["bright" if i % 2 else "dark" for i in range(10)]})
    pq.write_table(table, tmp_path / "i.parquet")
    shard(str(tmp_path / "i.parquet"), str(tmp_path / "img"), "--val-fraction", "0")
    gx, gy, m = read_all(tmp_path / "img")
    assert m["classes"] == ["bright", "dark"] and gx.shape == (10, 3, 4, 5) and m["fields"]["x"]["scale"] == 1 / 255
    assert ((gx[:, 0].mean(axis=(1, 2)) > 0.5) == (gy == 0)).all()


def test_an_image_column_trains_with_augmentation(tmp_path, digits):
    """Digits stored as Hugging Face stores images (PNG bytes in an Image feature): shards of [1, 8, 8] uint8
    pixels scaled to [0, 1], trained with crop and rotate, which change the batches and keep the accuracy."""
    import io

    from datasets import Dataset
    from datasets import Image as ImageFeature
    from PIL import Image

    x, y = digits

    def png(pixels: np.ndarray) -> bytes:
        buf = io.BytesIO()
        Image.fromarray((pixels.reshape(8, 8) * 255 / max(1e-9, pixels.max())).astype(np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    images = [{"bytes": png(p), "path": None} for p in x]
    Dataset.from_dict({"image": images, "label": [NAMES[c] for c in y]}).cast_column(
        "image", ImageFeature()
    ).save_to_disk(str(tmp_path / "hf"))
    shard(str(tmp_path / "hf"), str(tmp_path / "out"), "--val-fraction", "0.2", "--block-size", "32")
    gx, _, manifest = read_all(tmp_path / "out")
    assert gx.shape == (len(x), 1, 8, 8) and manifest["columns"] == {"image": "image", "label": "label"}
    augment = 'data.augment=[{"crop": {"padding": 1}}, {"rotate": {"degrees": 10}}]'
    plain = _trained(tmp_path / "out", tmp_path / "plain")
    augmented = _trained(tmp_path / "out", tmp_path / "aug", augment)
    assert plain["train_loss"] != augmented["train_loss"]  # the augmented run trained on other pixels
    assert plain["val_accuracy"] > 0.85 and augmented["val_accuracy"] > 0.8, (plain, augmented)


# ---------------------------------------------------------------- bounded memory at size


def _row_hashes(x: np.ndarray) -> np.ndarray:
    """A uint64 hash per row of float32 features (order-sensitive within the row)."""
    words = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    h = np.zeros(len(x), dtype=np.uint64)
    for j in range(words.shape[1]):
        h = mix64(h ^ words[:, j] ^ np.uint64(j << 40))
    return h


# a small parent for the measured command: Linux carries a process's peak RSS across exec, so a child
# forked from this test process would count the test's own memory
WRAPPER = (
    "import os, subprocess, sys; p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "_, s, u = os.wait4(p.pid, 0); print(u.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(s))"
)


def peak_rss_mb(cmd: list[str]) -> float:
    """The peak resident set of a command, in MiB; fails the test if it fails."""
    proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1]) / 1024


def _large_csv(path, rows: int, dim: int) -> np.ndarray:
    """A CSV of integer-valued features (column 0 the row id) and its rows' hashes, written in pieces."""
    import pyarrow.csv as pa_csv

    rng = np.random.default_rng(0)
    names = [f"f{j}" for j in range(dim)] + ["label"]
    hashes = []
    with pa_csv.CSVWriter(str(path), pa.schema([(n, pa.int32()) for n in names])) as w:
        for start in range(0, rows, 100_000):
            x = rng.integers(0, 1000, (min(100_000, rows - start), dim), dtype=np.int32)
            x[:, 0] = np.arange(start, start + len(x))
            label = rng.integers(0, 10, len(x), dtype=np.int32)
            w.write(pa.record_batch([*(pa.array(x[:, j]) for j in range(dim)), pa.array(label)], names=names))
            hashes.append(_row_hashes(np.c_[x, label].astype(np.float32)))
    return np.sort(np.concatenate(hashes))


def test_peak_memory_of_a_large_csv_stays_bounded_and_every_row_lands_once(tmp_path):
    """A 200 MB CSV: the child's peak RSS is under the bound however large the file, rows exactly once."""
    source = tmp_path / "big.csv"
    expected = _large_csv(source, 800_000, 64)
    assert source.stat().st_size > 190e6
    cmd = [sys.executable, "-m", "shoal", "shard", str(source), str(tmp_path / "out"), "--shuffle-memory", "64MB"]
    peak_mb = peak_rss_mb(cmd)
    assert peak_mb < 400, f"peak RSS {peak_mb:.0f} MB"  # the goal is 600 MB at any size; 64 MB of shuffle here
    train, val = open_shards(DataConfig(format="shards", path=str(tmp_path / "out")))
    got = []
    for src in (train, val):
        for start in range(0, len(src), 50_000):
            x, y, _ = src.get_batch(np.arange(start, min(len(src), start + 50_000)))
            got.append(_row_hashes(np.c_[x.numpy(), y.numpy()].astype(np.float32)))
    got = np.sort(np.concatenate(got))
    assert len(got) == len(expected) == 800_000 and np.array_equal(got, expected)


def test_column_options_on_a_source_without_columns_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 2), np.float32), y=np.arange(4))
    proc = shoal_cli("shard", str(tmp_path / "d.npz"), str(tmp_path / "out"), "--split-key", "id")
    assert proc.returncode == 2 and "--split-key names a column, and this source has none" in proc.stderr
