"""Augmentation and mixing on real data (scikit-learn's digits as 8x8 images), every transform checked exactly on
known inputs, and the mixed loss against a hand computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from shoal.config import DataConfig, JobConfig, load_config
from shoal.data.augment import Augment
from shoal.data.spec import from_config

from conftest import REPO, TINY_LM, shoal_cli, tiny_overrides

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


# ---- every transform: what it changes, exactly, and what it leaves alone ----


def image_augment(entries: list, channels: int = 1, **data) -> Augment:
    """Augment for synthetic [channels, 8, 8] images (or any data the keys describe)."""
    cfg = DataConfig(dataset="synthetic", input_shape=[channels, 8, 8], num_classes=4, augment=entries, **data)
    return Augment(cfg, from_config(cfg), seed=0, rank=0)


def test_hflip_mirrors_exactly_the_samples_it_picks_and_leaves_the_others_bit_equal():
    x = torch.rand(32, 1, 8, 8)
    out = augment(augment=[{"hflip": {"p": 0.5}}]).samples(x, 0, 0)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))  # each sample is its mirror image or itself, bit for bit
    assert any(flipped) and any(kept)
    assert torch.equal(augment(augment=[{"hflip": {"p": 1.0}}]).samples(x, 0, 0), x.flip(-1))
    assert torch.equal(augment(augment=[{"hflip": {"p": 0.0}}]).samples(x, 0, 0), x)


def test_crop_is_an_exact_window_of_the_zero_padded_image():
    x = torch.rand(32, 1, 8, 8) + 0.1
    out = augment(augment=[{"crop": {"padding": 2}}]).samples(x, 0, 0)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(found) == 1, i  # a window at whole-pixel offsets, nothing interpolated
        offsets += found
    assert len(set(offsets)) > 3 and any(o != (2, 2) for o in offsets)  # content moved, by different amounts


def coordinate_images(n: int) -> torch.Tensor:
    """Channel 0 is row + 1, channel 1 is column + 1: a transformed pixel tells where its content came from
    (bilinear interpolation is exact on a linear field), and 0 means filled."""
    rows = torch.arange(8.0)[:, None].expand(8, 8) + 1
    cols = torch.arange(8.0)[None, :].expand(8, 8) + 1
    return torch.stack([rows, cols]).expand(n, 2, 8, 8).clone()


def source_map(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine map target pixel (row, col) -> source (row, col) of one transformed coordinate image, fitted on
    its inner 4 x 4 pixels (whose sources lie inside the image for the sizes tested): (A, t) with src = A p + t."""
    p = torch.cartesian_prod(torch.arange(2.0, 6.0), torch.arange(2.0, 6.0))  # (row, col)
    src = out[:, 2:6, 2:6].reshape(2, -1).T.double() - 1
    design = torch.cat([p.double(), torch.ones(len(p), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, src).solution  # [3, 2]
    assert (design @ sol - src).abs().max() < 1e-5  # the inner pixels moved rigidly: one affine map
    return sol[:2].T, sol[2]


def check_fill(out: torch.Tensor, a: torch.Tensor, t: torch.Tensor) -> None:
    """Every pixel: content from the mapped source where it lies inside, zero where it lies a pixel or more outside."""
    p = torch.cartesian_prod(torch.arange(8.0), torch.arange(8.0)).double()
    src = p @ a.T + t
    got = out.reshape(2, -1).T.double()
    inside = ((src >= 0) & (src <= 7)).all(1)
    outside = ((src < -1) | (src > 8)).any(1)
    assert torch.allclose(got[inside], src[inside] + 1, atol=1e-4)
    assert bool((got[outside] == 0).all())


def test_translate_shifts_content_rigidly_within_the_fraction_and_fills_with_zeros():
    x = coordinate_images(32)
    out = image_augment([{"translate": {"fraction": 0.25}}], channels=2).samples(x, 0, 0)
    shifts = []
    for i in range(len(x)):
        if torch.equal(out[i], x[i]):
            continue  # kornia's RandomAffine leaves some samples as they are
        a, t = source_map(out[i])
        assert torch.allclose(a, torch.eye(2, dtype=a.dtype), atol=1e-4), a  # no rotation, no scaling
        assert bool((t.abs() <= 0.25 * 8 + 1e-4).all()), t  # at most fraction x size in each direction
        check_fill(out[i], a, t)
        shifts.append(t)
    assert len(shifts) >= 4 and any(float(s.abs().max()) > 0.5 for s in shifts)
    assert any(bool((out[i] == 0).any()) for i in range(len(x)))  # zero fill (the images hold no zeros of their own)


def test_rotate_turns_content_about_the_centre_within_the_degrees_and_fills_with_zeros():
    x = coordinate_images(32)
    out = image_augment([{"rotate": {"degrees": 30}}], channels=2).samples(x, 0, 0)
    centre = torch.tensor([3.5, 3.5], dtype=torch.float64)
    angles = []
    for i in range(len(x)):
        if torch.equal(out[i], x[i]):
            continue
        a, t = source_map(out[i])
        assert torch.allclose(a.T @ a, torch.eye(2, dtype=a.dtype), atol=1e-4) and float(torch.det(a)) > 0  # a rotation
        assert torch.allclose(a @ centre + t, centre, atol=1e-4)  # about the image centre
        angle = math.degrees(math.atan2(float(a[0, 1]), float(a[0, 0])))
        assert abs(angle) <= 30 + 1e-3, angle
        check_fill(out[i], a, t)
        angles.append(angle)
    assert len(angles) >= 4 and max(abs(g) for g in angles) > 5


def test_color_jitter_rescales_each_sample_affinely_within_bounds_keeping_shape_and_range():
    x = torch.rand(32, 1, 8, 8) * 0.5 + 0.25  # no clipping for factors within [0.8, 1.2]
    out = augment(augment=[{"color_jitter": {"brightness": 0.2, "contrast": 0.2}}]).samples(x, 0, 0)
    assert out.shape == x.shape and out.dtype == x.dtype
    gains = []
    for i in range(len(x)):
        design = torch.stack([x[i].flatten(), torch.ones(64)], 1).double()
        sol = torch.linalg.lstsq(design, out[i].flatten().double()[:, None]).solution
        assert (design @ sol - out[i].flatten().double()[:, None]).abs().max() < 1e-5  # out = gain x + offset
        gain = float(sol[0])
        assert 0.8 * 0.8 - 1e-4 <= gain <= 1.2 * 1.2 + 1e-4, gain  # brightness x contrast factors
        gains.append(gain)
    assert len({round(g, 4) for g in gains}) > 20 and max(abs(g - 1) for g in gains) > 0.05  # drawn per sample
    full = torch.rand(32, 1, 8, 8)
    strong = augment(augment=[{"color_jitter": {"brightness": 0.9, "contrast": 0.9}}]).samples(full, 0, 0)
    assert float(strong.min()) >= 0.0 and float(strong.max()) <= 1.0 and not torch.equal(strong, full)


@pytest.mark.parametrize("shape", [[1, 8, 8], [32]])
def test_erase_zeroes_one_rectangle_and_leaves_every_other_value_bit_equal(shape):
    cfg = DataConfig(dataset="synthetic", input_shape=shape, augment=[{"erase": {"p": 0.5, "scale": [0.02, 0.2]}}])
    aug = Augment(cfg, from_config(cfg), seed=0, rank=0)
    x = torch.rand(32, *shape) + 0.1  # no zeros of its own
    out = aug.samples(x, 0, 0)
    erased = 0
    for i in range(len(x)):
        changed = (out[i] != x[i]).reshape(-1, 8) if len(shape) == 3 else (out[i] != x[i])[None, :]
        if not changed.any():
            continue
        erased += 1
        rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
        box = torch.zeros_like(changed)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
        assert torch.equal(changed, box), i  # the changed values form one full rectangle (a run for a vector)
        flat_out = out[i].reshape(box.shape)
        assert bool((flat_out[box] == 0).all())  # erased to zero
        assert torch.equal(flat_out[~box], x[i].reshape(box.shape)[~box])  # the rest untouched, bit for bit
        assert 1 <= int(box.sum()) <= 0.3 * box.numel()  # scale [0.02, 0.2] of the area, up to rounding
    assert 4 <= erased <= 28  # p = 0.5 of 32 samples


def test_token_mask_replaces_about_p_of_the_tokens_with_the_mask_id_and_nothing_else():
    cfg = DataConfig(
        dataset="synthetic", task="lm", vocab_size=13, seq_len=32, augment=[{"token_mask": {"p": 0.25, "token": 0}}]
    )
    aug = Augment(cfg, from_config(cfg), seed=0, rank=0)
    x = torch.randint(1, 13, (64, 32))  # no token is the mask id yet
    out = aug.samples(x, 0, 0)
    assert out.dtype == x.dtype and out.shape == x.shape
    hit = out != x
    assert bool((out[hit] == 0).all())  # a changed token became the mask id
    assert 0.2 < float(hit.float().mean()) < 0.3  # p of 2,048 tokens (5 standard deviations either side)
    assert not torch.equal(hit, aug.samples(x, 0, 64) != x)  # drawn afresh for another batch


def test_noise_adds_zero_mean_gaussian_of_the_given_std():
    x = torch.rand(64, 32)
    cfg = DataConfig(dataset="synthetic", input_shape=[32], augment=[{"noise": {"std": 0.5}}])
    out = Augment(cfg, from_config(cfg), seed=0, rank=0).samples(x, 0, 0)
    assert out.shape == x.shape and out.dtype == x.dtype
    noise = (out - x).flatten()
    n = noise.numel()
    assert abs(float(noise.mean())) < 4 * 0.5 / math.sqrt(n)
    assert abs(float(noise.std()) - 0.5) < 0.04  # the standard error of the std is about 0.008
    assert abs(float((noise.abs() < 0.5).float().mean()) - 0.6827) < 0.04  # Gaussian: 68 % within one std


def test_a_user_fn_gets_the_batch_and_a_generator_and_its_output_is_what_trains(tmp_path):
    from shoal.data.loaders import build_loaders
    from shoal.dist import WorldInfo
    from shoal.worker import run_worker

    import helpers

    extra = {
        "model.target": "helpers:input_recording_mlp",
        "data.augment": ["helpers:tagged_augment"],
        "train.max_steps": 3,
        "train.grad_accum_steps": 2,
        "train.eval_every": 0,
    }
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "run", **extra))
    plain = build_loaders(cfg.replace({"data.augment": []}), WorldInfo(), torch.device("cpu")).train
    as_read = [next(plain)[0] for _ in range(6)]
    helpers.AUGMENT_CALLS.clear()
    helpers.SEEN_INPUTS.clear()
    run_worker(cfg)
    calls, seen = helpers.AUGMENT_CALLS, helpers.SEEN_INPUTS
    assert len(calls) == 6 and len(seen) == 6  # 3 steps x 2 micro-batches
    assert all(isinstance(c["generator"], torch.Generator) for c in calls)
    assert all(torch.equal(c["x"], want) for c, want in zip(calls, as_read))  # the batch as read
    assert all(torch.equal(s, c["out"]) for s, c in zip(seen, calls))  # the model trained on the fn's output
    shifts = [float((c["out"] - c["x"]).flatten()[0]) for c in calls]
    assert len(set(shifts)) == 6  # the generator gives every batch its own draw


