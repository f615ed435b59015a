"""`shoal check` on planted mistakes in real data: shards written by `shoal shard`, real models, real loss."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shoal import check
from shoal.check.lints import lint
from shoal.check.task import quick
from shoal.config import DataConfig, load_config
from shoal.data.memory import digits_arrays
from shoal.data.shards import open_shards

from conftest import REPO, shoal_cli

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
DIGITS_SHARDS = str(REPO / "configs" / "digits-shards.yaml")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_arrays()
    return x.reshape(len(x), -1).copy(), y.copy()


def _shard(tmp: Path, name: str, x: np.ndarray, y: np.ndarray, val: float = 0.2) -> Path:
    src = tmp / f"{name}.npz"
    np.savez(src, x=x, y=y)
    out = tmp / name
    r = shoal_cli(
        "shard", str(src), str(out), "--val-fraction", str(val), "--samples-per-shard", "256", "--block-size", "32"
    )
    assert r.returncode == 0, r.stderr
    return out


def _run(tmp: Path, config: str, *overrides: str) -> check.Result:
    cfg = load_config(config, list(overrides))
    return check.run(cfg, tmp / "check-out", say=lambda line: None)


def _kinds(result: check.Result) -> set[str]:
    return {f.kind for f in result.findings}


@pytest.fixture(scope="module")
def digits_shards(tmp_path_factory) -> Path:
    x, y = _digits()
    return _shard(tmp_path_factory.mktemp("digits"), "digits", x, y)


def test_quickstart_has_no_finding_and_writes_the_report(tmp_path):
    result = _run(tmp_path, QUICKSTART)
    assert result.findings == [] and result.exit_code == 0
    doc = json.loads((tmp_path / "check-out" / "report.json").read_text())
    assert doc["problems"] == 0 and doc["numbers"]["train_samples"] == 1438 and doc["numbers"]["val_samples"] == 359
    assert doc["numbers"]["model"]["overfit"]["memorised"] is True
    # the initial loss of a fresh model is near ln 10, the bar: majority class ~10%, a linear model far above
    assert abs(doc["numbers"]["model"]["initial_loss"] - np.log(10)) < 1.0
    base = doc["numbers"]["baselines"]
    assert base["majority_accuracy"] < 0.15 and base["linear_accuracy"] > 0.9
    assert {"data.png", "model.png"} <= set(doc["plots"])
    assert (tmp_path / "check-out" / "data.png").stat().st_size > 10_000
    assert "0 problem(s)" in (tmp_path / "check-out" / "report.md").read_text()


def test_digits_shards_config_has_no_finding(tmp_path, digits_shards):
    result = _run(tmp_path, DIGITS_SHARDS, f"data.path={digits_shards}")
    assert result.findings == []
    assert result.numbers["train_samples"] + result.numbers["val_samples"] == 1797


def test_large_synthetic_config_on_ten_thousand_samples(tmp_path):
    """The configs/ job on hold-out-sized shards: no finding, and (the issue's promise) well under 30 s."""
    out = tmp_path / "ls"
    r = shoal_cli(
        "shard",
        "synthetic",
        str(out),
        "--num-samples",
        "30000",
        "--input-shape",
        "32",
        "--num-classes",
        "10",
        "--samples-per-shard",
        "10000",
        "--val-fraction",
        "0.05",
    )
    assert r.returncode == 0, r.stderr
    start = time.perf_counter()
    result = _run(tmp_path, str(REPO / "configs" / "large-synthetic.yaml"), f"data.path={out}")
    assert time.perf_counter() - start < 30
    assert result.findings == [], [f.line() for f in result.findings]
    # the model probes and plots use an even sample from every shard, not the first shard only
    assert result.numbers["train_samples"] == 28500


def test_unnormalised_inputs_are_flagged(tmp_path):
    x, y = _digits()
    shards = _shard(tmp_path, "scaled", x * 1000 + 500, y)
    result = _run(tmp_path, DIGITS_SHARDS, f"data.path={shards}")
    f = next(f for f in result.findings if f.kind == "unnormalised_inputs")
    assert f.numbers["max_abs_mean"] > 500 and "standardise" in f.fix
    assert result.exit_code == 1


def test_leakage_counts_copied_validation_samples_exactly(tmp_path):
    """Validation built by copying 140 of 1,400 training samples (10%) into its shards."""
    x, y = _digits()
    rng = np.random.default_rng(0)
    copied = rng.choice(1400, 140, replace=False)
    train = _shard(tmp_path, "train", x[:1400], y[:1400], val=0)
    val = _shard(tmp_path, "val", np.concatenate([x[1400:], x[copied]]), np.concatenate([y[1400:], y[copied]]), val=0)
    shards = sorted(p.name for p in val.glob("*.tar"))
    pattern = f"{val}/train-{{000000..{len(shards) - 1:06d}}}.tar"
    result = _run(tmp_path, DIGITS_SHARDS, f"data.path={train}", f"data.val_path={pattern}")
    leak = next(f for f in result.findings if f.kind == "leakage")
    assert leak.numbers["count"] == 140 and leak.numbers["val_samples"] == 397 + 140
    assert any(name in leak.message for name in shards)
    assert result.numbers["duplicates"] == 0
    assert "leakage" in (tmp_path / "check-out" / "report.md").read_text()


def test_nan_and_labels_out_of_range_are_found_where_they_are(tmp_path):
    x, y = _digits()
    x[7, 3] = np.nan
    y[11] = 12  # the shards' manifest says 13 classes; the model below predicts 10
    shards = _shard(tmp_path, "bad", x, y)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["num_classes"] = 10
    (shards / "manifest.json").write_text(json.dumps(manifest))
    result = _run(tmp_path, DIGITS_SHARDS, f"data.path={shards}")
    by = {f.kind: f for f in result.findings}
    assert by["nonfinite_samples"].numbers["count"] == 1
    assert by["labels_out_of_range"].numbers == {"count": 1, "min": 0.0, "max": 12.0, "classes": 10}
    assert "num_classes" in by["labels_out_of_range"].fix and ".tar#" in by["labels_out_of_range"].message
    assert result.numbers["model"]["skipped"]  # no loss probes on labels the loss cannot take


def test_mse_on_classes(tmp_path):
    result = _run(tmp_path, QUICKSTART, "train.loss=mse")
    f = next(f for f in result.findings if f.kind == "mse_on_classes")
    assert f.fix == "train.loss: cross_entropy"


@pytest.mark.parametrize(
    "target, expected",
    [
        ("helpers:detached_mlp", {"no_gradient", "cannot_overfit"}),
        ("helpers:zeroed_mlp", {"zero_gradient", "cannot_overfit"}),
        ("helpers:unused_layer_mlp", {"no_gradient"}),
    ],
)
def test_broken_user_models(tmp_path, monkeypatch, target, expected):
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    result = _run(tmp_path, QUICKSTART, f"model.target={target}")
    assert _kinds(result) == expected, [f.line() for f in result.findings]
    if target.endswith("unused_layer_mlp"):
        f = result.findings[0]
        assert "unused.weight" in f.message and "find_unused_parameters" in f.fix


def test_units_dead_behind_torch_relu_are_named_by_layer_and_a_healthy_model_gets_neither(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))
    planted = _run(tmp_path, QUICKSTART, "model.target=helpers:functional_relu", "model.kwargs={bias: -10.0}")
    by_kind = {f.kind: f for f in planted.findings}
    assert by_kind["dead_relu"].numbers == {"layer": "head", "layer_share": 1.0}, planted.findings
    assert by_kind["zero_gradient"].numbers == {"layers": ["hidden"]}, planted.findings
    healthy = _run(tmp_path, QUICKSTART, "model.target=helpers:functional_relu")
    assert not {"dead_relu", "zero_gradient"} & _kinds(healthy), healthy.findings


