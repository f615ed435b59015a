"""Optimizers, no-decay groups, L1 and learning-rate schedules (pure)."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.config import ModelConfig, OptimConfig, ScheduleConfig
from shoal.data.spec import DataSpec
from shoal.errors import ConfigError
from shoal.models import build_model
from shoal.optim import Schedule, add_l1_grad, build_optimizer

SPEC = DataSpec(task="classification", input_shape=(4,), num_classes=3)


def model():
    return build_model(ModelConfig(width=8, depth=1, norm="layer"), SPEC, 3)


@pytest.mark.parametrize(
    "name, cls",
    [
        ("sgd", torch.optim.SGD),
        ("adam", torch.optim.Adam),
        ("adamw", torch.optim.AdamW),
        ("rmsprop", torch.optim.RMSprop),
    ],
)
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
    return [s.lr_at(step) for step in range(1, steps + 1)]


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
    assert Schedule(ScheduleConfig(name="cosine", warmup_steps=2, min_lr_ratio=0.1), 1.0, 12).lr_at(
        13
    ) == pytest.approx(0.1)  # one step past the run's 12: the cosine's end


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


LM_SPEC = DataSpec(task="lm", input_shape=(8,), vocab_size=11, seq_len=8)


def tied_lm(tie: bool = True):
    torch.manual_seed(0)
    return build_model(ModelConfig(name="transformer_lm", width=16, depth=1, heads=2, tie_embeddings=tie), LM_SPEC, 11)


def test_a_tied_parameter_is_in_the_optimizer_once_and_stepped_once_per_step():
    import copy

    model = tied_lm()
    assert model.head.weight is model.tok.weight
    reference = copy.deepcopy(model)
    opt = build_optimizer(model, OptimConfig(name="adamw", lr=0.01, weight_decay=0.0))
    listed = [p for g in opt.param_groups for p in g["params"]]
    assert len(listed) == len({id(p) for p in listed}) == len(list(model.parameters()))
    assert sum(p is model.tok.weight for p in listed) == 1
    # torch's own, deduplicated, with the kernels optim.implementation: auto picks here (fused)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.0, fused=True)
    x = torch.randint(0, 11, (4, 8))
    for _ in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            m(x).float().pow(2).mean().backward()
            o.step()
    assert opt.state[model.tok.weight]["step"].item() == 3  # not 6: one update per optimizer step
    before = tied_lm().tok.weight
    assert torch.equal(model.tok.weight, reference.tok.weight)
    assert not torch.equal(model.tok.weight, before)


def test_every_parameter_enumeration_counts_a_tied_tensor_once():
    from shoal.health.probes import layers
    from shoal.models import aliases, apply_freeze, trainable
    from shoal.optim import param_groups

    model = tied_lm()
    names = [n for n, _ in trainable(model)]
    assert "tok.weight" in names and "head.weight" not in names
    assert aliases(model) == {"head.weight": "tok.weight"}
    assert sum(len(g["params"]) for g in param_groups(model, OptimConfig())) == len(names)
    assert sum(len(ps) for ps in layers(model).values()) == len(names)
    assert apply_freeze(model, ["head.*"]) == ["tok.weight"]  # frozen by either name
    assert not model.tok.weight.requires_grad
    untied = tied_lm(tie=False)
    assert untied.head.weight is not untied.tok.weight and aliases(untied) == {}


def test_user_norm_gains_and_biases_are_not_decayed_unless_asked():
    from helpers import rms_mlp

    m = rms_mlp()
    opt = build_optimizer(m, OptimConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    gain = m[2].gain
    assert id(gain) not in decayed and id(m[1].bias) not in decayed
    assert id(m[1].weight) in decayed and id(m[4].weight) in decayed
    everything = build_optimizer(m, OptimConfig(weight_decay=0.1, decay_bias_and_norm=True))
    assert len(everything.param_groups) == 1 and id(gain) in {id(p) for p in everything.param_groups[0]["params"]}


def _noisy_cfg(eta: float | None, seed: int = 0) -> dict:
    from test_batch import cfg_with

    noise = {"optim.grad_noise": {"eta": eta, "gamma": 0.55}} if eta else {}
    return cfg_with(**{"train.max_steps": 5, "seed": seed, **noise}).to_dict()


def test_gradient_noise_keeps_replicas_identical_and_changes_the_trajectory():
    from test_batch import steps_on_rank

    from _ranks import spawn_ranks, spawn_sequence

    noisy = spawn_ranks(steps_on_rank, 2, _noisy_cfg(0.01), None)
    # the same run again in other processes, after a clean one there: nothing of a process's own leaks into the noise
    clean, again = spawn_sequence(
        [(steps_on_rank, (_noisy_cfg(None), None)), (steps_on_rank, (_noisy_cfg(0.01), None))], 2
    )
    for k, v in noisy[0]["params"].items():
        assert torch.equal(v, noisy[1]["params"][k]), k  # the same noise on every replica
        assert torch.equal(v, again[0]["params"][k]), k  # same seed, same trajectory
    moved = max((noisy[0]["params"][k] - clean[0]["params"][k]).abs().max().item() for k in clean[0]["params"])
    assert moved > 1e-3


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_optimizer_kernels_follow_optim_implementation_and_agree(name):
    """auto: torch's fused kernel where it has one (sgd, adam, adamw), foreach otherwise; every choice steps alike."""
    results = {}
    for impl in ("auto", "fused", "foreach", "for_loop"):
        if impl == "fused" and name == "rmsprop":
            with pytest.raises(ConfigError, match="optim.implementation: rmsprop has no fused kernel"):
                build_optimizer(tied_lm(False), OptimConfig(name=name, implementation=impl, momentum=0.5))
            continue
        model = tied_lm(False)
        opt = build_optimizer(model, OptimConfig(name=name, implementation=impl, momentum=0.5, lr=0.01))
        flags = opt.defaults
        if impl == "auto":
            assert bool(flags.get("fused")) == (name != "rmsprop") and bool(flags["foreach"]) == (name == "rmsprop")
        x = torch.randint(0, 11, (4, 8))
        for _ in range(3):
            opt.zero_grad()
            model(x).float().pow(2).mean().backward()
            opt.step()
        results[impl] = model.tok.weight.detach().clone()
    for impl, w in results.items():
        assert torch.allclose(w, results["for_loop"], atol=1e-6, rtol=1e-5), impl
