"""Training health: measure (rank 0, every health.every steps), detect the usual failures, and act
on them with every rank taking the same decision. Alerts go to the log, RUN_DIR/health.jsonl and
summary.json, each naming what happened, where, the numbers, and the config keys that fix it."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from shoal.config import EarlyStopping, HealthConfig
from shoal.health import detectors, policy
from shoal.health.detectors import Alert
from shoal.health.probes import ActivationProbe, Histograms, Reduce, UpdateRatio, grad_norms, layers, weight_norms

log = logging.getLogger("shoal")
HEALTH_FILE = "health.jsonl"
REPEAT_AFTER = 100  # steps before the same kind of alert is raised again
PROBATION_LOGS = 5  # log lines a rolled-back run has to improve its loss


class HealthMonitor:
    """One per rank. Measurements and alerts on rank 0; decisions on every rank from shared numbers."""

    def __init__(
        self,
        cfg: HealthConfig,
        early_stopping: EarlyStopping | None,
        model: torch.nn.Module,
        is_main: bool,
        run_dir: Path | None = None,
        classes: int = 0,
        overfit_remedies: list[str] | None = None,
        reduce: Reduce | None = None,
        layout: list[str] | None = None,
    ):
        self.cfg, self.is_main = cfg, is_main
        # a sharded model is measured by every rank together (each reduces its shards), otherwise by rank 0;
        # layout: the whole model's layers when this rank holds some (pipeline stages)
        self.reduce, self.layout = reduce, layout
        self.path = run_dir / HEALTH_FILE if (run_dir is not None and is_main) else None
        self._init_probes(model)
        self._init_decisions(early_stopping, model, classes, overfit_remedies)
        self._init_records()

    def _init_probes(self, model: torch.nn.Module) -> None:
        self.groups = layers(model)
        self.updates = UpdateRatio()
        self.activations = ActivationProbe(model) if (self.cfg.activations and self.is_main) else None
        self.histograms = Histograms(model) if (self.cfg.histograms_every and self.is_main) else None

    def _init_decisions(
        self, early_stopping: EarlyStopping | None, model: torch.nn.Module, classes: int, overfit_remedies: Any
    ) -> None:
        self.stopper = policy.EarlyStopper(early_stopping, model)
        # set by the job once its state exists (health.on_nonfinite=rollback)
        self.rollback: policy.Rollback | None = None
        self.chance_loss = math.log(classes) if classes > 1 else None
        self.overfit_remedies = overfit_remedies  # what the data allow (augmentation, mixing), else the generic list
        self.reference: float | None = None
        self.rollbacks = 0
        self.last_good_step = 0  # last log step with a finite, non-diverged loss (rollback target bound)
        self.probation = 0

    def _init_records(self) -> None:
        self.grad_history: list[float] = []
        self.eval_train: list[float] = []
        self.eval_val: list[float] = []
        self.alerts: list[Alert] = []
        self.last_alert: dict[str, int] = {}
        self.pending: dict[str, float] = {}  # measurements for the next metrics record

    # ---------------------------------------------------------------- measurements (rank 0)

    def due(self, step: int) -> bool:
        return (self.is_main or self.reduce is not None) and step % self.cfg.every == 0

    def arm(self, step: int) -> None:
        """Before the forward of step `step` (1-based): switch the activation hooks on if it is measured."""
        if self.activations is not None:
            self.activations.armed = self.due(step)
        if self.histograms is not None:
            self.histograms.armed = self._histogram_due(step)

    def _histogram_due(self, step: int) -> bool:
        return self.histograms is not None and step % self.cfg.histograms_every == 0

    def observe_gradients(self, step: int, grad_norm: float) -> None:
        """After backward and clipping, before the optimizer: per-layer gradient norms and detectors."""
        if math.isfinite(grad_norm):
            self.grad_history.append(grad_norm)
            self.grad_history = self.grad_history[-200:]
        if self._histogram_due(step):
            self.histograms.capture("grad", self.groups, grads=True)  # type: ignore[union-attr]
        if not self.due(step):
            return
        norms = grad_norms(self.groups, self.reduce, self.layout)
        self.pending.update({f"grad_norm/{k}": v for k, v in norms})
        self.updates.arm(self.groups)
        if step > self.cfg.warmup_steps:
            self._raise(detectors.vanishing(step, norms, self.cfg))
            self._raise(detectors.exploding(step, grad_norm, self.grad_history[:-1], self.cfg))

    def observe_update(self, step: int) -> None:
        """After the optimizer step: update-to-weight ratios, weight norms, activations."""
        if self._histogram_due(step):
            assert self.histograms is not None
            self.histograms.armed = False
            self.histograms.capture("weight", self.groups)
            hist, quantiles = self.histograms.take()
            self.pending.update(quantiles, histograms=hist)
        if not self.due(step):
            return
        self.pending.update(
            {f"update_ratio/{k}": v for k, v in self.updates.read(self.groups, self.reduce, self.layout)}
        )
        self.pending.update({f"weight_norm/{k}": v for k, v in weight_norms(self.groups, self.reduce, self.layout)})
        if self.activations is not None:
            for name, st in self.activations.take().items():
                self.pending.update({f"act_{k}/{name}": v for k, v in st.items()})

    def take_measurements(self) -> dict[str, float]:
        out, self.pending = self.pending, {}
        return out

    # ---------------------------------------------------------------- decisions (every rank)

    def judge(self, step: int, stepped: bool, loss: float | None = None, data_wait: float | None = None) -> str:
        """After a step (and its log line, when there is one): CONTINUE, ROLLBACK or STOP, alike on every rank.

        A skipped (non-finite) step and a diverged loss go to health.on_nonfinite; the input-bound
        share is this rank's wait, reported by rank 0. Everything else here is a global number.
        """
        if not stepped:
            self._raise(detectors.nonfinite(step, float("nan"), float("nan")))
            return self._on_trouble()
        if loss is None:
            return policy.CONTINUE
        self._check_start_and_input(step, loss, data_wait)
        if not math.isfinite(loss):
            return policy.CONTINUE  # the non-finite step itself was handled
        alert = self._loss_alert(step, loss)
        if alert is not None:
            self._raise(alert)
            return self._on_trouble()
        self.last_good_step = step
        return policy.CONTINUE

    def _check_start_and_input(self, step: int, loss: float, data_wait: float | None) -> None:
        """The first finite loss against chance; the input-bound share after the warm-up."""
        if self.reference is None and math.isfinite(loss):
            self.reference = min(loss, self.chance_loss) if self.chance_loss else loss
            self._raise(detectors.initial_loss(step, loss, self.chance_loss))
        if step > self.cfg.warmup_steps and data_wait is not None:  # the first windows hold loader start-up
            self._raise(detectors.input_bound(step, data_wait, self.cfg))

    def _loss_alert(self, step: int, loss: float) -> Alert | None:
        """Divergence from the reference loss, or a rolled-back run that did not improve."""
        alert = detectors.divergence(step, loss, self.reference, self.cfg) if self.reference is not None else None
        if alert is None and self.probation:
            alert = self._probation(step, loss)
        return alert

    def _on_trouble(self) -> str:
        return policy.on_trouble(self.cfg.on_nonfinite, self.rollbacks, self.cfg.max_rollbacks)

    def roll_back(self) -> None:
        """Carry out a ROLLBACK decision (every rank together)."""
        assert self.rollback is not None, "health.on_nonfinite=rollback builds the rollback"
        self.rollbacks += 1
        self.rollback(self.last_good_step, self.rollbacks)
        self.probation = PROBATION_LOGS
        self.last_alert.pop("divergence", None)  # a failure after a rollback is news

    def _probation(self, step: int, loss: float) -> Alert | None:
        """After a rollback the loss must get below where it started within a few log lines: a rate
        that left the network dead (stuck at chance) fails as surely as one that diverges."""
        assert self.reference is not None
        if loss < 0.9 * self.reference:
            self.probation = 0
            return None
        self.probation -= 1
        if self.probation:
            return None
        message = (
            f"after rollback {self.rollbacks} the training loss ({loss:.4g}) did not improve on its starting value "
            f"{self.reference:.4g} within {PROBATION_LOGS} log lines"
        )
        numbers = {"loss": loss, "reference": self.reference}
        return Alert("divergence", step, message, [], numbers, detectors.REMEDIES["divergence"])

    def after_eval(self, step: int, train_loss: float, metrics: dict[str, float]) -> str:
        """Plateau and overfitting alerts; early stopping: CONTINUE or EARLY_STOP."""
        if "val_loss" in metrics and math.isfinite(train_loss):
            self.eval_val.append(metrics["val_loss"])
            self.eval_train.append(train_loss)
            alert = detectors.overfitting(step, self.eval_train, self.eval_val, self.cfg)
            if alert is not None and self.overfit_remedies:
                alert.remedies = self.overfit_remedies
            self._raise(alert)
            self._raise(detectors.plateau(step, self.eval_val, self.cfg))
        return policy.EARLY_STOP if self.stopper.observe(step, metrics) else policy.CONTINUE

    # ---------------------------------------------------------------- alerts

    def _raise(self, alert: Alert | None) -> None:
        if alert is None:
            return
        last = self.last_alert.get(alert.kind)
        if last is not None and alert.step - last < REPEAT_AFTER:
            return
        self.last_alert[alert.kind] = alert.step
        self.alerts.append(alert)
        if self.is_main:
            log.warning(alert.line())
            if self.path is not None:
                with open(self.path, "a") as f:
                    f.write(json.dumps(alert.as_dict()) + "\n")

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for a in self.alerts:
            counts[a.kind] = counts.get(a.kind, 0) + 1
        return {
            "alerts": [a.line() for a in self.alerts[:20]],
            "alert_counts": counts,
            "rollbacks": self.rollbacks,
            **(
                {"best_step": self.stopper.best_step, f"best_{self.stopper.cfg.metric}": self.stopper.best}
                if self.stopper.best_step is not None
                else {}
            ),
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "reference": self.reference,
            "grad_history": list(self.grad_history),
            "eval_train": list(self.eval_train),
            "eval_val": list(self.eval_val),
            "last_alert": dict(self.last_alert),
            "rollbacks": self.rollbacks,
            "stopper": self.stopper.state_dict(),
            "last_good_step": self.last_good_step,
            "probation": self.probation,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference = state["reference"]
        self.grad_history = list(state["grad_history"])
        self.eval_train, self.eval_val = list(state["eval_train"]), list(state["eval_val"])
        self.last_alert = dict(state["last_alert"])
        self.rollbacks = int(state["rollbacks"])
        self.stopper.load_state_dict(state["stopper"])
        self.last_good_step = int(state.get("last_good_step", 0))
        self.probation = int(state.get("probation", 0))
