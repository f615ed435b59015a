"""Recovery from memory: every rank's train state in the node's shared memory, every checkpoint.memory_every steps.

Where: /dev/shm/shoal-<key of the run directory>/ (a tmpfs: memory, not disk). It outlives the rank's
process, so a rank SIGKILLed, OOM-killed or crashed leaves its last snapshot behind for the group that
goes on; it needs no Ray (torchrun workers take the same path) and costs one copy of the state into
pages that are already mapped. A node lost takes its snapshots with it: the ranks then resume from the
newest complete disk checkpoint, which keeps its own schedule.

What: each rank writes what it holds, with no collective: the whole model and optimizer (replicated
strategies; so every node keeps a full copy) or its own shards with their place in the whole (fsdp),
the named train state and its own generators. Two slots per rank, written in turn: a slot's
description (JSON) is removed before its bytes are overwritten and written (renamed into place) after,
so a rank killed mid-copy leaves the other slot whole. Tensors are raw bytes in the slot's file;
nothing is unpickled on the way back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal import dist
from shoal.state import RNG, STATE, WORLD_SIZE

log = logging.getLogger("shoal")
SLOTS = 2


def shm_root() -> Path:
    """The node's shared memory (a tmpfs), or the temporary directory where there is none."""
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def snapshot_dir(run_dir: Path | str) -> Path:
    """The run's snapshots on this node: named by the run directory, so every rank and every restart agrees."""
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return shm_root() / f"shoal-{key}"


def remove(run_dir: Path | str) -> None:
    """Free the run's shared memory on this node (a finished run needs none)."""
    shutil.rmtree(snapshot_dir(run_dir), ignore_errors=True)


# ---------------------------------------------------------------- flattening: tensors out, JSON left


