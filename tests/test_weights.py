"""Weights files: one safe loader for everything Shoal reads with torch, and a pickle that would run code
refused on every path a user can hand Shoal a file (export, compress, model.weights, --resume)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from shoal import checkpoint
from shoal.checkpoint import find_latest
from shoal.config import load_config
from shoal.errors import CheckpointError
from shoal.weights import SparsityMasks, load_file, quantize

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
PACKAGE = REPO / "platform" / "shoal"


class Touch:
    """Unpickling this runs `touch PATH`."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_every_torch_load_in_the_package_is_the_safe_one():
    """No `weights_only=False` anywhere, and torch.load called from shoal/weights.py alone (read with ast: calls,
    not the docstrings that mention it)."""
    import ast

    unsafe, loads = [], []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            if any(k.arg == "weights_only" and getattr(k.value, "value", None) is False for k in node.keywords):
                unsafe.append(f"{path.name}:{node.lineno}")
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "load" and getattr(f.value, "id", "") == "torch":
                if path.name != "weights.py":
                    loads.append(f"{path.name}:{node.lineno}")
    assert not unsafe, f"weights_only=False in {unsafe}"
    assert not loads, f"torch.load outside shoal/weights.py (use weights.load_file): {loads}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from shoal.worker import run_worker

    run_dir = tmp_path_factory.mktemp("w") / "run"
    run_worker(load_config(QUICKSTART, tiny_overrides(run_dir, **{"train.max_steps": 20})))
    return run_dir


def evil_compressed(tmp_path: Path, marker: Path, quantize: str | None = "dynamic") -> Path:
    """A directory laid out as `shoal compress` writes one, whose model.pt runs a command when unpickled."""
    where = tmp_path / "evil"
    where.mkdir()
    torch.save({"net.0.weight": Touch(str(marker))}, where / "model.pt")
    cfg = load_config(QUICKSTART).to_dict()
    variant = {"sparsity": 0.0, "method": "unstructured", "scope": "global"}
    if quantize:
        variant["quantize"] = quantize
    (where / "variant.json").write_text(json.dumps({"config": cfg, "variant": variant}))
    return where


def assert_refused(proc, marker: Path, needle: str = "cannot load model.pt safely") -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.strip().splitlines() if line.startswith("shoal: error")]
    assert len(errors) == 1 and needle in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists(), "the pickle ran its command"


@pytest.mark.parametrize("kind", ["dynamic", "weight_only", None])
def test_export_of_a_code_running_compressed_model_is_refused(tmp_path, kind):
    marker = tmp_path / "pwned"
    evil = evil_compressed(tmp_path, marker, kind)
    proc = shoal_cli("export", str(evil), str(tmp_path / "out.pt"))
    assert_refused(proc, marker)
    assert not (tmp_path / "out.pt").exists()


def test_compress_of_a_code_running_compressed_model_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_compressed(tmp_path, marker)
    proc = shoal_cli("compress", str(evil), "--quantize", "dynamic", "--out", str(tmp_path / "c"))
    assert_refused(proc, marker)


def test_model_weights_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = evil_compressed(tmp_path, marker)
    proc = shoal_cli("worker", str(QUICKSTART), *tiny_overrides(tmp_path / "run"), f"model.weights={evil / 'model.pt'}")
    assert_refused(proc, marker)


def test_resume_from_a_checkpoint_that_runs_code_is_refused(trained, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    marker = tmp_path / "pwned"
    ckpt = find_latest(run_dir)
    torch.save({"net.0.weight": Touch(str(marker))}, ckpt / "model.pt")
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["sha256"]["model.pt"] = checkpoint.sha256(ckpt / "model.pt")  # even with matching checksums
    (ckpt / "meta.json").write_text(json.dumps(meta))
    overrides = tiny_overrides(run_dir, **{"train.max_steps": 30, "run.overwrite": "true"})
    assert_refused(shoal_cli("worker", str(QUICKSTART), *overrides, "--resume"), marker)
    proc = shoal_cli("worker", str(QUICKSTART), *tiny_overrides(tmp_path / "b"), f"checkpoint.resume_from={ckpt}")
    assert_refused(proc, marker)


def test_real_int8_weights_still_load_and_give_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    quantize(model, "dynamic")
    torch.save(model.state_dict(), tmp_path / "q.pt")
    state = load_file(tmp_path / "q.pt", "test", quantized=True)
    again = quantize(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)), "dynamic")
    again.load_state_dict(state, assign=True)
    x = torch.randn(5, 8)
    assert torch.equal(model(x), again(x))


def test_a_file_that_is_not_torch_data_is_one_error(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"somewhere: cannot load model.pt safely"):
        load_file(tmp_path / "model.pt", "somewhere")
    with pytest.raises(CheckpointError, match=r"somewhere: gone.pt not found"):
        load_file(tmp_path / "gone.pt", "somewhere")


def test_sparsity_masks_keep_zeros_zero():
    layer = nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight[0, :2] = 0
    masks = SparsityMasks(layer)
    with torch.no_grad():
        layer.weight.add_(1.0)
        layer.bias.add_(1.0)
    masks.apply()
    assert torch.all(layer.weight[0, :2] == 0) and torch.all(layer.weight[1:] != 0)
    assert len(masks.masks) == 1  # biases (1-D) are never masked
