"""Reading webdataset tar shards: Shoal's packed shards fast, any webdataset shards with a decode fn.

Shoal's packed format (written by `shoal shard`) stores a block of `block_size` samples per tar
key: one member per field (`<key>.x.bin`, `<key>.y.bin`) holding the raw bytes of a
[count, *shape] array whose dtype and shape are in manifest.json. The files stay ordinary tars
(webdataset and `tar` open them); decoding a block is one `np.frombuffer`, not one `np.load`
per sample.

Local shards are read at random by block: the tar headers are scanned once per reader and
blocks are read with seek + read. Shards in object storage (s3://) are read at random too, by
ranged GET requests (ranged.py): a packed shard's block offsets follow from its manifest, and a
request fetches the blocks of one shuffle window. Other URLs (http://, pipe:CMD, anything
webdataset's gopen opens) are streamed forward. Either way a reader holds at most a few windows
of blocks in memory, so its memory does not grow with the data set.
"""

from __future__ import annotations

import logging
import math
import os
import tarfile
from collections import OrderedDict
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.config import DataConfig
from shoal.data.locate import MANIFEST, directory_manifest, expand, find_manifest, is_local, join, parent, present
from shoal.data.ranged import RangedShard, packed_layout, scan_index
from shoal.data.spec import DataSpec, from_manifest
from shoal.data.storage import Store, is_remote
from shoal.errors import ConfigError, DataError
from shoal.imports import import_object

log = logging.getLogger("shoal")
REMOTE_READERS = 4  # s3:// shards a source keeps a reader (and its last span of blocks) for


@dataclass(frozen=True)
class Shard:
    url: str  # local path or URL
    name: str  # for messages
    samples: int


# ---------------------------------------------------------------- resolving data.path


def open_shards(cfg: DataConfig) -> tuple[ShardSource, ShardSource | None]:
    """The train and validation sources data.path (and data.val_path) name."""
    assert cfg.path is not None
    decode = import_object(cfg.decode, "data.decode") if cfg.decode else None
    manifest = directory_manifest(cfg.path, cfg.storage_options)
    if manifest is not None:
        train = ShardSource(_split_shards(manifest, "train", cfg.path), manifest, cfg, decode)
        val_shards = _split_shards(manifest, "val", cfg.path) if "val" in manifest["splits"] else []
        val = ShardSource(val_shards, manifest, cfg, decode) if val_shards else None
        if cfg.val_path:
            val = _open_pattern(cfg.val_path, cfg, decode, key="data.val_path")
        return train, val
    train = _open_pattern(cfg.path, cfg, decode, key="data.path")
    val = _open_pattern(cfg.val_path, cfg, decode, key="data.val_path") if cfg.val_path else None
    return train, val


def _open_pattern(pattern: str, cfg: DataConfig, decode: Callable | None, key: str) -> ShardSource:
    checked = is_local(pattern) or is_remote(pattern)
    urls = _present_urls(pattern, cfg, key) if checked else expand(pattern)
    manifest_at = _manifest_location(cfg, urls, checked)
    manifest = find_manifest(manifest_at, cfg.storage_options) if manifest_at is not None else None
    if cfg.manifest and manifest is None:
        raise DataError(f"data.manifest: {cfg.manifest} not found")
    shards = _pattern_shards(urls, manifest, manifest_at, cfg)
    if manifest is None and decode is None:
        raise ConfigError(
            "shards without Shoal's manifest need a decode function 'package.module:fn' (sample dict -> (x, y))",
            key="data.decode",
        )
    return ShardSource(shards, manifest, cfg, decode)


def _present_urls(pattern: str, cfg: DataConfig, key: str) -> list[str]:
    """The files or objects of the pattern; missing ones raise, or are skipped under data.on_error=skip."""
    urls = expand(pattern)
    found, missing = present(pattern, key, cfg.storage_options)
    if missing and cfg.on_error == "raise":
        raise DataError(f"shard {missing[0]}: missing ({len(missing)} of {len(urls)} shards of {key} are absent)")
    if missing:
        log.warning("data.on_error=skip: %d missing shards of %s skipped, first %s", len(missing), key, missing[0])
        return found
    return urls


def _manifest_location(cfg: DataConfig, urls: list[str], checked: bool) -> str | None:
    """data.manifest, else the manifest beside local or s3:// shards (None for streamed URLs)."""
    if cfg.manifest:
        return cfg.manifest
    return join(parent(urls[0]), MANIFEST) if checked else None


