"""`shoal compress` and `shoal export` on a really trained digits MLP: pruning, int8, exports checked outside Shoal."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shoal.compress import Options, run
from shoal.config import load_config

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from shoal.worker import run_worker

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    summary = run_worker(load_config(QUICKSTART, tiny_overrides(run_dir)))
    assert summary["val_accuracy"] > 0.95
    return run_dir


@pytest.fixture(scope="module")
def compressed(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress")
    report = run(trained, out, Options(sparsities=[0.5, 0.9], quantize="dynamic"), say=lambda line: None)
    return out, {r["variant"]: r for r in report["rows"]}


def test_pruning_costs_what_the_report_says(compressed):
    out, rows = compressed
    base, half, most = rows["original"], rows["unstructured-0.5"], rows["unstructured-0.9"]
    assert base["val_accuracy"] - half["val_accuracy"] < 0.02
    assert base["val_accuracy"] - most["val_accuracy"] > 0.05  # 90% loses measurably, and the report shows it
    state = torch.load(out / "unstructured-0.5" / "model.pt", weights_only=True)
    weights = [v for k, v in state.items() if k.endswith("weight")]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(zero - 0.5) < 0.001  # the zeros are really in the saved file
    assert half["nonzero"] < 0.52 * base["parameters"]  # biases are not pruned: a little above half remains
    report = (out / "report.md").read_text()
    assert "unstructured-0.9" in report and (out / "tradeoff.png").stat().st_size > 10_000


def test_structured_pruning_removes_whole_neurons_and_spares_the_output_layer(trained):
    from shoal.compress.prune import prune
    from shoal.trained import load

    model = load(trained).model
    prune(model, 0.5, method="structured")
    hidden = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for layer in hidden[:-1]:
        rows = (layer.weight == 0).all(dim=1)
        assert int(rows.sum()) == layer.weight.shape[0] // 2  # half the neurons gone, each one whole
    assert not bool((hidden[-1].weight == 0).all(dim=1).any())  # every class keeps its output


def test_int8_dynamic_is_three_times_smaller_and_as_accurate(compressed):
    _, rows = compressed
    half, q = rows["unstructured-0.5"], rows["unstructured-0.5-int8-dynamic"]
    assert half["size_bytes"] / q["size_bytes"] >= 3
    assert abs(half["val_accuracy"] - q["val_accuracy"]) <= 0.01
    assert q["latency_ms"] > 0 and q["samples_per_s"] > 0


def test_exports_load_outside_shoal_and_reproduce_the_outputs(trained, compressed, tmp_path):
    import onnxruntime as ort

    from shoal.data.loaders import open_splits
    from shoal.trained import load

    out, _ = compressed
    model = load(out / "unstructured-0.5")
    _, val = open_splits(model.cfg)
    x = val.get_batch(np.arange(100, 140))[0]
    want = model.model(x).detach()
    r = shoal_cli("export", str(out / "unstructured-0.5"), str(tmp_path / "m.pt2"))
    assert r.returncode == 0 and "outputs match PyTorch's on 64 validation samples" in r.stdout, r.stderr
    got = torch.export.load(str(tmp_path / "m.pt2")).module()(x)
    assert torch.allclose(got, want, atol=1e-5)
    r = shoal_cli("export", str(trained), str(tmp_path / "m.onnx"))
    assert r.returncode == 0 and "onnxruntime" in r.stdout, r.stderr
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    base = load(trained).model(x).detach().numpy()
    assert np.allclose(got, base, atol=1e-4)


def refused(capsys, *args: str) -> str:
    """`shoal ARGS` in this process, refused with exit status 2 (from the parser too): its stderr."""
    from shoal.cli import main

    try:
        code = main(list(args))
    except SystemExit as e:  # argparse's refusals
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_bad_input_exits_2_with_the_reason(trained, compressed, tmp_path, capsys):
    out, _ = compressed
    # in this process (an exception would fail the test), and one real command for the exit status and no traceback
    assert "--format: 'pickle' is not one of" in refused(
        capsys, "export", str(trained), str(tmp_path / "x.bin"), "--format", "pickle"
    )
    assert "[0, 1)" in refused(capsys, "compress", str(trained), "--sparsity", "1.5", "--out", str(tmp_path / "c"))
    r = shoal_cli("export", str(out / "unstructured-0.5-int8-dynamic"), str(tmp_path / "q.onnx"))
    assert r.returncode == 2 and "cannot be exported to ONNX" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "q.onnx").exists()
    empty = tmp_path / "ckpt"
    empty.mkdir()
    (empty / "meta.json").write_text(
        json.dumps({"step": 1, "config": json.loads(json.dumps(load_config(QUICKSTART).to_dict()))})
    )
    err = refused(capsys, "export", str(empty), str(tmp_path / "e.pt2"))
    assert "ckpt" in err and "Traceback" not in err


def test_pruned_model_fine_tuned_on_two_ranks_keeps_its_zeros_and_recovers(trained, ray_cluster, tmp_path):
    r = shoal_cli(
        "compress",
        str(trained),
        "--sparsity",
        "0.9",
        "--finetune",
        "100",
        "--out",
        str(tmp_path / "c"),
        f"scaling.address={ray_cluster}",
        "scaling.num_workers=2",
        "log.progress=lines",
        "log.tensorboard=false",
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    rows = {row["variant"]: row for row in json.loads((tmp_path / "c" / "report.json").read_text())["rows"]}
    pruned, tuned = rows["unstructured-0.9"], rows["unstructured-0.9-finetuned100"]
    before = torch.load(tmp_path / "c" / "unstructured-0.9" / "model.pt", weights_only=True)
    after = torch.load(tmp_path / "c" / "unstructured-0.9-finetuned100" / "model.pt", weights_only=True)
    for k, w in before.items():
        if k.endswith("weight"):
            assert bool((after[k][w == 0] == 0).all()), k  # every pruned weight stayed zero ...
            assert not torch.equal(after[k], w), k  # ... while the others trained
    assert tuned["val_accuracy"] > pruned["val_accuracy"] + 0.2
    summary = json.loads((tmp_path / "c" / "unstructured-0.9" / "finetune" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 100
