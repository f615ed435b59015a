"""In-memory data sets: scikit-learn's digits, and synthetic data generated per index.

Both fetch whole batches by an index array (`get_batch`), which is what the step needs and avoids
per-sample Python overhead. Synthetic samples are a pure function of (seed, index), so ten million
samples cost no memory and every process computes the same sample for the same index.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from shoal.config import DataConfig
from shoal.data.spec import from_config

# Synthetic splits up to this size are generated once and held (cheaper per step); larger ones are
# computed per batch, so their memory does not grow with num_samples.
MATERIALIZE_BYTES = 256 * 2**20


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A counter-based hash: independent uniform 64-bit words for consecutive integers."""
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, keys: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) for integer keys, fixed by seed."""
    with np.errstate(over="ignore"):
        mixed = keys.astype(np.uint64) + np.uint64(seed) * np.uint64(0xD1B54A32D192ED03)
    return (splitmix64(mixed) >> np.uint64(40)).astype(np.float32) * np.float32(1.0 / (1 << 24))


class DigitsData:
    """scikit-learn's 8x8 digits (1,797 samples), pixel values scaled to [0, 1], split by seed."""

    def __init__(self, split: str, seed: int, val_fraction: float):
        x, y = digits_arrays()
        order = np.random.Generator(np.random.PCG64([seed, 0xD161])).permutation(len(y))
        n_val = int(round(len(y) * val_fraction))
        idx = order[n_val:] if split == "train" else order[:n_val]
        self.x = torch.from_numpy(x[idx])
        self.y = torch.from_numpy(y[idx])
        self.spec = from_config(DataConfig(dataset="digits"))

    def __len__(self) -> int:
        return len(self.y)

    def get_batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.from_numpy(idx)
        return self.x[t], self.y[t]


@lru_cache(maxsize=1)
def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    raw = _digits_table()
    x = (raw[:, :-1].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return x, raw[:, -1].astype(np.int64)


def _digits_table() -> np.ndarray:
    """scikit-learn's bundled digits.csv.gz (64 pixels + label per row).

    Read straight from the installed package: importing sklearn costs ~1.5 s of every rank's start.
    """
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.exists():
        return np.loadtxt(path, delimiter=",", dtype=np.float64)
    from sklearn.datasets import load_digits  # the fallback only: see above

    d = load_digits()
    return np.column_stack([d.data, d.target])


class SyntheticData:
    """Samples computed from (seed, index): a learnable task of any size that costs no memory.

    classification: uniform features, label = argmax of a fixed random linear teacher.
    regression: target = teacher projection of the features.
    lm: token sequences t[k+1] = (a * t[k] + c) mod vocab, with start and c drawn per sample.
    """

    def __init__(self, cfg: DataConfig, split: str, seed: int, materialize: bool = True):
        n_val = int(round(cfg.num_samples * cfg.val_fraction))
        self.offset = 0 if split == "train" else cfg.num_samples - n_val
        self.n = cfg.num_samples - n_val if split == "train" else n_val
        self.seed = seed
        self.task = cfg.task
        self.vocab = cfg.vocab_size
        self.seq_len = cfg.seq_len
        self.shape = tuple(cfg.input_shape)
        self.dim = math.prod(self.shape)
        rng = np.random.Generator(np.random.PCG64([seed, 0x7EAC]))
        outputs = cfg.num_classes if cfg.task == "classification" else 1
        self.teacher = rng.standard_normal((self.dim, outputs)).astype(np.float32) / np.float32(math.sqrt(self.dim))
        self.spec = from_config(cfg)

        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None
        if materialize and self.n * self._bytes_per_sample() <= MATERIALIZE_BYTES:
            self._cache = self._generate(np.arange(self.n, dtype=np.int64))

    def _bytes_per_sample(self) -> int:
        return (self.seq_len + 1) * 8 if self.task == "lm" else self.dim * 4 + 8

    def __len__(self) -> int:
        return self.n

    def get_batch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._cache is not None:
            t = torch.from_numpy(idx)
            return self._cache[0][t], self._cache[1][t]
        return self._generate(idx)

    def _generate(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        gidx = idx.astype(np.uint64) + np.uint64(self.offset)
        if self.task == "lm":
            return self._lm(gidx)
        keys = gidx[:, None] * np.uint64(self.dim) + np.arange(self.dim, dtype=np.uint64)[None, :]
        x = (_uniform(self.seed, keys) - np.float32(0.5)) * np.float32(math.sqrt(12.0))  # mean 0, var 1
        logits = x @ self.teacher
        xt = torch.from_numpy(x.reshape((len(idx), *self.shape)))
        if self.task == "classification":
            return xt, torch.from_numpy(logits.argmax(axis=1).astype(np.int64))
        return xt, torch.from_numpy(logits.astype(np.float32))

    def _lm(self, gidx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        u = _uniform(self.seed, gidx * np.uint64(2))
        c = (_uniform(self.seed, gidx * np.uint64(2) + np.uint64(1)) * self.vocab).astype(np.int64)
        start = (u * self.vocab).astype(np.int64)
        seq = np.empty((len(gidx), self.seq_len + 1), dtype=np.int64)
        seq[:, 0] = start
        for k in range(self.seq_len):
            seq[:, k + 1] = (3 * seq[:, k] + c) % self.vocab
        t = torch.from_numpy(seq)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def build_memory_data(cfg: DataConfig, seed: int, split: str) -> DigitsData | SyntheticData:
    """The train or val split of the in-memory data set the config names."""
    if cfg.dataset == "digits":
        return DigitsData(split, seed, cfg.val_fraction)
    return SyntheticData(cfg, split, seed)
