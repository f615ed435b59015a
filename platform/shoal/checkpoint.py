"""Checkpoints you can trust: complete, atomic, exact to resume from, optionally written in the background.

Layout (strategy allreduce: rank 0 saves the replicated state; DDP replicas are identical):

    RUN_DIR/checkpoints/step-000100/
        model.pt       the bare model's state dict (no DDP `module.` prefix)
        optimizer.pt   the optimizer's state dict
        state.pt       counters, schedule, precision, data position, every rank's RNG, log window
        meta.json      written last: step, metrics, config, Shoal version, sha256 of every file
    RUN_DIR/checkpoints/latest   the name of the newest complete checkpoint, replaced atomically

Sharded strategies (fsdp) write `model/` and `optimizer/` instead: torch.distributed.checkpoint
directories in which every rank writes its own shards (dcp.py); state.pt and meta.json as above.

A save goes to a temporary directory that is renamed into place only when every file and
meta.json are written and synced, so a crash at any moment leaves the previous checkpoint whole.
Loading goes through `weights.load_file` (`torch.load(weights_only=True)`): a checkpoint holds tensors and
plain data only and cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed

from shoal import __version__, dcp, dist
from shoal.config import CheckpointConfig
from shoal.dcp import Sharded, gather, read_into
from shoal.errors import CheckpointError
from shoal.state import DATA, MODEL, OPTIMIZER, PARTS, STATE, file_of
from shoal.weights import load_file

log = logging.getLogger("shoal")

FILES = tuple(file_of(part) for part in PARTS)
META = "meta.json"
LATEST = "latest"


# ---------------------------------------------------------------- finding and verifying


def checkpoints_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def verify(path: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint whose files match their checksums; CheckpointError otherwise."""
    meta_path = path / META
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not found")
    if not meta_path.exists():
        raise CheckpointError(f"checkpoint {path}: incomplete (no {META})")
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path}: unreadable {META} ({e})") from None
    for name, digest in meta.get("sha256", {}).items():
        f = path / name
        if not f.exists():
            raise CheckpointError(f"checkpoint {path}: {name} is missing")
        if sha256(f) != digest:
            raise CheckpointError(f"checkpoint {path}: {name} does not match its checksum (corrupt)")
    return meta


