"""Loss functions with the counts the engine needs for exact means across micro-batches and ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from shoal.config import JobConfig, TrainConfig
from shoal.data.spec import DataSpec
from shoal.errors import ConfigError


class Loss:
    """loss(out, y) is a mean over `count(y)` elements; `correct` counts right predictions.

    With model.output: loss the model computed that mean itself (`out` is it) over the same elements:
    the targets it was given, all of them counted (packed blocks and labels carry no ignored ones).
    """

    def __init__(self, cfg: TrainConfig, spec: DataSpec, model_key: str = "model.name", own: bool = False):
        self.name = cfg.loss
        self.model_key = model_key  # the config key that sizes the model's outputs
        self.own = own  # the model returns its own loss
        self._unchecked = not own
        self.smoothing = cfg.label_smoothing
        self.spec = spec
        self.classify = spec.task in ("classification", "lm") and not own  # no logits to count right ones in
        if spec.task == "regression" and self.name != "mse" and not own:
            raise ConfigError(f"regression data needs mse (got {self.name})", key="train.loss")
        if spec.task == "lm" and self.name != "cross_entropy" and not own:
            raise ConfigError(f"lm data needs cross_entropy (got {self.name})", key="train.loss")
        self.binary = self.name == "bce_with_logits" and spec.num_classes == 2

    @classmethod
    def of(cls, cfg: JobConfig, spec: DataSpec) -> Loss:
        """The job's loss: train.loss, or the model's own (model.output: loss)."""
        key = "model.target" if cfg.model.target else "model.name"
        return cls(cfg.train, spec, key, own=cfg.model.output == "loss")

    def out_features(self) -> int:
        """Model outputs this loss expects."""
        if self.spec.task == "regression":
            return self.spec.target_dim
        if self.spec.task == "lm":
            return self.spec.vocab_size
        return 1 if self.binary else self.spec.num_classes

    def __call__(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._unchecked:
            self.check_output(out)
        out = out.float()  # losses in fp32 under autocast
        if self.own:
            return out.reshape(())
        if hasattr(y, "lam"):  # mixup / cutmix targets: each sample's loss against both targets, by its shares
            return self._mixed(out, y)
        if self.spec.task == "lm":
            return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), label_smoothing=self.smoothing)
        if self.spec.task == "regression":
            return F.mse_loss(out.reshape(y.shape), y)
        if self.name == "cross_entropy":
            return F.cross_entropy(out, y, label_smoothing=self.smoothing)
        target = y.float().unsqueeze(1) if self.binary else F.one_hot(y, out.shape[1]).float()
        if self.name == "mse":
            return F.mse_loss(out, target)
        return F.binary_cross_entropy_with_logits(out, target)

    def _mixed(self, out: torch.Tensor, y: Any) -> torch.Tensor:
        lam = y.lam.float()
        if self.name == "cross_entropy":
            a = F.cross_entropy(out, y.a, reduction="none", label_smoothing=self.smoothing)
            b = F.cross_entropy(out, y.b, reduction="none", label_smoothing=self.smoothing)
            return (lam * a + (1 - lam) * b).mean()
        if self.binary:
            target = lam * y.a.float() + (1 - lam) * y.b.float()
            return F.binary_cross_entropy_with_logits(out.squeeze(1), target)
        k = out.shape[1]
        target = lam[:, None] * F.one_hot(y.a, k).float() + (1 - lam)[:, None] * F.one_hot(y.b, k).float()
        return F.mse_loss(out, target) if self.name == "mse" else F.binary_cross_entropy_with_logits(out, target)

    def check_output(self, out: torch.Tensor) -> None:
        """The model's outputs per sample must match the classes, vocabulary or targets (checked once).

        Fewer logits than classes would end a rank with `IndexError: Target 7 is out of bounds`.
        """
        self._unchecked = False
        want = self.out_features()
        got = out.shape[-1] if self.spec.task != "regression" else out[0].numel() if out.shape[0] else want
        if got == want or out.ndim == 1 and want == 1:
            return
        what = {
            "lm": f"a vocabulary of {want} tokens (ids 0..{want - 1})",
            "regression": f"{want} target values per sample",
        }.get(self.spec.task, f"{self.spec.num_classes} classes (labels 0..{self.spec.num_classes - 1})")
        raise ConfigError(
            f"the model gives {got} outputs per sample but the data has {what}; size the output layer to {want}",
            key=self.model_key,
        )

    def count(self, y: torch.Tensor) -> int:
        """Elements the mean is taken over: samples, or tokens for lm."""
        return y.numel() if self.spec.task == "lm" else y.shape[0]

    def correct(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Right predictions (a 0-dim tensor); 0 for regression."""
        if not self.classify:
            return torch.zeros((), device=out.device)
        pred = (out.squeeze(1) > 0).long() if self.binary else out.argmax(dim=-1)
        return (pred == y).sum()
