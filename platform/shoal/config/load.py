"""Reading a job: YAML from a file, an environment variable or the bundled quickstart, dotted KEY=VALUE
overrides, and validation whose every problem is a one-line ConfigError naming the file, line and key."""

from __future__ import annotations

import importlib.resources
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from shoal.config.messages import friendly_error
from shoal.config.schema import JobConfig
from shoal.errors import ConfigError

QUICKSTART = "quickstart.yaml"


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job YAML (None = the bundled quickstart), apply KEY=VALUE overrides, validate."""
    source, text = _read(path)
    data, lines = _parse_yaml(text, source)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
        lines[key] = 0  # 0 = "from the command line", shown instead of a line number
    return validate(data, source=source, lines=lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> JobConfig:
    """Validate a plain dict (as saved in a run directory or a checkpoint)."""
    return validate(dict(data), source=source, lines={})


def replace(cfg: JobConfig, updates: dict[str, Any]) -> JobConfig:
    """A copy of cfg with dotted keys changed ({"run.dir": "/x"}), validated again."""
    data = cfg.to_dict()
    for key, value in updates.items():
        set_dotted(data, key, value)
    return validate(data, source="<replace>", lines={})


def parse_override(item: str) -> tuple[str, Any]:
    """Split 'a.b=value'; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def quickstart_path() -> Path:
    """The bundled default job (configs/quickstart.yaml in the repository)."""
    return Path(str(importlib.resources.files("shoal") / QUICKSTART))


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data[a][b] = value for key "a.b", making sections as needed."""
    parts = key.split(".")
    cur = data
    for i, part in enumerate(parts[:-1]):
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def validate(data: dict[str, Any], source: str, lines: dict[str, int]) -> JobConfig:
    """A JobConfig from data, or the first problem as a ConfigError at its line of source."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise friendly_error(e, source, lines) from None


def _read(path: str | Path | None) -> tuple[str, str]:
    if path is None:
        return QUICKSTART, quickstart_path().read_text()
    if isinstance(path, str) and path.startswith("env:"):  # `shoal submit` carries the config this way
        name = path[4:]
        if name not in os.environ:
            raise ConfigError(f"environment variable {name} is not set", source=path)
        return path, os.environ[name]
    p = Path(path)
    if not p.exists():
        raise ConfigError("file not found", source=str(path))
    if p.is_dir():
        raise ConfigError("is a directory, expected a YAML job file", source=str(path))
    try:
        return str(path), p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", source=str(path)) from None


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse YAML into a dict plus the line number of every dotted key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"YAML syntax error: {e.problem}", source=where) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}", source=source)
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines[dotted] = key_node.start_mark.line + 1
            _collect_lines(value_node, dotted + ".", lines)
