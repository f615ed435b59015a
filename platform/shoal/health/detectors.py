"""Pure detectors: metric histories in, alerts out. Each alert says what happened, where, with the
numbers that triggered it, and the config keys that usually fix it."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from shoal.config import HealthConfig

REMEDIES: dict[str, list[str]] = {
    "vanishing": ["model.activation: relu", "model.init: he", "model.norm: batch", "model.residual: true"],
    "exploding": ["train.clip_grad_norm: 1.0", "a lower optim.lr", "schedule.warmup_steps"],
    "nonfinite": [
        "a lower optim.lr",
        "train.clip_grad_norm: 1.0",
        "health.on_nonfinite: rollback",
        "train.precision: bf16 (fp16 overflows)",
    ],
    "divergence": [
        "a lower optim.lr",
        "schedule.warmup_steps",
        "train.clip_grad_norm: 1.0",
        "health.on_nonfinite: rollback",
    ],
    "plateau": [
        "a higher optim.lr if the loss barely moves",
        "schedule.name: cosine_restarts or one_cycle (leave a poor minimum)",
        "schedule.name: plateau or cosine",
        "a larger model (model.width, model.depth)",
    ],
    "overfitting": [
        "model.dropout: 0.1-0.5",
        "optim.weight_decay: 0.01-0.1",
        "train.early_stopping",
        "more training data",
    ],
    "initial_loss": [
        "model.init: xavier (or a smaller model.init_std)",
        "normalised inputs (`shoal check` shows their statistics)",
        "train.clip_grad_norm: 1.0",
    ],
    "input_bound": [
        "data.num_workers (on machines with spare cores)",
        "data.prefetch_factor",
        "data.format: shards (packed, fast to decode)",
    ],
}


@dataclass
class Alert:
    kind: str
    step: int
    message: str
    where: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)
    remedies: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        fix = "; try " + ", ".join(self.remedies) if self.remedies else ""
        return f"health: {self.kind} at step {self.step}: {self.message}{fix}"


def _alert(kind: str, step: int, message: str, where: list[str] | None = None, **numbers: float) -> Alert:
    return Alert(kind, step, message, where or [], {k: float(v) for k, v in numbers.items()}, REMEDIES[kind])


def overfitting_remedies(task: str, input_shape: tuple[int, ...]) -> list[str]:
    """The overfitting remedies these data allow: augmentation that fits the inputs, mixing for class targets."""
    if task == "lm":
        more = ["data.augment: [token_mask]"]
    elif len(input_shape) == 3:
        more = ["data.augment: [crop, hflip, rotate] (or noise, erase)"]
    else:
        more = ["data.augment: [noise] (or erase)"]
    if task == "classification":
        more.append("data.mixup: {alpha: 0.2}" + (" or data.cutmix: {alpha: 1.0}" if len(input_shape) == 3 else ""))
    return [*REMEDIES["overfitting"][:3], *more, *REMEDIES["overfitting"][3:]]


INITIAL_LOSS_FACTOR = 1.6


def initial_loss(step: int, loss: float, chance: float | None) -> Alert | None:
    """The first logged loss far above ln C: the model starts confidently wrong (a last layer too large, raw inputs)."""
    if chance is None or loss <= INITIAL_LOSS_FACTOR * chance + 0.5:
        return None
    return _alert(
        "initial_loss",
        step,
        f"the first logged training loss {loss:.4g} is far above ln(classes) = {chance:.4g}, where a freshly "
        "initialised model that guesses uniformly starts",
        loss=loss,
        chance=chance,
    )


def vanishing(step: int, layer_norms: list[tuple[str, float]], cfg: HealthConfig) -> Alert | None:
    """The first layers learn orders of magnitude slower than the last ones (or not at all)."""
    if len(layer_norms) < 2:
        return None
    quarter = max(1, len(layer_norms) // 4)
    first, last = layer_norms[:quarter], layer_norms[-quarter:]
    first_mean = statistics.fmean(n for _, n in first)
    last_mean = statistics.fmean(n for _, n in last)
    dead = [name for name, n in layer_norms[: len(layer_norms) // 2 or 1] if n < cfg.vanishing_floor]
    ratio = first_mean / last_mean if last_mean > 0 else 0.0
    if not (ratio < cfg.vanishing_ratio or dead):
        return None
    names = dead or [name for name, _ in first]
    message = (
        f"gradients vanish towards the input: the first layers' gradient norm is {first_mean:.2e}, "
        f"{ratio:.1e} of the last layers' ({last_mean:.2e}); {', '.join(names[:4])} barely learn"
    )
    return _alert("vanishing", step, message, names, first_norm=first_mean, last_norm=last_mean, ratio=ratio)


def exploding(step: int, grad_norm: float, history: list[float], cfg: HealthConfig) -> Alert | None:
    """The global gradient norm is above a bound or spikes far above its running median."""
    if not math.isfinite(grad_norm):
        return None  # the non-finite detector reports it
    median = statistics.median(history[-50:]) if len(history) >= 5 else None
    if grad_norm > cfg.explode_norm:
        return _alert(
            "exploding", step, f"the gradient norm is {grad_norm:.3g}, above {cfg.explode_norm:g}", grad_norm=grad_norm
        )
    if median and grad_norm > cfg.spike_factor * median:
        return _alert(
            "exploding",
            step,
            f"the gradient norm spiked to {grad_norm:.3g}, {grad_norm / median:.0f}x its running median {median:.3g}",
            grad_norm=grad_norm,
            median=median,
        )
    return None


def nonfinite(step: int, loss: float, grad_norm: float) -> Alert:
    what = "loss" if not math.isfinite(loss) else "gradients"
    return _alert(
        "nonfinite",
        step,
        f"the {what} became NaN/Inf (loss {loss}, gradient norm {grad_norm})",
        loss=loss if math.isfinite(loss) else 0.0,
    )


def divergence(step: int, loss: float, reference: float, cfg: HealthConfig) -> Alert | None:
    """The training loss is far above where it started."""
    if math.isfinite(loss) and reference > 0 and loss > cfg.divergence_factor * reference:
        return _alert(
            "divergence",
            step,
            f"the training loss {loss:.4g} is {loss / reference:.0f}x its starting value {reference:.4g}",
            loss=loss,
            reference=reference,
        )
    return None


def plateau(step: int, val_losses: list[float], cfg: HealthConfig) -> Alert | None:
    """No evaluation improved the best validation loss for plateau_evals evaluations."""
    n = cfg.plateau_evals
    if len(val_losses) <= n:
        return None
    best_before = min(val_losses[:-n])
    recent = val_losses[-n:]
    if min(recent) >= best_before - 1e-4 * abs(best_before):
        return _alert(
            "plateau",
            step,
            f"the validation loss has not improved on {best_before:.4g} for {n} evaluations",
            best=best_before,
            last=recent[-1],
        )
    return None


def overfitting(step: int, train_losses: list[float], val_losses: list[float], cfg: HealthConfig) -> Alert | None:
    """Validation loss rising while training loss falls, overfit_evals evaluations in a row."""
    n = cfg.overfit_evals
    if len(val_losses) < n + 1 or len(train_losses) < n + 1:
        return None
    v, t = val_losses[-(n + 1) :], train_losses[-(n + 1) :]
    if all(b > a for a, b in zip(v, v[1:])) and all(b < a for a, b in zip(t, t[1:])):
        return _alert(
            "overfitting",
            step,
            f"for {n} evaluations the validation loss rose ({v[0]:.4g} -> {v[-1]:.4g}) "
            f"while the training loss fell ({t[0]:.4g} -> {t[-1]:.4g})",
            val_from=v[0],
            val_to=v[-1],
            train_from=t[0],
            train_to=t[-1],
        )
    return None


def input_bound(step: int, data_wait: float, cfg: HealthConfig) -> Alert | None:
    if data_wait > cfg.input_bound_fraction:
        return _alert(
            "input_bound", step, f"the step spends {data_wait:.0%} of its time waiting for data", data_wait=data_wait
        )
    return None
