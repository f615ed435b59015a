"""Reading shards: even coverage on real ranks and loader workers, order, exact resume across
world sizes, bad shards, and the shard quickstart."""

from __future__ import annotations

import json
import os
import tarfile
import time

import numpy as np
import pytest
import torch

from shoal.config import JobConfig, config_from_dict, load_config
from shoal.data.loaders import build_loaders
from shoal.dist import WorldInfo
from shoal.errors import ConfigError, DataError

from _ranks import spawn_ranks
from conftest import REPO, shoal_cli, tiny_overrides, write_id_shards

SIZES = [5, 17, 3, 29, 11, 8, 40]  # 113 samples, uneven, fewer shards than 2 ranks x 4 workers would want


def shard_cfg(path, **updates) -> JobConfig:
    base = {
        "data.format": "shards",
        "data.path": str(path),
        "data.batch_size": 3,
        "data.shuffle_buffer": 8,
        "model.width": 8,
        "model.depth": 1,
        "train.eval_every": 0,
        "log.tensorboard": False,
    }
    base.update(updates)
    return JobConfig().replace(base)


def read_batches(
    cfg_dict: dict, rank: int, world: int, state: dict | None = None, count: int | None = None
) -> tuple[list[list[int]], dict]:
    """Ids of this rank's next `count` batches (default: the rest of the epoch) and the position after."""
    stream = build_loaders(
        config_from_dict(cfg_dict), WorldInfo(rank=rank, world_size=world), torch.device("cpu")
    ).train
    if state is not None:
        stream.load_state_dict(state)
    n = stream.plan.num_batches(stream.consumed) if count is None else count
    batches = [next(stream)[1].tolist() for _ in range(n)]
    return batches, stream.state_dict()


def epoch_and_train(cfg_dict: dict) -> dict:
    """On a real rank with real loader workers: one epoch of ids, then DDP training past 2 epochs."""
    from shoal import dist
    from shoal.engine import train
    from shoal.job import build_job

    world = WorldInfo.from_env()
    cfg = config_from_dict(cfg_dict)
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    stream = build_loaders(cfg, world, torch.device("cpu")).train
    per_epoch = stream.plan.num_batches(stream.consumed)
    ids = [next(stream)[1].tolist() for _ in range(per_epoch)]
    job = build_job(cfg.replace({"train.max_steps": per_epoch * 2 + 3}), world, torch.device("cpu"))
    summary = train(job, lambda r: None)
    return {"ids": ids, "per_epoch": per_epoch, "steps": summary["steps"], "epochs": summary["epochs"]}


def test_two_ranks_two_loader_workers_cover_uneven_shards_once_without_hang(tmp_path):
    path = write_id_shards(tmp_path / "shards", SIZES)
    cfg = shard_cfg(path, **{"data.num_workers": 2, "data.persistent_workers": True})
    ranks = spawn_ranks(epoch_and_train, 2, cfg.to_dict(), timeout_s=120)
    assert ranks[0]["per_epoch"] == ranks[1]["per_epoch"] > 0
    used = [i for r in ranks for batch in r["ids"] for i in batch]
    assert len(used) == len(set(used)), "a sample was used twice in one epoch"
    assert set(used) <= set(range(sum(SIZES)))
    assert sum(SIZES) - len(used) <= 2 * 3 - 1
    assert all(len(b) == 3 for r in ranks for b in r["ids"])
    assert ranks[0]["steps"] == ranks[1]["steps"] == ranks[0]["per_epoch"] * 2 + 3
    assert ranks[0]["epochs"] == 2


def test_same_seed_same_order_new_epoch_new_order(tmp_path):
    cfg = shard_cfg(write_id_shards(tmp_path / "s", SIZES)).to_dict()
    a, state = read_batches(cfg, 0, 1)
    b, _ = read_batches(cfg, 0, 1)
    assert a == b
    next_epoch, _ = read_batches(cfg, 0, 1, state={"epoch": 1, "consumed": []})
    assert len(set(sum(next_epoch, [])) ^ set(sum(a, []))) <= 2 * (3 - 1)  # only the left-out samples differ
    assert next_epoch != a
    other_seed, _ = read_batches(config_from_dict(cfg).replace({"seed": 7}).to_dict(), 0, 1)
    assert other_seed != a


