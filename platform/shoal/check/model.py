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
        loss_fn = Loss(cfg.train, spec, key)
    except ConfigError:
        return rep  # a loss that cannot run on this task: the task findings say so
    if not labels_ok:
        rep.numbers["skipped"] = "labels or token ids out of range: the loss cannot be computed"
        return rep
    torch.manual_seed(cfg.seed)
    try:
        model = build_model(cfg.model, spec, loss_fn.out_features())
        apply_freeze(model, cfg.model.freeze)
    except ConfigError as e:
        rep.findings.append(Finding("model_does_not_build", "model", str(e), f"{e.key or key}"))
        return rep
    batch = min(len(x), max(2, cfg.check.overfit_batch))
    bx, by = x[:batch], y[:batch]
    params = trainable(model)
    rep.numbers["parameters"] = sum(p.numel() for _, p in params)
    try:
        _first_batch(model, loss_fn, bx, by, spec, rep)
    except ConfigError as e:  # the output size does not match the classes or vocabulary
        rep.findings.append(
            Finding("output_size", "model", str(e).split(": ", 1)[-1], f"{e.key}: outputs sized to the data")
        )
        return rep
    _overfit(cfg, model, loss_fn, bx, by, spec, rep)
    return rep


def _first_batch(
    model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, rep: ModelReport
) -> None:
    acts = probes.ActivationProbe(model)
    acts.armed = True
    model.train()
    out = model(x)
    loss = loss_fn(out, y)
    acts.armed = False
    for h in acts.handles:
        h.remove()
    initial = float(loss.detach())
    rep.numbers["initial_loss"] = initial
    _initial_loss(initial, spec, loss_fn, rep)
    groups = probes.layers(model)
    if loss.requires_grad:
        loss.backward()
    names = [n for n, _ in trainable(model)]
    grads = {n: p.grad for n, p in trainable(model)}
    missing = [n for n in names if grads[n] is None]
    zero = [n for n in names if grads[n] is not None and not bool(grads[n].any())]
    if missing:
        everything = len(missing) == len(names)
        rep.findings.append(
            Finding(
                "no_gradient",
                "model",
                (
                    "the loss does not depend on any parameter (the output is detached from the graph: "
                    "a .detach(), torch.no_grad() or .item() in forward)"
                    if everything
                    else f"{len(missing)} of {len(names)} parameters get no gradient on a real batch: "
                    f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}"
                ),
                "make forward use them, or freeze them (model.freeze: [names]); if they are used only on some "
                "batches, ddp.find_unused_parameters: true (DDP would otherwise hang or fail at the first step)"
                if not everything
                else "return the output of the model's layers from forward, without detaching it",
                numbers={"count": len(missing)},
            )
        )
    if zero and len(zero) == len(names) - len(missing):
        rep.findings.append(
            Finding(
                "zero_gradient",
                "model",
                f"every gradient is exactly zero on a real batch ({len(zero)} parameters): the output does not "
                "change with the weights (a zeroed or constant output, or saturated units)",
                "check the model's forward (what it returns) and model.init",
                numbers={"count": len(zero)},
            )
        )
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
        rep.findings.append(
            Finding(
                "initial_loss_high",
                "model",
                f"the loss at initialisation is {initial:.3g}, against ln({spec.classes}) = {chance:.3g} for a model "
                "that starts by guessing uniformly: the last layer starts confidently wrong, and the first steps "
                "are spent undoing it",
                "model.init: xavier (or a smaller model.init_std with init: normal); zero or scale down the last "
                "layer's weights in a model.target",
                numbers={"initial_loss": initial, "expected": chance},
            )
        )


def _scale_findings(norms: dict[str, float], stats: dict[str, dict[str, float]], rep: ModelReport) -> None:
    positive = {k: v for k, v in norms.items() if v > 0}
    if len(positive) >= 2:
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
    dead = {k: s["dead"] for k, s in stats.items() if s.get("dead") is not None and s["dead"] > DEAD_SHARE}
    if dead:
        name = max(dead, key=dead.get)
        rep.findings.append(
            Finding(
                "dead_relu",
                "model",
                f"{dead[name]:.0%} of the units after {name} output zero for the whole batch before training: "
                "they get no gradient and may never recover",
                "model.init: he, model.activation: leaky_relu (or gelu), or lower optim.lr",
                numbers={"layer_share": dead[name]},
            )
        )


