"""The model half of `shoal check`, on real samples in one process: the loss at initialisation against
chance, which parameters get a gradient, per-layer gradient and activation scale, dead ReLUs, whether
the model can memorise one batch, and the baselines a network must beat."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, Ridge
from torch import nn

from shoal.check.findings import Finding
from shoal.config import JobConfig
from shoal.data.fields import named
from shoal.data.loaders import takes_fields
from shoal.data.spec import DataSpec
from shoal.errors import ConfigError
from shoal.health import probes
from shoal.health.detectors import INITIAL_LOSS_FACTOR
from shoal.losses import Loss
from shoal.models import apply_freeze, build_model, trainable

VANISHING_RATIO = 1e-4  # smallest / largest layer gradient norm on one batch
EXPLODING_NORM = 1e3
DEAD_SHARE = 0.5  # ReLU units silent for the whole batch


@dataclass
class ModelReport:
    findings: list[Finding] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    layers: list[dict[str, Any]] = field(default_factory=list)  # per layer: grad norm, weight norm, activations
    overfit_curve: list[float] = field(default_factory=list)


def probe(cfg: JobConfig, spec: DataSpec, x: torch.Tensor, y: torch.Tensor, labels_ok: bool) -> ModelReport:
    """Every model finding on this sample (the first rows serve as the batch)."""
    rep = ModelReport()
    key = "model.target" if cfg.model.target else "model.name"
    try:
        loss_fn = Loss.of(cfg, spec)
    except ConfigError:
        return rep  # a loss that cannot run on this task: the task findings say so
    if not labels_ok:
        rep.numbers["skipped"] = "labels or token ids out of range: the loss cannot be computed"
        return rep
    model = _built(cfg, spec, loss_fn, key, rep)
    if model is None:
        return rep
    batch = min(len(x), max(2, cfg.check.overfit_batch))
    bx, by = x[:batch], y[:batch]
    if takes_fields(cfg, spec):  # as the loader gives them to such a model
        bx = named(bx, by, spec)
    if _first_batch_fits(model, loss_fn, bx, by, spec, rep):
        _overfit(cfg, model, loss_fn, bx, by, spec, rep)
    return rep


def _built(cfg: JobConfig, spec: DataSpec, loss_fn: Loss, key: str, rep: ModelReport) -> nn.Module | None:
    """The job's model, seeded and frozen as configured (None when it does not build: that is the finding)."""
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, spec, loss_fn.out_features())
        apply_freeze(model, cfg.model.freeze)
    except ConfigError as e:
        rep.findings.append(Finding("model_does_not_build", "model", str(e), f"{e.key or key}"))
        return None
    rep.numbers["parameters"] = sum(p.numel() for _, p in trainable(model))
    return model


def _first_batch_fits(
    model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, rep: ModelReport
) -> bool:
    """The first-batch probes; False when the output does not fit the data (an output_size finding)."""
    try:
        _first_batch(model, loss_fn, x, y, spec, rep)
    except ConfigError as e:  # the output size does not match the classes or vocabulary
        rep.findings.append(
            Finding("output_size", "model", str(e).split(": ", 1)[-1], f"{e.key}: outputs sized to the data")
        )
        return False
    return True


def _first_batch(
    model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, rep: ModelReport
) -> None:
    acts = probes.ActivationProbe(model)
    acts.armed = True
    silent = SilentUnits(model, x)
    model.train()
    out = model(x)
    loss = loss_fn(out, y)
    acts.armed = False
    for h in acts.handles + silent.handles:
        h.remove()
    initial = float(loss.detach())
    rep.numbers["initial_loss"] = initial
    _initial_loss(initial, spec, loss_fn, rep)
    groups = probes.layers(model)
    if loss.requires_grad:
        loss.backward()
    rep.findings += _gradient_findings(model)
    _layers(groups, acts, rep)
    _silent_inputs(silent.shares, rep)


