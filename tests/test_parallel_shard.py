"""`shoal shard --workers N` and `--ray`: the same samples in the same order as one process, string labels
given the same class ids, a conversion killed midway leaves no manifest and a re-run replaces it cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest
from test_data_writer import shard

from shoal.config import DataConfig
from shoal.data.arrow_sources import PIECE_BYTES
from shoal.data.shard_tasks import Failed, Layout, SpillTask, run_elsewhere, spill
from shoal.data.shards import open_shards
from shoal.data.shuffle import mix64
from shoal.data.sources import load_source

from conftest import REPO, TESTS, shoal_cli

NAMES = np.array(["pear", "apple", "quince", "fig"])  # first seen in this order, so ids are not first-seen ones


def in_order(out_dir) -> list[tuple[np.ndarray, np.ndarray]]:
    """(x, y) of each split, its shards in the manifest's order."""
    train, val = open_shards(DataConfig(format="shards", path=str(out_dir)))
    out = []
    for src in (train, val):
        x, y, skipped = src.get_batch(np.arange(len(src)))
        assert skipped == 0
        out.append((x.numpy(), y.numpy()))
    return out


def row_checksum(x: np.ndarray, y: np.ndarray) -> int:
    """A hash of the sorted row hashes: the same set of rows, whatever their order."""
    words = np.c_[x.reshape(len(x), -1), y.reshape(len(y), -1)].astype(np.float32).view(np.uint32).astype(np.uint64)
    h = np.zeros(len(x), dtype=np.uint64)
    for j in range(words.shape[1]):
        h = mix64(h ^ words[:, j] ^ np.uint64(j << 40))
    return int(mix64(np.sort(h)).sum(dtype=np.uint64))