def _planted(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits with `noise` of the labels replaced by a random other class."""
    x, y = _digits()
    rng = np.random.default_rng(seed)
    flip = rng.random(len(y)) < noise
    noisy = y.copy()
    noisy[flip] = (y[flip] + rng.integers(1, 10, int(flip.sum()))) % 10
    return x, noisy


def _noisy_digits(tmp: Path, name: str, noise: float, seed: int = 0) -> tuple[Path, dict[bytes, int]]:
    """Planted-noise digits as shards of 1x8x8 images; the true label of each image."""
    x, y = _digits()
    planted, labels = _planted(noise, seed)
    shards = _shard(tmp, name, planted.reshape(-1, 1, 8, 8), labels, val=0.1)
    return shards, {_key(row): int(t) for row, t in zip(x, y)}


def _key(row: np.ndarray) -> bytes:
    return np.round(np.asarray(row, dtype=np.float64), 4).tobytes()


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_planted_label_noise_is_estimated_and_its_suspects_are_the_planted_ones(tmp_path, noise):
    shards, truth = _noisy_digits(tmp_path, f"noisy{noise}", noise)
    result = _run(tmp_path, DIGITS_SHARDS, f"data.path={shards}")
    est = result.numbers["label_noise"]
    train = open_shards(DataConfig(format="shards", path=str(shards)))[0]
    x, y, _ = train.get_batch(np.arange(len(train)))
    wrong = {i for i in range(len(y)) if truth[_key(x[i].numpy().reshape(-1))] != int(y[i])}
    planted = len(wrong) / len(y)
    assert abs(est["rate"] - planted) < (0.02 if noise == 0 else 0.05), (est["rate"], planted)
    assert ("label_noise" in {f.kind for f in check.problems(result.findings)}) == (noise > 0)
    if noise == 0.3:
        index = {f"{s.name}#{i}": k for k, (s, i) in enumerate(_places(train))}
        top = [index[s["at"]] for s in est["suspects"][:100]]
        assert sum(t in wrong for t in top) >= 80, sum(t in wrong for t in top)
        assert (tmp_path / "check-out" / "suspects.png").stat().st_size > 10_000  # their thumbnails


def _places(train) -> list[tuple]:
    return [(s, i) for s in train.shards for i in range(s.samples)]


def test_doctor_labels_estimates_the_noise_from_the_trained_models_view_of_validation(tmp_path):
    truth = {_key(row): int(t) for row, t in zip(*_digits())}
    shards_val = _shard(tmp_path, "noisy-val", *_planted(0.3, seed=1), val=0.3)
    run_dir = tmp_path / "run"
    proc = shoal_cli(
        "worker", DIGITS_SHARDS, f"data.path={shards_val}", "train.max_steps=150", "train.eval_every=0",
        f"run.dir={run_dir}", "log.tensorboard=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = shoal_cli("doctor", str(run_dir), "--labels")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((run_dir / "doctor" / "labels.json").read_text())
    assert (doc["split"], doc["method"]) == ("val", "predictions")
    val = open_shards(DataConfig(format="shards", path=str(shards_val)))[1]
    x, y, _ = val.get_batch(np.arange(len(val)))
    wrong = {i for i in range(len(y)) if truth[_key(x[i].numpy())] != int(y[i])}
    assert abs(doc["rate"] - len(wrong) / len(y)) < 0.1, (doc["rate"], len(wrong) / len(y))
    index = {f"{s.name}#{i}": k for k, (s, i) in enumerate(_places(val))}
    top = [index[s["at"]] for s in doc["suspects"][:50]]
    assert sum(t in wrong for t in top) >= 40, sum(t in wrong for t in top)
    assert doc["finding"]["kind"] == "label_noise" and "Suspected wrong labels" in proc.stdout


@pytest.fixture(scope="module")
def noisy_run(tmp_path_factory) -> tuple[Path, Path, dict[bytes, int]]:
    """A digits classifier trained on shards with 30% planted wrong labels and no validation split:
    (run directory, shards, the true label of each image)."""
    tmp = tmp_path_factory.mktemp("noisy-run")
    planted, labels = _planted(0.3, seed=1)
    shards = _shard(tmp, "noisy-train", planted.reshape(-1, 1, 8, 8), labels, val=0)
    run_dir = tmp / "run"
    proc = shoal_cli(
        "worker", DIGITS_SHARDS, f"data.path={shards}", "train.max_steps=150", "train.eval_every=0",
        f"run.dir={run_dir}", "log.tensorboard=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return run_dir, shards, {_key(row): int(t) for row, t in zip(*_digits())}


def test_doctor_labels_on_the_training_split_judges_it_by_kfold_on_the_trained_models_features(noisy_run):
    run_dir, shards, truth = noisy_run
    proc = shoal_cli("doctor", str(run_dir), "--labels", "--split", "train")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((run_dir / "doctor" / "labels.json").read_text())
    assert (doc["split"], doc["method"], doc["folds"]) == ("train", "kfold", 5)
    train = open_shards(DataConfig(format="shards", path=str(shards)))[0]
    x, y, _ = train.get_batch(np.arange(len(train)))
    wrong = {i for i in range(len(y)) if truth[_key(x[i].numpy().reshape(-1))] != int(y[i])}
    assert doc["samples"] == len(y)  # under SAMPLE: every training sample judged
    assert abs(doc["rate"] - len(wrong) / len(y)) < 0.1, (doc["rate"], len(wrong) / len(y))
    index = {f"{s.name}#{i}": k for k, (s, i) in enumerate(_places(train))}
    top = [index[s["at"]] for s in doc["suspects"][:50]]
    assert sum(t in wrong for t in top) >= 40, sum(t in wrong for t in top)
    assert doc["finding"]["kind"] == "label_noise" and "no validation split" not in proc.stdout
    assert "## Labels (training split: 5-fold logistic regression on the trained model's penultimate" in proc.stdout


def test_doctor_labels_without_a_validation_split_says_it_uses_the_training_split(noisy_run):
    run_dir, _, _ = noisy_run
    proc = shoal_cli("doctor", str(run_dir), "--labels")
    assert proc.returncode == 0, proc.stderr
    said = [line for line in proc.stdout.splitlines() if "no validation split" in line]
    assert len(said) == 1 and said[0].startswith("[shoal] --labels: the run has no validation split; judging the train")
    assert json.loads((run_dir / "doctor" / "labels.json").read_text())["split"] == "train"
    proc = shoal_cli("doctor", str(run_dir), "--labels", "--split", "val")
    assert proc.returncode == 2 and "no validation split" in proc.stderr and "Traceback" not in proc.stderr


def _one_line_error(proc, *words: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("shoal: error: --labels:"), proc.stderr
    assert all(w in lines[0] for w in words), lines


def test_doctor_labels_on_the_training_split_refuses_a_regression_run_and_a_run_without_checkpoint(tmp_path, noisy_run):
    run_dir = tmp_path / "regression"
    proc = shoal_cli(
        "worker", QUICKSTART, "data.dataset=synthetic", "data.task=regression", "train.loss=mse", "train.max_steps=2",
        "train.eval_every=0", f"run.dir={run_dir}", "log.tensorboard=false",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    _one_line_error(shoal_cli("doctor", str(run_dir), "--labels", "--split", "train"), "regression", "classes")
    bare = tmp_path / "no-checkpoint"
    shutil.copytree(noisy_run[0], bare, ignore=shutil.ignore_patterns("checkpoints", "doctor"))
    _one_line_error(shoal_cli("doctor", str(bare), "--labels", "--split", "train"), "no complete checkpoint")


TOPICS = {  # a text's class is which of these words it holds: what a bag of tokens can learn
    "food": "bread cheese soup recipe oven spice butter garlic noodle salad".split(),
    "money": "bank loan stock market price budget invoice salary pension profit".split(),
    "sport": "goal match team score coach league striker referee season trophy".split(),
    "travel": "train airport hotel ticket luggage beach passport museum island harbour".split(),
}
FILLER = "the a of and to in is it was for on with as at by this that from we they he she you had have been".split()


def _topic_texts(n: int, noise: float, seed: int = 0) -> tuple[list[str], list[str], np.ndarray]:
    """n texts of filler words and one to three words of their topic; their labels with `noise` of them
    replaced by another topic; which were replaced."""
    import random

    rng, names = random.Random(seed), sorted(TOPICS)
    texts, given, wrong = [], [], np.zeros(n, dtype=bool)
    for i in range(n):
        topic = rng.randrange(len(names))
        words = [rng.choice(FILLER) for _ in range(rng.randint(5, 12))]
        words += [rng.choice(TOPICS[names[topic]]) for _ in range(rng.randint(1, 3))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        wrong[i] = rng.random() < noise
        given.append(names[(topic + rng.randint(1, len(names) - 1)) % len(names)] if wrong[i] else names[topic])
    return texts, given, wrong


def _topic_shards(tmp: Path, noise: float) -> tuple[Path, np.ndarray, list[str]]:
    """The texts as `shoal shard --tokenizer --label-column --seq-len` rows (in order, no validation split)
    through a BPE trained on them; which rows are planted; the check's overrides for a bag-of-embeddings model."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shoal.data import tokens

    texts, given, wrong = _topic_texts(2000, noise)
    pq.write_table(pa.table({"text": texts, "label": given}), tmp / "t.parquet")
    tokens.train_bpe(texts, 400, tmp / "tok.json", say=lambda *_: None)
    out = tmp / "topics"
    r = shoal_cli(
        "shard", str(tmp / "t.parquet"), str(out), "--tokenizer", str(tmp / "tok.json"), "--label-column", "label",
        "--seq-len", "24", "--no-shuffle", "--val-fraction", "0",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    overrides = [
        "data.format=shards", f"data.path={out}", "check.overfit_steps=20", "model.target=helpers:token_bag",
        f"model.kwargs.vocab_size={manifest['vocab_size']}", f"model.kwargs.pad_id={manifest['pad_id']}",
        f"model.kwargs.classes={len(TOPICS)}",
    ]  # fmt: skip
    return out, wrong, overrides


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_label_noise_in_text_classification_is_estimated_on_the_bag_of_tokens(tmp_path, noise):
    shards, wrong, overrides = _topic_shards(tmp_path, noise)
    result = _run(tmp_path, QUICKSTART, *overrides)
    est = result.numbers["label_noise"]
    assert est["samples"] == len(wrong) and est["inputs"] == "bag of tokens (TF-IDF)"
    assert ("label_noise" in _kinds(result)) == (noise > 0), result.findings
    if noise == 0:
        assert est["rate"] < 0.03, est["rate"]
        return
    assert abs(est["rate"] - wrong.mean()) < 0.08, (est["rate"], wrong.mean())
    train = open_shards(DataConfig(format="shards", path=str(shards)))[0]
    index = {f"{s.name}#{i}": k for k, (s, i) in enumerate(_places(train))}  # rows in the texts' order
    top = [index[s["at"]] for s in est["suspects"][:50]]
    assert sum(wrong[t] for t in top) >= 40, sum(wrong[t] for t in top)
    assert {s["given"] for s in est["suspects"]} <= set(TOPICS)  # by class name


def test_doctor_labels_on_the_training_split_of_a_text_classifier(tmp_path):
    shards, wrong, overrides = _topic_shards(tmp_path, 0.3)
    run_dir = tmp_path / "run"
    train = [*overrides, "train.max_steps=150", "optim.lr=0.06", "train.eval_every=0", f"run.dir={run_dir}"]
    proc = shoal_cli("worker", QUICKSTART, *train, "log.tensorboard=false")
    assert proc.returncode == 0, proc.stderr
    proc = shoal_cli("doctor", str(run_dir), "--labels", "--split", "train")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((run_dir / "doctor" / "labels.json").read_text())
    assert (doc["split"], doc["method"], doc["samples"]) == ("train", "kfold", len(wrong))
    assert abs(doc["rate"] - wrong.mean()) < 0.08, (doc["rate"], wrong.mean())
    index = {
        f"{s.name}#{i}": k
        for k, (s, i) in enumerate(_places(open_shards(DataConfig(format="shards", path=str(shards)))[0]))
    }
    top = [index[s["at"]] for s in doc["suspects"][:50]]
    assert sum(wrong[t] for t in top) >= 40, sum(wrong[t] for t in top)


def test_a_systematic_mislabelling_names_the_confused_pair(tmp_path):
    x, y = _digits()
    rng = np.random.default_rng(0)
    swapped = np.where((y == 3) & (rng.random(len(y)) < 0.4), 5, y)  # 40% of the 3s labelled 5, always 5
    shards = _shard(tmp_path, "swapped", x, swapped, val=0.1)
    result = _run(tmp_path, DIGITS_SHARDS, f"data.path={shards}")
    pairs = result.numbers["label_noise"]["pairs"]
    assert (pairs[0]["given"], pairs[0]["likely"]) == (5, 3), pairs


def test_cli_exit_codes_and_summary(tmp_path):
    r = shoal_cli("check", QUICKSTART, "train.loss=mse", "--out", str(tmp_path / "o"))
    assert r.returncode == 1
    assert "PROBLEM model: mse_on_classes" in r.stdout and "fix: train.loss: cross_entropy" in r.stdout
    assert (tmp_path / "o" / "report.json").exists()
    r = shoal_cli("check", QUICKSTART, "optim.lr=-1", "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "optim.lr" in r.stderr and "Traceback" not in r.stderr
    r = shoal_cli("check")
    assert r.returncode == 2


def test_lints_name_key_and_value():
    cfg = load_config(
        QUICKSTART,
        [
            "optim.name=adam",
            "optim.weight_decay=0.1",
            "train.eval_every=1000",
            "scaling.max_failures=2",
            "optim.lr=0.05",
            "schedule.warmup_steps=0",
            "train.clip_grad_norm=null",
        ],
    )
    found = {f.kind: f for f in lint(cfg, train_samples=1438)}
    assert found["adam_weight_decay"].fix.startswith("optim.name: adamw")
    assert found["eval_after_end"].fix == "train.eval_every: 60"
    assert "checkpoint.every_minutes" in found["restarts_without_checkpoints"].fix
    assert "schedule.warmup_steps" in found["high_lr_unguarded"].fix
    big = load_config(QUICKSTART, ["data.batch_size=1000"])
    assert "batch_larger_than_data" in {f.kind for f in lint(big, train_samples=1438)}
    assert lint(load_config(QUICKSTART, []), train_samples=1438) == []


def test_quick_check_reads_the_manifest_without_torch(digits_shards):
    """The subset `shoal train` runs in the driver: lints and loss/task fit, no torch imported."""
    code = (
        "import sys; from shoal.config import load_config; from shoal.check.task import quick;"
        f"cfg = load_config({DIGITS_SHARDS!r}, ['data.path={digits_shards}', 'train.loss=bce_with_logits']);"
        "print([f.kind for f in quick(cfg)]); print('torch' in sys.modules)"
    )
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "['bce_on_many_classes']" and out[1] == "False"
    assert quick(load_config(QUICKSTART, [])) == []


def test_train_refuses_to_start_under_on_findings_fail(tmp_path):
    r = shoal_cli("train", QUICKSTART, "train.loss=mse", "check.on_findings=fail", f"run.dir={tmp_path / 'run'}")
    assert r.returncode == 2
    assert "check: model: mse_on_classes" in r.stderr and "check.on_findings" in r.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
