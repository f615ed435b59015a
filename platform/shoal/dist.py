"""Distributed setup: the only module that reads RANK/WORLD_SIZE/... and creates the process group.

Launchers (torchrun, Shoal's Ray launcher) produce the torchrun environment; workers consume it
through `WorldInfo.from_env()` and receive `world` as an argument everywhere else.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shoal.errors import ConfigError

if TYPE_CHECKING:  # torch is imported by the functions that need it: the Ray driver never loads it
    import torch

ENV_KEYS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    restart: int = 0  # torchrun's restart of this worker group (TORCHELASTIC_RESTART_COUNT): >0 resumes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> WorldInfo:
        """Read the variables torchrun sets; a plain process is rank 0 of 1."""
        env = os.environ if env is None else env
        world = _int(env, "WORLD_SIZE", 1, low=1)
        rank = _int(env, "RANK", 0, low=0)
        local_world = _int(env, "LOCAL_WORLD_SIZE", world, low=1)
        local_rank = _int(env, "LOCAL_RANK", rank % local_world, low=0)
        node_rank = _int(env, "GROUP_RANK", _int(env, "NODE_RANK", rank // local_world, low=0), low=0)
        if rank >= world:
            raise ConfigError(f"RANK={rank} must be < WORLD_SIZE={world}", key="environment")
        if local_rank >= local_world:
            raise ConfigError(f"LOCAL_RANK={local_rank} must be < LOCAL_WORLD_SIZE={local_world}", key="environment")
        if world > 1 and ("MASTER_ADDR" not in env or "MASTER_PORT" not in env):
            raise ConfigError(
                "WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (start ranks with torchrun or `shoal train`)",
                key="environment",
            )
        return cls(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            node_rank=node_rank,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT", 29500, low=1),
            restart=_int(env, "TORCHELASTIC_RESTART_COUNT", 0, low=0),
        )

    def to_env(self) -> dict[str, str]:
        """The torchrun environment that describes this rank."""
        return {
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "LOCAL_WORLD_SIZE": str(self.local_world_size),
            "GROUP_RANK": str(self.node_rank),
            "NODE_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _int(env: Mapping[str, str], name: str, default: int, low: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer", key="environment") from None
    if value < low:
        raise ConfigError(f"{name}={value} must be >= {low}", key="environment")
    return value


def select_device(world: WorldInfo, want: str) -> torch.device:
    """cuda:LOCAL_RANK when asked for (or auto and a GPU is visible), else cpu."""
    import torch

    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("CUDA was asked for but this rank sees no GPU", key="scaling.device")
        index = world.local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def select_backend(device: torch.device, want: str) -> str:
    """nccl for CUDA, gloo for CPU, unless the config names one."""
    if want == "auto":
        return "nccl" if device.type == "cuda" else "gloo"
    if want == "nccl" and device.type != "cuda":
        raise ConfigError("nccl needs CUDA; use gloo (or auto) on CPU", key="scaling.backend")
    return want


def init_process_group(world: WorldInfo, backend: str, timeout_s: float, device: torch.device) -> None:
    """Join the group described by `world` (no-op for a single process)."""
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", world.master_addr)
    os.environ.setdefault("MASTER_PORT", str(world.master_port))
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _loopback_store(world, timeout)
    dist.init_process_group(
        backend=backend,
        init_method=None if store is not None else "env://",
        store=store,
        rank=world.rank,
        world_size=world.world_size,
        timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def ensure_group(device: torch.device) -> None:
    """A process group even for a world of one (a sharded strategy's device mesh needs one)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1
        )


def _loopback_store(world: WorldInfo, timeout: datetime.timedelta) -> object | None:
    """For a group on one machine (MASTER_ADDR on loopback): a TCPStore whose server rank 0 binds to
    loopback itself, and gloo/NCCL kept on the loopback interface. torch's own store listens on every
    interface ("::") with no authentication; torchrun's agent store is left alone (it has its own)."""
    import ipaddress
    import socket

    import torch.distributed as dist

    try:
        loopback = ipaddress.ip_address(world.master_addr).is_loopback
    except ValueError:
        loopback = world.master_addr == "localhost"
    if not loopback or os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    iface = _loopback_interface()
    if iface:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", iface)
    fd = None
    if world.rank == 0:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", world.master_port))
        sock.listen(512)
        fd = sock.detach()
    return dist.TCPStore(
        "127.0.0.1",
        world.master_port,
        world.world_size,
        world.rank == 0,
        timeout=timeout,
        wait_for_workers=False,
        master_listen_fd=fd,
    )


