"""The global batch per optimizer step: fixed (data.batch_size x train.grad_accum_steps x ranks), or grown
by train.batch_ramp through the accumulation count. The per-rank micro-batch never changes, so the data's
partition, the shapes and the data position stay as they are; only how many micro-batches a step takes.

Elastic (scaling.min_workers): the ranks are those configured (num_workers), whatever the world now; a
unit of batch_size x num_workers samples is cut into `pieces` micro-batches per rank present
(data/partition.py UnitLayout), so a step takes units x pieces of them and its samples never change."""

from __future__ import annotations

import math
from typing import Any

from shoal.config import JobConfig
from shoal.data.partition import pieces_per_rank
from shoal.errors import ConfigError

AUTO_GROWTH = 8  # auto: default bound, in multiples of the start batch


class BatchSchedule:
    def __init__(self, cfg: JobConfig, data_world: int):
        self.elastic = cfg.scaling.elastic
        ranks = cfg.scaling.num_workers if self.elastic else data_world
        self.unit = cfg.data.batch_size * ranks  # samples one micro-batch on every configured rank adds
        self.pieces = pieces_per_rank(self.unit, data_world, cfg.data.batch_size) if self.elastic else 1
        ramp = cfg.train.batch_ramp
        self.ramp = ramp
        if ramp is None:
            self.start_k = self.end_k = cfg.train.grad_accum_steps
        else:
            self.start_k = self._micro_batches(ramp.start or self.unit, "start")
            self.end_k = self._micro_batches(ramp.end or AUTO_GROWTH * self.start_k * self.unit, "end")
        self.power = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}[ramp.lr_scaling] if ramp else 0.0
        self.current = self.start_k  # auto: grown whenever the noise scale is estimated

    def _micro_batches(self, batch: int, name: str) -> int:
        if batch % self.unit:
            raise ConfigError(
                f"{name}={batch} is not a multiple of data.batch_size x data-parallel ranks = {self.unit}",
                key="train.batch_ramp",
            )
        return batch // self.unit

    def accum(self, step: int) -> int:
        """Micro-batches per rank in step number `step` (1 = the first)."""
        return self.units(step) * self.pieces

    def samples(self, step: int, rows: int, data_world: int) -> int:
        """The step's global batch: every rank read `rows` (elastic: ranks read uneven pieces of fixed units)."""
        return self.units(step) * self.unit if self.elastic else rows * data_world

    def units(self, step: int) -> int:
        """Global micro-batches of `unit` samples in step number `step` (the accumulation count)."""
        if self.ramp is None:
            return self.start_k
        if self.ramp.auto:
            return self.current
        frac = min(1.0, (step - 1) / self.ramp.steps)  # the ramp starts at the first step and ends ramp.steps later
        return min(self.end_k, self.start_k + math.floor((self.end_k - self.start_k) * frac + 1e-9))

    def lr_factor(self, step: int) -> float:
        """optim.lr's multiplier at this batch (lr_scaling; 1 without a ramp)."""
        return (self.units(step) / self.start_k) ** self.power

    def adapt(self, gns: float | None) -> None:
        """auto: grow towards the noise scale (the critical batch), within [start, end]; never shrink.

        Every rank calls this with the same reduced estimate, so every rank takes the same count.
        """
        if self.ramp is None or not self.ramp.auto or gns is None or not math.isfinite(gns):
            return
        want = min(self.end_k, max(self.start_k, math.floor(gns / self.unit)))
        self.current = max(self.current, want)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current = int(state["current"])
