"""One train state: every stateful part of a rank's run by name, and the checkpoint's keys.

A checkpoint holds three parts, each its own file (`<part>.pt`): MODEL and OPTIMIZER (through the
strategy: full on rank 0, or sharded on every rank) and STATE, a dict of the named Stateful parts
below. Saving, resuming, rollback and the parameter servers all go through these names.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from shoal import dist
from shoal.errors import CheckpointError

MODEL, OPTIMIZER, STATE = "model", "optimizer", "state"
PARTS = (MODEL, OPTIMIZER, STATE)
# names inside STATE
BATCH, GNS = "batch", "gns"
COUNTERS, SCHEDULE, PRECISION, DATA, WINDOW, EVAL, HEALTH, RNG, WORLD_SIZE = (
    "counters",
    "schedule",
    "precision",
    "data",
    "window",
    "last_eval",
    "health",
    "rng",
    "world_size",
)


def file_of(part: str) -> str:
    """The file a checkpoint part is written to."""
    return f"{part}.pt"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Counters:
    """Where training stands: optimizer steps, samples, skipped steps (one owner: train_step)."""

    def __init__(self) -> None:
        self.step = 0
        self.samples = 0
        self.skipped_steps = 0

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "samples": self.samples, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.samples, self.skipped_steps = (
            int(state["step"]),
            int(state["samples"]),
            int(state["skipped_steps"]),
        )


class LastEval:
    """The latest evaluation's metrics (saved: a resumed run reports them until the next one)."""

    def __init__(self) -> None:
        self.metrics: dict[str, float] = {}

    def state_dict(self) -> dict[str, float]:
        return dict(self.metrics)

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.metrics = dict(state)


class StateIO(Protocol):
    """How a strategy's model and optimizer state is saved and loaded (strategies/state_io.py implements it)."""

    sharded: bool  # True: every rank saves and loads its own part of the model and optimizer

    def model_state(self) -> dict[str, Any]:
        """The model's state to save (a collective where sharded)."""

    def load_model_state(self, state: Any, source: Path | str) -> None:
        """Load a state dict or a checkpoint's `Sharded` model into this rank (source names it in errors)."""

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state to save."""

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Any) -> None:
        """Load an optimizer state dict or a checkpoint's `Sharded` optimizer."""


class TrainState:
    """The model and optimizer (in the strategy's layout: its state_io) and the named Stateful parts of one rank."""

    def __init__(
        self,
        state_io: StateIO,
        optimizer: torch.optim.Optimizer,
        parts: dict[str, Stateful],
        world: dist.WorldInfo,
        seed: int,
    ):
        self.state_io, self.optimizer, self.parts, self.world, self.seed = state_io, optimizer, parts, world, seed

    def collect(self) -> dict[str, Any]:
        """Everything needed to continue exactly (a collective: every rank calls it at the same step)."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        state[RNG] = dist.all_gather_object(rng_state())
        state[WORLD_SIZE] = self.world.world_size
        return {
            MODEL: self.state_io.model_state(),
            OPTIMIZER: self.state_io.optimizer_state(self.optimizer),
            STATE: state,
        }

    def held(self) -> dict[str, Any]:
        """The model and optimizer as the strategy keeps them on this rank (whole, or its shards): no collective."""
        return {MODEL: self.state_io.model_state(), OPTIMIZER: self.state_io.optimizer_state(self.optimizer)}

    def progress(self) -> dict[str, Any]:
        """The named parts and this rank's own generators, as `collect` lays out STATE but with no collective."""
        state = {name: part.state_dict() for name, part in self.parts.items()}
        # torch's generators only: Python's and NumPy's global ones (30-50 us to read, every step) Shoal never draws
        # from; disk checkpoints keep them
        state[RNG] = rng_state(host_libraries=False)
        state[WORLD_SIZE] = self.world.world_size
        return state

    def generation(self) -> tuple[int, ...]:
        """Changes when the optimizer's state is replaced or grows (a load, a first step): the tensors a snapshot
        keeps are then found anew; otherwise they are the same storage, updated in place."""
        return id(self.optimizer.state), len(self.optimizer.state), id(self.state_io)

    def restore(self, data: dict[str, Any], source: Path | str, keep: tuple[str, ...] = ()) -> None:
        """Load a checkpoint's parts (as `collect` gave them) into this rank; parts named in keep stay as they are."""
        self.state_io.load_model_state(data[MODEL], source)
        try:
            self.state_io.load_optimizer_state(self.optimizer, data[OPTIMIZER])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {source}: optimizer state does not fit this config ({e})") from None
        state = data[STATE]
        for name, part in self.parts.items():
            if name in state and name not in keep:
                part.load_state_dict(state[name])
        rngs, rank = state[RNG], self.world.rank  # every rank's (a list), or a snapshot's own (a dict by rank)
        if state[WORLD_SIZE] == self.world.world_size and (
            rank in rngs if isinstance(rngs, dict) else rank < len(rngs)
        ):
            set_rng_state(rngs[rank])
        else:  # new ranks: fresh, reproducible generators (bitwise resume needs the same world size)
            step = self.parts[COUNTERS].state_dict()["step"]
            torch.manual_seed(self.seed * 1_000_003 + self.world.rank + 1 + 7919 * step)


# ---------------------------------------------------------------- RNG


def rng_state(host_libraries: bool = True) -> dict[str, Any]:
    """This process's generators as tensors and plain data (weights_only-loadable); torch's alone unless
    host_libraries (Python's and NumPy's global generators too)."""
    torch_state = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if not host_libraries:
        return torch_state
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "python": [version, torch.from_numpy(np.asarray(internal, dtype=np.int64)), gauss],  # one tensor: cheap to copy
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "gauss": [int(np_state[3]), float(np_state[4])],
        },
        **torch_state,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    if "python" in state:  # (a memory snapshot keeps torch's generators only)
        version, internal, gauss = state["python"]
        if isinstance(internal, torch.Tensor):
            internal = tuple(internal.tolist())
        random.setstate((version, _tuples(internal), gauss))  # older checkpoints hold it as a list
        n = state["numpy"]
        np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["gauss"][0], n["gauss"][1]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