def _gradient_findings(model: nn.Module) -> list[Finding]:
    """Parameters without a gradient after backward, or every gradient exactly zero."""
    names = [n for n, _ in trainable(model)]
    grads = {n: p.grad for n, p in trainable(model)}
    missing = [n for n in names if grads[n] is None]
    zero = [n for n in names if grads[n] is not None and not bool(grads[n].any())]
    found = [_no_gradient(missing, len(names))] if missing else []
    if zero and len(zero) == len(names) - len(missing):
        found.append(_zero_gradient(len(zero)))
    elif zero:
        cut_off = [layer for layer, ps in probes.layers(model).items() if all(_exactly_zero(p.grad) for p in ps)]
        found += [_zero_gradient_in(cut_off)] if cut_off else []
    return found


def _exactly_zero(grad: torch.Tensor | None) -> bool:
    return grad is not None and not bool(grad.any())


def _zero_gradient_in(layers: list[str]) -> Finding:
    shown = ", ".join(layers[:4]) + (", ..." if len(layers) > 4 else "")
    return Finding(
        "zero_gradient",
        "model",
        f"every gradient of {shown} is exactly zero on a real batch: nothing flows back to "
        f"{'this layer' if len(layers) == 1 else 'these layers'} (units after it that output a constant for every "
        "sample, such as a ReLU, nn.ReLU or torch.relu, behind a large negative bias)",
        "model.init: he (biases start at zero), model.activation: leaky_relu (or gelu), or lower optim.lr",
        numbers={"layers": layers},
    )


def _no_gradient(missing: list[str], total: int) -> Finding:
    if len(missing) == total:
        message = (
            "the loss does not depend on any parameter (the output is detached from the graph: "
            "a .detach(), torch.no_grad() or .item() in forward)"
        )
        fix = "return the output of the model's layers from forward, without detaching it"
    else:
        message = (
            f"{len(missing)} of {total} parameters get no gradient on a real batch: "
            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
        )
        fix = (
            "make forward use them, or freeze them (model.freeze: [names]); if they are used only on some "
            "batches, ddp.find_unused_parameters: true (DDP would otherwise hang or fail at the first step)"
        )
    return Finding("no_gradient", "model", message, fix, numbers={"count": len(missing)})


def _zero_gradient(count: int) -> Finding:
    return Finding(
        "zero_gradient",
        "model",
        f"every gradient is exactly zero on a real batch ({count} parameters): the output does not "
        "change with the weights (a zeroed or constant output, or saturated units)",
        "check the model's forward (what it returns) and model.init",
        numbers={"count": count},
    )


def _layers(groups: Any, acts: probes.ActivationProbe, rep: ModelReport) -> None:
    """Per layer: gradient and weight norms, activation statistics; then the findings on their scale."""
    norms = dict(probes.grad_norms(groups))
    weights = dict(probes.weight_norms(groups))
    stats = acts.take()
    for layer in groups:
        rep.layers.append({"layer": layer, "grad_norm": norms.get(layer), "weight_norm": weights.get(layer)})
    for name, s in stats.items():
        rep.layers.append(
            {"layer": name, "activation_std": s["std"], "activation_mean": s["mean"], "dead": s.get("dead")}
        )
    _scale_findings(norms, stats, rep)


def _initial_loss(initial: float, spec: DataSpec, loss_fn: Loss, rep: ModelReport) -> None:
    """Cross-entropy at initialisation should be about ln C: the model starts by guessing uniformly."""
    if not math.isfinite(initial):
        rep.findings.append(
            Finding(
                "nonfinite_initial_loss",
                "model",
                f"the loss on the first batch is {initial}",
                "check the inputs (shoal check's data findings) and model.init",
            )
        )
        return
    if loss_fn.name != "cross_entropy" or not spec.classes:
        return
    chance = math.log(spec.classes)
    rep.numbers["chance_loss"] = chance
    if initial > INITIAL_LOSS_FACTOR * chance + 0.5:
        rep.findings.append(_initial_loss_high(initial, chance, spec.classes))


