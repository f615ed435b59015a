"""Augmentation and mixing on real data: scikit-learn's digits as 8x8 images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shoal.config import DataConfig, JobConfig, load_config
from shoal.data.augment import Augment
from shoal.data.spec import from_config

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
IMAGES = [{"crop": {"padding": 1}}, {"rotate": {"degrees": 10}}, {"noise": {"std": 0.1}}]


def constant_images(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i: after mixing, each pixel says which sample it came from."""
    return torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 8, 8).clone(), torch.arange(n)


def augment(**data) -> Augment:
    cfg = DataConfig(dataset="digits", **data)
    return Augment(cfg, from_config(cfg), seed=0, rank=0)


def test_mixup_mixes_inputs_and_targets_in_the_stated_proportions():
    x, y = constant_images()
    mixed, t = augment(mixup={"alpha": 0.4}).mix(x, y, epoch=0, position=0)
    for i in range(len(x)):
        want = t.lam[i] * t.a[i] + (1 - t.lam[i]) * t.b[i]  # the pixel value is the mixture of the two labels
        assert torch.allclose(mixed[i], want.expand_as(mixed[i]))
    assert torch.equal(t.a, y) and sorted(t.b.tolist()) == y.tolist()  # partners are a permutation


def test_cutmix_targets_follow_the_pasted_area():
    x, y = constant_images()
    mixed, t = augment(cutmix={"alpha": 1.0}).mix(x, y, epoch=0, position=3)
    for i in range(len(x)):
        own = (mixed[i] == i).float().mean()
        assert abs(float(own) - float(t.lam[i])) < 1e-6 or t.b[i] == i  # own share of pixels = own share of target
    assert (t.lam < 1).any()


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_alpha_zero_leaves_the_batch_unchanged(kind):
    x, y = constant_images()
    mixed, t = augment(**{kind: {"alpha": 0.0}}).mix(x, y, epoch=0, position=0)
    assert torch.equal(mixed, x) and torch.equal(t.a, y) and bool((t.lam == 1).all())


def test_same_seed_same_batches_and_draws_differ_by_position_and_rank():
    x = torch.rand(16, 1, 8, 8)
    a, b = augment(augment=IMAGES), augment(augment=IMAGES)
    assert torch.equal(a.samples(x, 0, 32), b.samples(x, 0, 32))
    assert not torch.equal(a.samples(x, 0, 32), a.samples(x, 0, 64))
    other_rank = Augment(DataConfig(dataset="digits", augment=IMAGES), from_config(DataConfig()), 0, rank=1)
    assert not torch.equal(a.samples(x, 0, 32), other_rank.samples(x, 0, 32))
    before = torch.random.get_rng_state()
    a.samples(x, 1, 0)
    assert torch.equal(before, torch.random.get_rng_state())  # dropout's generator is untouched


def test_stop_and_resume_mid_epoch_is_bitwise_with_augmentation(tmp_path):
    from shoal.checkpoint import find_latest
    from shoal.worker import run_worker

    extra = {
        "data.augment": IMAGES,
        "data.mixup": {"alpha": 0.4},
        "model.dropout": 0.1,
        "train.eval_every": 0,
        "checkpoint.every_steps": 15,
        "schedule.name": "constant",
        "schedule.warmup_steps": 0,
    }
    run_worker(load_config(QUICKSTART, tiny_overrides(tmp_path / "whole", **{**extra, "train.max_steps": 30})))
    run_worker(load_config(QUICKSTART, tiny_overrides(tmp_path / "cut", **{**extra, "train.max_steps": 15})))
    rest = load_config(QUICKSTART, tiny_overrides(tmp_path / "cut", **{**extra, "train.max_steps": 30}))
    run_worker(rest, resume=True)
    a = torch.load(find_latest(tmp_path / "whole") / "model.pt", weights_only=True)
    b = torch.load(find_latest(tmp_path / "cut") / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def overfit_run(tmp_path, name: str, augment_: list) -> tuple[float, list[dict]]:
    """180 training images, a wide network, no regularisation: it memorises them."""
    from shoal.worker import run_worker

    run = tmp_path / name
    extra = {
        "data.val_fraction": 0.9,
        "data.augment": augment_,
        "train.max_steps": 600,
        "train.eval_every": 40,
        "log.every": 40,
        "schedule.name": "constant",
        "schedule.warmup_steps": 0,
        "model.width": 512,
        "optim.lr": 0.01,
        "optim.weight_decay": 0.0,
        "train.clip_grad_norm": "null",
    }
    run_worker(load_config(QUICKSTART, tiny_overrides(run, **extra)))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["val_loss"] - r["loss"] for r in records if "val_loss" in r][-5:]
    health = run / "health.jsonl"
    return float(np.mean(gaps)), [
        json.loads(line) for line in health.read_text().splitlines()
    ] if health.exists() else []


def test_augmentation_shrinks_the_gap_an_image_task_overfits_by(tmp_path):
    plain_gap, plain_alerts = overfit_run(tmp_path, "plain", [])
    aug_gap, _ = overfit_run(tmp_path, "augmented", IMAGES)
    overfit = [a for a in plain_alerts if a["kind"] == "overfitting"]
    assert overfit, "the plain run should be diagnosed as overfitting"
    remedies = " ".join(overfit[0]["remedies"])
    assert "data.augment: [crop, hflip, rotate]" in remedies and "data.cutmix" in remedies
    assert aug_gap < 0.6 * plain_gap, (aug_gap, plain_gap)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["data.augment=[blur]"], "data.augment[0]: unknown transform 'blur'"),
        (["data.augment=[{crop: {size: [12, 12], padding: 1}}]"], "data.augment[0]: crop: size [12, 12] is larger"),
        (["data.dataset=synthetic", "data.augment=[noise, hflip]"], "data.augment[1]: hflip needs image inputs"),
        (["data.dataset=synthetic", "data.cutmix={alpha: 1.0}"], "data.cutmix: cutmix pastes image boxes"),
    ],
)
def test_bad_augmentation_exits_2_naming_the_key(tmp_path, overrides, key):
    r = shoal_cli("train", str(QUICKSTART), *overrides, f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and key in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_plateau_alert_names_the_cycling_schedules():
    from shoal.health.detectors import REMEDIES

    assert any("cosine_restarts" in r for r in REMEDIES["plateau"])


def test_loader_workers_draw_what_the_training_process_would_and_never_repeat_a_draw():
    from shoal.data.loaders import build_loaders
    from shoal.dist import WorldInfo

    def batches(workers: int) -> list[torch.Tensor]:
        cfg = JobConfig().replace(
            {"data.augment": [{"noise": {"std": 1.0}}], "data.num_workers": workers, "data.shuffle": False}
        )
        stream = build_loaders(cfg, WorldInfo(), torch.device("cpu")).train
        out = [next(stream)[0] for _ in range(4)]
        stream.close()
        return out

    inline, workers = batches(0), batches(2)
    assert all(torch.equal(a, b) for a, b in zip(inline, workers))  # the same draws wherever they are made
    noise = [b - b.round(decimals=4) for b in workers]  # digits pixels are multiples of 1/16: the rest is noise
    assert not any(torch.allclose(noise[i], noise[j]) for i in range(4) for j in range(i))
