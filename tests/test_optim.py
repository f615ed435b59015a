"""Optimizers, no-decay groups, L1 and learning-rate schedules (pure)."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.config import ModelConfig, OptimConfig, ScheduleConfig
from shoal.data.spec import DataSpec
from shoal.models import build_model
from shoal.optim import Schedule, add_l1_grad, build_optimizer

SPEC = DataSpec(task="classification", input_shape=(4,), num_classes=3)


def model():
    return build_model(ModelConfig(width=8, depth=1, norm="layer"), SPEC, 3)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizer_by_name(name, cls):
    opt = build_optimizer(model(), OptimConfig(name=name, momentum=0.5 if name in ("sgd", "rmsprop") else 0.0))
    assert isinstance(opt, cls)


def test_biases_and_norm_weights_are_not_decayed_unless_asked():
    m = model()
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[1]["weight_decay"] == 0.0
    assert id(m.layers[0].linear.weight) in decayed
    assert id(m.layers[0].linear.bias) not in decayed and id(m.layers[0].norm.weight) not in decayed
    everything = build_optimizer(m, OptimConfig(weight_decay=0.1, decay_bias_and_norm=True))
    assert len(everything.param_groups) == 1


def test_l1_adds_sign_of_weight_to_decayed_gradients_only():
    m = model()
    opt = build_optimizer(m, OptimConfig(l1=0.5))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    add_l1_grad(opt)
    w = m.layers[0].linear.weight
    assert torch.equal(w.grad, 0.5 * torch.sign(w))
    assert torch.count_nonzero(m.layers[0].linear.bias.grad) == 0


def lrs(cfg: ScheduleConfig, steps: int, base=1.0):
    s = Schedule(cfg, base, steps)
    return [s.lr_at(i) for i in range(steps)]


def test_warmup_then_constant():
    assert lrs(ScheduleConfig(warmup_steps=4), 6) == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_step_and_multistep():
    assert lrs(ScheduleConfig(name="step", step_size=2, gamma=0.5), 5) == pytest.approx([1, 1, 0.5, 0.5, 0.25])
    assert lrs(ScheduleConfig(name="multistep", milestones=[1, 3], gamma=0.1), 4) == pytest.approx([1, 0.1, 0.1, 0.01])


def test_cosine_reaches_min_ratio():
    v = lrs(ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1), 12)
    assert v[:2] == pytest.approx([0.5, 1.0])
    assert v[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(v[2:], v[3:]))
    assert Schedule(ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1), 1.0, 12).lr_at(12) == pytest.approx(0.1)


def test_plateau_drops_after_patience_and_its_state_round_trips():
    s = Schedule(ScheduleConfig(name="plateau", patience=1, factor=0.5), 1.0, 100)
    for v in (1.0, 0.9, 0.95, 0.95):
        s.observe({"val_loss": v})
    assert s.lr_at(50) == pytest.approx(0.5)
    t = Schedule(ScheduleConfig(name="plateau", patience=1, factor=0.5), 1.0, 100)
    t.load_state_dict(s.state_dict())
    assert t.lr_at(50) == s.lr_at(50) and t.best == 0.9
    s.observe({"val_loss": math.nan})  # NaN never counts as an improvement
    assert s.best == 0.9