CHANGES_ONLY_INPUTS = [
    ("digits", [{"crop": {"padding": 2}}]),
    ("digits", [{"hflip": {"p": 0.5}}]),
    ("digits", [{"rotate": {"degrees": 20}}]),
    ("digits", [{"translate": {"fraction": 0.25}}]),
    ("digits", ["color_jitter"]),
    ("digits", [{"erase": {"p": 1.0}}]),
    ("digits", ["noise"]),
    ("lm", [{"token_mask": {"p": 0.3}}]),
    ("digits", ["helpers:tagged_augment"]),
]


@pytest.mark.parametrize(
    "data, entries",
    CHANGES_ONLY_INPUTS,
    ids=["crop", "hflip", "rotate", "translate", "color_jitter", "erase", "noise", "token_mask", "user_fn"],
)
def test_every_transform_changes_training_inputs_only_never_labels_or_validation(data, entries):
    from shoal.data.loaders import build_loaders
    from shoal.dist import WorldInfo

    base = {"data.shuffle": False}
    if data == "lm":
        base.update(TINY_LM)
    plain = build_loaders(JobConfig().replace(base), WorldInfo(), torch.device("cpu"))
    aug = build_loaders(JobConfig().replace({**base, "data.augment": entries}), WorldInfo(), torch.device("cpu"))
    changed = False
    for _ in range(3):
        (xp, yp), (xa, ya) = next(plain.train), next(aug.train)
        assert torch.equal(ya, yp)  # labels (lm: next-token targets) exactly as read
        assert xa.shape == xp.shape and xa.dtype == xp.dtype
        changed |= not torch.equal(xa, xp)
    assert changed
    for (xp, yp, _), (xa, ya, _) in zip(plain.val.batches(2), aug.val.batches(2), strict=True):
        assert torch.equal(xa, xp) and torch.equal(ya, yp)  # validation is never augmented
    plain.train.close()
    aug.train.close()