def resume_rest(cfg_dict: dict, state: dict, world: int) -> list[int]:
    """In a fresh process: restore the position on every rank of `world` and read the rest of the epoch."""
    return [i for r in range(world) for batch in read_batches(cfg_dict, r, world, state)[0] for i in batch]


@pytest.mark.parametrize(
    "world_before, world_after, workers_before, workers_after", [(2, 2, 0, 0), (2, 3, 2, 0), (2, 1, 0, 2)]
)
def test_resume_mid_epoch_reads_exactly_the_unseen_samples(
    tmp_path, world_before, world_after, workers_before, workers_after
):
    path = write_id_shards(tmp_path / "s", SIZES)
    before = shard_cfg(path, **{"data.num_workers": workers_before}).to_dict()
    after = shard_cfg(path, **{"data.num_workers": workers_after}).to_dict()
    seen, states = [], []
    for r in range(world_before):
        batches, state = read_batches(before, r, world_before, count=5)
        seen += [i for b in batches for i in b]
        states.append(state)
    assert all(s == states[0] for s in states), "every rank must hold the same global position"
    state = json.loads(json.dumps(states[0]))  # what a checkpoint stores
    rest = spawn_ranks(resume_rest, 1, after, state, world_after)[0]
    assert not set(seen) & set(rest), "a resumed epoch repeated samples"
    assert len(rest) == len(set(rest))
    remaining = sum(SIZES) - len(seen)
    assert remaining - len(rest) <= world_after * 3 - 1


def test_reader_memory_is_bounded_by_the_shuffle_window(tmp_path):
    cfg = shard_cfg(write_id_shards(tmp_path / "s", [400] * 5, block=4), **{"data.shuffle_buffer": 16})
    stream = build_loaders(cfg, WorldInfo(), torch.device("cpu")).train
    for _ in range(stream.plan.num_batches(stream.consumed)):
        next(stream)
        assert len(stream.source._cache) <= stream.source.capacity == 2 * 16 // 4 + 4


def corrupt(path, offset_fraction=0.5, nbytes=600):
    data = bytearray(path.read_bytes())
    at = int(len(data) * offset_fraction) // 512 * 512  # a tar header boundary
    data[at : at + nbytes] = b"\xff" * nbytes
    path.write_bytes(bytes(data))


def all_batches(cfg: JobConfig) -> list:
    stream = build_loaders(cfg, WorldInfo(), torch.device("cpu")).train
    return [next(stream) for _ in range(stream.plan.num_batches(stream.consumed))]


def test_corrupt_shard_is_named(tmp_path):
    path = write_id_shards(tmp_path / "s", SIZES)
    corrupt(path / "train-000006.tar")
    with pytest.raises(DataError, match=r"shard train-000006\.tar.*(corrupt|truncated|holds)"):
        all_batches(shard_cfg(path))


def test_truncated_shard_is_named(tmp_path):
    path = write_id_shards(tmp_path / "s", SIZES)
    p = path / "train-000003.tar"
    p.write_bytes(p.read_bytes()[: 3 * 1024 + 100])
    with pytest.raises(DataError, match=r"shard train-000003\.tar.*(truncated|corrupt)"):
        all_batches(shard_cfg(path))


def test_missing_field_names_shard_and_sample(tmp_path):
    import webdataset as wds

    path = write_id_shards(tmp_path / "s", [8, 8])
    with wds.TarWriter(str(path / "train-000001.tar")) as sink:
        sink.write(
            {
                "__key__": "000000000008",
                "x.bin": np.zeros((4, 2), np.float32).tobytes(),
                "y.bin": np.arange(8, 12).tobytes(),
            }
        )
        sink.write({"__key__": "000000000012", "x.bin": np.zeros((4, 2), np.float32).tobytes()})
    with pytest.raises(DataError, match=r"shard train-000001\.tar, sample 000000000012: field 'y' is missing"):
        all_batches(shard_cfg(path, **{"data.shuffle": False, "data.batch_size": 4}))


def test_wrong_shape_names_shard_and_sample(tmp_path):
    path = write_id_shards(tmp_path / "s", [8])
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["fields"]["x"]["shape"] = [3]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard train-000000\.tar, sample 0+: field 'x' holds 32 bytes, expected 48"):
        all_batches(shard_cfg(path, **{"data.batch_size": 4}))


