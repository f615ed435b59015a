"""Does the loss fit the task? And the quick check `shoal train` runs before every run (no torch, no
samples read: config lints and loss/task fit from the config and the shards' manifest)."""

from __future__ import annotations

from collections.abc import Callable

from shoal.check.findings import Finding, problems
from shoal.check.lints import lint
from shoal.config import JobConfig
from shoal.data.spec import DataSpec, describe
from shoal.errors import ConfigError


def task_findings(cfg: JobConfig, spec: DataSpec) -> list[Finding]:
    """A loss that runs but does not fit the data's task."""
    loss = cfg.train.loss
    found = _mse_on_classes(loss, spec) or _bce_on_many_classes(loss, spec) or _loss_task_mismatch(loss, spec)
    return [found] if found is not None else []


def _mse_on_classes(loss: str, spec: DataSpec) -> Finding | None:
    if not (spec.task == "classification" and loss == "mse"):
        return None
    return Finding(
        "mse_on_classes",
        "model",
        f"train.loss: mse on {spec.num_classes}-class labels regresses one-hot targets: its gradient "
        "fades as outputs approach them and it does not yield probabilities; training is slower and "
        "accuracy lower",
        "train.loss: cross_entropy",
    )


def _bce_on_many_classes(loss: str, spec: DataSpec) -> Finding | None:
    if not (spec.task == "classification" and loss == "bce_with_logits" and spec.num_classes > 2):
        return None
    return Finding(
        "bce_on_many_classes",
        "model",
        f"train.loss: bce_with_logits on {spec.num_classes} mutually exclusive classes scores each class "
        "as its own yes/no question (multi-label), so the outputs do not compete for the one true class",
        "train.loss: cross_entropy",
    )


def _loss_task_mismatch(loss: str, spec: DataSpec) -> Finding | None:
    if spec.task not in ("regression", "lm"):
        return None
    want = "mse" if spec.task == "regression" else "cross_entropy"
    if loss == want:
        return None
    what = "continuous targets" if spec.task == "regression" else "next-token targets"
    return Finding(
        "loss_task_mismatch", "model", f"train.loss: {loss} on {what} ({spec.task} data)", f"train.loss: {want}"
    )


def quick(cfg: JobConfig) -> list[Finding]:
    """What `shoal train` checks before it starts anything: config lints and the loss against the task."""
    spec, train_samples = describe(cfg.data)
    return lint(cfg, train_samples) + task_findings(cfg, spec)


def before_run(cfg: JobConfig, say: Callable[[str], None]) -> None:
    """Print the quick check's findings; under check.on_findings=fail, refuse to start on a problem."""
    if cfg.check.on_findings == "off":
        return
    found = quick(cfg)
    for f in found:
        say(f"[shoal] check: {f.line()}")
    bad = problems(found)
    if bad and cfg.check.on_findings == "fail":
        raise ConfigError(
            f"{len(bad)} finding(s) before the run, first: {bad[0].kind}: fix {bad[0].fix} "
            "(or check.on_findings: warn to start anyway)",
            key="check.on_findings",
        )