def _pattern_shards(
    urls: list[str], manifest: dict[str, Any] | None, manifest_at: str | None, cfg: DataConfig
) -> list[Shard]:
    """The shards, their sample counts from the manifest, or counted when there is none."""
    known = _manifest_counts(manifest) if manifest else {}
    shards = []
    for url in urls:
        name = _name(url)
        samples = known.get(name)
        if samples is None and manifest is not None:
            raise DataError(f"shard {name}: not listed in {manifest_at}")
        shards.append(Shard(url, name, samples if samples is not None else _count_samples(url, name, cfg)))
    return shards


def _name(url: str) -> str:
    """A shard's file name, for messages and the manifest's counts."""
    if is_local(url):
        return Path(url).name
    if is_remote(url):
        return url.rstrip("/").rsplit("/", 1)[-1]
    return os.path.basename(url.split("::")[-1].rstrip("|").split()[-1])


def _split_shards(manifest: dict[str, Any], split: str, root: str) -> list[Shard]:
    return [Shard(join(root, s["name"]), s["name"], int(s["samples"])) for s in manifest["splits"][split]["shards"]]


def _manifest_counts(manifest: dict[str, Any]) -> dict[str, int]:
    return {s["name"]: int(s["samples"]) for split in manifest["splits"].values() for s in split["shards"]}


def _count_samples(url: str, name: str, cfg: DataConfig) -> int:
    """Samples (tar keys) in a shard without a manifest: one pass over its headers."""
    if is_remote(url):
        return len(scan_index(Store(cfg.storage_options), url, name))
    return sum(1 for _ in _iter_groups(url, name, with_data=False))


# ---------------------------------------------------------------- tar access


def _iter_groups(url: str, name: str, with_data: bool = True) -> Iterator[tuple[str, dict[str, Any]]]:
    """(key, {extension: bytes or (offset, size)}) of consecutive tar members sharing a key."""
    stream = _open_stream(url, name)
    reached: list[str | None] = [None]  # the last key read, for the message on a corrupt tar
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tf:
            key, group = yield from _tar_groups(tf, name, with_data, reached)
    except tarfile.TarError as e:
        raise DataError(f"shard {name}, after sample {reached[0]}: corrupt or truncated tar ({e})") from None
    finally:
        stream.close()
    if key is not None:
        yield key, group


def _open_stream(url: str, name: str) -> Any:
    try:
        if is_local(url):
            return open(Path(url).expanduser(), "rb")
        # lazily: webdataset brings ~700 modules (seconds of a loaded rank's start) that local shards never use
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    except OSError as e:
        raise DataError(f"shard {name}: cannot open ({e.strerror or e})") from None


def _tar_groups(
    tf: tarfile.TarFile, name: str, with_data: bool, reached: list[str | None]
) -> Generator[tuple[str, dict[str, Any]], None, tuple[str | None, dict[str, Any]]]:
    """_iter_groups' groups but the last, which it returns (yielded once the file is closed)."""
    key, group = None, {}
    for member in filter(tarfile.TarInfo.isfile, tf):
        k, _, ext = os.path.basename(member.name).partition(".")
        if k != key and key is not None:
            yield key, group
            group = {}
        key = reached[0] = k
        if with_data:
            f = tf.extractfile(member)
            group[ext] = data = f.read() if f else b""
            if len(data) != member.size:
                raise DataError(f"shard {name}, sample {k}: truncated ({len(data)} of {member.size} bytes of .{ext})")
        else:
            group[ext] = (member.offset_data, member.size)
    return key, group