# ---- mixup / cutmix loss, with label smoothing and gradient accumulation, by hand ----


def smoothed_ce(logits: torch.Tensor, target: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample cross-entropy against (1 - eps) one-hot + eps / K, written out."""
    k = logits.shape[1]
    soft = (1 - eps) * F.one_hot(target, k).double() + eps / k
    return -(soft * F.log_softmax(logits.double(), dim=1)).sum(1)


def partner_and_share(mixed: torch.Tensor, x: torch.Tensor, kind: str) -> tuple[list[int], list[float]]:
    """From the pixels alone: which sample each mixed one took from, and its own share."""
    partners, shares = [], []
    for i in range(len(x)):
        if kind == "mixup":  # mixed = lam x_i + (1 - lam) x_j: the j with the best least-squares fit
            if torch.allclose(mixed[i], x[i], atol=1e-6, rtol=0):  # its own partner: any j fits, with lam 1
                partners.append(i)
                shares.append(1.0)
                continue
            best = None
            for j in range(len(x)):
                d = (x[i] - x[j]).flatten().double()
                lam = float(((mixed[i] - x[j]).flatten().double() @ d) / (d @ d)) if j != i else 1.0
                err = float((mixed[i].double() - lam * x[i].double() - (1 - lam) * x[j].double()).abs().max())
                if best is None or err < best[0]:
                    best = (err, j, lam)
            assert best[0] < 1e-5
            partners.append(best[1])
            shares.append(best[2])
        else:  # cutmix: the pixels that are not its own are all one partner's, in a box
            other = mixed[i] != x[i]
            if not other.any():  # nothing pasted (or pasted from itself)
                partners.append(i)
                shares.append(1.0)
                continue
            js = [j for j in range(len(x)) if torch.equal(mixed[i][other], x[j][other])]
            assert len(js) == 1, i
            rows, cols = other[0].any(1).nonzero().flatten(), other[0].any(0).nonzero().flatten()
            assert bool(other[0, rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all())  # one box
            partners.append(js[0])
            shares.append(1 - float(other.float().mean()))
    return partners, shares


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixed_loss_with_label_smoothing_over_two_micro_batches_equals_a_hand_computation(tmp_path, kind):
    import copy

    from shoal.checkpoint import find_latest
    from shoal.data.loaders import build_loaders
    from shoal.dist import WorldInfo
    from shoal.job import build_job
    from shoal.worker import run_worker

    eps, lr = 0.1, 0.5
    settings = {
        "data.dataset": "synthetic",  # continuous pixel values: the mixing can be read back from the pixels
        "data.input_shape": [1, 8, 8],
        "data.num_classes": 4,
        "data.num_samples": 200,
        "data.val_fraction": 0.0,
        "data.batch_size": 8,
        "model.name": "mlp",
        "model.width": 16,
        "optim.name": "sgd",
        "optim.lr": lr,
        "train.max_steps": 1,
        "train.grad_accum_steps": 2,
        "train.label_smoothing": eps,
        "train.eval_every": 0,
        "log.every": 1,
        "log.tensorboard": False,
        "run.dir": str(tmp_path / "run"),
        f"data.{kind}": {"alpha": 1.0},
    }
    cfg = JobConfig().replace(settings)
    cpu = torch.device("cpu")
    plain = build_loaders(cfg.replace({f"data.{kind}": None}), WorldInfo(), cpu).train
    job = build_job(cfg, WorldInfo(), cpu)  # the same initial weights and batches the run below will have
    model = copy.deepcopy(job.bare_model).double()
    start = {k: v.clone() for k, v in job.bare_model.state_dict().items()}
    losses, lams = [], []
    for _ in range(2):  # the step's two micro-batches
        (x, y), (mixed, t) = next(plain), next(job.data.train)
        partners, shares = partner_and_share(mixed, x, kind)
        lam = torch.tensor(shares, dtype=torch.float64)
        for i, j in enumerate(partners):
            assert int(t.a[i]) == int(y[i])
            if j != i:  # the partner's target and the share follow the pixels
                assert int(t.b[i]) == int(y[j]) and abs(float(t.lam[i]) - shares[i]) < 1e-5
        logits = model(mixed.double())
        b = torch.tensor([int(y[j]) for j in partners])
        losses.append(lam * smoothed_ce(logits, y, eps) + (1 - lam) * smoothed_ce(logits, b, eps))
        lams.append(lam)
    assert not torch.equal(lams[0], lams[1])  # each micro-batch drew its own mixing
    hand = torch.cat(losses).mean()  # over all 16 samples of the step
    assert any(float(lam.min()) < 0.9 for lam in lams)  # the mixing matters to the loss
    hand.backward()
    job.data.train.close()

    run_worker(cfg)
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["step"] == 1
    assert record["loss"] == pytest.approx(hand.item(), rel=1e-5)
    after = torch.load(find_latest(tmp_path / "run") / "model.pt", weights_only=True)
    for k, p in model.named_parameters():
        engine_grad = (start[k].double() - after[k].double()) / lr  # plain SGD: w1 = w0 - lr g
        assert torch.allclose(engine_grad, p.grad, atol=1e-6, rtol=1e-4), k
