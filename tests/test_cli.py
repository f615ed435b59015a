"""The `shoal` command: arguments, overrides, exit statuses, and one line for every user mistake."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import yaml

from shoal.cli import _exit_code, _split_config, build_parser

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_a_first_positional_with_equals_is_an_override_not_a_config():
    args = build_parser().parse_args(["train", "optim.lr=0.1", "train.max_steps=5"])
    assert _split_config(args) == (None, ["optim.lr=0.1", "train.max_steps=5"])
    args = build_parser().parse_args(["train", "job.yaml", "optim.lr=0.1"])
    assert _split_config(args) == ("job.yaml", ["optim.lr=0.1"])


@pytest.mark.parametrize(
    "summary, code",
    [
        ({"status": "completed"}, 0),
        ({"status": "preempted", "exit_code": 130}, 130),
        ({"status": "preempted"}, 143),  # a rank that did not get the signal itself
        ({"status": "diverged"}, 1),
        ({"status": "failed"}, 1),
    ],
)
def test_exit_status_follows_the_run(summary, code):
    assert _exit_code(summary) == code


def test_every_command_in_the_help_runs_a_handler():
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = [c.dest for c in commands._choices_actions]
    assert listed == list(commands.choices) and "k8s" in listed
    for name, parser in commands.choices.items():
        actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        leaves = actions[0].choices.values() if actions else [parser]
        assert all(callable(p.get_default("func")) for p in leaves), name


CLI_CASES = [
    (["validate", "missing.yaml"], "missing.yaml: file not found"),
    (["validate", "{bad}"], "YAML syntax error"),
    (["validate", "{job}", "train.max_stepz=3"], "train.max_stepz: unknown key"),
    (["validate", "{job}", "optim.lr=abc"], "optim.lr"),
    (["validate", "{job}", "train.grad_accum_steps=0"], "train.grad_accum_steps: must be >= 1"),
    (["validate", "{job}", "train.precision=fp8"], "train.precision: must be one of"),
    (["validate", "{job}", "train.precision=fp16"], "train.precision: fp16 needs CUDA"),
    (["validate", "{job}", "model.target=no_such_module:make"], "model.target: cannot import 'no_such_module:make'"),
    (["validate", "{job}", "notakey"], "expected KEY=VALUE"),
    (["train", "{job}", "train.precision=fp16"], "train.precision: fp16 needs CUDA"),
    (["train", "{job}", "model.target=no_such_module:make"], "model.target: cannot import"),
    (["worker", "{job}", "train.grad_accum_steps=0"], "train.grad_accum_steps"),
]


@pytest.mark.parametrize("argv, needle", CLI_CASES)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, argv, needle):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1\n")
    argv = [a.format(job=QUICKSTART, bad=bad) for a in argv]
    proc = shoal_cli(*argv, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("shoal: error: ")
    assert needle in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_validate_prints_resolved_config():
    proc = shoal_cli("validate", str(QUICKSTART), "optim.lr=0.25")
    assert proc.returncode == 0, proc.stderr
    data = yaml.safe_load(proc.stdout)
    assert data["optim"]["lr"] == 0.25
    assert data["train"]["grad_accum_steps"] == 1  # defaults are shown


def test_cli_train_without_config_runs_the_bundled_quickstart(ray_cluster, tmp_path):
    proc = shoal_cli("train", *tiny_overrides(tmp_path / "run", **{"scaling.address": ray_cluster}), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"run directory: {tmp_path / 'run'}" in proc.stdout
    acc = float(proc.stdout.split("val_accuracy ")[-1].split()[0])
    assert acc >= 0.95
    assert "(rank 0 pid=" in proc.stdout + proc.stderr  # rank-prefixed worker lines reach the driver


def test_existing_run_directory_is_not_overwritten(ray_cluster, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text('{"status": "completed", "mine": true}')
    proc = shoal_cli("train", str(QUICKSTART), *tiny_overrides(run, **{"scaling.address": ray_cluster}), cwd=tmp_path)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr
    assert json.loads((run / "summary.json").read_text()) == {"status": "completed", "mine": True}


def test_plain_worker_without_torchrun_is_world_size_one(tmp_path):
    proc = shoal_cli("worker", str(QUICKSTART), *tiny_overrides(tmp_path / "run", **{"train.max_steps": 20}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["steps"] == 20


def test_python_dash_m_shoal_is_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "shoal", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("shoal ")


def test_tokenizer_train_writes_a_tokenizer_shard_reads(tmp_path):
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) for i in range(400)]
    (tmp_path / "corpus.txt").write_text("\n".join(lines) + "\n")
    proc = shoal_cli("tokenizer", "train", "corpus.txt", "--vocab-size", "300", "--out", "tok.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "tok.json").read_text())
    assert doc["model"]["type"] == "BPE" and doc["pre_tokenizer"]["type"] == "ByteLevel"
    assert [t["content"] for t in doc["added_tokens"]] == ["<|endoftext|>"]
    vocab = len(doc["model"]["vocab"])
    assert 257 <= vocab <= 300 and f"wrote tok.json: a vocabulary of {vocab} tokens" in proc.stdout
    shard = shoal_cli("shard", "corpus.txt", "out", "--tokenizer", "tok.json", "--seq-len", "16", cwd=tmp_path)
    assert shard.returncode == 0, shard.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["vocab_size"] == vocab
