"""Planted faults in real training: vanishing gradients, a learning rate of 50, overfitting,
a healthy run; the doctor report; lr-find; sweep."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shoal.checkpoint import find_latest
from shoal.config import JobConfig, load_config

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def train(cfg: JobConfig) -> dict:
    from shoal.worker import run_worker

    return run_worker(cfg)


def alerts(run_dir: Path) -> list[dict]:
    path = run_dir / "health.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def deep_cfg(run_dir: Path, **model) -> JobConfig:
    return JobConfig().replace(
        {
            "data.dataset": "synthetic",
            "data.num_samples": 2000,
            "data.input_shape": [16],
            "data.num_classes": 4,
            "model.width": 32,
            "model.depth": 20,
            **{f"model.{k}": v for k, v in model.items()},
            "optim.name": "sgd",
            "optim.lr": 0.05,
            "train.max_steps": 40,
            "train.eval_every": 0,
            "health.every": 10,
            "health.warmup_steps": 10,
            "log.tensorboard": False,
            "run.dir": str(run_dir),
        }
    )


def test_deep_sigmoid_net_is_reported_vanishing_and_a_healthy_one_is_not(tmp_path):
    train(deep_cfg(tmp_path / "sig", activation="sigmoid", init="normal", init_std=0.01))
    found = [a for a in alerts(tmp_path / "sig") if a["kind"] == "vanishing"]
    assert found, "vanishing gradients not reported"
    assert found[0]["where"][0] == "layers.0.linear"
    assert "model.activation: relu" in found[0]["remedies"]
    summary = json.loads((tmp_path / "sig" / "summary.json").read_text())
    assert summary["alert_counts"].get("vanishing", 0) >= 1
    records = [json.loads(line) for line in (tmp_path / "sig" / "metrics.jsonl").read_text().splitlines()]
    assert "grad_norm/layers.0.linear" in records[0] and "update_ratio/head" in records[0]
    train(deep_cfg(tmp_path / "ok", activation="relu", init="he", norm="batch"))
    assert not [a for a in alerts(tmp_path / "ok") if a["kind"] == "vanishing"]


def test_learning_rate_50_is_reported_and_rollback_recovers(tmp_path):
    bad = load_config(QUICKSTART, tiny_overrides(tmp_path / "bad", **{"optim.lr": 50, "train.max_steps": 60}))
    train(bad)
    kinds = {a["kind"] for a in alerts(tmp_path / "bad")}
    assert kinds & {"exploding", "divergence"}, kinds
    fixed = load_config(
        QUICKSTART, tiny_overrides(tmp_path / "fixed", **{"optim.lr": 50, "health.on_nonfinite": "rollback"})
    )
    summary = train(fixed)
    assert summary["status"] == "completed" and summary["steps"] == fixed.train.max_steps
    assert summary["rollbacks"] >= 1
    assert summary["val_accuracy"] >= 0.85
    rec = json.loads((tmp_path / "fixed" / "summary.json").read_text())
    assert rec["rollbacks"] == summary["rollbacks"]


def test_divergence_with_stop_policy_stops_with_the_diagnosis(tmp_path):
    cfg = load_config(QUICKSTART, tiny_overrides(tmp_path / "run", **{"optim.lr": 50, "health.on_nonfinite": "stop"}))
    summary = train(cfg)
    assert summary["status"] == "diverged" and summary["steps"] < cfg.train.max_steps
    assert any("divergence" in line for line in summary["alerts"])


def test_overfitting_is_reported_and_early_stopping_ends_at_the_best_weights(tmp_path):
    cfg = JobConfig().replace(
        {
            "data.dataset": "synthetic",
            "data.num_samples": 864,
            "data.val_fraction": 0.925926,
            "data.input_shape": [32],
            "data.num_classes": 4,
            "data.batch_size": 16,
            "model.width": 512,
            "model.depth": 3,
            "optim.lr": 0.003,
            "train.max_steps": 1000,
            "train.eval_every": 20,
            "log.every": 20,
            "log.tensorboard": False,
            "train.early_stopping": {"metric": "val_loss", "mode": "min", "patience": 4, "restore_best": True},
            "run.dir": str(tmp_path / "run"),
        }
    )
    summary = train(cfg)
    assert summary["early_stopped"] and summary["steps"] < 1000
    assert any(a["kind"] == "overfitting" for a in alerts(tmp_path / "run"))
    assert abs(summary["val_loss"] - summary["best_val_loss"]) < 1e-6  # the run ends with the best weights
    final = torch.load(find_latest(tmp_path / "run") / "model.pt", weights_only=True)
    from shoal.dist import WorldInfo
    from shoal.engine import evaluate
    from shoal.job import build_job

    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    job.bare_model.load_state_dict(final)
    assert abs(evaluate(job)["val_loss"] - summary["best_val_loss"]) < 1e-5  # the saved weights are the best ones


def test_healthy_quickstart_raises_no_alert_and_the_doctor_says_so(tmp_path):
    summary = train(load_config(QUICKSTART, tiny_overrides(tmp_path / "run")))
    assert summary["alerts"] == [] and summary["alert_counts"] == {}
    assert not (tmp_path / "run" / "health.jsonl").exists()
    proc = shoal_cli("doctor", str(tmp_path / "run"))
    assert proc.returncode == 0 and "None: no vanishing" in proc.stdout
    for png in ("loss.png", "lr.png", "grad_norms.png"):
        assert (tmp_path / "run" / "doctor" / png).read_bytes()[:4] == b"\x89PNG"


def test_doctor_reports_alerts_with_remedies_on_a_failed_run(tmp_path):
    train(deep_cfg(tmp_path / "sig", activation="sigmoid", init="normal", init_std=0.01))
    (tmp_path / "sig" / "summary.json").unlink()  # as if it were still running
    proc = shoal_cli("doctor", str(tmp_path / "sig"))
    assert proc.returncode == 0
    report = (tmp_path / "sig" / "doctor" / "report.md").read_text()
    assert "### vanishing" in report and "`model.init: he`" in report and "running" in report
    assert shoal_cli("doctor", str(tmp_path / "nowhere")).returncode == 2


def test_histograms_reach_tensorboard_and_the_doctor_draws_distributions(tmp_path):
    run = tmp_path / "run"
    overrides = tiny_overrides(run, **{"train.max_steps": 20, "train.eval_every": 0, "health.histograms_every": 5})
    train(load_config(QUICKSTART, [*overrides, "log.tensorboard=true"]))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run), size_guidance={"histograms": 0})
    events.Reload()
    tags = set(events.Tags()["histograms"])
    assert {"weight/layers.0.linear", "grad/head", "activation/layers.1.act"} <= tags
    weights = events.Histograms("weight/layers.0.linear")
    assert [h.step for h in weights] == [5, 10, 15, 20]
    first = weights[0].histogram_value
    assert first.num == 64 * 128 + 128 and first.min < 0 < first.max  # every weight and bias of the layer
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    q = next(r["dist_activation/layers.0.act"] for r in records if r["step"] == 5)
    assert q[0] == 0.0 and q == sorted(q)  # ReLU outputs: quantiles from 0 upwards
    assert all("histograms" not in r for r in records)
    proc = shoal_cli("doctor", str(run))
    assert proc.returncode == 0 and "distributions" in proc.stdout
    assert (run / "doctor" / "distributions.png").read_bytes()[:4] == b"\x89PNG"


def test_an_overconfident_start_is_reported_as_initial_loss(tmp_path):
    """Inputs scaled x1000 make the first logits huge: the first logged loss is far above ln 10."""
    cfg = load_config(
        QUICKSTART,
        tiny_overrides(
            tmp_path / "run",
            **{
                "train.max_steps": 10,
                "train.eval_every": 0,
                "log.every": 1,
                "model.init": "normal",
                "model.init_std": 3.0,
            },
        ),
    )
    summary = train(cfg)
    assert summary["alert_counts"].get("initial_loss") == 1
    alert = next(a for a in alerts(tmp_path / "run") if a["kind"] == "initial_loss")
    assert alert["step"] == 1 and alert["numbers"]["loss"] > 1.6 * alert["numbers"]["chance"] + 0.5
    assert any("model.init" in r for r in alert["remedies"])
