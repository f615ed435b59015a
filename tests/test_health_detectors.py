"""Pure detectors and policies: numbers in, alerts and decisions out."""

from __future__ import annotations

from shoal.config import EarlyStopping, HealthConfig
from shoal.health import detectors, policy

CFG = HealthConfig()


def test_vanishing_names_the_first_layers():
    norms = [(f"layers.{i}", 10.0 ** (-12 + i * 0.6)) for i in range(20)] + [("head", 1.0)]
    a = detectors.vanishing(50, norms, CFG)
    assert a is not None and a.kind == "vanishing" and a.where[0] == "layers.0"
    assert "model.activation: relu" in a.remedies and "model.init: he" in a.remedies
    assert detectors.vanishing(50, [(f"l{i}", 1.0 + i * 0.1) for i in range(8)], CFG) is None


def test_exploding_bound_and_spike():
    assert detectors.exploding(5, 2e3, [1.0] * 10, CFG).numbers["grad_norm"] == 2e3
    spike = detectors.exploding(5, 50.0, [1.0, 1.2, 0.9, 1.1, 1.0], CFG)
    assert spike is not None and "50x its running median" in spike.message
    assert detectors.exploding(5, 2.0, [1.0, 1.2, 0.9, 1.1, 1.0], CFG) is None


def test_divergence_against_reference():
    assert detectors.divergence(10, 12.0, 2.3, CFG).kind == "divergence"
    assert detectors.divergence(10, 2.0, 2.3, CFG) is None


def test_plateau_and_overfitting():
    assert detectors.plateau(100, [1.0, 0.8, 0.8, 0.81, 0.8, 0.82, 0.85], CFG).kind == "plateau"
    assert detectors.plateau(100, [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4], CFG) is None
    over = detectors.overfitting(100, [1.0, 0.5, 0.3, 0.2], [0.9, 0.95, 1.0, 1.1], CFG)
    assert over is not None and "model.dropout: 0.1-0.5" in over.remedies
    assert detectors.overfitting(100, [1.0, 0.5, 0.3, 0.2], [0.9, 0.8, 1.0, 1.1], CFG) is None


def test_input_bound():
    assert detectors.input_bound(10, 0.7, CFG).kind == "input_bound"
    assert detectors.input_bound(10, 0.1, CFG) is None


def test_trouble_policy():
    assert policy.on_trouble("skip", 0, 5) == policy.CONTINUE  # the step was already skipped
    assert policy.on_trouble("rollback", 4, 5) == policy.ROLLBACK
    assert policy.on_trouble("rollback", 5, 5) == policy.STOP
    assert policy.on_trouble("stop", 0, 5) == policy.STOP


def test_early_stopper_patience_state_and_best_weights():
    import torch

    model = torch.nn.Linear(2, 1)
    s = policy.EarlyStopper(EarlyStopping(patience=2, min_delta=0.01), model)
    assert s.observe(10, {"val_loss": 1.0}) is False
    best = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    assert s.observe(20, {"val_loss": 0.995}) is False  # within min_delta: not better, weights not taken
    assert s.observe(30, {"val_loss": 1.2}) is True
    assert s.restore_best() and torch.equal(model.weight, best)
    t = policy.EarlyStopper(EarlyStopping(patience=2))
    t.load_state_dict(s.state_dict())
    assert (t.best, t.best_step) == (1.0, 10)
    assert policy.EarlyStopper(EarlyStopping(restore_best=False), model).restore_best() is False


def test_sampled_update_ratio_matches_the_exact_ratio():
    import torch
    from torch import nn

    from shoal.health.probes import UpdateRatio, layers

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 3)
    )  # 60,000 weights: sampled; 200 biases: whole
    groups = layers(model)
    before = {k: [p.detach().clone() for p in ps] for k, ps in groups.items()}
    ratio = UpdateRatio()
    ratio.arm(groups)
    with torch.no_grad():
        model[0].weight.mul_(1.01)  # 1% on the weight, 50% on the bias: the bias is a small share of the norm
        model[0].bias.mul_(1.5)
        model[2].weight.add_(0.1)
    estimate = dict(ratio.read(groups))
    for k, ps in groups.items():
        ps = [p.detach() for p in ps]
        exact = (
            sum(float((p - b).pow(2).sum()) for p, b in zip(ps, before[k])) ** 0.5
            / sum(float(b.pow(2).sum()) for b in before[k]) ** 0.5
        )
        assert abs(estimate[k] - exact) / exact < 0.05, (k, estimate[k], exact)
    assert ratio.read(groups) == []  # one reading per arming