def step_of(path: Path) -> int:
    """The step a checkpoint was taken at, from its meta.json (not verified: loading it verifies)."""
    try:
        return int(json.loads((path / META).read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def find_latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint: `latest` if it verifies, else the newest that does (saying so)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    candidates = sorted(
        (p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")), key=lambda p: p.name, reverse=True
    )
    named = root / LATEST
    if named.exists():
        first = root / named.read_text().strip()
        candidates = [first] + [c for c in candidates if c != first]
    for path in candidates:
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log.warning("%s; falling back to an older checkpoint", e)
    return None


def find_at_or_before(run_dir: Path, step: int) -> Path | None:
    """The newest complete checkpoint taken at or before `step` (health rollbacks)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return None
    for path in sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: p.name, reverse=True):
        if int(path.name.split("-")[1]) <= step:
            try:
                verify(path)
                return path
            except CheckpointError:
                continue
    return None


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(meta, {part: contents}) of a verified checkpoint, loaded without running pickled code.

    The model and optimizer of a sharded checkpoint come as `Sharded` directories: the strategy
    that loads them reads its own shards (every rank, together).
    """
    meta = verify(path)
    if is_sharded(path):
        return meta, {
            MODEL: Sharded(path / MODEL),
            OPTIMIZER: Sharded(path / OPTIMIZER),
            STATE: load_part(path, STATE),
        }
    return meta, {part: load_part(path, part) for part in PARTS}


def is_sharded(path: Path) -> bool:
    return (path / MODEL).is_dir()


def load_part(path: Path, part: str) -> Any:
    """One part of a checkpoint (MODEL, OPTIMIZER, STATE), loaded without running pickled code."""
    return load_file(path / file_of(part), f"checkpoint {path}")


def load_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor] | Sharded, path: Path | str) -> None:
    """Load weights (a state dict, or a sharded checkpoint's model read whole), or fail listing every
    missing, unexpected and mis-shaped key."""
    if isinstance(state, Sharded):
        own = model.state_dict()
        check_keys(own, state.shapes(), path)
        read_into(own, state.path)
        model.load_state_dict(own)
        return
    check_keys(model.state_dict(), shapes_of(state), path)
    model.load_state_dict(state)


def load_weights(model: torch.nn.Module, path: str) -> None:
    """model.weights: start from a state dict file (`shoal export` or `shoal compress` output), loaded strictly."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"model.weights: {file}: not found (a state dict file, e.g. compress/<variant>/model.pt)")
    state = load_file(file, f"model.weights: {file.parent}")
    if not isinstance(state, dict):
        raise CheckpointError(f"model.weights: {file}: holds a {type(state).__name__}, not a state dict")
    load_model_state(model, state, file)


def shapes_of(state: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else None for k, v in state.items()}


def check_keys(own: dict[str, Any], shapes: dict[str, tuple[int, ...] | None], path: Path | str) -> None:
    """The checkpoint's keys and shapes must match the model's (listing every missing, unexpected and mis-shaped key)."""
    missing = sorted(set(own) - set(shapes))
    unexpected = sorted(set(shapes) - set(own))
    shapes = [
        f"{k}: checkpoint {list(shapes[k])} vs model {list(own[k].shape)}"
        for k in own
        if shapes.get(k) is not None and tuple(shapes[k]) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
        if shapes:
            parts.append("shape mismatch " + "; ".join(shapes[:6]))
        raise CheckpointError(f"checkpoint {path} does not fit the model in the config: " + ", ".join(parts))


def sha256(path: Path) -> str:
    """The file's SHA-256 (hex), as meta.json records it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------- saving


def snapshot(obj: Any) -> Any:
    """A deep CPU copy of a state (an in-memory checkpoint)."""
    return _stage(obj, None)


def _stage(obj: Any, staged: Any) -> Any:
    """A deep copy of `obj` with every tensor on the CPU, reusing the buffers of the previous copy.

    Reuse matters: a fresh 170 MB allocation costs more page faults than the copy itself.
    """
    if isinstance(obj, torch.Tensor):
        if isinstance(staged, torch.Tensor) and staged.shape == obj.shape and staged.dtype == obj.dtype:
            return staged.copy_(obj.detach())
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        old = staged if isinstance(staged, dict) else {}
        return {k: _stage(v, old.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        old = staged if isinstance(staged, (list, tuple)) and len(staged) == len(obj) else [None] * len(obj)
        return type(obj)(_stage(v, o) for v, o in zip(obj, old))
    return obj


class Checkpointer:
    """Decides when to save, writes atomically (in the background if asked), prunes, finds.

    Always present: without a run directory (a job trained in a test or a tool) it saves nothing.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: Path | None,
        world: dist.WorldInfo,
        config: dict[str, Any] | None = None,
        sharded: bool = False,
    ):
        self.cfg = cfg
        self.sharded = sharded  # every rank writes its own shards of the model and optimizer
        self.config = config or {}  # the resolved job config, recorded in meta.json
        self.run_dir = run_dir
        self.root = checkpoints_dir(run_dir) if run_dir is not None else None
        self.world = world
        self.last_save = time.monotonic()
        self._thread: threading.Thread | None = None
        self.saved: list[Path] = []
        self.stalls: list[float] = []  # seconds each save held up the training loop
        self._staged: Any = None  # host copy of the last snapshot, reused by the next
        # sharded background saves talk on groups of their own, one per part: the model's and the optimizer's
        # writes run their collectives at once, each in its own thread (a shared group deadlocks)
        self._groups: dict[str, Any] | None = None
        if sharded and cfg.async_save and world.distributed and run_dir is not None:
            self._groups = {part: torch.distributed.new_group(backend="gloo") for part in (MODEL, OPTIMIZER)}

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def time_due(self) -> bool:
        """This rank's clock says checkpoint.every_minutes has passed (ranks agree on it together)."""
        return (
            self.enabled
            and self.cfg.every_minutes is not None
            and time.monotonic() - self.last_save >= self.cfg.every_minutes * 60
        )

    def due(self, step: int, timer: bool, stop: bool, ending: bool) -> bool:
        """Save now? every_steps, the agreed timer, a stop by signal, or the end of training (at_end)."""
        every = self.cfg.every_steps is not None and step % self.cfg.every_steps == 0
        return self.enabled and (every or timer or stop or (ending and self.cfg.at_end))

    def find_at_or_before(self, step: int) -> Path | None:
        """The newest complete checkpoint of this run taken at or before `step` (rollbacks)."""
        return find_at_or_before(self.run_dir, step) if self.run_dir is not None else None

    def save(self, state: dict[str, Any], step: int, metrics: dict[str, float], nonfinite_steps: int) -> None:
        """Write a checkpoint of `state`: rank 0 alone (the caller gathered what every rank holds), or, sharded,
        every rank its own part (a collective)."""
        self.last_save = time.monotonic()
        if not self.enabled or not (self.world.is_main or self.sharded):
            return
        started = time.perf_counter()
        self.wait()  # at most one save in flight
        if self.sharded:
            self._save_sharded(state, step, metrics, nonfinite_steps)
        elif self.cfg.async_save:
            snapshot = self._staged = _stage(state, self._staged)  # safe: the previous write is done
            self._thread = threading.Thread(
                target=self._write_guarded,
                args=(snapshot, step, metrics, nonfinite_steps),
                daemon=True,
                name="shoal-ckpt",
            )
            self._thread.start()
        else:
            self._write_guarded(state, step, metrics, nonfinite_steps)
        self.stalls.append(time.perf_counter() - started)

    def wait(self) -> None:
        """Block until the save in flight (if any) is on disk."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _write_guarded(self, state: dict[str, Any], step: int, metrics: dict[str, float], nonfinite_steps: int) -> None:
        try:
            path = self._write(state, step, metrics, nonfinite_steps)
            self._prune()
            log.info("checkpoint saved: %s", path)
        except OSError as e:
            log.error("checkpoint at step %d failed (%s); the previous checkpoint is kept", step, e.strerror or e)

    def _write(self, state: dict[str, Any], step: int, metrics: dict[str, float], nonfinite_steps: int) -> Path:
        tmp = self._fresh_tmp(step, f"-{os.getpid()}")
        try:
            for part in PARTS:
                torch.save(state[part], tmp / file_of(part))
            return self._commit(tmp, step, state[STATE], metrics, nonfinite_steps)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _fresh_tmp(self, step: int, suffix: str = "") -> Path:
        tmp = self.root / f".tmp-step-{step:06d}{suffix}"
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def _commit(
        self, tmp: Path, step: int, extra: dict[str, Any], metrics: dict[str, float], nonfinite_steps: int
    ) -> Path:
        """Checksum every file, write meta.json last, rename into place, point `latest` at it (rank 0)."""
        name = f"step-{step:06d}"
        final = self.root / name
        meta = {
            "step": step,
            "epoch": extra.get(DATA, {}).get("epoch", 0),
            "metrics": metrics,
            "nonfinite_steps": nonfinite_steps,
            "world_size": self.world.world_size,
            "format": "sharded" if self.sharded else "full",
            "shoal_version": __version__,
            "time": time.time(),
            "config": self.config,
            "sha256": {str(f.relative_to(tmp)): sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()},
        }
        _write_synced(tmp / META, json.dumps(meta, indent=1))
        for d in [tmp, *(p for p in tmp.rglob("*") if p.is_dir())]:
            _fsync_dir(d)
        if final.exists():  # a checkpoint of the same step from an earlier attempt
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _write_synced(self.root / f".{LATEST}.tmp", name)
        os.replace(self.root / f".{LATEST}.tmp", self.root / LATEST)
        self.saved.append(final)
        return final

    def _save_sharded(self, state: dict[str, Any], step: int, metrics: dict[str, float], nonfinite_steps: int) -> None:
        """Every rank writes its shards of the model and optimizer into the same temporary directory (in the
        background with checkpoint.async); rank 0 adds state.pt and commits once all of them are written."""
        tmp = self.root / f".tmp-step-{step:06d}"
        if self.world.is_main:
            self._fresh_tmp(step)
        dist.barrier()  # the fresh directory exists before anyone writes into it
        background = self._groups is not None
        extra = snapshot(state[STATE]) if background else state[STATE]
        groups = self._groups or {}
        try:
            futures = [dcp.write(state[part], tmp / part, groups.get(part), background) for part in (MODEL, OPTIMIZER)]
        except Exception as e:  # noqa: BLE001 - DCP raises its own exception types for a rank's I/O failure
            return self._failed(step, e, tmp)

        def finish() -> None:
            try:
                for f in futures:
                    if f is not None:
                        f.result()  # on rank 0: complete only once every rank wrote (DCP gathers their results)
                if self.world.is_main:
                    torch.save(extra, tmp / file_of(STATE))
                    path = self._commit(tmp, step, extra, metrics, nonfinite_steps)
                    self._prune()
                    log.info("checkpoint saved: %s", path)
            except Exception as e:  # noqa: BLE001
                self._failed(step, e, tmp)

        if background:
            self._thread = threading.Thread(target=finish, daemon=True, name="shoal-ckpt")
            self._thread.start()
        else:
            finish()

    def _failed(self, step: int, e: BaseException, tmp: Path) -> None:
        if self.world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            reason = getattr(e, "strerror", None) or str(e).strip().splitlines()[0][:200]
            log.error("checkpoint at step %d failed (%s); the previous checkpoint is kept", step, reason)

    def _prune(self) -> None:
        """keep_last newest, plus the newest from before a non-finite step and the best by keep_best."""
        if self.cfg.keep_last is None:
            return
        entries = []
        for p in sorted(self.root.glob("step-*")):
            try:
                entries.append((p, json.loads((p / META).read_text())))
            except (OSError, ValueError):
                continue  # incomplete: not ours to judge here
        keep = {p for p, _ in entries[-self.cfg.keep_last :]}
        if entries:
            latest_bad = entries[-1][1].get("nonfinite_steps", 0)
            before_bad = [p for p, m in entries if m.get("nonfinite_steps", 0) < latest_bad]
            if before_bad:
                keep.add(before_bad[-1])
        best = self._best(entries)
        if best is not None:
            keep.add(best)
        for p, _ in entries:
            if p not in keep:
                shutil.rmtree(p, ignore_errors=True)

    def _best(self, entries: list[tuple[Path, dict[str, Any]]]) -> Path | None:
        kb = self.cfg.keep_best
        if kb is None:
            return None
        scored = [
            (m["metrics"][kb.metric], p)
            for p, m in entries
            if isinstance(m.get("metrics", {}).get(kb.metric), (int, float))
        ]
        if not scored:
            return None
        return kb.best_of(scored)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- export


def export(checkpoint: Path, out: Path, overwrite: bool = False, safetensors: bool | None = None) -> Path:
    """Write the checkpoint's model weights as a plain state dict (safetensors if OUT ends so).

    The file is written beside OUT and renamed into place, so a failure never leaves half a file,
    and an existing OUT is only replaced when asked.
    """
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it, or choose another name")
    if out.exists() and out.is_dir():
        raise CheckpointError(f"{out} is a directory; give a file name such as model.pt")
    meta = verify(checkpoint)
    if is_sharded(checkpoint):
        state = gather(checkpoint / MODEL)
    else:
        state = load_part(checkpoint, MODEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        if safetensors or (safetensors is None and out.suffix == ".safetensors"):
            try:  # an optional package: only this format needs it
                from safetensors.torch import save_file
            except ImportError:
                raise CheckpointError(
                    "writing .safetensors needs the safetensors package (pip install safetensors), or use a .pt name"
                ) from None
            save_file(
                {k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"shoal_step": str(meta["step"])}
            )
        else:
            torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
