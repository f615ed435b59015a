"""The config reference in the README: markdown tables of every key, its default and its meaning,
generated from the schema (`shoal config-reference --update README.md`)."""

from __future__ import annotations

from typing import Any

import yaml

from shoal.config.schema import JobConfig
from shoal.config.section import Section

HEADER = "| key | default | meaning |\n|---|---|---|"


def config_reference() -> str:
    """One table of the top-level keys, then one per section."""
    out = [HEADER]
    out += [_row(name, field) for name, field in JobConfig.model_fields.items() if not _is_section(field.annotation)]
    for name, field in JobConfig.model_fields.items():
        if _is_section(field.annotation):
            out.append(f"\n**{name}**\n\n{HEADER}")
            out += [_row(f"{name}.{sub.alias or key}", sub) for key, sub in field.annotation.model_fields.items()]
    return "\n".join(out) + "\n"


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, Section)


def _row(key: str, field: Any) -> str:
    default = field.get_default(call_default_factory=True)
    shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
    if isinstance(default, tuple):
        shown = str(list(default))
    doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
    return f"| `{key}` | `{shown}` | {doc} |"