def test_empty_pattern_and_missing_shard(tmp_path):
    with pytest.raises(DataError, match="data.path: pattern .* matches no file"):
        all_batches(shard_cfg(str(tmp_path / "none-{000000..000003}.tar")))
    path = write_id_shards(tmp_path / "s", SIZES)
    os.remove(path / "train-000002.tar")
    with pytest.raises(DataError, match=r"shard .*train-000002\.tar: missing"):
        all_batches(shard_cfg(str(path / "train-{000000..000006}.tar")))
    with pytest.raises(DataError, match=r"shard train-000002\.tar: cannot open"):
        all_batches(shard_cfg(path))


def test_foreign_shards_need_a_decode_function(tmp_path):
    import webdataset as wds

    (tmp_path / "f").mkdir()
    with wds.TarWriter(str(tmp_path / "f" / "a-0.tar")) as sink:
        for i in range(12):
            sink.write({"__key__": f"s{i:04d}", "input.npy": np.full(2, i, np.float32), "cls": i % 3})
    with pytest.raises(ConfigError, match="data.decode"):
        all_batches(shard_cfg(str(tmp_path / "f" / "a-{0..0}.tar")))
    cfg = shard_cfg(
        str(tmp_path / "f" / "a-{0..0}.tar"),
        **{
            "data.decode": "helpers:decode_npy_cls",
            "data.input_shape": [2],
            "data.num_classes": 3,
            "data.batch_size": 4,
        },
    )
    batches = all_batches(cfg)
    assert len(batches) == 3
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert sorted(xs[:, 0].long().tolist()) == list(range(12))
    assert torch.equal(ys, xs[:, 0].long() % 3)


def test_on_error_skip_counts_and_reports(tmp_path):
    path = write_id_shards(tmp_path / "s", SIZES, val=[10])
    corrupt(path / "train-000006.tar", 0.3)
    cfg = shard_cfg(path, **{"data.on_error": "skip", "train.max_steps": 40, "run.dir": str(tmp_path / "run")})
    proc = shoal_cli("worker", "/dev/null", *[f"{k}={v}" for k, v in _flat(cfg.to_dict()).items()])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["data_skipped_samples"] > 0
    assert "data.on_error=skip" in proc.stderr
    assert proc.stderr.count("skipping bad data") == 1


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        elif v is not None and not (isinstance(v, (list, dict)) and not v):
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, dict, bool)) else v
    return out