class _LocalShard:
    """Random access to the key groups of a local tar: headers scanned once, data read by seek."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.index: list[tuple[str, dict[str, tuple[int, int]]]] | None = None
        self.file: Any = None

    def group(self, i: int) -> tuple[str, dict[str, bytes]]:
        if self.index is None:
            self.index = list(_iter_groups(self.shard.url, self.shard.name, with_data=False))
            self.file = open(Path(self.shard.url).expanduser(), "rb")
        if i >= len(self.index):
            raise DataError(
                f"shard {self.shard.name}: holds {len(self.index)} entries, the manifest promises more (truncated?)"
            )
        key, members = self.index[i]
        out = {}
        for ext, (offset, size) in members.items():
            self.file.seek(offset)
            data = self.file.read(size)
            if len(data) != size:
                raise DataError(
                    f"shard {self.shard.name}, sample {key}: truncated ({len(data)} of {size} bytes of .{ext})"
                )
            out[ext] = data
        return key, out


class _StreamShard:
    """Forward-only access to the key groups of a shard behind a URL or pipe."""

    def __init__(self, shard: Shard):
        self.shard = shard
        self.it: Iterator[tuple[str, dict[str, Any]]] | None = None
        self.next = 0

    def group(self, i: int) -> tuple[str, dict[str, bytes]]:
        if self.it is None or i < self.next:
            self.it = _iter_groups(self.shard.url, self.shard.name)
            self.next = 0
        for key, members in self.it:
            self.next += 1
            if self.next - 1 == i:
                return key, members
        raise DataError(
            f"shard {self.shard.name}: ended after {self.next} entries, the manifest promises more (truncated?)"
        )


# ---------------------------------------------------------------- the source


class ShardSource:
    """Fetches batches of samples by global id (shard-major order) from a list of shards."""

    def __init__(self, shards: list[Shard], manifest: dict[str, Any] | None, cfg: DataConfig, decode: Callable | None):
        self.shards = shards
        self.manifest = manifest
        self.decode = decode
        self.on_error = cfg.on_error
        self.shard_counts = [s.samples for s in shards]
        self.n = sum(self.shard_counts)
        self.cum = np.concatenate([[0], np.cumsum(self.shard_counts)]).astype(np.int64)
        self.block_size = int(manifest["block_size"]) if manifest else 1
        # enough decoded blocks for two shuffle windows: memory is bounded, not proportional to the data
        self.capacity = 2 * math.ceil(cfg.shuffle_buffer / self.block_size) + 4
        self.spec = from_manifest(manifest, cfg)
        self.store, self.window = Store(cfg.storage_options), cfg.shuffle_buffer
        self._readers: dict[int, Any] = {}
        self._cache: OrderedDict[tuple[int, int], Any] = OrderedDict()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:  # loader workers open their own files
        state = dict(self.__dict__)
        state["_readers"], state["_cache"] = {}, OrderedDict()
        return state

    def get_batch(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(x, y, samples skipped) for these ids; skipped only under data.on_error=skip.

        Per sample, a row view of its cached block and one stack at the end: a batch is small next to a
        block, and numpy's per-call cost, not the bytes, is what a grouped gather paid for.
        """
        shard = np.searchsorted(self.cum, ids, side="right") - 1
        offset = np.asarray(ids, dtype=np.int64) - self.cum[shard]
        xs, ys = [], []
        for s, b, w in zip(shard.tolist(), (offset // self.block_size).tolist(), (offset % self.block_size).tolist()):
            got = self._block(s, b)
            if got is not None:
                xs.append(got[0][w])
                ys.append(got[1][w])
        if not xs:
            return _empty(self.spec), _empty_y(self.spec), len(ids)
        return _to_x(np.stack(xs), self.manifest), _to_y(np.stack(ys), self.spec), len(ids) - len(xs)

    def _block(self, s: int, b: int) -> tuple[np.ndarray, np.ndarray] | None:
        key = (s, b)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        try:
            value: Any = self._read_block(s, b)
        except DataError as e:
            if self.on_error == "raise":
                raise
            self._warn_once(self.shards[s].name, e)
            value = None
        self._cache[key] = value
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return value

    def scan(self) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor] | tuple[str, int, DataError]]:
        """Every block in order, as (shard name, first sample's index in the shard, x, y), unchecked and
        uncached, or (shard name, index, error) for a block that cannot be read: `shoal check` reports
        labels out of range and bad blocks instead of stopping at the first."""
        for s, shard in enumerate(self.shards):
            for b in range(math.ceil(shard.samples / self.block_size)):
                try:
                    x, y = self._read_block(s, b, check=False)
                except DataError as e:
                    yield shard.name, b * self.block_size, e
                    continue
                x, y = (a if a.flags.writeable else a.copy() for a in (x, y))  # frombuffer views are read-only
                yield shard.name, b * self.block_size, _to_x(x, self.manifest), _to_y(y, self.spec)
            self._readers.pop(s, None)  # one open file at a time

    def _read_block(self, s: int, b: int, check: bool = True) -> tuple[np.ndarray, np.ndarray]:
        shard = self.shards[s]
        key, members = self._reader(s).group(b)
        if self.manifest is None:
            x, y = self._decode_user(shard, key, members)
        else:
            count = min(self.block_size, shard.samples - b * self.block_size)
            arrays = {f: _field(shard, key, members, f, spec, count) for f, spec in self.manifest["fields"].items()}
            x, y = (
                (np.asarray(v) for v in self.decode(arrays)) if self.decode is not None else (arrays["x"], arrays["y"])
            )
        if check:
            self._check_range(shard, key, x, y)
        return x, y

    def _reader(self, s: int) -> Any:
        """Shard s's reader: by seek for a file, by ranged GET for s3://, forward for other URLs."""
        reader = self._readers.pop(s, None)
        if reader is None:
            shard = self.shards[s]
            if is_local(shard.url):
                reader = _LocalShard(shard)
            elif is_remote(shard.url):
                layout = self._layout(shard)
                reader = RangedShard(
                    shard.url, shard.name, self.store, layout, math.ceil(self.window / self.block_size)
                )
            else:
                reader = _StreamShard(shard)
        self._readers[s] = reader  # the most recent last: remote readers beyond a few are let go
        while is_remote(self.shards[s].url) and len(self._readers) > REMOTE_READERS:
            self._readers.pop(next(iter(self._readers)))
        return reader

    def _layout(self, shard: Shard) -> Any:
        """Where a packed shard's blocks lie, from the manifest (None without one: its headers are read)."""
        if self.manifest is None:
            return None
        return packed_layout(shard.samples, self.block_size, self.manifest["fields"])

    def _check_range(self, shard: Shard, key: str, x: np.ndarray, y: np.ndarray) -> None:
        """Class labels in [0, num_classes) and token ids in [0, vocab_size): one min/max per block.

        A label past the model's outputs would otherwise end a rank with an IndexError deep in the loss.
        """
        spec, at = self.spec, f"shard {shard.name}, sample {key}"
        if spec.task == "classification" and spec.num_classes and y.size:
            _in_range(y, spec.num_classes, f"{at}: label", self._where("num_classes", spec.num_classes))
        if spec.task == "classification" and spec.vocab_size and x.size:
            _in_range(x, spec.vocab_size, f"{at}: token id", self._where("vocab_size", spec.vocab_size))
        elif spec.task == "lm" and spec.vocab_size:
            for what, arr in (("token id", x), ("target token id", y)):
                if arr.size:
                    _in_range(arr, spec.vocab_size, f"{at}: {what}", self._where("vocab_size", spec.vocab_size))

    def _where(self, name: str, n: int) -> str:
        """Where a class count or vocabulary size was set, for the message."""
        return f"{name}={n} in the manifest" if self.manifest else f"data.{name}={n}"

    def _decode_user(self, shard: Shard, key: str, members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
        try:
            x, y = self.decode({"__key__": key, **members})  # type: ignore[misc]
        except DataError:
            raise
        except Exception as e:  # a user function failing on one sample
            raise DataError(f"shard {shard.name}, sample {key}: data.decode failed: {type(e).__name__}: {e}") from None
        return np.asarray(x)[None], np.asarray(y).reshape(1)

    def _warn_once(self, shard: str, err: DataError) -> None:
        if shard not in self._warned:
            self._warned.add(shard)
            log.warning("data.on_error=skip: skipping bad data: %s", err)


def _in_range(values: np.ndarray, n: int, what: str, key: str) -> None:
    low, high = values.min(), values.max()
    if low < 0 or high >= n:
        bad = low if low < 0 else high
        raise DataError(f"{what} {bad} is outside [0, {n}) ({key}); fix the data or the class count")


def _field(
    shard: Shard, key: str, members: dict[str, bytes], field: str, spec: dict[str, Any], count: int
) -> np.ndarray:
    data = members.get(f"{field}.bin")
    if data is None:
        raise DataError(f"shard {shard.name}, sample {key}: field {field!r} is missing (has {sorted(members)})")
    dtype = np.dtype(spec["dtype"])
    shape = tuple(spec["shape"])
    expected = count * dtype.itemsize * math.prod(shape)
    if len(data) != expected:
        raise DataError(
            f"shard {shard.name}, sample {key}: field {field!r} holds {len(data)} bytes, expected {expected} "
            f"for {count} x {spec['dtype']}{list(shape)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(count, *shape)


def _to_x(x: np.ndarray, manifest: dict[str, Any] | None) -> torch.Tensor:
    scale = manifest["fields"]["x"].get("scale") if manifest else None
    if manifest and (manifest["task"] == "lm" or manifest.get("vocab_size")):  # token ids, for an embedding
        return torch.from_numpy(x.astype(np.int64))
    if scale is not None or x.dtype != np.float32:
        x = x.astype(np.float32) * np.float32(scale if scale is not None else 1.0)
    return torch.from_numpy(np.ascontiguousarray(x))


def _to_y(y: np.ndarray, spec: DataSpec) -> torch.Tensor:
    if spec.task == "regression":
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _empty(spec: DataSpec) -> torch.Tensor:
    if spec.task == "lm" or spec.token_ids:
        return torch.zeros((0, *spec.input_shape), dtype=torch.int64)
    return torch.zeros((0, *spec.input_shape), dtype=torch.float32)


def _empty_y(spec: DataSpec) -> torch.Tensor:
    if spec.task == "lm":
        return torch.zeros((0, spec.seq_len), dtype=torch.int64)
    return torch.zeros((0,), dtype=torch.float32 if spec.task == "regression" else torch.int64)
