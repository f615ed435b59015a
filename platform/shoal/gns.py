"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A), from what
data-parallel training has anyway: each rank's gradient over its own b samples before the AllReduce
(the strategy's noise probe measures its squared norm before the reduction) and the reduced gradient over
B = b x ranks samples (its norm is the one clipping uses). Per measured step, the unbiased estimators

    |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b)        tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

are summed on each rank; every ESTIMATE_STEPS steps or so one small all-reduce averages them over the ranks
(so every rank holds the same estimate) and each is smoothed by an exponential moving average before the
ratio is taken, as the paper recommends (the ratio of noisy means is far steadier than the mean of noisy
ratios). The estimate's cadence is its own, not the log line's: train.batch_ramp auto grows the batch from it,
and log.every must not change training.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from shoal import dist

SMOOTHING = 0.2  # weight of the newest estimate's interval in the moving averages
ESTIMATE_STEPS = 10  # about this many steps between estimates (a whole number of measured steps)


class NoiseProbe(Protocol):
    """A rank's own gradient, seen before its reduction (what a strategy that can see it gives the noise scale)."""

    def arm(self, enabled: bool) -> None:
        """Measure in the coming step, or not."""

    def local_grad_sq(self) -> torch.Tensor | None:
        """This rank's squared gradient norm in the armed step (None when it was not measured)."""


class NoiseScale:
    """Measured every `every` steps through the strategy's probe (none: not measured)."""

    def __init__(self, every: int, world_size: int, device: torch.device, probe: NoiseProbe | None):
        # one rank has no second batch size to compare
        self.every = every if world_size > 1 and probe is not None else 0
        self.probe = probe
        self.estimate_every = self.every * max(1, round(ESTIMATE_STEPS / self.every)) if self.every else 0
        self.world_size = world_size
        self.device = device
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # sum of |G|^2 terms, tr(Sigma) terms, steps
        self.g2: float | None = None
        self.trace: float | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def arm(self, step: int) -> None:
        """Before step number `step`'s backward: have the probe measure it if it is due."""
        if self.probe is not None:
            self.probe.arm(self.due(step))

    def observe(self, step: int, global_norm: torch.Tensor, b: int, scale: float) -> float | None:
        """Step number `step` done: add its terms if it was measured (the probe's |G_b|^2 of this rank over its b
        samples, taken under a loss scale, and the reduced gradient's norm; tensors, no sync). Returns the new
        estimate on the steps that make one (every rank, at the same steps), else None."""
        if not self.every:
            return None
        local_sq = self.probe.local_grad_sq() if self.due(step) and b else None
        if local_sq is not None:
            self._add(local_sq.double() / scale**2, global_norm.double() ** 2, b)
        return self._estimate() if step % self.estimate_every == 0 else None

    def _add(self, local_sq: torch.Tensor, global_sq: torch.Tensor, b: int) -> None:
        """A measured step's terms; a non-finite one adds nothing (decided on device: no host read)."""
        big = b * self.world_size
        g2 = (big * global_sq - b * local_sq) / (big - b)
        trace = (local_sq - global_sq) / (1.0 / b - 1.0 / big)
        terms = torch.stack([g2.double(), trace.double(), torch.ones((), dtype=torch.float64, device=self.device)])
        finite = torch.isfinite(local_sq) & torch.isfinite(global_sq)
        self.sums += torch.where(finite, terms, torch.zeros_like(terms))

    def _estimate(self) -> float | None:
        """Average the interval's terms over the ranks (one small all-reduce) into the moving averages."""
        g2, trace, n = (dist.all_sum(self.sums) / self.world_size).tolist()
        self.sums.zero_()
        if n > 0:
            g2, trace = g2 / n, trace / n
            self.g2 = g2 if self.g2 is None else (1 - SMOOTHING) * self.g2 + SMOOTHING * g2
            self.trace = trace if self.trace is None else (1 - SMOOTHING) * self.trace + SMOOTHING * trace
        return self._value().get("gns")

    def figures(self) -> dict[str, float]:
        """For a log line: {'gns': B_simple}, the latest estimate, once there is one (no collective)."""
        return self._value()

    def _value(self) -> dict[str, float]:
        if self.g2 is None or self.trace is None or self.g2 <= 0:
            return {}
        return {"gns": self.trace / self.g2}

    def state_dict(self) -> dict[str, Any]:
        return {"g2": self.g2, "trace": self.trace, "sums": self.sums.tolist()}  # sums: a resume mid-interval

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g2, self.trace = state["g2"], state["trace"]
        if "sums" in state:  # checkpoints from before the estimate had its own cadence lack it
            self.sums = torch.tensor(state["sums"], dtype=torch.float64, device=self.device)