def _parquet(path, n: int = 6000) -> None:
    """Row groups of 700 rows (9 pieces), x = [id, id / 2, ...], a string label that names a quarter of the ids."""
    ids = np.arange(n, dtype=np.float32)
    x = np.stack([ids, ids / 2, -ids], axis=1)
    table = pa.table({"x": list(x), "kind": NAMES[(np.arange(n) * 4) // n]})
    pq.write_table(table, path, row_group_size=700)


def _csv(path) -> None:
    """A CSV of three pieces and more: integer features (f0 the row id) and an integer label."""
    rng = np.random.default_rng(1)
    names = [f"f{j}" for j in range(12)] + ["label"]
    with pa_csv.CSVWriter(str(path), pa.schema([(n, pa.int32()) for n in names])) as w:
        start = 0
        while not path.exists() or path.stat().st_size < 2.3 * PIECE_BYTES:
            x = rng.integers(0, 100_000, (50_000, 12), dtype=np.int32)
            x[:, 0] = np.arange(start, start + len(x))
            w.write(pa.record_batch([*(pa.array(x[:, j]) for j in range(12)), pa.array(x[:, 1] % 7)], names=names))
            start += len(x)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    _parquet(root / "d.parquet")
    _csv(root / "d.csv")
    # shuffle memory for a few buckets of the parquet file; for the CSV's 30 or more
    return {
        "parquet": (root / "d.parquet", ["--label-column", "kind"], "64KB"),
        "csv": (root / "d.csv", [], "1MB"),
    }


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_workers_and_ray_write_the_samples_of_one_process_in_its_order(tmp_path, sources, ray_cluster, kind):
    path, extra, memory = sources[kind]
    assert load_source(str(path), label_column=extra[1] if extra else None).pieces >= 3
    common = [*extra, "--seed", "5", "--shuffle-memory", memory, "--samples-per-shard", "1000"]
    shard(str(path), str(tmp_path / "one"), *common)
    shard(str(path), str(tmp_path / "two"), *common, "--workers", "2")
    proc = shoal_cli("shard", str(path), str(tmp_path / "ray"), *common, "--ray", ray_cluster)
    assert proc.returncode == 0, proc.stderr[-3000:]

    manifests = {d: json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two", "ray")}
    counts = {d: {s: v["samples"] for s, v in m["splits"].items()} for d, m in manifests.items()}
    assert counts["one"] == counts["two"] == counts["ray"] and counts["one"]["val"] > 0
    assert len({m.get("classes") and tuple(m["classes"]) for m in manifests.values()}) == 1
    assert any("-001-" in s["name"] for s in manifests["two"]["splits"]["train"]["shards"])  # two tasks wrote
    one = in_order(tmp_path / "one")
    for d in ("two", "ray"):
        got = in_order(tmp_path / d)
        assert [row_checksum(*s) for s in got] == [row_checksum(*s) for s in one]
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, one)), d
    x = np.concatenate([s[0] for s in one])
    y = np.concatenate([s[1] for s in one])
    assert np.array_equal(np.sort(x[:, 0]), np.arange(len(x)))  # every row once
    if kind == "parquet":  # class ids are the sorted names' wherever a name was first seen
        assert manifests["one"]["classes"] == sorted(NAMES.tolist())
        assert (np.array(manifests["one"]["classes"])[y] == NAMES[(x[:, 0].astype(int) * 4) // len(x)]).all()


def test_ray_without_an_address_starts_a_local_cluster_of_the_workers_asked(tmp_path):
    shard("digits", str(tmp_path / "one"))
    proc = shoal_cli("shard", "digits", str(tmp_path / "ray"), "--workers", "2", "--ray", env={"RAY_ADDRESS": None})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for a, b in zip(in_order(tmp_path / "one"), in_order(tmp_path / "ray")):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _big_parquet(path, n: int) -> None:
    ids = np.arange(n, dtype=np.float32)
    pq.write_table(
        pa.table({"x": list(np.stack([ids] * 8, axis=1)), "y": np.arange(n) % 5}), path, row_group_size=20_000
    )


def test_a_conversion_killed_midway_leaves_no_manifest_and_a_rerun_replaces_it(tmp_path):
    source, out = tmp_path / "big.parquet", tmp_path / "out"
    _big_parquet(source, 200_000)
    cmd = [sys.executable, "-m", "shoal", "shard", str(source), str(out), "--workers", "2"]
    cmd += ["--samples-per-shard", "512", "--block-size", "8"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list(out.glob("*.tar")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its worker processes at once
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    assert list(out.glob("*.tar")) and not (out / "manifest.json").exists()

    rerun = shoal_cli("shard", str(source), str(out), "--overwrite", "--samples-per-shard", "4096", timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    named = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.name for p in out.iterdir()} == named | {"manifest.json"}  # no shard or spill of the killed run
    ids = np.concatenate([s[0][:, 0] for s in in_order(out)])
    assert np.array_equal(np.sort(ids), np.arange(200_000))


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_workers_below_one_exit_2_with_one_line(tmp_path, workers):
    proc = shoal_cli("shard", "digits", str(tmp_path / "out"), "--workers", workers)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"shoal: error: --workers: must be at least 1 (got {workers})"
    assert not (tmp_path / "out").exists()


def test_a_task_that_cannot_see_out_dir_says_so_in_one_line(tmp_path):
    """As a Ray task on a node without OUT_DIR's storage finds it: the driver's marker is not there."""
    task = SpillTask(0, (0, 1), _layout(tmp_path), lambda: load_source("digits"))
    got = run_elsewhere(spill, task, str(tmp_path / "progress"), str(tmp_path / "spill" / "driver"))
    assert isinstance(got, Failed) and got.kind == "DataError"
    assert got.message == (
        f"{tmp_path}: not visible from {os.uname().nodename} (a Ray node); with --ray, OUT_DIR must be on storage "
        "every node of the cluster sees"
    )


def _layout(tmp_path) -> Layout:
    dtype = np.dtype([("x", "<f4", (1, 8, 8)), ("y", "<i8")])
    return Layout(str(tmp_path / "spill"), str(tmp_path), "digits", dtype, 1, 0, True, 1 << 20, None, 64, 64)