def _flatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {"__dict__": {k: _flatten(v, tensors) for k, v in obj.items()}}
        return {"__items__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    return obj  # JSON keeps NaN and infinities as Python writes them


def _unflatten(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__dict__" in obj:
        return {k: _unflatten(v, tensors) for k, v in obj["__dict__"].items()}
    if "__items__" in obj:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in obj["__items__"]}
    if "__tuple__" in obj:
        return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
    return obj


def _local(t: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """A tensor's bytes to keep and what places them: a DTensor's local shard with the whole's shape."""
    from_dtensor = type(t).__name__ == "DTensor"
    if not from_dtensor:
        return t.detach(), {}
    return t.to_local().detach(), {"global_shape": list(t.shape)}


# ---------------------------------------------------------------- writing


class Snapshots:
    """This rank's snapshots: `save(step)` every `every` steps, into the slot not holding the newest."""

    def __init__(self, every: int | None, run_dir: Path | None, world: dist.WorldInfo, collect_local: Any):
        self.every = every if run_dir is not None else None
        self.world = world
        self.collect_local = collect_local  # () -> the train state as this rank holds it (no collectives)
        self.dir = snapshot_dir(run_dir) if run_dir is not None else None
        self.slot = self._older_slot()  # a restarted rank keeps the newest snapshot whole until it has another
        self._maps: dict[int, tuple[int, mmap.mmap]] = {}  # slot -> (size, mapping), kept between snapshots

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def due(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def save(self, step: int) -> None:
        """Copy this rank's state into a slot (the other one stays whole until this one is complete)."""
        assert self.dir is not None
        self.dir.mkdir(mode=0o700, exist_ok=True)
        found: list[torch.Tensor] = []
        tree = _flatten(self.collect_local(), found)
        pieces = [_local(t) for t in found]
        entries, size = [], 0
        for local, place in pieces:
            entry = {"dtype": str(local.dtype).removeprefix("torch."), "shape": list(local.shape), "offset": size}
            entries.append({**entry, **place})
            size += local.numel() * local.element_size()
        desc = self._path(self.slot, "json")
        desc.unlink(missing_ok=True)  # from here until the rename below this slot is not whole
        view = torch.frombuffer(self._buffer(self.slot, size), dtype=torch.uint8, count=max(size, 1))
        for (local, _), e in zip(pieces, entries):
            n = local.numel() * local.element_size()
            if n:
                view[e["offset"] : e["offset"] + n].copy_(local.contiguous().reshape(-1).view(torch.uint8))
        doc = {"step": step, "rank": self.world.rank, "world_size": self.world.world_size}
        tmp = self._path(self.slot, "json.tmp")
        tmp.write_text(json.dumps({**doc, "tensors": entries, "tree": tree}))
        os.replace(tmp, desc)
        self.slot = (self.slot + 1) % SLOTS

    def _older_slot(self) -> int:
        if self.dir is None:
            return 0
        steps = []
        for slot in range(SLOTS):
            try:
                steps.append(json.loads(self._path(slot, "json").read_text())["step"])
            except (OSError, ValueError, KeyError):
                return slot  # empty or unreadable: write here first
        return min(range(SLOTS), key=lambda i: steps[i])

    def _buffer(self, slot: int, size: int) -> mmap.mmap:
        """The slot's file mapped into memory, grown when the state grew."""
        have = self._maps.get(slot)
        if have is not None and have[0] == size:
            return have[1]
        path = self._path(slot, "bin")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, max(size, 1))
            m = mmap.mmap(fd, max(size, 1))
        finally:
            os.close(fd)
        self._maps[slot] = (size, m)
        return m

    def _path(self, slot: int, ext: str) -> Path:
        assert self.dir is not None
        return self.dir / f"rank-{self.world.rank}.{slot}.{ext}"


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Slot:
    path: Path  # the description (JSON); the bytes are beside it
    step: int
    rank: int
    world_size: int


def slots(run_dir: Path | str) -> list[Slot]:
    """Every whole slot of the run on this node."""
    root = snapshot_dir(run_dir)
    out = []
    for p in root.glob("rank-*.json") if root.is_dir() else []:
        try:
            doc = json.loads(p.read_text())
            out.append(Slot(p, int(doc["step"]), int(doc["rank"]), int(doc["world_size"])))
        except (OSError, ValueError, KeyError):
            continue
    return out


def read(slot: Slot) -> dict[str, Any]:
    """A slot's state, its tensors copied out of shared memory; DTensor shards come as Shard(local, global_shape)."""
    doc = json.loads(slot.path.read_text())
    raw = bytearray(slot.path.with_suffix(".bin").read_bytes())
    tensors: list[Any] = []
    for e in doc["tensors"]:
        dtype, shape = getattr(torch, e["dtype"]), e["shape"]
        count = math.prod(shape)
        t = (
            torch.frombuffer(raw, dtype=dtype, count=count, offset=e["offset"])
            if count
            else torch.empty(0, dtype=dtype)
        )
        t = t.reshape(shape).clone()
        tensors.append(Shard(t, tuple(e["global_shape"])) if "global_shape" in e else t)
    return _unflatten(doc["tree"], tensors)


@dataclass(frozen=True)
class Shard:
    """One old rank's local piece of a sharded tensor (dim 0), and the whole's shape."""

    local: torch.Tensor
    global_shape: tuple[int, ...]


def _whole(parts: list[Any]) -> Any:
    """One state from every old rank's (in rank order): shards joined along dim 0, the rest as rank 0 had it."""
    first = parts[0]
    if isinstance(first, Shard):
        whole = torch.cat([p.local for p in parts]) if first.local.dim() else first.local
        return whole.reshape(first.global_shape)
    if isinstance(first, dict):
        return {k: _whole([p[k] for p in parts]) for k in first}
    if isinstance(first, (list, tuple)) and first and any(isinstance(v, (dict, Shard)) for v in first):
        return type(first)(_whole([p[i] for p in parts]) for i in range(len(first)))
    return first


# ---------------------------------------------------------------- choosing what to resume from


def restorable_steps(found: list[Slot], sharded: bool) -> set[int]:
    """Steps this node can restore: one whole slot of the step (replicated state), or every old rank's (shards)."""
    steps: dict[int, set[int]] = {}
    worlds: dict[int, int] = {}
    for s in found:
        steps.setdefault(s.step, set()).add(s.rank)
        worlds[s.step] = s.world_size
    if not sharded:
        return set(steps)
    return {step for step, ranks in steps.items() if ranks >= set(range(worlds[step]))}


def cadence(cfg: Any) -> int | None:
    """Steps between snapshots: checkpoint.memory_every, else every step when the job is elastic, else none."""
    return cfg.checkpoint.memory_every or (1 if cfg.scaling.elastic else None)


@dataclass(frozen=True)
class Choice:
    """The snapshot every rank resumes from: its step, and the rank that reads it for all (None: each reads its own)."""

    step: int
    source: int | None


def choose(run_dir: Path | str, sharded: bool) -> Choice | None:
    """The newest snapshot the group can resume from, agreed by every rank (a collective). Shards need every old
    rank's slot on each node that reads; a replicated state, one whole slot on any node (it is sent to the others)."""
    mine = restorable_steps(slots(run_dir), sharded)
    everyone = [set(s) for s in dist.all_gather_object(sorted(mine))]
    common = set.intersection(*everyone)
    if sharded or common:
        return Choice(max(common), None) if common else None
    held = set.union(*everyone)
    if not held:
        return None
    step = max(held)
    return Choice(step, min(r for r, steps in enumerate(everyone) if step in steps))


def take(run_dir: Path | str, choice: Choice, world: dist.WorldInfo, sharded: bool) -> dict[str, Any]:
    """The chosen snapshot's state on this rank (a collective when one rank sends it to the others)."""
    if choice.source is None:
        return load(run_dir, choice.step, world, sharded)
    state = load(run_dir, choice.step, world, sharded) if world.rank == choice.source else None
    state = dist.broadcast_object(state, src=choice.source)
    return state  # type: ignore[return-value]


def load(run_dir: Path | str, step: int, world: dist.WorldInfo, sharded: bool) -> dict[str, Any]:
    """The train state of `step` in a checkpoint's layout (MODEL, OPTIMIZER, STATE), read from this node's snapshots:
    this rank's own slot where it has one (its generators), else another's; shards joined into whole tensors."""
    found = sorted((s for s in slots(run_dir) if s.step == step), key=lambda s: s.rank)
    own = next((s for s in found if s.rank == world.rank), found[0])
    if sharded:
        states = [read(s) for s in found]
        state = _whole(states)
        state[STATE] = read(own)[STATE]
    else:
        state = read(own)
    state[STATE][RNG] = {own.rank: state[STATE][RNG]}
    state[STATE][WORLD_SIZE] = own.world_size
    return state
