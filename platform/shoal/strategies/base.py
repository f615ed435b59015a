"""The strategy interface: how the model is spread over the ranks and how their gradients meet.

The engine talks only to this, never to DDP, FSDP or a pipeline schedule: `wrap` the model, run
one step's micro-batches (`forward_backward`: one gradient reduction, after the last), measure
and clip the global gradient norm (`clip`), give the model and optimizer state to save and take it
back (full on rank 0, or sharded on every rank), and the `bare_model` for evaluation and export.
Strategies differ in these methods; the loop is the same.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.losses import Loss
from shoal.precision import Precision

Batch = tuple[torch.Tensor, torch.Tensor]


class Strategy:
    """Single process by default; subclasses wrap the model and reduce the gradients."""

    name = "single"
    sharded_state = False  # True: every rank saves and loads its own part of the model and optimizer

    def __init__(self, cfg: JobConfig, world: WorldInfo, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.module: nn.Module | None = None  # what forward runs through (wrapped)
        self._bare: nn.Module | None = None
        self.grads_bytes = 0  # gradient bytes this rank held at a step (the memory report)
        self.layout: list[str] | None = (
            None  # every layer of the whole model when this rank holds only some (pipelines)
        )

    # ---------------------------------------------------------------- the model

    def wrap(self, model: nn.Module) -> nn.Module:
        """Put the (frozen, initialised) model in place on this rank; returns the module to call."""
        self._bare = self.module = model
        return model

    @property
    def bare_model(self) -> nn.Module:
        """The model without wrappers: for evaluation, checkpoints, health probes and export."""
        assert self._bare is not None, "wrap the model first"
        return self._bare

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward AND backward: reduce its gradients only if enabled."""
        return contextlib.nullcontext()

    def data_world(self) -> WorldInfo:
        """The ranks the data is split over, and this rank's place among them (every rank reads its own share)."""
        return self.world

    def counted(self, counts: Sequence[int]) -> int:
        """Elements this rank's summed loss covers (the window's global mean divides by their sum)."""
        return sum(counts)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's output for evaluation (None on a rank that computes none of it)."""
        return self.bare_model(x)

    def log_figures(self) -> dict[str, float]:
        """Figures of the strategy's own for a log line (every rank calls it at the same steps)."""
        return {}

    def close(self) -> None:
        """Drop the wrapper before the process group goes.

        DDP's reducer holds the group; freed last, from the reducer's destructor (which keeps the
        GIL), the group joins gloo threads that may be waiting for the GIL to free a finished
        collective's Python tensors: a deadlock at exit, seen on ranks that finish within a few ms
        of their last collective. Dropped first, the group is freed by destroy_process_group, which
        releases the GIL.
        """
        self.module = self._bare

    # ---------------------------------------------------------------- one step

    @property
    def measures_noise(self) -> bool:
        """Whether local_grad_sq can see a rank's own gradient before its reduction (the gradient noise scale)."""
        return False

    def arm_noise_probe(self, enabled: bool) -> None:
        """Measure this rank's gradient norm before the reduction in the coming step (the gradient noise scale)."""

    def local_grad_sq(self) -> torch.Tensor | None:
        """That squared norm, when this strategy can see it (None: gns is not measured)."""
        return None

    def forward_backward(
        self, batches: Sequence[Batch], counts: Sequence[int], loss_fn: Loss, precision: Precision
    ) -> torch.Tensor:
        """Forward and backward of the step's micro-batches; returns this rank's summed loss (on device).

        Each micro-batch's loss enters as its share of the samples actually accumulated, so the
        step's gradient is the mean over all of them. Forward and backward of micro-batches
        1..k-1 run with gradient sync off: exactly one reduction per optimizer step.
        """
        model = self.module
        assert model is not None, "wrap the model first"
        total = sum(counts)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        for i, ((x, y), n) in enumerate(zip(batches, counts)):
            with self.sync(enabled=i == len(batches) - 1):
                with precision.autocast():
                    out = model(x)
                if n:
                    loss = loss_fn(out, y)
                    # a non-finite loss makes this rank's gradients NaN, and the reduction carries
                    # that NaN to every rank: the finite check below is then agreed without a collective
                    precision.backward(loss * (n / total) * spread_nonfinite(loss))
                    loss_sum += loss.detach().double() * n
                else:  # every sample of this micro-batch was skipped (data.on_error=skip): same collectives, zero gradient
                    precision.backward(out.float().sum() * 0.0)
        return loss_sum

    def grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """The global L2 norm of the gradients, identical on every rank (it is computed from reduced values)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device, dtype=torch.float64)
        return torch.nn.utils.get_total_norm(grads, foreach=True).double()

    def reduce_squares(self, values: torch.Tensor) -> torch.Tensor:
        """Per-rank sums of squares (a vector) made global: here every rank holds whole tensors already."""
        return values

    def local_bytes(self, tensors: list[torch.Tensor]) -> int:
        """Bytes of these tensors this rank holds."""
        return sum(t.nbytes for t in tensors)

    def clip(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Measure the global norm, then clip by train.clip_grad_norm or clip_grad_value if it is finite."""
        cfg = self.cfg.train
        if not self.grads_bytes:
            self.grads_bytes = self.local_bytes([p.grad for p in params if p.grad is not None])
        norm = self.grad_norm(params)
        if torch.isfinite(norm):
            if cfg.clip_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad_norm, norm)
            elif cfg.clip_grad_value is not None:
                torch.nn.utils.clip_grad_value_(params, cfg.clip_grad_value)
        return norm

    def memory(self, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """MiB this rank holds: parameters, gradients, optimizer state, and its peak (CUDA allocated, or process RSS)."""
        state = [t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        mib = 2.0**20
        return {
            "peak_mb": peak_memory_mb(self.device),
            "params_mb": self.local_bytes(list(self.bare_model.parameters())) / mib,
            "grads_mb": self.grads_bytes / mib,
            "optimizer_mb": self.local_bytes(state) / mib,
        }

    # ---------------------------------------------------------------- state

    def model_state(self) -> dict[str, Any]:
        """The model's state to save: the full state dict (rank 0 writes it) unless sharded_state."""
        return self.bare_model.state_dict()

    def load_model_state(self, state: Any, source: Path | str) -> None:
        """A full state dict, or a sharded checkpoint's model read whole (a job saved by strategy fsdp)."""
        from shoal.checkpoint import load_model_state

        load_model_state(self.bare_model, state, source)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        return optimizer.state_dict()

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        from shoal.dcp import Sharded

        if not isinstance(state, Sharded):
            optimizer.load_state_dict(state)
            return
        # saved sharded, keyed by parameter name: read it whole into this optimizer's named state
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        from shoal.dcp import read_optimizer_into

        target = get_optimizer_state_dict(self.bare_model, optimizer)
        read_optimizer_into(target, state.path)
        set_optimizer_state_dict(self.bare_model, optimizer, target)


def spread_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """1.0 for a finite loss, NaN otherwise: multiplied into the loss, it makes every gradient NaN."""
    return 1.0 + 0.0 * loss.detach()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this rank so far: CUDA's max allocated on a GPU, the process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2.0**20
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2.0**20 if sys.platform == "darwin" else peak / 1024.0  # bytes on macOS, KiB on Linux
