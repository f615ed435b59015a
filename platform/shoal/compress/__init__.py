"""`shoal compress RUN_DIR_OR_CHECKPOINT`: prune and/or quantise a trained model, optionally fine-tune the
pruned one with Shoal's own (distributed) training loop keeping its zeros, and measure every variant against
the original on the job's validation split. Each variant is written as a directory `shoal export` reads.

    compress/report.md, report.json, tradeoff.png
    compress/<variant>/model.pt + variant.json
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shoal import plots
from shoal.compress.measure import measure
from shoal.compress.prune import prune
from shoal.config import parse_override
from shoal.data.loaders import open_splits
from shoal.errors import ShoalError
from shoal.launcher import run as launch
from shoal.trained import VARIANT, Trained, load
from shoal.weights import quantize


@dataclass
class Options:
    sparsities: list[float]
    method: str = "unstructured"  # | structured
    scope: str = "global"  # | layer
    quantize: str | None = None  # dynamic | weight_only
    finetune_steps: int = 0
    overrides: list[str] | None = None  # for the fine-tune job (e.g. scaling.num_workers=2)


def run(source: Path, out: Path | None, opts: Options, say: Any = print) -> dict[str, Any]:
    trained = load(source)
    if out is None:
        out = _run_dir(trained.source) / "compress"
    _, val = open_splits(trained.cfg)
    if val is None or not len(val):
        raise ShoalError("shoal compress measures on the validation split, and this job has none (data.val_fraction)")
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"variant": "original", **measure(trained.model, trained.cfg, trained.spec, val)}]
    say(_line(rows[-1]))
    for s in opts.sparsities or ([0.0] if opts.quantize else []):
        rows += _variants(trained, val, s, out, opts, say)
    report = {"source": str(trained.source), "rows": rows}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(_markdown(report))
    report["plot"] = str(_plot(rows, out / "tradeoff.png"))
    return report


def _variants(trained: Trained, val: Any, s: float, out: Path, opts: Options, say: Any) -> list[dict[str, Any]]:
    """The variants at sparsity s: pruned, then fine-tuned and/or quantised; each saved and measured (its row)."""
    model = copy.deepcopy(trained.model)
    name = f"{opts.method}-{s:g}" if s else "dense"
    variant: dict[str, Any] = {"sparsity": s, "method": opts.method, "scope": opts.scope}
    prune(model, s, opts.method, opts.scope)
    rows = []
    if s:
        rows.append(_keep(out, name, model, trained, variant, val, say))
    if s and opts.finetune_steps:
        model = _finetune(out / name, trained, opts, say)
        name += f"-finetuned{opts.finetune_steps}"
        variant["finetune_steps"] = opts.finetune_steps
        rows.append(_keep(out, name, model, trained, variant, val, say))
    if opts.quantize:
        quantize(model, opts.quantize)
        name += f"-int8-{opts.quantize}"
        variant["quantize"] = opts.quantize
        rows.append(_keep(out, name, model, trained, variant, val, say))
    return rows


def _keep(
    out: Path, name: str, model: torch.nn.Module, trained: Trained, variant: dict[str, Any], val: Any, say: Any
) -> dict[str, Any]:
    """Saves a variant in out/name and measures it; returns its row."""
    _save(out / name, model, trained, variant)
    row = {"variant": name, **measure(model, trained.cfg, trained.spec, val), "path": str(out / name)}
    say(_line(row))
    return row


def _run_dir(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _save(where: Path, model: torch.nn.Module, trained: Trained, variant: dict[str, Any]) -> None:
    where.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), where / "model.pt")
    (where / VARIANT).write_text(json.dumps({"config": trained.cfg.to_dict(), "variant": variant}, indent=2))


def _finetune(pruned: Path, trained: Trained, opts: Options, say: Any) -> torch.nn.Module:
    """Train the pruned weights for a few steps with Shoal's own loop (any strategy, any launcher), zeros kept."""
    cfg = _finetune_config(pruned, trained, opts)
    say(
        f"[shoal] compress: fine-tuning {pruned.name} for {opts.finetune_steps} steps on {cfg.scaling.num_workers} rank(s)"
    )
    summary = launch(cfg)
    if summary.get("status") != "completed":
        raise ShoalError(f"shoal compress: the fine-tune ended {summary.get('status')}: {summary.get('error')}")
    return load(pruned / "finetune").model


def _finetune_config(pruned: Path, trained: Trained, opts: Options) -> Any:
    """The job, from the pruned weights with their zeros kept, for --finetune-steps in pruned/finetune."""
    updates = {
        "model.weights": str(pruned / "model.pt"),
        "model.keep_sparsity": True,
        "train.max_steps": opts.finetune_steps,
        "train.eval_every": 0,
        "schedule.warmup_steps": 0,
        "checkpoint.every_steps": None,
        "checkpoint.at_end": True,
        "run.dir": str(pruned / "finetune"),
        "run.overwrite": True,
    }
    return trained.cfg.replace({**updates, **dict(parse_override(o) for o in opts.overrides or [])})


def _line(row: dict[str, Any]) -> str:
    acc = f", accuracy {row['val_accuracy']:.2%}" if "val_accuracy" in row else ""
    return (
        f"[shoal] compress: {row['variant']}: loss {row['val_loss']:.4f}{acc}, {row['size_bytes'] / 1e3:,.0f} kB, "
        f"{row['nonzero']:,}/{row['parameters']:,} non-zero, {row['latency_ms']:.3f} ms at batch 1, "
        f"{row['samples_per_s']:,.0f} samples/s"
    )


def _markdown(report: dict[str, Any]) -> str:
    base = report["rows"][0]
    lines = [
        f"# shoal compress: {report['source']}",
        "",
        "Measured on the job's validation split, on the CPU (latency: median of 21 timings at batch 1; throughput: median "
        "of 7 at the job's batch).",
        "",
        "| variant | val loss | val accuracy | size kB | x smaller | non-zero | latency ms | samples/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [_table_row(r, base) for r in report["rows"]]
    lines += [
        "",
        "Unstructured zeros shrink the file only once compressed (zip) or stored sparse; they cut compute "
        "only with sparse kernels. Structured pruning and int8 change the dense size and speed directly.",
        "",
        "![tradeoff](tradeoff.png)",
    ]
    return "\n".join(lines) + "\n"


def _table_row(r: dict[str, Any], base: dict[str, Any]) -> str:
    acc = f"{r['val_accuracy']:.2%}" if "val_accuracy" in r else ""
    return (
        f"| {r['variant']} | {r['val_loss']:.4f} | {acc} | {r['size_bytes'] / 1e3:,.1f} | "
        f"{base['size_bytes'] / r['size_bytes']:.2f} | {r['nonzero']:,} / {r['parameters']:,} | "
        f"{r['latency_ms']:.3f} | {r['samples_per_s']:,.0f} |"
    )


def _plot(rows: list[dict[str, Any]], path: Path) -> Path:
    key = "val_accuracy" if "val_accuracy" in rows[0] else "val_loss"
    fig, ax = plots.figure(1, 2, (11, 4))
    for a, x, label in (
        (ax[0][0], "size_bytes", "size on disk (bytes)"),
        (ax[0][1], "latency_ms", "latency at batch 1 (ms)"),
    ):
        for r in rows:
            a.scatter(r[x], r[key])
            a.annotate(r["variant"], (r[x], r[key]), fontsize=7)
        a.set(xlabel=label, ylabel=key.replace("_", " "))
    ax[0][0].set_title("score against size")
    ax[0][1].set_title("score against latency")
    return plots.save(fig, path)
