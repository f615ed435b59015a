"""House rules the package keeps as it grows: short functions, modules of one size, imports that run one way.

Measured with the standard library's ast over platform/shoal: every function's length in lines (decorators
excluded, docstring included), every module's length, and every import between the package's units (a
top-level module, or a subpackage taken whole), lazy imports inside functions included, since those are
where a cycle hides.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "platform" / "shoal"

# The package's units, lowest first. A unit may import from its own layer and the layers below it, never from
# one above. New modules are placed here when they land.
LAYERS = [
    {"errors", "imports", "progress", "signals", "startup", "plots", "toolchain"},  # no Shoal imports of their own
    {"config"},  # the typed job and its rules
    {
        "dist",
        "raynode",
        "keeper",
        "cluster",
        "rundir",
        "dcp",
        "state",
        "weights",
        "checkpoint",
        "snapshot",
        "metrics",
        "precision",
    },
    {"data", "hf", "model_io", "models", "losses", "optim", "batch", "gns", "health", "trained", "report", "tracking"},
    {"strategies"},
    {"job", "check", "preflight", "batchfind", "export"},
    {"engine"},
    {"run", "worker", "ps", "controller"},
    {"launcher", "submit", "k8s", "compare", "compress", "lrfind", "sweep"},  # commands that run jobs
    {"cli", "__main__"},
]


def modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def functions() -> list[tuple[int, str]]:
    out = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                out.append((node.end_lineno - node.lineno + 1, f"{name}:{node.lineno} {node.name}"))
    return sorted(out)


def unit_of(dotted: str) -> str | None:
    """shoal.a.b -> a (a module or subpackage of the package); None outside it."""
    parts = dotted.split(".")
    if parts[0] != "shoal" or len(parts) < 2:
        return None
    return parts[1]


def imports() -> dict[str, set[str]]:
    """unit -> the units it imports (absolute imports; the package uses no relative ones)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, tree in modules().items():
        here = Path(name).parts[0].removesuffix(".py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for unit in {unit_of(t) for t in targets} - {None, here}:
                if (PACKAGE / unit).is_dir() or (PACKAGE / f"{unit}.py").exists():
                    edges[here].add(unit)
    return edges


def layer_of(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_functions_are_short():
    lengths = functions()
    p90 = lengths[int(0.9 * len(lengths))][0]
    assert p90 <= 20, f"function length p90 is {p90} lines (at most 20)"
    long = [f"{where} ({n} lines)" for n, where in lengths if n > 80]
    assert not long, f"functions over 80 lines: {long}"


def test_the_training_loop_reads_in_one_screen():
    tree = ast.parse((PACKAGE / "engine.py").read_text())
    train = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 40


def test_no_module_is_over_600_lines():
    long = {n: len((PACKAGE / n).read_text().splitlines()) for n in modules()}
    assert not {n: k for n, k in long.items() if k > 600}


def test_every_unit_has_a_layer():
    units = {Path(n).parts[0].removesuffix(".py") for n in modules()} - {"__init__"}
    placed = set().union(*LAYERS)
    assert units <= placed, f"place these in LAYERS: {sorted(units - placed)}"
    assert placed <= units, f"LAYERS names units that are gone: {sorted(placed - units)}"


def test_imports_run_downwards_only():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
        for a, targets in sorted(imports().items())
        for b in sorted(targets)
        if layer_of(b) > layer_of(a)
    ]
    assert not upward, upward


def test_no_import_cycle():
    edges = imports()

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and (seen.add(nxt) or reaches(nxt, goal, seen))):
                return True
        return False

    cycles = sorted(a for a in edges if reaches(a, a, set()))
    assert not cycles, f"units on an import cycle: {cycles}"
