"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A), from what
data-parallel training has anyway: each rank's gradient over its own b samples before the AllReduce
(the strategy's noise probe measures its squared norm before the reduction) and the reduced gradient over
B = b x ranks samples (its norm is the one clipping uses). Per measured step, the unbiased estimators

    |G|^2 ~ (B |G_B|^2 - b |G_b|^2) / (B - b)        tr(Sigma) ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

are summed on each rank; at a log line one small all-reduce averages them over the ranks (so every rank
holds the same estimate) and each is smoothed by an exponential moving average before the ratio is taken,
as the paper recommends (the ratio of noisy means is far steadier than the mean of noisy ratios).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from shoal import dist

if TYPE_CHECKING:
    from shoal.strategies.base import NoiseProbe

SMOOTHING = 0.2  # weight of the newest log interval in the moving averages


class NoiseScale:
    """Measured every `every` steps through the strategy's probe (none: not measured)."""

    def __init__(self, every: int, world_size: int, device: torch.device, probe: NoiseProbe | None):
        # one rank has no second batch size to compare
        self.every = every if world_size > 1 and probe is not None else 0
        self.probe = probe
        self.world_size = world_size
        self.device = device
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # sum of |G|^2 terms, tr(Sigma) terms, steps
        self.g2: float | None = None
        self.trace: float | None = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def arm(self, step: int) -> None:
        """Before the step's backward: have the probe measure it if it is due."""
        if self.probe is not None:
            self.probe.arm(self.due(step))

    def observe(self, step: int, global_norm: torch.Tensor, b: int, scale: float) -> None:
        """A measured step: the probe's |G_b|^2 of this rank over its b samples (taken under a loss scale), and the
        reduced gradient's norm (tensors: no sync). Steps not measured, or without a local norm, are left out."""
        local_sq = self.probe.local_grad_sq() if self.probe is not None and self.due(step) and b else None
        if local_sq is None:
            return
        local_sq = local_sq.double() / scale**2
        global_sq = global_norm.double() ** 2
        if not (torch.isfinite(local_sq) and torch.isfinite(global_sq)):
            return
        big = b * self.world_size
        g2 = (big * global_sq - b * local_sq) / (big - b)
        trace = (local_sq - global_sq) / (1.0 / b - 1.0 / big)
        self.sums += torch.stack([g2.double(), trace.double(), torch.ones((), dtype=torch.float64, device=self.device)])

    def figures(self) -> dict[str, float]:
        """At a log line (every rank): {'gns': B_simple} once measured, from the smoothed averages."""
        if not self.every:
            return {}
        g2, trace, n = (dist.all_sum(self.sums) / self.world_size).tolist()
        self.sums.zero_()
        if n <= 0:
            return self._value()
        g2, trace = g2 / n, trace / n
        self.g2 = g2 if self.g2 is None else (1 - SMOOTHING) * self.g2 + SMOOTHING * g2
        self.trace = trace if self.trace is None else (1 - SMOOTHING) * self.trace + SMOOTHING * trace
        return self._value()

    def _value(self) -> dict[str, float]:
        if self.g2 is None or self.trace is None or self.g2 <= 0:
            return {}
        return {"gns": self.trace / self.g2}

    def state_dict(self) -> dict[str, Any]:
        return {"g2": self.g2, "trace": self.trace}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g2, self.trace = state["g2"], state["trace"]
