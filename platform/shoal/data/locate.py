"""Where the shards of data.path are: directories, brace patterns, manifests, on local disk or in object
storage (s3://, storage.py). No torch, no reading of samples: the driver calls `check_paths` before any
cluster starts, so a typo, a wrong bucket or missing credentials fail in a second."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import braceexpand

from shoal.data import storage
from shoal.errors import DataError

if TYPE_CHECKING:  # the config's pydantic models take a second to build: not at `shoal shard`'s start
    from shoal.config import DataConfig

MANIFEST = "manifest.json"
PACKED = "shoal-packed-v1"


def is_local(path: str) -> bool:
    """A file path, not a URL or a pipe: checked and read at random."""
    return "://" not in path and not path.startswith("pipe:")


def is_pattern(path: str) -> bool:
    """An object-storage URL naming shards (a brace pattern or one .tar), not a `shoal shard` prefix."""
    return "{" in path or path.endswith(".tar")


def join(root: str, name: str) -> str:
    """A shard's location under a `shoal shard` directory or prefix."""
    return storage.join(root, name) if storage.is_remote(root) else str(Path(root).expanduser() / name)


def parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if storage.is_remote(url) else str(Path(url).expanduser().parent)


def expand(pattern: str) -> list[str]:
    """The shard names a brace pattern stands for, in order."""
    return list(braceexpand.braceexpand(pattern))


def read_manifest(path: Path, hint: str | None = None) -> dict[str, Any]:
    """manifest.json of a `shoal shard` directory."""
    if not path.exists():
        raise DataError(hint or f"{path}: not found")
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"{path}: not a readable manifest ({e})") from None
    return parse_manifest(text, str(path))


def load_manifest(location: str, options: dict[str, Any], hint: str | None = None) -> dict[str, Any]:
    """The manifest at a local path or an s3:// URL."""
    if not storage.is_remote(location):
        return read_manifest(Path(location).expanduser(), hint)
    store = storage.Store(options)
    if hint is not None and not store.exists(location):
        raise DataError(hint)
    return parse_manifest(store.read(location).decode("utf-8", "replace"), location)


def find_manifest(location: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest at a local path or URL, None when there is none."""
    if storage.is_remote(location):
        return load_manifest(location, options) if storage.Store(options).exists(location) else None
    path = Path(location).expanduser()
    return read_manifest(path) if path.exists() else None


def directory_manifest(path: str, options: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of data.path when it is a `shoal shard` directory or s3:// prefix; None for a pattern."""
    if not is_directory(path):
        return None
    hint = f"data.path: {path} has no {MANIFEST}; write shards with `shoal shard` or give a pattern"
    return load_manifest(join(path, MANIFEST), options, hint)


def is_directory(path: str) -> bool:
    """A local directory or an s3:// prefix (not a pattern): where `shoal shard` writes."""
    if storage.is_remote(path):
        return not is_pattern(path)
    return is_local(path) and Path(path).expanduser().is_dir()


def parse_manifest(text: str, where: str) -> dict[str, Any]:
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise DataError(f"{where}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != PACKED:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise DataError(f"{where}: format {found!r}, expected {PACKED!r}")
    return manifest


def local_present(pattern: str, key: str) -> tuple[list[str], list[str]]:
    """(present, missing) local files of a pattern; DataError when it matches no file at all."""
    return present(pattern, key, {})


def present(pattern: str, key: str, options: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(present, missing) files or objects of a pattern; DataError when it matches none at all.

    Objects are found by listing their prefixes (a request per prefix, not per shard)."""
    urls = expand(pattern)
    if storage.is_remote(pattern):
        store = storage.Store(options)
        listed = {p: store.names(p) for p in dict.fromkeys(parent(u) for u in urls)}
        found = [u for u in urls if u.rsplit("/", 1)[-1] in listed[parent(u)]]
    else:
        found = [u for u in urls if Path(u).expanduser().exists()]
    if not found:
        raise DataError(f"{key}: pattern {pattern!r} matches no {'object' if storage.is_remote(pattern) else 'file'}")
    return found, [u for u in urls if u not in found]


def check_paths(cfg: DataConfig, local: bool = True) -> None:
    """Every path the data section names exists and says what it should: local paths (when `local`: a
    cluster of other machines has its own) and s3:// URLs (the same from every machine). Other URLs are
    checked where they are read."""
    if cfg.format != "shards" or cfg.path is None:
        return
    for key, value in (("data.path", cfg.path), ("data.val_path", cfg.val_path)):
        if value is not None and _checked_here(value, local):
            _check_path(key, value, cfg)
    if cfg.manifest and _checked_here(cfg.manifest, local):
        load_manifest(cfg.manifest, cfg.storage_options, hint=f"data.manifest: {cfg.manifest} not found")


def _checked_here(value: str, local: bool) -> bool:
    return storage.is_remote(value) or (local and is_local(value))


def _check_path(key: str, value: str, cfg: DataConfig) -> None:
    """data.path's folder or prefix has a manifest; a pattern's files exist (unless data.on_error=skip)."""
    if key == "data.path" and directory_manifest(value, cfg.storage_options) is not None:
        return
    _, missing = present(value, key, cfg.storage_options)
    if missing and cfg.on_error == "raise":
        raise DataError(
            f"shard {missing[0]}: missing ({len(missing)} of {len(expand(value))} shards of {key} are absent)"
        )
