"""Sharded checkpoint parts through torch.distributed.checkpoint (DCP): every rank writes its own
shards in parallel, any number of ranks reads them back (resharding), and one process can gather
them into a full state dict for export.

Reading is held to the promise that a checkpoint runs no code: the tensor files are read with
`torch.load(weights_only=True)` by DCP itself, and the `.metadata` file, which DCP unpickles, goes
through an unpickler that only builds DCP's own metadata classes and plain data.
"""

from __future__ import annotations

import copy
import io
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal.errors import CheckpointError

METADATA = ".metadata"
# modules whose classes a DCP .metadata may hold; anything else refuses to load
_ALLOWED_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.filesystem",
    "torch.distributed.checkpoint.planner",
)
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # returns a torch.layout by name, nothing else
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
}


@dataclass(frozen=True)
class Sharded:
    """A part of a sharded checkpoint on disk (a DCP directory), read when a strategy loads it."""

    path: Path

    def shapes(self) -> dict[str, tuple[int, ...] | None]:
        """The stored state dict's keys (for model parts: parameter and buffer names) and tensor shapes."""
        return {
            k: tuple(m.size) if hasattr(m, "size") else None
            for k, m in read_metadata(self.path).state_dict_metadata.items()
        }


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")


def read_metadata(path: Path) -> Any:
    """A DCP directory's metadata, unpickled without running code."""
    try:
        data = (path / METADATA).read_bytes()
        return _MetadataUnpickler(io.BytesIO(data)).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint {path.parent}: cannot read {path.name}/{METADATA} safely ({type(e).__name__}: {e})"
        ) from None


def _reader(path: Path) -> Any:
    # torch.distributed.checkpoint, here and below, brings sympy and ~600 modules: seconds of every rank's start,
    # and only sharded checkpoints need it
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata = read_metadata(path)
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def read_into(target: dict[str, Any], path: Path) -> None:
    """Fill `target` (a state dict of this rank's tensors, sharded or whole) from a DCP directory.

    A collective when a process group exists: every rank calls it.
    """
    import torch.distributed.checkpoint as dcp

    read_metadata(path)  # refuses unsafe metadata in one line, before DCP wraps the refusal
    try:
        dcp.load(target, storage_reader=_reader(path))
    except CheckpointError:
        raise
    except Exception as e:  # DCP wraps every rank's failure; say it in one line
        raise CheckpointError(
            f"checkpoint {path.parent}: cannot load {path.name} ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})"
        ) from None


def read_optimizer_into(target: dict[str, Any], path: Path) -> None:
    """Fill a named optimizer state dict's per-parameter state from a DCP directory, keeping its groups.

    The groups' settings come from the config (the schedule sets the rate every step), and ranks that
    hold different parameters (pipeline stages) save different groups under the same entries.
    """
    groups = copy.deepcopy(target["param_groups"])  # DCP's load rewrites the dicts in place
    read_into(target, path)
    target["param_groups"] = groups


def write(state: dict[str, Any], path: Path, group: Any = None, background: bool = False) -> Any:
    """Write this rank's part of `state` into a DCP directory (a collective); a future when in the background."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    writer = FileSystemWriter(str(path), sync_files=True)
    if background:
        return dcp.async_save(state, storage_writer=writer, process_group=group)
    dcp.save(state, storage_writer=writer, process_group=group)
    return None


def gather(path: Path) -> dict[str, Any]:
    """Every tensor of a DCP directory as a full state dict, read in this one process (export)."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    read_metadata(path)  # refuses unsafe metadata in one line, before DCP wraps the refusal
    state: dict[str, Any] = {}
    try:
        # the empty planner builds every tensor from the metadata (as DCP's own dcp_to_torch_save does)
        _load_state_dict(state, storage_reader=_reader(path), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path.parent}: cannot gather {path.name} ({type(e).__name__}: {str(e).strip().splitlines()[0][:300]})"
        ) from None
    return state
