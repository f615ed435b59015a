"""A parameter server: one flat shard of the parameters, its optimizer state, and a version.

Workers call `push_pull` once per step: the server applies their gradient (unless it is too stale
under ps.max_staleness) and answers with its current parameters, so a step costs one round trip.
Parameters and gradients travel as one float32 NumPy buffer per shard through Ray's object store.
The driver creates servers empty (it never loads torch); PS rank 0 fills them with `init`, from the
model every worker builds alike, and opens them.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import numpy as np

from shoal.config import config_from_dict
from shoal.ps.sharding import TensorSpec, offsets

WINDOW_KEYS = ("loss_sum", "count", "samples", "grad_norm_sum", "pushes", "staleness_sum")


class ParameterServer:
    def __init__(self, shard: int, cfg: dict[str, Any]):
        self.shard = shard
        self.cfg = config_from_dict(cfg)
        self.is_open = False
        self.version = 0
        self.max_steps = self.cfg.train.max_steps
        self.stopping = False
        self.staleness: Counter[int] = Counter()
        self.dropped = 0
        self.skipped = 0
        self.samples = 0
        self.window = dict.fromkeys(WINDOW_KEYS, 0.0)
        self.evals: list[dict[str, Any]] = []

    def init(self, specs: list[TensorSpec], init: np.ndarray) -> None:
        """Take this shard's tensors (name, shape, decay group) and their initial values."""
        import torch  # in the actor: the driver holds this class, never torch

        from shoal.optim import Schedule, make_optimizer

        job = self.cfg
        self.flat = torch.from_numpy(np.array(init, dtype=np.float32))
        self.grad = torch.zeros_like(self.flat)
        self.offsets = offsets(specs)
        self.params = []
        for o, s in zip(self.offsets, specs):
            p = torch.nn.Parameter(self.flat[o : o + s.numel].view(s.shape))  # a view: steps update the flat buffer
            p.grad = self.grad[o : o + s.numel].view(s.shape)
            self.params.append(p)
        decay = [p for p, s in zip(self.params, specs) if s.decay]
        rest = [p for p, s in zip(self.params, specs) if not s.decay]
        groups = [
            {"params": decay, "weight_decay": job.optim.weight_decay, "l1": job.optim.l1},
            {"params": rest, "weight_decay": 0.0, "l1": 0.0},
        ]
        self.optimizer = make_optimizer([g for g in groups if g["params"]], job.optim)
        self.schedule = Schedule(job.schedule, job.optim.lr, job.train.max_steps)

    def open(self) -> None:
        """Start answering workers (after init, and after a resume loaded the checkpoint's state)."""
        self.is_open = True

    def ready(self) -> bool:
        return self.is_open

    def push_pull(
        self, grad: np.ndarray | None, version: int, stats: dict[str, Any] | None
    ) -> tuple[np.ndarray, int, bool]:
        """Apply a worker's gradient computed on `version` (None: nothing to apply); return the parameters."""
        if grad is not None and not self._done():
            staleness = self.version - version
            bound = self.cfg.ps.max_staleness
            if bound is not None and staleness > bound:
                self.dropped += 1  # SSP: too old; the worker computes again on what it gets back
            else:
                self._apply(grad, staleness)
                if stats is not None:  # samples and loss of the updates that were applied
                    self._record(stats)
        elif grad is None and version >= 0 and stats is not None and not stats.get("ok", True):
            self.skipped += 1
        return self.flat.numpy(), self.version, self._done()

    def _apply(self, grad: np.ndarray, staleness: int) -> None:
        import torch  # as in init

        from shoal.optim import add_l1_grad

        if self.cfg.optim.l1:  # add_l1_grad writes into the gradients: they need a buffer of our own
            self.grad.copy_(torch.from_numpy(np.array(grad, copy=True)))
            self._point_grads(self.grad)
        else:  # the optimizers only read gradients: use the pushed buffer where it lies
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                self._point_grads(torch.from_numpy(grad))
        lr = self.schedule.lr_at(self.version + 1)  # the update this makes
        if self.cfg.ps.staleness_lr == "inverse":
            lr /= max(1, staleness)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        add_l1_grad(self.optimizer)
        self.optimizer.step()
        self.version += 1
        self.staleness[staleness] += 1
        if self.shard == 0:
            self.window["staleness_sum"] += staleness

    def _point_grads(self, flat: Any) -> None:
        for p, o in zip(self.params, self.offsets):
            p.grad = flat[o : o + p.numel()].view_as(p)

    def _record(self, stats: dict[str, Any]) -> None:
        w = self.window
        w["loss_sum"] += stats["loss_sum"]
        w["count"] += stats["count"]
        w["samples"] += stats["samples"]
        w["grad_norm_sum"] += stats["grad_norm"]
        w["pushes"] += 1
        self.samples += stats["samples"]

    def _done(self) -> bool:
        # shard 0 alone decides the end (shards may drop different stale pushes), so the job ends
        # exactly at train.max_steps of shard 0's updates
        return self.stopping or (self.shard == 0 and self.version >= self.max_steps)

    def progress(self) -> dict[str, Any]:
        """Version, totals and the window since the last call (then reset)."""
        out = {
            "version": self.version,
            "samples": self.samples,
            "dropped": self.dropped,
            "skipped": self.skipped,
            "lr": self.schedule.lr_at(max(1, self.version)) if self.is_open else 0.0,  # the last update's
            "window": dict(self.window),
            "staleness": dict(self.staleness),
            "done": self._done(),
        }
        self.window = dict.fromkeys(WINDOW_KEYS, 0.0)
        return out

    def stop(self) -> None:
        """Finish: every worker's next push_pull answers done."""
        self.stopping = True

    def state(self) -> dict[str, Any]:
        """What a checkpoint holds for this shard."""
        return {
            "flat": self.flat.clone(),
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "schedule": self.schedule.state_dict(),
            "staleness": dict(self.staleness),
            "samples": self.samples,
        }

    def load(self, state: dict[str, Any]) -> None:
        self.flat.copy_(state["flat"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = int(state["version"])
        self.schedule.load_state_dict(state["schedule"])
        self.staleness = Counter({int(k): int(v) for k, v in state["staleness"].items()})
        self.samples = int(state["samples"])
