"""Where the shards of data.path are: directories, brace patterns, manifests. No torch, no reading of
samples: the driver calls `check_paths` before any cluster starts, so a typo fails in a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import braceexpand

from shoal.errors import DataError

if TYPE_CHECKING:  # the config's pydantic models take a second to build: not at `shoal shard`'s start
    from shoal.config import DataConfig

MANIFEST = "manifest.json"
PACKED = "shoal-packed-v1"


def is_local(path: str) -> bool:
    """A file path, not a URL or a pipe: checked and read at random."""
    return "://" not in path and not path.startswith("pipe:")


def expand(pattern: str) -> list[str]:
    """The shard names a brace pattern stands for, in order."""
    return list(braceexpand.braceexpand(pattern))


def read_manifest(path: Path, hint: str | None = None) -> dict[str, Any]:
    """manifest.json of a `shoal shard` directory."""
    if not path.exists():
        raise DataError(hint or f"{path}: not found")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable manifest ({e})") from None
    if manifest.get("format") != PACKED:
        raise DataError(f"{path}: format {manifest.get('format')!r}, expected {PACKED!r}")
    return manifest


def local_present(pattern: str, key: str) -> tuple[list[str], list[str]]:
    """(present, missing) local files of a pattern; DataError when it matches no file at all."""
    urls = expand(pattern)
    present = [u for u in urls if Path(u).expanduser().exists()]
    if not present:
        raise DataError(f"{key}: pattern {pattern!r} matches no file")
    return present, [u for u in urls if u not in present]


def check_paths(cfg: DataConfig) -> None:
    """Every local path the data section names exists and says what it should (URLs are checked where read)."""
    if cfg.format != "shards" or cfg.path is None:
        return
    for key, value in (("data.path", cfg.path), ("data.val_path", cfg.val_path)):
        if value is not None and is_local(value):
            _check_path(key, value, cfg.on_error)
    if cfg.manifest and is_local(cfg.manifest):
        read_manifest(Path(cfg.manifest).expanduser(), hint=f"data.manifest: {cfg.manifest} not found")


def _check_path(key: str, value: str, on_error: str) -> None:
    """data.path's folder has a manifest; a pattern's files exist (unless data.on_error=skip)."""
    path = Path(value).expanduser()
    if key == "data.path" and path.is_dir():
        read_manifest(
            path / MANIFEST,
            hint=f"data.path: {path} has no {MANIFEST}; write shards with `shoal shard` or give a pattern",
        )
        return
    _, missing = local_present(value, key)
    if missing and on_error == "raise":
        raise DataError(
            f"shard {missing[0]}: missing ({len(missing)} of {len(expand(value))} shards of {key} are absent)"
        )
