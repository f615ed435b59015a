"""Object storage against a real S3 server (SeaweedFS on 127.0.0.1, tests/_s3.py): `shoal shard` to s3://, the
same samples read back as from local files, blocks by ranged GET (counted by the server), and a wrong bucket,
endpoint or key refused by `shoal validate` and `shoal train` in seconds, as one line naming the URL."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest
import torch

from shoal.config import JobConfig
from shoal.data import storage
from shoal.data.shards import open_shards
from shoal.errors import DataError

from conftest import REPO, shoal_cli, tiny_overrides, write_id_shards

QUICKSTART = REPO / "configs" / "quickstart.yaml"
DIGITS = ("--val-fraction", "0.2", "--samples-per-shard", "256", "--block-size", "32")


def shard_digits(out: str, *extra: str, env: dict | None = None):
    proc = shoal_cli("shard", "digits", out, *DIGITS, *extra, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def shards_cfg(path: str, **updates) -> JobConfig:
    base = {"data.format": "shards", "data.path": path, "data.batch_size": 32, "data.shuffle_buffer": 64}
    return JobConfig().replace({**base, **updates})


def every_sample(source) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, skipped = source.get_batch(np.arange(len(source)))
    assert skipped == 0
    return x, y


def one_line_error(proc) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines, proc.stdout[-2000:]
    return lines[-1]


def test_options_come_from_the_aws_environment_with_storage_options_over_them(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://general:1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://s3-only:2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_REGION", "eu-central-1")
    options = storage.fs_options({"config_kwargs": {"read_timeout": 5}, "client_kwargs": {"verify": False}})
    assert options["endpoint_url"] == "http://s3-only:2"  # the S3-specific variable wins, as in botocore
    assert options["client_kwargs"] == {"region_name": "eu-central-1", "verify": False}
    assert options["config_kwargs"]["read_timeout"] == 5 and options["config_kwargs"]["connect_timeout"] == 5
    assert storage.endpoint({"endpoint_url": "http://given:3"}) == "http://given:3"
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.delenv("AWS_REGION")
    assert storage.fs_options()["endpoint_url"] == "http://general:1"
    assert storage.fs_options()["client_kwargs"] == {"region_name": "eu-west-1"}


def test_shard_to_s3_uploads_every_shard_then_the_manifest_and_leaves_no_staging(s3, tmp_path):
    server, bucket = s3
    staging = tmp_path / "tmp"
    staging.mkdir()
    url = f"s3://{bucket}/digits"
    shard_digits(url, env={"TMPDIR": str(staging)})
    fs = server.filesystem()
    listed = {o["name"].rsplit("/", 1)[-1]: o for o in fs.ls(f"{bucket}/digits", detail=True)}
    manifest = json.loads(fs.cat_file(f"{bucket}/digits/manifest.json"))
    names = [s["name"] for split in manifest["splits"].values() for s in split["shards"]]
    assert set(listed) == {*names, "manifest.json"}
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == 1797
    assert all(listed["manifest.json"]["LastModified"] >= listed[n]["LastModified"] for n in names)
    assert not list(staging.iterdir()), "the staging directory is left behind"

    again = shoal_cli("shard", "digits", url, *DIGITS)
    assert again.returncode == 2 and "already holds shards" in one_line_error(again) and url in again.stderr
    shard_digits(url, "--overwrite", "--samples-per-shard", "1024")  # fewer, larger shards replace the old ones
    manifest = json.loads(fs.cat_file(f"{bucket}/digits/manifest.json"))
    names = {s["name"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/digits")} == {*names, "manifest.json"}


def test_an_upload_that_fails_leaves_no_manifest(s3, tmp_path):
    server, bucket = s3
    staging = tmp_path / "stage"
    staging.mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "manifest.json"):
        (staging / name).write_bytes(b"x" * 1000)
    store, url = storage.Store(), f"s3://{bucket}/p"
    with pytest.raises(DataError, match="train-000002.tar"):  # a shard the writer did not finish
        storage.publish(
            store, staging, url, ["train-000000.tar", "train-000001.tar", "train-000002.tar"], "manifest.json", set()
        )
    assert not server.filesystem().exists(f"{bucket}/p/manifest.json")


def test_reading_from_s3_gives_the_samples_of_the_local_files(s3, tmp_path):
    server, bucket = s3
    local = tmp_path / "digits"
    shard_digits(str(local))
    server.filesystem().put(str(local) + "/", f"{bucket}/digits/", recursive=True)
    url = f"s3://{bucket}/digits"
    for local_cfg, s3_cfg in (
        (shards_cfg(str(local)), shards_cfg(url)),
        (shards_cfg(f"{local}/train-{{000000..000005}}.tar"), shards_cfg(f"{url}/train-{{000000..000005}}.tar")),
    ):
        (train_l, val_l), (train_s, val_s) = open_shards(local_cfg.data), open_shards(s3_cfg.data)
        assert train_s.shard_counts == train_l.shard_counts and len(train_s) > 1000
        for a, b in zip(every_sample(train_l), every_sample(train_s)):
            assert torch.equal(a, b)
        if val_l is not None:
            for a, b in zip(every_sample(val_l), every_sample(val_s)):
                assert torch.equal(a, b)
    from shoal.data.spec import describe

    assert describe(shards_cfg(url).data) == describe(shards_cfg(str(local)).data)  # what the driver sees


def test_shards_without_a_manifest_are_read_through_their_tar_headers(s3, tmp_path):
    import webdataset as wds

    server, bucket = s3
    (tmp_path / "f").mkdir()
    for s in range(2):
        with wds.TarWriter(str(tmp_path / "f" / f"a-{s}.tar")) as sink:
            for i in range(12):
                sink.write({"__key__": f"s{s}{i:04d}", "input.npy": np.full(2, 12 * s + i, np.float32), "cls": i % 3})
    server.filesystem().put(str(tmp_path / "f") + "/", f"{bucket}/f/", recursive=True)
    decode = {"data.decode": "helpers:decode_npy_cls", "data.input_shape": [2], "data.num_classes": 3}
    local, _ = open_shards(shards_cfg(f"{tmp_path}/f/a-{{0..1}}.tar", **decode).data)
    remote, _ = open_shards(shards_cfg(f"s3://{bucket}/f/a-{{0..1}}.tar", **decode).data)
    assert remote.shard_counts == local.shard_counts == [12, 12]
    x, y = every_sample(remote)
    assert x[:, 0].long().tolist() == list(range(24)) and torch.equal(y, x[:, 0].long() % 3)
    assert all(torch.equal(a, b) for a, b in zip(every_sample(local), (x, y)))


def test_a_block_is_one_ranged_get_of_about_its_bytes_not_the_shard(s3, tmp_path):
    server, bucket = s3
    local = tmp_path / "big"
    big = ("synthetic", str(local), "--num-samples", "4096", "--input-shape", "1024")
    proc = shoal_cli("shard", *big, "--samples-per-shard", "2048", "--block-size", "64", "--val-fraction", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    shard_bytes = (local / "train-000000.tar").stat().st_size
    assert shard_bytes > 8 << 20
    server.filesystem().put(str(local) + "/", f"{bucket}/big/", recursive=True)
    block_bytes = 64 * 1024 * 4

    source, _ = open_shards(shards_cfg(f"s3://{bucket}/big", **{"data.shuffle_buffer": 64}).data)
    before = server.metrics(bucket)
    x, _, _ = source.get_batch(np.array([100]))  # one sample of the second block of the first shard
    after = server.metrics(bucket)
    assert after["gets"] - before["gets"] == after["ranged_gets"] - before["ranged_gets"] == 1
    sent = after["bytes_sent"] - before["bytes_sent"]
    assert block_bytes <= sent <= block_bytes + 2048, sent
    assert sent < shard_bytes / 30

    wide, _ = open_shards(shards_cfg(f"s3://{bucket}/big", **{"data.shuffle_buffer": 256}).data)
    before = server.metrics(bucket)
    got, _, _ = wide.get_batch(np.arange(0, 256, 7))  # four blocks, wanted together by a shuffle window: one request
    after = server.metrics(bucket)
    assert after["gets"] - before["gets"] == 1
    assert 4 * block_bytes <= after["bytes_sent"] - before["bytes_sent"] <= 4 * block_bytes + 8192
    local_source, _ = open_shards(shards_cfg(str(local)).data)
    assert torch.equal(got, local_source.get_batch(np.arange(0, 256, 7))[0])


def _refused(args: list[str], env: dict, url: str) -> str:
    start = time.monotonic()
    proc = shoal_cli(*args, env=env, timeout=120)
    took = time.monotonic() - start
    line = one_line_error(proc)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert url in line, line
    assert took < 20, f"{args[0]} took {took:.1f}s to refuse {url}"
    return line


@pytest.mark.parametrize("command", ["validate", "train"])
def test_a_wrong_bucket_endpoint_or_key_exits_2_within_seconds_naming_the_url(s3, tmp_path, command):
    server, bucket = s3
    shard_digits(f"s3://{bucket}/digits")
    run = tiny_overrides(tmp_path / "run", **{"data.format": "shards", "scaling.num_workers": 1})
    args = [command, str(QUICKSTART), *run]
    url = "s3://no-such-bucket-here/digits"
    line = _refused([*args, f"data.path={url}"], {}, url)
    assert "bucket 'no-such-bucket-here' does not exist" in line

    url = f"s3://{bucket}/digits"
    missing = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None}
    assert "no S3 credentials" in _refused([*args, f"data.path={url}"], missing, url)
    assert "access refused" in _refused([*args, f"data.path={url}"], {"AWS_SECRET_ACCESS_KEY": "wrong"}, url)
    closed = {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}  # the discard port: nothing listens
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in _refused([*args, f"data.path={url}"], closed, url)
    url = f"s3://{bucket}/nothing-here"
    assert "has no manifest.json" in _refused([*args, f"data.path={url}"], {}, url)


def test_validate_reads_the_manifest_from_s3_for_the_model(s3, tmp_path):
    server, bucket = s3
    shard_digits(f"s3://{bucket}/digits")
    over = tiny_overrides(tmp_path / "run", **{"data.format": "shards", "data.path": f"s3://{bucket}/digits"})
    proc = shoal_cli("validate", str(QUICKSTART), *over, "data.augment=[hflip]")
    assert proc.returncode == 0, proc.stderr[
        -2000:
    ]  # hflip needs images: the manifest's [1, 8, 8], not the config's [32]


def test_without_s3fs_an_s3_path_says_what_to_install(s3, tmp_path):
    code = (
        "import sys; sys.modules['s3fs'] = None; from shoal.cli import main; "
        f"sys.exit(main(['validate', {str(QUICKSTART)!r}, 'data.format=shards', 'data.path=s3://b/x', "
        f"'run.dir={tmp_path / 'run'}']))"
    )
    import subprocess

    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pip install 'shoal[s3]'" in one_line_error(proc)


def test_id_shards_read_from_s3_by_pattern_with_the_manifest_beside_them(s3, tmp_path):
    server, bucket = s3
    path = write_id_shards(tmp_path / "ids", [5, 17, 3, 29], block=4)
    server.filesystem().put(str(path) + "/", f"{bucket}/ids/", recursive=True)
    source, _ = open_shards(shards_cfg(f"s3://{bucket}/ids/train-{{000000..000003}}.tar").data)
    assert source.shard_counts == [5, 17, 3, 29]
    assert every_sample(source)[1].tolist() == list(range(54))
    server.filesystem().rm(f"{bucket}/ids/train-000002.tar")
    with pytest.raises(DataError, match="train-000002.tar: missing"):
        open_shards(shards_cfg(f"s3://{bucket}/ids/train-{{000000..000003}}.tar").data)


def test_storage_options_reach_s3fs_and_a_truncated_shard_is_named(s3, tmp_path, monkeypatch):
    server, bucket = s3
    path = write_id_shards(tmp_path / "ids", [40, 40], block=4)
    data = (path / "train-000001.tar").read_bytes()
    (path / "train-000001.tar").write_bytes(data[: len(data) // 2])  # cut inside a block
    server.filesystem().put(str(path) + "/", f"{bucket}/ids/", recursive=True)
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the endpoint now comes from data.storage_options alone
    cfg = shards_cfg(f"s3://{bucket}/ids", **{"data.storage_options": {"endpoint_url": server.endpoint}})
    source, _ = open_shards(cfg.data)
    assert source.get_batch(np.arange(40))[1].tolist() == list(range(40))
    with pytest.raises(DataError, match=r"shard train-000001.tar.*(truncated|corrupt)"):
        source.get_batch(np.arange(40, 80))
    skip, _ = open_shards(cfg.replace({"data.on_error": "skip"}).data)
    local, _ = open_shards(shards_cfg(str(path), **{"data.on_error": "skip"}).data)
    got, expected = skip.get_batch(np.arange(80)), local.get_batch(np.arange(80))
    assert got[2] == expected[2] > 0 and torch.equal(got[1], expected[1])  # skipped as the local file is
