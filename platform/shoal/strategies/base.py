"""The strategy interface: how the model is spread over the ranks and how their gradients meet.

The engine talks only to this, never to DDP, FSDP or a pipeline schedule. The core is small: `wrap`
the model, run one step's micro-batches (`forward_backward`: one gradient reduction, after the last),
measure and clip the global gradient norm (`clip`), the `bare_model` for evaluation and export, the
world the data is split over, and `close`. Beside it, `state_io` gives the model and optimizer state
to save and takes it back, in the strategy's layout (state_io.py). What only some strategies have is an
attribute that may be None: `noise_probe` (the gradient noise scale's look at a rank's own gradient),
`log_figures` (a pipeline's bubble), `reduce_squares` (norms of tensors the ranks hold parts of).
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import nn

from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.gns import NoiseProbe
from shoal.health.probes import local
from shoal.losses import Loss
from shoal.precision import Precision
from shoal.state import StateIO
from shoal.strategies.memory import local_bytes
from shoal.strategies.state_io import FullStateIO

Batch = tuple[torch.Tensor, torch.Tensor]
Reduce = Callable[[torch.Tensor], torch.Tensor]


class Strategy(abc.ABC):
    """The core every strategy has; the optional capabilities below are None unless a strategy sets them."""

    name: str
    state_io: StateIO  # set by wrap
    # per-rank sums of squares (a vector) made global, where the ranks hold parts of tensors (sharded, stages)
    reduce_squares: Reduce | None = None
    noise_probe: NoiseProbe | None = None
    # figures of the strategy's own for a log line (a collective: every rank calls it at the same steps)
    log_figures: Callable[[], dict[str, float]] | None = None
    # every layer of the whole model when this rank holds only some (pipelines)
    layout: list[str] | None = None

    def __init__(self, cfg: JobConfig, world: WorldInfo, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.module: nn.Module | None = None  # what forward runs through (wrapped)
        self._bare: nn.Module | None = None
        self.grads_bytes = 0  # gradient bytes this rank held at a step (the memory report)

    # ---------------------------------------------------------------- the model

    @abc.abstractmethod
    def wrap(self, model: nn.Module) -> nn.Module:
        """Put the (frozen, initialised) model in place on this rank, set `state_io`; returns the module to call."""

    @property
    def bare_model(self) -> nn.Module:
        """The model without wrappers: for evaluation, checkpoints, health probes and export."""
        assert self._bare is not None, "wrap the model first"
        return self._bare

    def data_world(self) -> WorldInfo:
        """The ranks the data is split over, and this rank's place among them (every rank reads its own share)."""
        return self.world

    def counted(self, counts: Sequence[int]) -> int:
        """Elements this rank's summed loss covers (the window's global mean divides by their sum)."""
        return sum(counts)

    def eval_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The model's output for evaluation (None on a rank that computes none of it)."""
        return self.bare_model(x)

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

    def sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward AND backward: reduce its gradients only if enabled."""
        return contextlib.nullcontext()

    def forward_backward(
        self,
        batches: Sequence[Batch],
        counts: Sequence[int],
        loss_fn: Loss,
        precision: Precision,
        total: float | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Forward and backward of the step's micro-batches; returns this rank's summed loss (on device).

        Each micro-batch's loss enters as its share of `total` (default: the samples this rank accumulated), so
        the step's gradient is the mean over all of them. Forward and backward of micro-batches
        1..k-1 run with gradient sync off: exactly one reduction per optimizer step.
        """
        model = self.module
        assert model is not None, "wrap the model first"
        total = sum(counts) if total is None else total
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

    def clip(self, params: list[nn.Parameter]) -> torch.Tensor:
        """Measure the global norm (identical on every rank: it comes from reduced values), then clip by
        train.clip_grad_norm or clip_grad_value.

        No host read here: a non-finite norm leaves zero or NaN gradients behind, and that step is
        skipped (the step's one read of the norm decides it), so the clipped values are never used."""
        cfg = self.cfg.train
        grads = [p.grad for p in params if p.grad is not None]
        if not self.grads_bytes:
            self.grads_bytes = local_bytes(grads)
        if self.reduce_squares is not None:
            norm = sharded_norm(grads, self.reduce_squares)
        elif grads:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True).double()
        else:
            norm = torch.zeros((), device=self.device, dtype=torch.float64)
        if cfg.clip_grad_norm is not None:
            # the coefficient in the gradients' own dtype: a float64 one sends _foreach_mul_ down its slow path
            torch.nn.utils.clip_grads_with_norm_(params, cfg.clip_grad_norm, norm.to(grads[0].dtype) if grads else norm)
        elif cfg.clip_grad_value is not None:
            torch.nn.utils.clip_grad_value_(params, cfg.clip_grad_value)
        return norm


class SingleStrategy(Strategy):
    """One process holds and trains the whole model (also async_ps workers, which accumulate locally)."""

    name = "single"

    def wrap(self, model: nn.Module) -> nn.Module:
        self._bare = self.module = model
        self.state_io = FullStateIO(model)
        return model


def sharded_norm(tensors: list[torch.Tensor], reduce: Reduce) -> torch.Tensor:
    """The L2 norm of tensors the ranks hold parts of: this rank's sum of squares, made global by `reduce`."""
    parts = [local(t) for t in tensors]
    sq = (
        torch.stack([n.double() ** 2 for n in torch._foreach_norm(parts)]).sum()
        if parts
        else torch.zeros((), dtype=torch.float64)
    )
    return reduce(sq.reshape(1)).sqrt()[0]


def spread_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """1.0 for a finite loss, NaN otherwise: multiplied into the loss, it makes every gradient NaN."""
    return 1.0 + 0.0 * loss.detach()