def _initial_loss_high(initial: float, chance: float, classes: int) -> Finding:
    return Finding(
        "initial_loss_high",
        "model",
        f"the loss at initialisation is {initial:.3g}, against ln({classes}) = {chance:.3g} for a model "
        "that starts by guessing uniformly: the last layer starts confidently wrong, and the first steps "
        "are spent undoing it",
        "model.init: xavier (or a smaller model.init_std with init: normal); zero or scale down the last "
        "layer's weights in a model.target",
        numbers={"initial_loss": initial, "expected": chance},
    )


def _scale_findings(norms: dict[str, float], stats: dict[str, dict[str, float]], rep: ModelReport) -> None:
    _vanishing(norms, rep)
    _exploding(norms, rep)
    _dead_relu(stats, rep)


def _vanishing(norms: dict[str, float], rep: ModelReport) -> None:
    positive = {k: v for k, v in norms.items() if v > 0}
    if len(positive) < 2:
        return
    low, high = min(positive, key=positive.get), max(positive, key=positive.get)
    ratio = positive[low] / positive[high]
    rep.numbers["grad_norm_ratio"] = ratio
    if ratio < VANISHING_RATIO:
        rep.findings.append(
            Finding(
                "vanishing_gradients",
                "model",
                f"before training, layer {low} gets a gradient {ratio:.1e} times that of {high}: the early "
                "layers will barely learn",
                "model.norm: layer (or batch), model.residual: true, model.init: he, model.activation: relu",
                numbers={"ratio": ratio},
            )
        )


def _exploding(norms: dict[str, float], rep: ModelReport) -> None:
    total = math.sqrt(sum(v * v for v in norms.values()))
    rep.numbers["grad_norm"] = total
    if total > EXPLODING_NORM:
        rep.findings.append(
            Finding(
                "exploding_gradients",
                "model",
                f"the gradient norm on the first batch is {total:.3g}: the first steps will throw the weights far",
                "train.clip_grad_norm: 1.0, and model.init: he / xavier (or model.norm: layer)",
                numbers={"grad_norm": total},
            )
        )


class SilentUnits:
    """Forward hooks on every module that holds parameters, for one forward: the share of the units entering it
    (features, or a convolution's channels) that hold one value for every sample of the batch. Whatever made them
    so (nn.ReLU, torch.relu, a saturated tanh), the layer gets nothing from them; the batch itself is not measured
    (a pixel that is always 0 is the data's, not the model's)."""

    def __init__(self, model: nn.Module, batch: Any):
        self.shares: dict[str, float] = {}
        main = batch.main if hasattr(batch, "main") else batch
        self.batch_storage = main.untyped_storage().data_ptr() if isinstance(main, torch.Tensor) else None
        owners = [(n, m) for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in owners]

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, out: Any) -> None:
            t = next((i for i in inputs if isinstance(i, torch.Tensor)), None)
            if t is None or not t.is_floating_point() or t.dim() < 2 or t.shape[0] < 2 or name in self.shares:
                return
            if t.untyped_storage().data_ptr() == self.batch_storage:
                return
            channels = isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            units = (t.transpose(0, 1).reshape(t.shape[1], -1) if channels else t.reshape(-1, t.shape[-1]).T).detach()
            self.shares[name] = float((units.amax(dim=1) == units.amin(dim=1)).float().mean())

        return hook


def _silent_inputs(shares: dict[str, float], rep: ModelReport) -> None:
    """dead_relu for units silent behind any activation, where the nn.ReLU probe found none."""
    silent = {k: v for k, v in shares.items() if v > DEAD_SHARE}
    if not silent or any(f.kind == "dead_relu" for f in rep.findings):
        return
    name = max(silent, key=silent.get)
    message = (
        f"{silent[name]:.0%} of the units entering {name} hold the same value for every sample before training "
        "(dead units of the activation before it, nn.ReLU or torch.relu): they pass no gradient back"
    )
    rep.findings.append(_dead_units(message, {"layer": name, "layer_share": silent[name]}))


def _dead_units(message: str, numbers: dict[str, Any]) -> Finding:
    return Finding(
        "dead_relu", "model", message, "model.init: he, model.activation: leaky_relu (or gelu), or lower optim.lr",
        numbers=numbers,
    )  # fmt: skip


