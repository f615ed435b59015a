"""data.augment, data.mixup, data.cutmix: training batches made new on the fly, per rank.

Image transforms come from kornia (a maintained, pure-PyTorch augmentation library that runs on the batch's
own device; torchvision's compiled operators do not load against the CPU build of torch used here), token
masking and Gaussian noise are one tensor operation each. Every draw is seeded by (seed, epoch, rank,
position of the batch in the epoch), inside a forked RNG: the same job gives the same augmented batches,
a resumed run continues exactly, loader workers never repeat each other's draws, and the training RNG
(dropout) is untouched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from shoal.config import DataConfig
from shoal.data.augment_options import parse
from shoal.data.spec import DataSpec
from shoal.imports import import_object


@dataclass
class Mixed:
    """Targets of a mixed batch: sample i is share lam[i] of target a[i] and 1 - lam[i] of target b[i]."""

    a: torch.Tensor
    b: torch.Tensor
    lam: torch.Tensor

    @property
    def shape(self) -> torch.Size:
        return self.a.shape

    def numel(self) -> int:
        return self.a.numel()

    def to(self, device: Any, non_blocking: bool = False) -> Mixed:
        return Mixed(*(t.to(device, non_blocking=non_blocking) for t in (self.a, self.b, self.lam)))


class Augment:
    """The per-sample transforms of data.augment (`samples`) and the batch mixing of mixup/cutmix (`mix`)."""

    def __init__(self, cfg: DataConfig, spec: DataSpec, seed: int, rank: int):
        self.spec, self.seed, self.rank = spec, seed, rank
        self.steps = [self._build(name, opts) for name, opts in parse(cfg, spec)]
        self.mixup, self.cutmix = cfg.mixup, cfg.cutmix

    @property
    def active(self) -> bool:
        return bool(self.steps) or self.mixup is not None or self.cutmix is not None

    def _seed(self, epoch: int, position: int, salt: int) -> int:
        key = f"{self.seed}/{epoch}/{self.rank}/{position}/{salt}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF

    def samples(self, x: torch.Tensor, epoch: int, position: int) -> torch.Tensor:
        """data.augment on a batch, drawn for (epoch, position)."""
        if not self.steps:
            return x
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self._seed(epoch, position, 0))
            gen = torch.Generator(device=x.device).manual_seed(self._seed(epoch, position, 1))
            for step in self.steps:
                x = step(x, gen)
        return x

    def mix(self, x: torch.Tensor, y: torch.Tensor, epoch: int, position: int) -> tuple[torch.Tensor, Any]:
        """mixup or cutmix (one of them per batch when both are set), targets as Mixed."""
        if self.mixup is None and self.cutmix is None:
            return x, y
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(self._seed(epoch, position, 2))
            use_cut = self.cutmix is not None and (self.mixup is None or bool(torch.rand(()) < 0.5))
            alpha = (self.cutmix if use_cut else self.mixup).alpha  # type: ignore[union-attr]
            if alpha == 0:
                return x, Mixed(y, y, torch.ones(len(y), device=x.device))
            return _cutmix(x, y, alpha) if use_cut else _mixup(x, y, alpha)

    def _build(self, name: str, o: dict[str, Any]) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
        if ":" in name:
            fn = import_object(name, "data.augment")
            return lambda x, g: fn(x, g)
        if name == "noise":
            return lambda x, g: x + o["std"] * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        if name == "token_mask":
            return _token_mask(o)
        return _kornia_step(name, o, image=len(self.spec.input_shape) == 3)


def _token_mask(o: dict[str, Any]) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    def mask(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        hit = torch.rand(x.shape, generator=g, device=x.device) < o["p"]
        return torch.where(hit, torch.full_like(x, o["token"]), x)

    return mask


def _kornia_step(name: str, o: dict[str, Any], image: bool) -> Callable[[torch.Tensor, torch.Generator], torch.Tensor]:
    import kornia.augmentation as K  # an optional extra (shoal[augment])

    op = {
        "crop": lambda: K.RandomCrop(tuple(o["size"]), padding=o["padding"]),
        "hflip": lambda: K.RandomHorizontalFlip(p=o["p"]),
        "rotate": lambda: K.RandomRotation(degrees=o["degrees"]),
        "translate": lambda: K.RandomAffine(degrees=0.0, translate=(o["fraction"], o["fraction"])),
        "color_jitter": lambda: K.ColorJitter(o["brightness"], o["contrast"], o["saturation"], o["hue"], p=1.0),
        "erase": lambda: K.RandomErasing(scale=tuple(o["scale"]), p=o["p"]),
    }[name]()

    def apply(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        view = x if image else x.reshape(len(x), 1, 1, -1)  # erase on any tensor: as a 1-row image
        return op(view).reshape(x.shape)

    return apply


def _mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, Mixed]:
    lam = torch.distributions.Beta(alpha, alpha).sample().to(x.device)
    perm = torch.randperm(len(x), device=x.device)
    mixed = lam * x + (1 - lam) * x[perm]
    return mixed, Mixed(y, y[perm], lam.expand(len(x)).clone())


def _cutmix(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, Mixed]:
    """kornia's CutMix; each sample's share of its own target is its share of its own pixels."""
    import kornia.augmentation as K  # an optional extra (shoal[augment])

    out, labels = K.RandomCutMixV2(num_mix=1, beta=alpha, p=1.0, use_correct_lambda=True, data_keys=["input", "class"])(
        x, y
    )
    labels = labels[0] if labels.ndim == 3 else labels
    b, lam = labels[:, 1].long(), labels[:, 2].to(x.dtype)
    return out, Mixed(y, b, lam)
