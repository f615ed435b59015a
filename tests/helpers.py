"""Importable pieces for tests: user model factories (model.target) with planted behaviour."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from torch import nn


class FailingMLP(nn.Module):
    """A tiny model whose forward raises on one rank after some steps (a crashing rank)."""

    def __init__(self, fail_rank: int, after_calls: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.fail_rank = fail_rank
        self.after = after_calls
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        import torch.distributed as dist

        if self.training and dist.is_initialized() and dist.get_rank() == self.fail_rank and self.calls > self.after:
            raise RuntimeError(f"planted failure on rank {self.fail_rank}")
        return self.net(x)


def failing_mlp(fail_rank: int = 1, after_calls: int = 5) -> nn.Module:
    return FailingMLP(fail_rank, after_calls)


def env_recording_mlp(out_dir: str) -> nn.Module:
    """A plain digits model that first records the torchrun variables this rank was given."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")
    env = {k: os.environ.get(k) for k in keys}
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    Path(out_dir, f"env-{env['RANK']}.json").write_text(json.dumps(env))
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def decode_npy_cls(sample: dict):
    """data.decode for foreign webdataset shards: one .npy input and a .cls label per sample."""
    import io

    import numpy as np

    return np.load(io.BytesIO(sample["input.npy"])), int(sample["cls"])


class HangingMLP(nn.Module):
    """Rank `hang_rank` stops making progress (sleeps in forward) after some calls."""

    def __init__(self, hang_rank: int, after_calls: int):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.hang_rank, self.after, self.calls = hang_rank, after_calls, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        import torch.distributed as dist

        self.calls += 1
        if self.training and dist.is_initialized() and dist.get_rank() == self.hang_rank and self.calls > self.after:
            time.sleep(3600)
        return self.net(x)


def hanging_mlp(hang_rank: int = 1, after_calls: int = 5) -> nn.Module:
    return HangingMLP(hang_rank, after_calls)


def node_recording_mlp(out_dir: str) -> nn.Module:
    """Records the torchrun variables and the Ray node this rank runs on."""
    import ray

    model = env_recording_mlp(out_dir)
    rank = os.environ["RANK"]
    path = Path(out_dir, f"env-{rank}.json")
    env = json.loads(path.read_text())
    env["NODE_ID"] = ray.get_runtime_context().get_node_id()
    path.write_text(json.dumps(env))
    return model


def narrow_mlp(outputs: int = 5) -> nn.Module:
    """A digits model with fewer outputs than the data has classes (labels 0-9)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, outputs))


def raising_factory() -> nn.Module:
    """A model factory that fails when called (in the ranks)."""
    raise ValueError("planted: the factory cannot build this model")


class RMSNorm(nn.Module):
    """A normalisation layer of the user's own (not a torch class), as LLM code has them."""

    def __init__(self, dim: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.gain


def rms_mlp() -> nn.Module:
    """A digits MLP with a user-defined norm layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), RMSNorm(32), nn.ReLU(), nn.Linear(32, 10))


class _DigitsNet(nn.Module):
    """A small digits classifier for `shoal check`'s planted model mistakes."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        if mode == "unused":
            self.unused = nn.Linear(32, 10)  # a layer forward never calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.mode == "detached":
            return out.detach()
        if self.mode == "zeroed":
            return out * 0.0
        return out


def detached_mlp() -> nn.Module:
    return _DigitsNet("detached")


def zeroed_mlp() -> nn.Module:
    return _DigitsNet("zeroed")


def unused_layer_mlp() -> nn.Module:
    return _DigitsNet("unused")


def linear_regressor(inputs: int = 8) -> nn.Module:
    """Least squares as a model: the gradient noise scale of its mse loss has a closed form on the data."""
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 1))


