"""Recovery from memory: every rank's train state in the node's shared memory, every checkpoint.memory_every steps.

Where: /dev/shm/shoal-<key of the run directory>/ (a tmpfs: memory, not disk; a directory of this user's,
mode 0700, or none is used). It outlives the rank's process, so a rank SIGKILLed, OOM-killed or crashed
leaves its last snapshot behind for the group that goes on; it needs no Ray (torchrun workers take the
same path) and costs one copy of the state into pages that stay mapped. A node lost takes its snapshots
with it: the ranks then resume from the newest complete disk checkpoint, which keeps its own schedule.

What: each rank writes what it holds, with no collective: the whole model and optimizer (replicated
strategies; so every node keeps a full copy) or its own shards with their place in the whole (fsdp),
the named train state and torch's generators. Two slots per rank, written in turn, each one file:

    header (64 bytes)  magic, whole flag, step, where the description lies and its length
    tensors            raw bytes, each at a multiple of 64
    description        JSON: rank, world size, each tensor's dtype, shape and offset, the state's tree

The whole flag is cleared before a slot is overwritten and set after, so a rank killed mid-copy leaves
the other slot whole. Nothing is unpickled on the way back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import shutil
import statistics
import struct
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal import dist
from shoal.state import RNG, STATE, WORLD_SIZE

log = logging.getLogger("shoal")
SLOTS = 2
AUTO = "auto"  # checkpoint.memory_every unset on an elastic job: see Pace
BUDGET = 0.03  # of the training time, for AUTO
WARMUP = 5  # first steps of a run AUTO does not measure (allocations, first calls)
CALIBRATION = 20  # steps measured before AUTO settles
ALIGN = 64  # bytes: the header's size, and every tensor starts at a multiple (typed views of the slot's bytes)
MAGIC = b"SHOALSN1"
HEADER = struct.Struct("<8sBxxxxxxxqqq")  # magic, whole, step, description offset, description length


def shm_root() -> Path:
    """The node's shared memory (a tmpfs), or the temporary directory where there is none."""
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def snapshot_dir(run_dir: Path | str) -> Path:
    """The run's snapshots on this node: named by the run directory, so every rank and every restart agrees."""
    key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
    return shm_root() / f"shoal-{key}"


def remove(run_dir: Path | str) -> None:
    """Free the run's shared memory on this node (a finished run needs none)."""
    root = snapshot_dir(run_dir)
    if _ours(root):
        shutil.rmtree(root, ignore_errors=True)


def _ours(root: Path) -> bool:
    """A directory of this user's that no one else can write: the only kind snapshots are written to or read from
    (/dev/shm is shared by every user of the node, and a name is easy to guess)."""
    try:
        st = root.lstat()
    except FileNotFoundError:
        return False
    return root.is_dir() and not root.is_symlink() and st.st_uid == os.getuid() and not st.st_mode & 0o077


# ---------------------------------------------------------------- flattening: tensors out, JSON left

_PLAIN = (int, float, str, type(None))  # bool is an int


