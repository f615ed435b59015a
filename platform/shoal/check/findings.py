"""A finding: what is wrong (or worth knowing), the numbers, and the config key or data step that fixes it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PROBLEM, NOTE = "problem", "note"  # problems fail `shoal check` (exit 1); notes are reported only


@dataclass
class Finding:
    kind: str  # e.g. unnormalised_inputs, leakage, adam_weight_decay
    area: str  # data | model | config
    message: str
    fix: str  # the config key and value, or the data step, that fixes it
    severity: str = PROBLEM
    numbers: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        tag = "" if self.severity == PROBLEM else " (note)"
        return f"{self.area}: {self.kind}{tag}: {self.message}; fix: {self.fix}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def problems(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == PROBLEM]


def notes(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity != PROBLEM]