def _loopback_interface() -> str | None:
    """The name of the interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    try:
        import psutil

        for name, addrs in psutil.net_if_addrs().items():
            if any(a.address == "127.0.0.1" for a in addrs):
                return name
    except Exception:  # no psutil, or interfaces unreadable: gloo then picks its own
        return None
    return None


def destroy_process_group() -> None:
    """Leave the group if one was joined."""
    import time

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # A gloo worker thread frees a finished collective's tensors after the caller has its result,
        # and needs the GIL to do it. Torch 2.13's DDP keeps the group and its threads alive past
        # destroy_process_group, so a thread still freeing at interpreter exit aborts the process
        # ("terminate called without an active exception"), and one freeing while a destructor holds
        # the GIL deadlocks it. A moment without the GIL lets them finish first.
        time.sleep(0.05)
        dist.destroy_process_group()


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor across ranks (in place, returned); identity for one process."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank src's object on every rank."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box: list[object] = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def ranks_env_from_counts(node_counts: Sequence[int], master_addr: str, master_port: int) -> list[WorldInfo]:
    """The WorldInfo of every rank when node i runs node_counts[i] ranks, in node order (as torchrun)."""
    world = sum(node_counts)
    out: list[WorldInfo] = []
    for node_rank, count in enumerate(node_counts):
        for local in range(count):
            out.append(
                WorldInfo(
                    rank=len(out),
                    world_size=world,
                    local_rank=local,
                    local_world_size=count,
                    node_rank=node_rank,
                    master_addr=master_addr,
                    master_port=master_port,
                )
            )
    return out


def all_gather_object(obj: object) -> list[object]:
    """Every rank's object, in rank order."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@dataclass(frozen=True)
class Flags:
    """What any rank may raise between steps; once agreed, every rank acts on it at the same step."""

    stop: bool = False  # a signal asked for a graceful stop
    save: bool = False  # checkpoint.every_minutes has passed
    out_of_time: bool = False  # train.max_time_s has passed

    def as_list(self) -> list[bool]:
        return [self.stop, self.save, self.out_of_time]


class Pulse:
    """Flags any rank may raise, agreed by all ranks at the same step (their max across ranks).

    An exchange starts an asynchronous all_reduce (MAX) of the flags and reads the previous one, so
    its latency hides behind compute. Exchanges run every step for the first WARMUP steps, then
    about every `period_s`: the interval in steps follows the slowest rank's step time, which
    travels in the same all_reduce, so every rank picks the same steps. (A tiny collective every
    step cost 5-10% of a 30 ms step on gloo with two ranks on two cores.) A single process agrees
    with itself at once. Flags must stay raised until acted on: one raised between exchanges is
    seen at the next.
    """

    WARMUP = 8
    SIZE = len(Flags().as_list())

    def __init__(self, device: torch.device, period_s: float = 1.0, max_interval: int = 100):
        self.device = device
        self.period_s = period_s
        self.max_interval = max_interval
        self.calls = 0
        self.next_at = 1
        self.interval = 1
        self._since: tuple[int, float] | None = None  # (calls, time) at the last exchange
        self._pending: tuple[object, torch.Tensor] | None = None

    def exchange(self, flags: Flags) -> Flags:
        """Call once per step: the flags agreed at this step (all False between exchanges)."""
        import time

        import torch
        import torch.distributed as dist

        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return flags  # a single process agrees with itself, at once and for free
        self.calls += 1
        if self.calls < self.next_at:
            return Flags()
        now = time.perf_counter()
        step_s = (now - self._since[1]) / (self.calls - self._since[0]) if self._since else 0.0
        self._since = (self.calls, now)
        agreed = self.drain()
        t = torch.tensor(
            [1.0 if f else 0.0 for f in flags.as_list()] + [step_s], dtype=torch.float64, device=self.device
        )
        self._pending = (dist.all_reduce(t, op=dist.ReduceOp.MAX, async_op=True), t)
        self.next_at = self.calls + self.interval
        return agreed

    def drain(self) -> Flags:
        """Wait for the exchange in flight and return its agreed flags."""
        if self._pending is None:
            return Flags()
        work, t = self._pending
        self._pending = None
        work.wait()
        values = t.tolist()
        step_s = values[self.SIZE]
        if self.calls >= self.WARMUP and step_s > 0:  # the same numbers on every rank: the same interval
            self.interval = max(1, min(self.max_interval, int(self.period_s / step_s)))
        return Flags(*(bool(v) for v in values[: self.SIZE]))