def wrong_outputs() -> nn.Module:
    """A digits model with 3 outputs where the data has 10 classes (a mismatch validate must name)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


class NanOnceMLP(nn.Module):
    """A synthetic-data MLP whose training forward returns NaN once, at its `at_call`-th call on rank `nan_rank`
    (a planted non-finite step; the count survives a rollback, so the step after it is clean)."""

    def __init__(self, inputs: int, classes: int, at_call: int, nan_rank: int):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(inputs, 16), nn.ReLU())
        self.out = nn.Linear(16, classes)
        self.at_call, self.nan_rank, self.calls = at_call, nan_rank, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = self.out(self.inp(x))
        if self.training:
            self.calls += 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            if self.calls == self.at_call and rank == self.nan_rank:
                out = out * float("nan")
        return out


def nan_once_mlp(inputs: int = 12, classes: int = 4, at_call: int = 8, nan_rank: int = 1) -> nn.Module:
    return NanOnceMLP(inputs, classes, at_call, nan_rank)


class SlowLinear(nn.Linear):
    """A linear layer whose training forward sleeps: by measured time it is by far the heaviest layer."""

    def __init__(self, *args, sleep_s: float = 0.05, **kwargs):
        super().__init__(*args, **kwargs)
        self.sleep_s = sleep_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        if self.training:
            time.sleep(self.sleep_s)
        return super().forward(x)


def slow_head_mlp(inputs: int = 12, classes: int = 4, sleep_s: float = 0.05) -> nn.Module:
    """A chain whose parameters sit in the middle (Linear 32x32) but whose time sits in the light head."""
    return nn.Sequential(
        nn.Linear(inputs, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), SlowLinear(32, classes, sleep_s=sleep_s)
    )


class _Block(nn.Module):
    def __init__(self, inputs: int, outputs: int):
        super().__init__()
        self.linear = nn.Linear(inputs, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.linear(x))


class Tower(nn.Module):
    """A model whose forward is not an nn.Sequential (a loop over a ModuleList): parallel.split_fn names its chain."""

    def __init__(self, inputs: int, classes: int):
        super().__init__()
        self.stem = _Block(inputs, 16)
        self.body = nn.ModuleList([_Block(16, 16), _Block(16, 16)])
        self.head = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block in self.body:
            h = block(h)
        return self.head(h)


def tower(inputs: int = 12, classes: int = 4) -> nn.Module:
    return Tower(inputs, classes)


def tower_split(model: nn.Module) -> list[str]:
    """parallel.split_fn for Tower: the modules whose forwards, in order, make its forward."""
    return ["stem", "body.0", "body.1", "head"]


def nested_sequential(inputs: int = 12, classes: int = 4) -> nn.Module:
    """A user's own nn.Sequential with Sequentials inside (the pipeline unrolls them into one chain)."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(inputs, 16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU()),
        nn.Linear(16, classes),
    )


AUGMENT_CALLS: list[dict] = []  # tagged_augment's calls in this process, in order (a test clears it first)


def tagged_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A data.augment user fn: adds 1 + one draw from the generator it is given to every value; logs each call."""
    out = x + (1.0 + torch.rand((), generator=generator))
    AUGMENT_CALLS.append({"x": x.clone(), "generator": generator, "out": out.clone()})
    return out


SEEN_INPUTS: list[torch.Tensor] = []  # what input_recording_mlp's forward got in training mode (this process)


class InputRecordingMLP(nn.Module):
    """A digits model that keeps a copy of every input it trains on."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            SEEN_INPUTS.append(x.detach().clone())
        return self.net(x)


def input_recording_mlp() -> nn.Module:
    return InputRecordingMLP()


class TokenBag(nn.Module):
    """Rows of token ids -> class logits: the mean of the ids' embeddings, pads left out."""

    def __init__(self, vocab_size: int, classes: int, pad_id: int, width: int = 16):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = (x != self.pad_id).unsqueeze(-1).float()
        mean = (self.embed(x) * keep).sum(1) / keep.sum(1).clamp(min=1.0)
        return self.head(mean)


def token_bag(vocab_size: int = 300, classes: int = 3, pad_id: int = 0) -> nn.Module:
    return TokenBag(vocab_size, classes, pad_id)


class FunctionalReLU(nn.Module):
    """64 -> 32 -> 10 with torch.relu between (no nn.ReLU module); hidden bias `bias` (-10: dead from the start)."""

    def __init__(self, bias: float):
        super().__init__()
        self.hidden = nn.Linear(64, 32)
        self.head = nn.Linear(32, 10)
        nn.init.constant_(self.hidden.bias, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(x.flatten(1))))


def functional_relu(bias: float = 0.0) -> nn.Module:
    return FunctionalReLU(bias)


class KillingMLP(nn.Module):
    """A digits MLP whose rank `kill_rank` SIGKILLs its own process at its `at_call`-th training forward, once per
    `marker` file (a real death: no exception, no cleanup). The replacement that grows the group back lives on."""

    def __init__(self, marker: str, kill_rank: int, at_call: int, sleep_s: float, drop: str | None):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.marker, self.kill_rank, self.at_call, self.calls = Path(marker), kill_rank, at_call, 0
        self.sleep_s, self.drop = sleep_s, drop  # drop: a directory removed first (the node's snapshots, lost with it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import signal

        import torch.distributed as dist

        if self.training:
            self.calls += 1
            rank = dist.get_rank() if dist.is_initialized() else 0
            if rank == self.kill_rank and self.calls == self.at_call and not self.marker.exists():
                if self.drop:
                    import shutil

                    shutil.rmtree(self.drop, ignore_errors=True)
                self.marker.write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
                os.kill(os.getpid(), signal.SIGKILL)
            if self.sleep_s:
                time.sleep(self.sleep_s)
        return self.net(x)


def killing_mlp(
    marker: str, kill_rank: int = 1, at_call: int = 8, sleep_s: float = 0.0, drop: str | None = None
) -> nn.Module:
    return KillingMLP(marker, kill_rank, at_call, sleep_s, drop)