def _dead_relu(stats: dict[str, dict[str, float]], rep: ModelReport) -> None:
    dead = {k: s["dead"] for k, s in stats.items() if s.get("dead") is not None and s["dead"] > DEAD_SHARE}
    if not dead:
        return
    name = max(dead, key=dead.get)
    message = (
        f"{dead[name]:.0%} of the units after {name} output zero for the whole batch before training: "
        "they get no gradient and may never recover"
    )
    rep.findings.append(_dead_units(message, {"layer_share": dead[name]}))


def _overfit(
    cfg: JobConfig, model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, rep: ModelReport
) -> None:
    """Train on one fixed batch: a working model, loss and labels memorise it."""
    start = time.perf_counter()
    target = 0.05 if spec.task == "regression" else 0.1
    curve, has_grad = _memorise(model, loss_fn, x, y, target, cfg.check.overfit_steps)
    rep.overfit_curve = curve
    first, last = curve[0], curve[-1]
    ok = math.isfinite(last) and (last <= target * first or (len(curve) < cfg.check.overfit_steps and has_grad))
    rep.numbers["overfit"] = {
        "steps": len(curve),
        "first_loss": first,
        "last_loss": last,
        "seconds": time.perf_counter() - start,
        "memorised": ok,
    }
    if not ok:
        rep.findings.append(_cannot_overfit(len(x), curve))


def _memorise(
    model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor, target: float, steps: int
) -> tuple[list[float], bool]:
    """Adam's loss curve on the one batch (stopped once it falls to target x the first loss or the batch is
    memorised), and whether the last loss had a gradient."""
    opt = torch.optim.Adam(_whole_model_training(model), lr=3e-3)
    curve: list[float] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = loss_fn(out, y)
        curve.append(float(loss.detach()))
        if not math.isfinite(curve[-1]) or not loss.requires_grad:
            break
        if curve[-1] <= target * curve[0] or _memorised(loss_fn, out, y):
            break
        loss.backward()
        opt.step()
    return curve, loss.requires_grad