def _flatten(obj: Any, tensors: list[Any]) -> Any:
    if isinstance(obj, _PLAIN):
        return obj  # JSON keeps NaN and infinities as Python writes them
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1}
    if isinstance(obj, dict):
        if all(type(k) is str for k in obj):
            return {k: _flatten(v, tensors) for k, v in obj.items()}  # (no key of Shoal's state is a marker below)
        return {"__items__": [[_flatten(k, tensors), _flatten(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_flatten(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_flatten(v, tensors) for v in obj]
    raise TypeError(f"a memory snapshot holds tensors and plain data, not {type(obj).__name__}")


def _unflatten(obj: Any, tensors: list[Any]) -> Any:
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        ((key, value),) = obj.items()
        if key == "__tensor__":
            return tensors[value]
        if key == "__items__":
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value}
        if key == "__tuple__":
            return tuple(_unflatten(v, tensors) for v in value)
    return {k: _unflatten(v, tensors) for k, v in obj.items()}


def _local(t: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """A tensor's bytes to keep and what places them: a DTensor's local shard with the whole's shape."""
    if type(t).__name__ != "DTensor":
        return t.detach(), {}
    return t.to_local().detach(), {"global_shape": list(t.shape)}


# ---------------------------------------------------------------- writing


@dataclass
class _Part:
    """A state's tensors (as this rank holds them: a DTensor's local shard) and its tree as JSON, tensors by index.
    The model's and optimizer's are kept between snapshots while the same storage holds them (the optimizer
    updates them in place): a snapshot then only copies their bytes."""

    locals: list[torch.Tensor]
    entries: list[dict[str, Any]]
    tree: str  # the JSON of its mapping's items, without the braces: parts of one slot's tree join with a comma
    end: int  # the byte after its last tensor
    entries_json: str = ""  # the JSON of entries, without the brackets

    @classmethod
    def of(cls, state: dict[str, Any], first: int = 0, offset: int = ALIGN) -> _Part:
        """`state`'s part of a slot: its tensors numbered from `first`, its bytes from `offset`."""
        found: list[Any] = [None] * first  # _flatten numbers a tensor by its place in the list
        tree = {k: _flatten(v, found) for k, v in state.items()}
        pieces = [_local(t) for t in found[first:]]
        entries = []
        for local, place in pieces:
            offset = -(-offset // ALIGN) * ALIGN
            entry = {"dtype": str(local.dtype).removeprefix("torch."), "shape": list(local.shape), "offset": offset}
            entries.append({**entry, **place})
            offset += local.numel() * local.element_size()
        locals_ = [local for local, _ in pieces]
        return cls(locals_, entries, json.dumps(tree)[1:-1], offset, json.dumps(entries)[1:-1])

    def same_storage(self, state: dict[str, Any]) -> bool:
        found: list[torch.Tensor] = []
        for v in state.values():
            _flatten(v, found)
        now = [_local(t)[0] for t in found]
        return len(now) == len(self.locals) and all(
            a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.dtype == b.dtype for a, b in zip(now, self.locals)
        )


@dataclass
class _Mapped:
    """A slot's file mapped into memory, with typed views of the model's and optimizer's bytes in it."""

    size: int
    mapping: mmap.mmap
    views: list[torch.Tensor]


class Pace:
    """The cadence of checkpoint.memory_every unset on an elastic job: a snapshot every step while the run's first
    WARMUP + CALIBRATION steps measure it, then every k steps, the fewest that keep snapshots within BUDGET of
    the training time (on a tiny model a snapshot costs as much as a step). Every rank takes the largest k, once."""

    def __init__(self, world: dist.WorldInfo):
        self.world = world
        self.k, self.start, self.agreed = 1, -1, False  # a snapshot every step until agreed
        self.last: float | None = None
        self.saves: list[float] = []
        self.steps: list[float] = []

    def due(self, step: int) -> bool:
        if self.start < 0:
            self.start = step - 1  # the run's first step here: the same on every rank
        if not self.agreed:
            self._measure(step)
        return (step - self.start) % self.k == 0

    def _measure(self, step: int) -> None:
        """Step times (less the snapshot in them) past the first WARMUP steps; agree at the end of CALIBRATION."""
        now = time.perf_counter()
        if self.last is not None and step - self.start > WARMUP:
            self.steps.append(now - self.last - (self.saves[-1] if self.saves else 0.0))
        self.last = now
        if step - self.start >= WARMUP + CALIBRATION:
            self.agree()

    def saved(self, seconds: float) -> None:
        if not self.agreed:
            self.saves.append(seconds)

    def agree(self) -> None:
        """k for every rank: each proposes the fewest steps between snapshots within BUDGET, the largest is taken."""
        step_s, save_s = statistics.median(self.steps), statistics.median(self.saves)
        mine = max(1, math.ceil(save_s / (BUDGET * step_s))) if step_s > 0 else 1
        self.k = max(dist.all_gather_object(mine))
        self.agreed = True
        if self.world.is_main:
            log.info(
                "checkpoint.memory_every: a snapshot every %d step(s) (one takes %.2f ms, a step %.2f ms; budget %d%%)",
                self.k,
                save_s * 1e3,
                step_s * 1e3,
                round(BUDGET * 100),
            )


class Snapshots:
    """This rank's snapshots: `save(step)` every `every` steps, into the slot not holding the newest.

    held() gives the model and optimizer (MODEL, OPTIMIZER) as this rank holds them; progress() the named train
    state and generators (STATE); generation() changes when held()'s tensors are replaced. None may run a collective.
    """

    def __init__(
        self,
        every: int | None,
        run_dir: Path | None,
        world: dist.WorldInfo,
        held: Callable[[], dict[str, Any]],
        progress: Callable[[], dict[str, Any]],
        generation: Callable[[], Any] = object,
    ):
        # every: steps between snapshots, AUTO (Pace), or None (none)
        self.every = every if run_dir is not None else None
        self.pace = Pace(world)
        self.world = world
        self.held, self.progress, self.generation = held, progress, generation
        self.dir = snapshot_dir(run_dir) if run_dir is not None else None
        self.slot = self._older_slot()  # a restarted rank keeps the newest snapshot whole until it has another
        self._big: _Part | None = None
        self._generation: Any = None  # of the held tensors in _big
        self._maps: dict[int, _Mapped] = {}

    @property
    def enabled(self) -> bool:
        return self.every is not None

    def due(self, step: int) -> bool:
        if not self.enabled:
            return False
        return self.pace.due(step) if self.every == AUTO else step % self.every == 0

    def save(self, step: int) -> None:
        """Copy this rank's state into a slot (the other one stays whole until this one is complete)."""
        started = time.perf_counter()
        self._save(step)
        if self.every == AUTO:
            self.pace.saved(time.perf_counter() - started)

    def _save(self, step: int) -> None:
        big = self._held()
        small = _Part.of({STATE: self.progress()}, first=len(big.locals), offset=big.end)
        desc = (
            f'{{"rank": {self.world.rank}, "world_size": {self.world.world_size}, '
            f'"tensors": [{", ".join(e for e in (big.entries_json, small.entries_json) if e)}], '
            f'"tree": {{{big.tree}, {small.tree}}}}}'
        ).encode()
        m = self._buffer(self.slot, small.end + len(desc))
        m.mapping[8] = 0  # from here until the flag is set again this slot is not whole
        torch._foreach_copy_(m.views, big.locals)
        for local, e in zip(small.locals, small.entries):
            _view(m.mapping, e).copy_(local)
        at = -(-small.end // ALIGN) * ALIGN
        m.mapping[at : at + len(desc)] = desc
        m.mapping[: HEADER.size] = HEADER.pack(MAGIC, 0, step, at, len(desc))
        m.mapping[8] = 1
        self.slot = (self.slot + 1) % SLOTS

    def _held(self) -> _Part:
        """The model's and optimizer's part, found anew only when their tensors were replaced."""
        generation = self.generation()
        if self._big is None or generation != self._generation or generation is None:
            held = self.held()
            if self._big is None or not self._big.same_storage(held):
                self._big, self._maps = _Part.of(held), {}
            self._generation = generation
        return self._big

    def _older_slot(self) -> int:
        if self.dir is None or not _ours(self.dir):
            return 0
        steps = {s.path: s.step for s in _slots_in(self.dir) if s.rank == self.world.rank}
        for slot in range(SLOTS):
            if self._path(slot) not in steps:
                return slot  # empty or torn: write here first
        return min(range(SLOTS), key=lambda i: steps[self._path(i)])

    def _buffer(self, slot: int, size: int) -> _Mapped:
        """The slot's file mapped into memory (grown when the state grew), with typed views for the model and optimizer."""
        have = self._maps.get(slot)
        if have is not None and have.size >= size:
            return have
        assert self._big is not None and self.dir is not None
        self.dir.mkdir(mode=0o700, exist_ok=True)  # (the ranks of a node race to make it)
        if not _ours(self.dir):
            raise PermissionError(f"{self.dir} is not a directory of this user's alone: no snapshot is written there")
        size = size + size // 4 + 4096  # room for a description that grows (counters, data positions)
        fd = os.open(self._path(slot), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        mapping[8] = 0
        self._maps[slot] = _Mapped(size, mapping, [_view(mapping, e) for e in self._big.entries])
        return self._maps[slot]

    def _path(self, slot: int) -> Path:
        assert self.dir is not None
        return self.dir / f"rank-{self.world.rank}.{slot}.slot"


def _view(buffer: Any, entry: dict[str, Any]) -> torch.Tensor:
    """The slot's bytes of one tensor, typed and shaped as the entry says."""
    dtype, shape = getattr(torch, entry["dtype"]), entry["shape"]
    count = math.prod(shape)
    if not count:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=entry["offset"]).view(shape)


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Slot:
    path: Path
    step: int
    rank: int
    world_size: int


def slots(run_dir: Path | str) -> list[Slot]:
    """Every whole slot of the run on this node."""
    root = snapshot_dir(run_dir)
    return _slots_in(root) if _ours(root) else []


def _slots_in(root: Path) -> list[Slot]:
    out = []
    for p in root.glob("rank-*.slot"):
        doc = _description(p)
        if doc is not None:
            out.append(Slot(p, doc["step"], int(doc["rank"]), int(doc["world_size"])))
    return out


def _description(path: Path, data: bytes | None = None) -> dict[str, Any] | None:
    """A whole slot's description (with its step), or None for a slot torn or not a snapshot."""
    try:
        if data is None:
            with open(path, "rb") as f:
                head = f.read(HEADER.size)
                magic, whole, step, at, length = HEADER.unpack(head)
                f.seek(at)
                desc = f.read(length)
        else:
            magic, whole, step, at, length = HEADER.unpack(data[: HEADER.size])
            desc = data[at : at + length]
        if magic != MAGIC or whole != 1:
            return None
        return {**json.loads(desc), "step": step}
    except (OSError, ValueError, struct.error):
        return None


def read(slot: Slot) -> dict[str, Any]:
    """A slot's state, its tensors copied out of shared memory; DTensor shards come as Shard(local, global_shape)."""
    raw = bytearray(slot.path.read_bytes())
    doc = _description(slot.path, raw)
    if doc is None:
        raise FileNotFoundError(f"{slot.path}: the snapshot was overwritten or torn while being read")
    tensors: list[Any] = []
    for e in doc["tensors"]:
        t = _view(raw, e).clone()
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


def cadence(cfg: Any) -> int | str | None:
    """Steps between snapshots: checkpoint.memory_every, else AUTO when the job is elastic, else none."""
    return cfg.checkpoint.memory_every or (AUTO if cfg.scaling.elastic else None)


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