def _overfit(
    cfg: JobConfig, model: nn.Module, loss_fn: Loss, x: torch.Tensor, y: torch.Tensor, spec: DataSpec, rep: ModelReport
) -> None:
    """Train on one fixed batch: a working model, loss and labels memorise it."""
    params = [p for _, p in trainable(model)]
    model.train()
    for m in model.modules():  # memorising needs the whole model; dropout would hide it
        if isinstance(m, nn.Dropout):
            m.eval()
    opt = torch.optim.Adam(params, lr=3e-3)
    curve: list[float] = []
    start = time.perf_counter()
    target = 0.05 if spec.task == "regression" else 0.1
    for _ in range(cfg.check.overfit_steps):
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
    rep.overfit_curve = curve
    first, last = curve[0], curve[-1]
    ok = math.isfinite(last) and (
        last <= target * first or (len(curve) < cfg.check.overfit_steps and loss.requires_grad)
    )
    rep.numbers["overfit"] = {
        "steps": len(curve),
        "first_loss": first,
        "last_loss": last,
        "seconds": time.perf_counter() - start,
        "memorised": ok,
    }
    if not ok:
        rep.findings.append(
            Finding(
                "cannot_overfit",
                "model",
                f"the model did not memorise one batch of {len(x)} samples in {len(curve)} steps (loss {first:.3g} -> "
                f"{last:.3g}): a working model drives it near zero, so the model's forward (a detached, zeroed or "
                "constant output), the loss or the labels are broken",
                "check the forward of the model (model.target), train.loss and the labels; then run `shoal check` again",
                numbers={"first_loss": first, "last_loss": last, "steps": len(curve)},
            )
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
    x, y = train
    if not len(x) or spec.task == "lm":
        return _lm_baseline(spec, train, val) if spec.task == "lm" and len(x) else {}
    xt = x.reshape(len(x), -1).double().numpy()
    yt = y.numpy()
    if val is not None and len(val[0]):
        xv, yv = val[0].reshape(len(val[0]), -1).double().numpy(), val[1].numpy()
        where = "validation sample"
    else:
        cut = max(1, len(xt) * 4 // 5)
        xt, xv, yt, yv = xt[:cut], xt[cut:], yt[:cut], yt[cut:]
        where = "held-out fifth of the training sample"
    finite = np.isfinite(xt).all(1) & np.isfinite(yt.reshape(len(yt), -1)).all(1)
    xt, yt = xt[finite], yt[finite]
    keep_v = np.isfinite(xv).all(1) & np.isfinite(yv.reshape(len(yv), -1)).all(1)
    xv, yv = xv[keep_v], yv[keep_v]
    if not len(xt) or not len(xv):
        return {}
    mean, std = xt.mean(0), xt.std(0) + 1e-8
    xt, xv = (xt - mean) / std, (xv - mean) / std
    out: dict[str, Any] = {"measured_on": where, "fitted_on": len(xt)}
    if spec.task == "classification":
        counts = np.bincount(yt.astype(np.int64).clip(0), minlength=spec.num_classes)
        majority = int(np.argmax(counts))
        out["majority_accuracy"] = float((yv == majority).mean())
        if len(np.unique(yt)) > 1:
            clf = LogisticRegression(max_iter=300)
            clf.fit(xt, yt)
            out["linear_accuracy"] = float(clf.score(xv, yv))
    else:
        yt2, yv2 = yt.reshape(len(yt), -1), yv.reshape(len(yv), -1)
        out["mean_mse"] = float(((yv2 - yt2.mean(0)) ** 2).mean())
        reg = Ridge(alpha=1.0).fit(xt, yt2)
        out["linear_mse"] = float(((reg.predict(xv).reshape(yv2.shape) - yv2) ** 2).mean())
    return out


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
        text = (
            f"on the {numbers['measured_on']}, always predicting the majority class scores "
            f"{numbers['majority_accuracy']:.1%} and a logistic regression fitted on {numbers['fitted_on']:,} "
            f"samples {numbers['linear_accuracy']:.1%}: the network should beat both"
        )
    elif "majority_accuracy" in numbers:
        text = f"always predicting the majority class scores {numbers['majority_accuracy']:.1%}"
    elif "linear_mse" in numbers:
        text = (
            f"on the {numbers['measured_on']}, predicting the mean scores mse {numbers['mean_mse']:.4g} and least "
            f"squares (ridge) {numbers['linear_mse']:.4g}: the network should beat both"
        )
    else:
        text = (
            f"predicting token frequencies scores loss {numbers['unigram_loss']:.3g} against "
            f"{numbers['uniform_loss']:.3g} for uniform guessing"
        )
    return text