def _whole_model_training(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters, with the model in training mode but its dropout off."""
    params = [p for _, p in trainable(model)]
    model.train()
    for m in model.modules():  # memorising needs the whole model; dropout would hide it
        if isinstance(m, nn.Dropout):
            m.eval()
    return params


def _cannot_overfit(batch: int, curve: list[float]) -> Finding:
    first, last = curve[0], curve[-1]
    return Finding(
        "cannot_overfit",
        "model",
        f"the model did not memorise one batch of {batch} samples in {len(curve)} steps (loss {first:.3g} -> "
        f"{last:.3g}): a working model drives it near zero, so the model's forward (a detached, zeroed or "
        "constant output), the loss or the labels are broken",
        "check the forward of the model (model.target), train.loss and the labels; then run `shoal check` again",
        numbers={"first_loss": first, "last_loss": last, "steps": len(curve)},
    )


def _memorised(loss_fn: Loss, out: torch.Tensor, y: torch.Tensor) -> bool:
    if not loss_fn.classify:
        return False
    with torch.no_grad():
        return bool(loss_fn.correct(out, y).item() == loss_fn.count(y))


# ---------------------------------------------------------------- baselines


def baselines(
    spec: DataSpec, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None
) -> dict[str, Any]:
    """The bars a network must clear: the majority class, and a linear model fitted on the sample."""
    x, _ = train
    if not len(x) or spec.task == "lm":
        return _lm_baseline(spec, train, val) if spec.task == "lm" and len(x) else {}
    xt, yt, xv, yv, where = _held_out(train, val)
    xt, yt = _finite_rows(xt, yt)
    xv, yv = _finite_rows(xv, yv)
    if not len(xt) or not len(xv):
        return {}
    mean, std = xt.mean(0), xt.std(0) + 1e-8
    xt, xv = (xt - mean) / std, (xv - mean) / std
    if spec.token_ids:  # ids are not magnitudes: a linear model on them measures nothing
        return {"measured_on": where, "fitted_on": len(xt)} | _majority(spec, yt, yv)
    fit = _classifiers if spec.task == "classification" else _regressors
    return {"measured_on": where, "fitted_on": len(xt)} | fit(spec, xt, yt, xv, yv)


def _held_out(
    train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """(x, y) to fit on, (x, y) to measure on, and what the latter is: the validation sample, or else the
    training sample's last fifth."""
    x, y = train
    xt, yt = x.reshape(len(x), -1).double().numpy(), y.numpy()
    if val is not None and len(val[0]):
        return xt, yt, val[0].reshape(len(val[0]), -1).double().numpy(), val[1].numpy(), "validation sample"
    cut = max(1, len(xt) * 4 // 5)
    return xt[:cut], yt[:cut], xt[cut:], yt[cut:], "held-out fifth of the training sample"


def _finite_rows(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    keep = np.isfinite(x).all(1) & np.isfinite(y.reshape(len(y), -1)).all(1)
    return x[keep], y[keep]


def _majority(spec: DataSpec, yt: np.ndarray, yv: np.ndarray) -> dict[str, float]:
    counts = np.bincount(yt.astype(np.int64).clip(0), minlength=spec.num_classes)
    return {"majority_accuracy": float((yv == int(np.argmax(counts))).mean())}


def _classifiers(spec: DataSpec, xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = _majority(spec, yt, yv)
    if len(np.unique(yt)) > 1:
        clf = LogisticRegression(max_iter=300)
        clf.fit(xt, yt)
        out["linear_accuracy"] = float(clf.score(xv, yv))
    return out


def _regressors(spec: DataSpec, xt: np.ndarray, yt: np.ndarray, xv: np.ndarray, yv: np.ndarray) -> dict[str, Any]:
    yt2, yv2 = yt.reshape(len(yt), -1), yv.reshape(len(yv), -1)
    reg = Ridge(alpha=1.0).fit(xt, yt2)
    return {
        "mean_mse": float(((yv2 - yt2.mean(0)) ** 2).mean()),
        "linear_mse": float(((reg.predict(xv).reshape(yv2.shape) - yv2) ** 2).mean()),
    }


def _lm_baseline(spec: DataSpec, train: tuple[torch.Tensor, torch.Tensor], val: Any) -> dict[str, Any]:
    """Unigram cross-entropy: what predicting token frequencies alone scores, against ln V."""
    counts = np.bincount(train[1].reshape(-1).numpy().clip(0, spec.vocab_size - 1), minlength=spec.vocab_size) + 1.0
    p = counts / counts.sum()
    target = (val[1] if val is not None and len(val[0]) else train[1]).reshape(-1).numpy().clip(0, spec.vocab_size - 1)
    return {"uniform_loss": math.log(spec.vocab_size), "unigram_loss": float(-np.log(p[target]).mean())}


def baseline_line(numbers: dict[str, Any]) -> str | None:
    """The baselines in words (not a finding: the bar the run's own scores are read against)."""
    if not numbers:
        return None
    if "linear_accuracy" in numbers:
        return _classifiers_line(numbers)
    if "majority_accuracy" in numbers:
        return f"always predicting the majority class scores {numbers['majority_accuracy']:.1%}"
    if "linear_mse" in numbers:
        return (
            f"on the {numbers['measured_on']}, predicting the mean scores mse {numbers['mean_mse']:.4g} and least "
            f"squares (ridge) {numbers['linear_mse']:.4g}: the network should beat both"
        )
    return (
        f"predicting token frequencies scores loss {numbers['unigram_loss']:.3g} against "
        f"{numbers['uniform_loss']:.3g} for uniform guessing"
    )


def _classifiers_line(numbers: dict[str, Any]) -> str:
    return (
        f"on the {numbers['measured_on']}, always predicting the majority class scores "
        f"{numbers['majority_accuracy']:.1%} and a logistic regression fitted on {numbers['fitted_on']:,} "
        f"samples {numbers['linear_accuracy']:.1%}: the network should beat both"
    )