def test_bad_shard_under_the_cli_exits_2_naming_the_shard(tmp_path):
    path = write_id_shards(tmp_path / "s", SIZES)
    corrupt(path / "train-000006.tar")
    proc = shoal_cli(
        "worker",
        str(REPO / "configs" / "quickstart.yaml"),
        *tiny_overrides(
            tmp_path / "run",
            **{
                "data.format": "shards",
                "data.path": str(path),
                "data.batch_size": 3,
                "model.width": 8,
                "train.max_steps": 200,
            },
        ),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "train-000006.tar" in proc.stderr.strip().splitlines()[-1]
    assert "Traceback" not in proc.stderr


def test_packed_shards_are_ordinary_webdataset_tars(tmp_path):
    import webdataset as wds

    path = write_id_shards(tmp_path / "s", [8])
    with tarfile.open(path / "train-000000.tar") as tf:
        assert [m.name for m in tf.getmembers()][:2] == ["000000000000.x.bin", "000000000000.y.bin"]
    samples = list(wds.WebDataset(str(path / "train-000000.tar"), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["000000000000", "000000000004"]
    assert np.frombuffer(samples[1]["y.bin"], dtype="<i8").tolist() == [4, 5, 6, 7]


def test_digits_shards_quickstart_reaches_95_percent_on_ray(ray_cluster, tmp_path):
    from shoal import launcher

    proc = shoal_cli(
        "shard",
        "digits",
        str(tmp_path / "digits"),
        "--val-fraction",
        "0.2",
        "--samples-per-shard",
        "256",
        "--block-size",
        "32",
    )
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(
        REPO / "configs" / "digits-shards.yaml",
        tiny_overrides(tmp_path / "run", **{"data.path": str(tmp_path / "digits")}),
    )
    summary = launcher.run(cfg)
    assert summary["status"] == "completed" and summary["world_size"] == 2
    assert summary["val_accuracy"] >= 0.95


def test_pipe_urls_are_streamed_with_the_manifests_counts(tmp_path):
    path = write_id_shards(tmp_path / "s", [10, 7, 12])
    cfg = shard_cfg(f"pipe:cat {path}/train-{{000000..000002}}.tar", **{"data.manifest": str(path / "manifest.json")})
    ids = [i for _, y in all_batches(cfg) for i in y.tolist()]
    assert len(ids) == len(set(ids)) and 29 - len(ids) <= 3 - 1
    assert set(ids) <= set(range(29))


@pytest.mark.parametrize("persistent", [False, True])
def test_loader_workers_stop_when_the_stream_is_closed_or_dropped(tmp_path, persistent):
    import multiprocessing

    cfg = shard_cfg(
        write_id_shards(tmp_path / "s", SIZES), **{"data.num_workers": 2, "data.persistent_workers": persistent}
    )
    before = len(multiprocessing.active_children())
    dropped = build_loaders(cfg, WorldInfo(), torch.device("cpu")).train
    closed = build_loaders(cfg, WorldInfo(), torch.device("cpu")).train
    for _ in range(3):
        next(dropped), next(closed)
    assert len(multiprocessing.active_children()) == before + 4
    closed.close()
    assert len(multiprocessing.active_children()) == before + 2
    del dropped  # by reference count, not left to the garbage collector (which waits 5 s per worker)
    assert len(multiprocessing.active_children()) == before


def _set_manifest(path, **values) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(values)
    (path / "manifest.json").write_text(json.dumps(manifest))


# A bad label, token id or too-narrow model must end the command within seconds, start-up included: with the
# original bug the error took 22.8 s; 12 s leaves room for a loaded machine and still fails that.
ERROR_WITHIN_S = 12.0


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("loader_workers", [0, 1])
def test_labels_beyond_num_classes_exit_2_naming_shard_value_and_range(tmp_path, loader_workers):
    path = write_id_shards(tmp_path / "s", [24, 24])  # labels are the ids 0..47
    _set_manifest(path, num_classes=10)
    started = time.monotonic()
    proc = shoal_cli(
        "worker",
        str(REPO / "configs" / "quickstart.yaml"),
        *tiny_overrides(
            tmp_path / "run",
            **{
                "data.format": "shards",
                "data.path": str(path),
                "data.batch_size": 4,
                "data.num_workers": loader_workers,
                "data.shuffle": False,
                "model.width": 8,
            },
        ),
    )
    elapsed = time.monotonic() - started  # the whole command, its start-up included
    line = _one_line_error(proc)
    assert elapsed < ERROR_WITHIN_S, f"the label error took {elapsed:.1f} s"
    assert (
        line.startswith("shoal: error: shard train-00000")
        and "is outside [0, 10) (num_classes=10 in the manifest)" in line
    )
    label = int(line.split(": label ")[1].split()[0])
    assert 10 <= label < 48


def test_labels_beyond_num_classes_on_ray_fail_within_seconds(ray_cluster, tmp_path):
    path = write_id_shards(tmp_path / "s", [24, 24])
    _set_manifest(path, num_classes=10)
    started = time.monotonic()
    proc = shoal_cli(
        "train",
        str(REPO / "configs" / "quickstart.yaml"),
        *tiny_overrides(
            tmp_path / "run",
            **{
                "scaling.address": ray_cluster,
                "data.format": "shards",
                "data.path": str(path),
                "data.batch_size": 4,
                "model.width": 8,
            },
        ),
    )
    elapsed = time.monotonic() - started  # the whole command: driver, Ray job, ranks, the error
    line = _one_line_error(proc)
    assert elapsed < ERROR_WITHIN_S, f"the label error on Ray took {elapsed:.1f} s"
    assert "label" in line and "is outside [0, 10)" in line and "shard train-00000" in line


def test_token_ids_beyond_the_vocabulary_exit_2(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    assert shoal_cli("shard", str(text), str(tmp_path / "s"), "--seq-len", "16").returncode == 0
    _set_manifest(tmp_path / "s", vocab_size=50)  # bytes of lower-case letters are 97..122
    started = time.monotonic()
    proc = shoal_cli(
        "worker",
        str(REPO / "configs" / "quickstart.yaml"),
        *tiny_overrides(
            tmp_path / "run",
            **{
                "data.format": "shards",
                "data.path": str(tmp_path / "s"),
                "data.batch_size": 4,
                "model.name": "transformer_lm",
                "model.width": 16,
                "model.heads": 2,
                "model.depth": 1,
            },
        ),
    )
    elapsed = time.monotonic() - started
    line = _one_line_error(proc)
    assert elapsed < ERROR_WITHIN_S, f"the token id error took {elapsed:.1f} s"
    assert "token id" in line and "is outside [0, 50) (vocab_size=50 in the manifest)" in line


def test_a_model_with_fewer_outputs_than_classes_is_a_config_error(tmp_path):
    started = time.monotonic()
    proc = shoal_cli(
        "worker",
        str(REPO / "configs" / "quickstart.yaml"),
        *tiny_overrides(tmp_path / "run", **{"model.target": "helpers:narrow_mlp", "train.max_steps": 5}),
    )
    elapsed = time.monotonic() - started
    line = _one_line_error(proc)
    assert elapsed < ERROR_WITHIN_S, f"the output-size error took {elapsed:.1f} s"
    assert "model.target: the model gives 5 outputs per sample but the data has 10 classes (labels 0..9)" in line


# ---------------------------------------------------------------- shards in object storage (tests/_s3.py's server)

DIGITS_SHARDS = REPO / "configs" / "digits-shards.yaml"


def digits_in_s3(s3, tmp_path) -> tuple[str, str]:
    """(local directory, s3:// prefix) of the same digits shards."""
    server, bucket = s3
    local = tmp_path / "digits"
    proc = shoal_cli(
        "shard", "digits", str(local), "--val-fraction", "0.2", "--samples-per-shard", "256", "--block-size", "32"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    server.filesystem().put(str(local) + "/", f"{bucket}/digits/", recursive=True)
    return str(local), f"s3://{bucket}/digits"


def train_on_rank(cfg_dict: dict) -> dict:
    from shoal.worker import run_worker

    return run_worker(config_from_dict(cfg_dict))


def logged(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_ranks_from_s3_train_exactly_as_from_local_files(s3, tmp_path):
    local, url = digits_in_s3(s3, tmp_path)

    def job(path: str, run: str) -> dict:
        over = {"data.path": path, "train.max_steps": 30, "train.eval_every": 15, "log.every": 1}
        return load_config(DIGITS_SHARDS, tiny_overrides(tmp_path / run, **over, **{"data.num_workers": 1})).to_dict()

    from_local = spawn_ranks(train_on_rank, 2, job(local, "local"), timeout_s=300)[0]
    from_s3 = spawn_ranks(train_on_rank, 2, job(url, "s3"), timeout_s=300)[0]
    assert from_local["status"] == from_s3["status"] == "completed" and from_s3["world_size"] == 2
    a, b = logged(tmp_path / "local"), logged(tmp_path / "s3")
    losses = [r["loss"] for r in a if "loss" in r]
    assert len(losses) == 30 and max(losses) - min(losses) > 0.1  # it learned: the losses compared are not flat
    assert [(r.get("loss"), r.get("val_loss")) for r in a] == [(r.get("loss"), r.get("val_loss")) for r in b]


def test_resume_mid_epoch_from_s3_is_the_uninterrupted_run(s3, tmp_path):
    import threading

    from shoal.checkpoint import find_latest
    from shoal.worker import run_worker

    _, url = digits_in_s3(s3, tmp_path)  # 1437 training samples: 44 steps an epoch at batch 32

    def run(name: str, resume: bool = False, stop_after: int | None = None) -> dict:
        over = {"data.path": url, "train.max_steps": 70, "train.eval_every": 35, "log.every": 5}
        cfg = load_config(DIGITS_SHARDS, tiny_overrides(tmp_path / name, **over))
        stop = threading.Event()

        def report(record: dict) -> None:
            if stop_after is not None and record["step"] >= stop_after:
                stop.set()

        return run_worker(cfg, resume=resume, report=report, stop=stop)

    run("straight")
    stopped = run("resumed", stop_after=20)
    assert stopped["status"] == "preempted" and 20 <= stopped["steps"] < 44  # stopped inside the first epoch
    resumed = run("resumed", resume=True)
    assert resumed["status"] == "completed" and resumed["steps"] == 70
    a, b = (torch.load(find_latest(tmp_path / n) / "model.pt", weights_only=True) for n in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    keys = ("step", "epoch", "samples", "loss", "val_loss", "val_accuracy")
    assert [{k: r.get(k) for k in keys} for r in logged(tmp_path / "straight")] == [
        {k: r.get(k) for k in keys} for r in logged(tmp_path / "resumed")
    ]
