"""The stream the engine sees: an endless, resumable train stream and a validation split per rank."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from shoal.config import DataConfig, JobConfig
from shoal.data import partition
from shoal.data.augment import Augment
from shoal.data.fields import FieldsSource, is_hugging_face_target
from shoal.data.memory import build_memory_data
from shoal.data.shards import open_shards
from shoal.data.spec import DataSpec
from shoal.dist import WorldInfo
from shoal.errors import ConfigError, DataError, ShoalError

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Raised:
    """A user-facing error met in a loader worker, carried to the training process as the batch itself:
    re-raised there with its one-line message (DataLoader would wrap it in a worker traceback)."""

    error: ShoalError


class BatchSource(Protocol):
    """A split that fetches whole batches by sample index."""

    spec: DataSpec

    def __len__(self) -> int: ...
    def get_batch(self, idx: np.ndarray) -> Batch: ...


class _ByIndexBatch(torch.utils.data.Dataset):
    """Map-style view for DataLoader workers: item = (index array, epoch, position) = one batch, augmented here
    (data.augment, on the worker's CPU) when the stream hands the transforms to its workers."""

    def __init__(self, source: BatchSource, augment: Any = None):
        self.source = source
        self.augment = augment

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[np.ndarray, int, int]) -> Any:
        idx, epoch, position = item
        try:
            batch = self.source.get_batch(idx)
        except ShoalError as e:
            return _Raised(e)
        if self.augment is None:
            return batch
        return (self.augment.samples(batch[0], epoch, position), *batch[1:])


class _EpochBatches(torch.utils.data.Sampler):
    """The index batches of the stream's current (epoch, position); re-read at every iter()."""

    def __init__(self, stream: TrainStream):
        # a weak reference: a stream -> loader -> sampler -> stream cycle would leave the loader's
        # workers to the garbage collector, whose shutdown of them waits 5 s per worker
        self._stream = weakref.ref(stream)

    @property
    def stream(self) -> TrainStream:
        s = self._stream()
        assert s is not None, "the train stream is gone"
        return s

    def __iter__(self) -> Iterator[tuple[np.ndarray, int, int]]:
        s = self.stream
        batches = s.plan.batches(s.epoch, s.consumed, s.loader_workers)
        # a generator that does not hold the stream (see __init__): the position TrainStream.position() gives
        return _with_positions(batches, s.epoch, s.position(), s.world.world_size * s.batch_size)

    def __len__(self) -> int:
        return self.stream.plan.num_batches(self.stream.consumed)


def _with_positions(
    batches: Iterator[np.ndarray], epoch: int, start: int, step: int
) -> Iterator[tuple[np.ndarray, int, int]]:
    for i, ids in enumerate(batches):
        yield ids, epoch, start + i * step


