"""Asynchronous parameter-server mode on real Ray, and `shoal compare`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from shoal import launcher
from shoal.checkpoint import find_latest
from shoal.config import load_config
from shoal.errors import ConfigError
from shoal.ps.sharding import TensorSpec, balance, flatten, offsets

from conftest import REPO, TINY_LM, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_shards_are_balanced_by_bytes():
    sizes = [100, 10, 60, 40, 30, 5]
    shards = balance(sizes, 2)
    assert sorted(i for s in shards for i in s) == list(range(6))
    loads = sorted(sum(sizes[i] for i in s) for s in shards)
    assert loads == [115, 130]  # the best split of these sizes
    assert balance([4, 4, 4, 4], 4) == [[0], [1], [2], [3]]
    with pytest.raises(
        ConfigError, match="ps.num_shards: must be between 1 and the number of trainable parameter tensors \\(6\\)"
    ):
        balance(sizes, 7)


def test_flat_buffers_round_trip():
    import numpy as np

    specs = [TensorSpec("a", (2, 3), True), TensorSpec("b", (4,), False), TensorSpec("c", (), True)]
    arrays = [np.arange(6).reshape(2, 3), np.ones(4), np.array(7.0)]
    flat = flatten(arrays)
    assert flat.dtype == np.float32 and flat.shape == (11,)
    for o, s, a in zip(offsets(specs), specs, arrays):  # where the servers find each tensor
        assert np.array_equal(flat[o : o + s.numel].reshape(s.shape), a)


def test_zero_shards_is_a_config_error():
    with pytest.raises(ConfigError, match="ps.num_shards: must be >= 1"):
        load_config(QUICKSTART, ["ps.num_shards=0"])


@pytest.fixture(scope="module")
def async_run(ray_cluster, tmp_path_factory):
    """One async_ps run of the quickstart, shared by the tests that read it."""
    run_dir = tmp_path_factory.mktemp("async") / "run"
    cfg = load_config(
        QUICKSTART,
        tiny_overrides(
            run_dir,
            **{
                "strategy": "async_ps",
                "train.max_steps": 400,
                "ps.max_staleness": 1,
                "ps.num_shards": 2,
                "log.tensorboard": "true",
            },
        ),
    )
    return cfg, launcher.run(cfg)


def test_async_ps_quickstart_reaches_93_percent_with_bounded_staleness(async_run):
    cfg, summary = async_run
    run_dir = Path(cfg.run.dir)
    assert summary["status"] == "completed" and summary["strategy"] == "async_ps"
    assert summary["val_accuracy"] >= 0.93
    assert summary["staleness_max"] <= 1
    assert all(int(k) <= 1 for k in summary["staleness_histogram"])
    saved = json.loads((run_dir / "summary.json").read_text())
    for key in ("updates_per_s", "staleness_mean", "staleness_p50", "staleness_p99", "samples_per_s", "val_accuracy"):
        assert key in saved, key
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in records) and any("val_accuracy" in r for r in records)
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert find_latest(run_dir).name == "step-000400"


def test_async_ps_resumes_from_its_checkpoint(async_run, tmp_path):
    cfg, _ = async_run
    shutil.copytree(cfg.run.dir, tmp_path / "run")
    summary = launcher.run(cfg.replace({"run.dir": str(tmp_path / "run"), "train.max_steps": 440}), resume=True)
    assert summary["steps"] == 440 and summary["resumed_from"].endswith("step-000400")
    assert find_latest(tmp_path / "run").name == "step-000440"


def test_one_async_worker_matches_single_process_training(ray_cluster, tmp_path):
    common = {
        "train.max_steps": 40,
        "scaling.num_workers": 1,
        "optim.name": "sgd",
        "optim.lr": 0.05,
        "optim.momentum": 0.9,
        "optim.weight_decay": 0.01,
        "train.clip_grad_norm": 1.0,
        "train.eval_every": 0,
    }
    ps = load_config(QUICKSTART, tiny_overrides(tmp_path / "ps", **{"strategy": "async_ps", **common}))
    summary = launcher.run(ps)
    assert summary["staleness_max"] == 0 and summary["staleness_histogram"] == {"0": 40}
    proc = shoal_cli("worker", str(QUICKSTART), *tiny_overrides(tmp_path / "ar", **common))
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(find_latest(tmp_path / "ps") / "model.pt", weights_only=True)
    b = torch.load(find_latest(tmp_path / "ar") / "model.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), f"{k}: {(a[k] - b[k]).abs().max()}"


def test_async_ps_is_not_for_torchrun(tmp_path):
    proc = shoal_cli("worker", str(QUICKSTART), *tiny_overrides(tmp_path / "run", strategy="async_ps"))
    assert (
        proc.returncode == 2 and "strategy: async_ps runs its parameter servers through the Ray launcher" in proc.stderr
    )


def test_overlap_computes_on_the_previous_reply_so_staleness_is_one(ray_cluster, tmp_path):
    over = {
        "strategy": "async_ps",
        "train.max_steps": 20,
        "scaling.num_workers": 1,
        "ps.overlap": True,
        "train.eval_every": 0,
    }
    summary = launcher.run(load_config(QUICKSTART, tiny_overrides(tmp_path / "ov", **over)))
    hist = summary["staleness_histogram"]
    assert hist.get("0") == 1 and hist.get("1", 0) >= 19 and set(hist) <= {"0", "1"}, hist


def test_tied_language_model_under_async_ps_is_one_tensor_on_the_servers_and_in_the_checkpoint(ray_cluster, tmp_path):
    from shoal.models import build_model

    lm = {
        **TINY_LM,
        "strategy": "async_ps",
        "train.max_steps": 20,
        "train.eval_every": 0,
        "ps.num_shards": 2,
    }
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "run", **lm))
    summary = launcher.run(cfg)
    assert summary["steps"] == 20
    ckpt = find_latest(tmp_path / "run")
    state = torch.load(ckpt / "model.pt", weights_only=True)
    assert torch.equal(state["head.weight"], state["tok.weight"])
    from shoal.data.spec import DataSpec

    model = build_model(cfg.model, DataSpec(task="lm", input_shape=(8,), vocab_size=13, seq_len=8), 13)
    model.load_state_dict(state)  # a complete state dict: every name the model has
    assert model.head.weight is model.tok.weight
    # the servers hold the tied tensor once: their buffers add up to the model's distinct parameters
    servers = torch.load(ckpt / "state.pt", weights_only=True)["ps_servers"]
    assert sum(st["flat"].numel() for st in servers) == sum(p.numel() for p in model.parameters())
