"""Pydantic's validation errors as one line a user can act on: file[:line]: key: what is allowed (got what)."""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from shoal.config.schema import JobConfig
from shoal.errors import ConfigError

BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def friendly_error(exc: ValidationError, source: str, lines: dict[str, int]) -> ConfigError:
    """The first validation error, naming the file, the line (0: the command line) and the key."""
    errors = exc.errors(include_url=False)
    loc = [str(p) for p in errors[0]["loc"] if not isinstance(p, int)]
    key, msg = _describe(errors[0], loc)
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    line = _line_of(key, lines)
    where = f"{source}:{line}" if line else f"{source} (command line)" if line == 0 else source
    return ConfigError(msg, key=key or None, source=where)


def _describe(err: Any, loc: list[str]) -> tuple[str, str]:
    """(key, message) for one pydantic error."""
    key, kind, got = ".".join(loc), err["type"], err.get("input")
    if kind == "value_error":
        return _own_message(str(err["msg"]), key)
    if kind == "extra_forbidden":
        return key, "unknown key" + _did_you_mean(loc)
    if kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        return key, f"must be one of {allowed.replace(' or ', ', ')} (got {got!r})"
    if kind in BOUNDS:
        bound = next(iter(err.get("ctx", {}).values()), "?")
        return key, f"must be {BOUNDS[kind]} {bound} (got {got!r})"
    if kind == "missing":
        return key, "is required"
    if kind == "string_pattern_mismatch":
        return key, f"must match {err['ctx']['pattern']} (got {got!r})"
    return key, f"{err['msg'].lower()} (got {got!r})"


def _own_message(msg: str, key: str) -> tuple[str, str]:
    """Our own validators write "key: message"; they carry the key they are about."""
    msg = msg.removeprefix("Value error, ")
    if re.match(r"^[\w.]+: ", msg):
        key, _, msg = msg.partition(": ")
    return key, msg


def _line_of(key: str, lines: dict[str, int]) -> int | None:
    parts = key.split(".")
    while parts:
        if ".".join(parts) in lines:
            return lines[".".join(parts)]
        parts.pop()
    return None


def _did_you_mean(loc: list[str]) -> str:
    """' (did you mean 'optim.lr'?)' from the fields of the section that holds the bad key."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    prefix = ".".join(loc[:-1])
    if close:
        return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    return f"; allowed in {prefix or 'the top level'}: {', '.join(names)}"