class TrainStream:
    """This rank's endless stream of training micro-batches, epoch after epoch.

    Its position (epoch, what is consumed this epoch) is the same on every rank, since every rank
    takes the same number of batches, and stays valid when the job resumes with another world
    size or number of loader workers. Batches come in the plan's order, also through DataLoader
    workers (which hand out sampler items round robin), so the position is exact.
    """

    def __init__(
        self,
        source: BatchSource,
        plan: Any,
        cfg: DataConfig,
        world: WorldInfo,
        device: torch.device,
        augment: Any = None,
    ):
        self.source, self.plan, self.world, self.device = source, plan, world, device
        self.augment = augment  # data.augment / mixup / cutmix (None: batches as read)
        self.batch_size = cfg.batch_size
        self.loader_workers = cfg.num_workers
        self._begin_epoch(0)
        self.skipped_samples = 0  # bad samples skipped under data.on_error=skip (this rank)
        _check_plan(plan, world, self.batch_size, self.consumed)
        self._loader = self._make_loader(cfg, device)
        self._it: Iterator[Any] | None = None

    def _begin_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.consumed = self.plan.fresh()
        self.taken = 0  # batches taken since `consumed` was set

    def _make_loader(self, cfg: DataConfig, device: torch.device) -> torch.utils.data.DataLoader | None:
        pin = device.type == "cuda" if cfg.pin_memory == "auto" else bool(cfg.pin_memory)
        if cfg.num_workers == 0 and not pin:
            return None  # plain in-process fetch: no DataLoader machinery on the hot path
        workers = cfg.num_workers
        in_workers = self.augment is not None and workers > 0  # per-sample transforms overlap the step there
        return torch.utils.data.DataLoader(
            _ByIndexBatch(self.source, self.augment if in_workers else None),
            batch_size=None,
            sampler=_EpochBatches(self),
            num_workers=workers,
            pin_memory=pin,
            prefetch_factor=cfg.prefetch_factor if workers else None,
            persistent_workers=cfg.persistent_workers and workers > 0,
        )

    def _epoch_iter(self) -> Iterator[Any]:
        if self._loader is not None:
            return iter(self._loader)
        return (self.source.get_batch(ids) for ids in self.plan.batches(self.epoch, self.consumed, self.loader_workers))

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> Batch:
        item = self._next_item()
        position = self.position() if self.augment is not None else 0  # the draws' key; only augmentation needs it
        self.taken += 1
        x, y = item[0].to(self.device, non_blocking=True), item[1].to(self.device, non_blocking=True)
        if len(item) > 2:
            self.skipped_samples += int(item[2])
        if self.augment is not None:  # drawn for (epoch, position): the same after a resume, and per rank
            if not self.loader_workers:  # with loader workers they transformed the batch already
                x = self.augment.samples(x, self.epoch, position)
            x, y = self.augment.mix(x, y, self.epoch, position)
        return x, y

    def _next_item(self) -> Any:
        """The next batch as read, the next epoch begun when this one is done; a worker's error raised."""
        if self._it is None:
            self._it = self._epoch_iter()
        try:
            item = next(self._it)
        except StopIteration:
            self._begin_epoch(self.epoch + 1)
            self._it = self._epoch_iter()
            item = next(self._it)
        if isinstance(item, _Raised):
            raise item.error
        return item

    def position(self) -> int:
        """Global samples taken this epoch before the next batch (the same whether or not the run was resumed)."""
        done = self.consumed if isinstance(self.consumed, int) else sum(b - a for a, b in self.consumed)
        return done + self.taken * self.world.world_size * self.batch_size

    def close(self) -> None:
        """Stop the loader workers now; any later batch is fetched in this process."""
        self._it = None
        self._loader = None  # a persistent-workers loader holds its iterator: let both go

    def state_dict(self) -> dict[str, Any]:
        """The global position: the same on every rank, valid for any world size."""
        consumed = self.plan.after(self.epoch, self.consumed, self.taken, self.loader_workers)
        return {"epoch": self.epoch, "consumed": consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        consumed = state["consumed"]
        self.consumed = [tuple(c) for c in consumed] if isinstance(consumed, list) else int(consumed)
        self.taken = 0
        self._it = None


def _check_plan(plan: Any, world: WorldInfo, batch_size: int, consumed: Any) -> None:
    """The training split holds at least one global batch."""
    if plan.num_batches(consumed) == 0:
        global_batch = world.world_size * batch_size
        raise DataError(
            f"data: {plan.n} training samples are fewer than one global batch "
            f"(world size {world.world_size} x data.batch_size {batch_size} = {global_batch}); "
            "lower data.batch_size or scaling.num_workers"
        )


class EvalSet:
    """This rank's share of the validation split (every sample exactly once across ranks)."""

    def __init__(self, source: BatchSource, world: WorldInfo, batch_size: int, device: torch.device):
        self.source = source
        self.idx = partition.shard_for_eval(len(source), world.rank, world.world_size)
        self.batch_size = batch_size
        self.device = device
        shares = [len(partition.shard_for_eval(len(source), r, world.world_size)) for r in range(world.world_size)]
        self.steps = max(-(-n // batch_size) for n in shares)  # forward passes every rank makes

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, limit: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        """(x, y, counted): this rank's batches, then repeats of a batch (counted=False) until every rank has
        made the same number of forward passes, as a sharded model needs (each gathers parameters with all)."""
        steps = self.steps if limit is None else min(self.steps, limit)
        for i in range(steps):
            start = i * self.batch_size
            counted = start < len(self.idx)
            ids = (
                self.idx[start : start + self.batch_size]
                if counted
                else np.arange(min(self.batch_size, len(self.source)))
            )
            item = self.source.get_batch(ids)
            yield item[0].to(self.device, non_blocking=True), item[1].to(self.device, non_blocking=True), counted


@dataclass
class Loaders:
    train: TrainStream
    val: EvalSet | None
    spec: DataSpec
    world: WorldInfo  # the ranks the data is split over (a pipeline's replicas, not its stages)


def open_splits(cfg: JobConfig) -> tuple[Any, Any]:
    """The job's whole training and validation sources, read by index (validation None when there is none):
    what `shoal check`, `shoal compress`, `shoal export` and `shoal batch-find` read, in one process."""
    if cfg.data.format == "shards":
        train, val = open_shards(cfg.data)
    else:
        train = build_memory_data(cfg.data, cfg.seed, "train")
        val = build_memory_data(cfg.data, cfg.seed, "val") if cfg.data.val_fraction > 0 else None
    if not takes_fields(cfg, train.spec):
        return train, val
    return FieldsSource(train), FieldsSource(val) if val is not None else None


def takes_fields(cfg: JobConfig, spec: DataSpec) -> bool:
    """Batches of named fields: for a model that takes its inputs by name, or padded token data (cut per batch)."""
    m = cfg.model
    return is_hugging_face_target(m.target) or m.inputs is not None or m.output is not None or spec.pad_id is not None


def build_loaders(cfg: JobConfig, world: WorldInfo, device: torch.device) -> Loaders:
    """The train stream and validation split for this rank."""
    train, val = open_splits(cfg)
    plan = _plan(cfg, train, world)
    augment = None
    if cfg.data.augment or cfg.data.mixup is not None or cfg.data.cutmix is not None:
        if isinstance(train, FieldsSource):
            raise ConfigError(
                "applies to image tensors; a model given named fields takes none here", key="data.augment"
            )
        augment = Augment(cfg.data, train.spec, cfg.seed, world.rank)
    stream = TrainStream(train, plan, cfg.data, world, device, augment)
    evalset = EvalSet(val, world, cfg.data.batch_size, device) if val is not None and len(val) else None
    return Loaders(train=stream, val=evalset, spec=train.spec, world=world)


def _plan(cfg: JobConfig, train: Any, world: WorldInfo) -> Any:
    """The order this rank reads training samples in: by shard window for shards, by sample in memory."""
    data = cfg.data
    if cfg.scaling.elastic:  # the same samples in every step at any world size
        unit = data.batch_size * cfg.scaling.num_workers
        if data.format == "shards":
            ids = partition.shard_ids(train.shard_counts, cfg.seed, data.shuffle_buffer, data.shuffle)
        else:
            ids = partition.memory_ids(len(train), cfg.seed, data.shuffle)
        return partition.UnitPlan(len(train), ids, unit, world.rank, world.world_size, data.batch_size)
    if data.format == "shards":
        return partition.ShardPlan(
            train.shard_counts,
            cfg.seed,
            data.shuffle,
            data.shuffle_buffer,
            world.rank,
            world.world_size,
            data.batch_size,
        )
    return partition.MemoryPlan(len(train), cfg.seed, data.shuffle, world.rank, world.world_size, data.batch_size)
