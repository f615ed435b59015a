"""User code named in the config as "package.module:attr": found without running it, imported where it runs.

The driver only *locates* a target (the module's file exists and defines the name), so a model
module that imports torch, or does anything at import time, runs in the ranks alone. The ranks
*import* it; every failure on either side is a ConfigError naming the config key.
"""

from __future__ import annotations

import ast
import importlib
import importlib.machinery
import sys
from pathlib import Path
from typing import Any

from shoal.errors import ConfigError


def import_object(target: str, key: str) -> Any:
    """The object "package.module:attr" names (attr may be dotted), imported now."""
    module_name, _, attr = target.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:  # the user's module may fail in any way while importing
        raise ConfigError(f"cannot import {target!r}: {type(e).__name__}: {e}", key=key) from None
    if not callable(obj):
        raise ConfigError(f"{target!r} is not callable", key=key)
    return obj


def locate_object(target: str, key: str) -> Path | None:
    """Check that "package.module:attr" can be found, without executing any of its code.

    Returns the module's source file (None for built-in or compiled modules, which are trusted to
    define what they define). Raises ConfigError when the module cannot be found or its source
    defines no such top-level name.
    """
    module_name, _, attr = target.partition(":")
    origin = _find_module(module_name, target, key)
    if origin is None or origin.suffix != ".py":
        return origin
    try:
        tree = ast.parse(origin.read_bytes(), filename=str(origin))
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"cannot read {target!r} ({origin}): {type(e).__name__}: {e}", key=key) from None
    names, open_ended = _top_level_names(tree)
    first = attr.split(".")[0]
    if first not in names and not open_ended:
        shown = ", ".join(sorted(n for n in names if not n.startswith("_"))[:10])
        raise ConfigError(
            f"cannot import {target!r}: module {module_name!r} ({origin}) defines no {first!r} (it has: {shown})",
            key=key,
        )
    return origin


def _find_module(module_name: str, target: str, key: str) -> Path | None:
    """The module's file, found part by part along sys.path without importing its packages."""
    if module_name in sys.modules:
        spec = getattr(sys.modules[module_name], "__spec__", None)
        return Path(spec.origin) if spec is not None and spec.origin and Path(spec.origin).exists() else None
    search: list[str] | None = None
    spec = None
    parts = module_name.split(".")
    for i in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), search)
        if spec is None:
            if i == 0 and parts[0] in sys.builtin_module_names:
                return None
            missing = ".".join(parts[: i + 1])
            raise ConfigError(
                f"cannot import {target!r}: no module named {missing!r} on the Python path (is its folder the current one?)",
                key=key,
            )
        search = list(spec.submodule_search_locations or [])
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen", "namespace"):
        return None
    return Path(spec.origin)


def _top_level_names(tree: ast.Module) -> tuple[set[str], bool]:
    """Names a module binds at top level (also inside top-level if/try blocks); open-ended when it
    uses `from x import *` or a module __getattr__."""
    names: set[str] = set()
    open_ended = False
    stack: list[ast.stmt] = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name))
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*":
                    open_ended = True
                names.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            stack.extend(node.body)
            stack.extend(getattr(node, "orelse", []))
            stack.extend(getattr(node, "finalbody", []))
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)
    return names, open_ended or "__getattr__" in names
