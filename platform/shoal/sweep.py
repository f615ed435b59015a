"""`shoal sweep`: a grid of config values x seeds, one run each (side by side where the cluster has
room), and a table and plot of the results."""

from __future__ import annotations

import functools
import itertools
import json
import statistics
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from shoal import cluster, launcher, rundir, tracking
from shoal.config import JobConfig, parse_override
from shoal.errors import ConfigError
from shoal.plots import figure, save

METRICS = ("val_loss", "val_accuracy", "train_loss", "samples_per_s", "wall_s")


def parse_grid(items: list[str]) -> list[tuple[str, list[Any]]]:
    """['optim.lr=0.01,0.1'] -> [('optim.lr', [0.01, 0.1])]."""
    grid = []
    for item in items:
        key, value = parse_override(item)
        raw = item.partition("=")[2]
        values = (
            [parse_override(f"{key}={v}")[1] for v in raw.split(",")]
            if isinstance(value, str) or "," in raw
            else [value]
        )
        if not values or any(v == "" for v in values):
            raise ConfigError(f"--grid {item!r}: expected KEY=V1,V2,...")
        grid.append((key, values))
    return grid


def combinations(cfg: JobConfig, grid: list[tuple[str, list[Any]]], seeds: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, overrides) for every grid point and seed; every one validated before anything runs."""
    out = []
    keys = [k for k, _ in grid]
    for values in itertools.product(*(v for _, v in grid)):
        point = dict(zip(keys, values))
        label = ",".join(f"{k}={v}" for k, v in point.items()) or "base"
        for s in range(seeds):
            updates = {**point, "seed": cfg.seed + s}
            cfg.replace(updates)  # a bad value fails here, before the first run
            out.append((label, updates))
    return out


def run(cfg: JobConfig, grid_items: list[str], seeds: int, parallel: int | None = None) -> dict[str, Any]:
    grid = parse_grid(grid_items)
    runs = combinations(cfg, grid, seeds)
    out = rundir.resolve(cfg) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    cfg = tracking.group(cfg, f"sweep {out.parent.name}")  # one parent run (MLflow) / group (W&B) for all
    conn = cluster.connect(cfg.scaling.address, cfg.scaling.dashboard, cfg.scaling.keep_alive_s)
    if conn.note:
        print(conn.note, flush=True)
    try:
        width = parallel or _room(cfg)
        print(f"[shoal] sweep: {len(runs)} runs, {width} at a time", flush=True)
        one = functools.partial(_one_run, cfg, out, len(runs))
        with ThreadPoolExecutor(max_workers=width) as pool:
            results = list(pool.map(one, enumerate(runs)))
    finally:
        conn.close()
    table = aggregate(results)
    report = {"grid": {k: v for k, v in grid}, "seeds": seeds, "runs": results, "table": table}
    _write_report(out, report)
    return report


def _write_report(out: Path, report: dict[str, Any]) -> None:
    """results.json, results.md and sweep.png in the sweep's folder."""
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "results.md").write_text(markdown(report["table"]) + "\n\n![sweep](sweep.png)\n")
    plot(out / "sweep.png", report["table"])


def _one_run(cfg: JobConfig, out: Path, total: int, i_run: tuple[int, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """Runs one grid point and seed in out/run-NNN; returns its row of results."""
    i, (label, updates) = i_run
    run_cfg = cfg.replace(
        {**updates, "run.dir": str(out / f"run-{i:03d}"), "run.overwrite": True, "log.progress": "none"}
    )
    summary = launcher.run(run_cfg, progress_stream=_Quiet())
    print(
        f"[shoal] sweep {i + 1}/{total} {label} seed={updates['seed']}: "
        + ", ".join(f"{m} {summary[m]:.4g}" for m in METRICS if isinstance(summary.get(m), float)),
        flush=True,
    )
    return {
        "label": label,
        "seed": updates["seed"],
        "run_dir": str(out / f"run-{i:03d}"),
        **{m: summary.get(m) for m in METRICS},
    }


def _room(cfg: JobConfig) -> int:
    """How many runs fit side by side in the cluster."""
    import ray  # kept out of the CLI start-up: ray loads once the sweep has a cluster

    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int(cpus // (cfg.scaling.num_workers * cfg.scaling.cpus_per_worker)))


class _Quiet:
    """Progress stream for runs side by side: only the sweep's own lines are printed."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over seeds for each grid point."""
    rows = []
    for label in dict.fromkeys(r["label"] for r in results):
        group = [r for r in results if r["label"] == label]
        row: dict[str, Any] = {"label": label, "runs": len(group)}
        for m in METRICS:
            vals = [r[m] for r in group if isinstance(r.get(m), float)]
            if vals:
                row[m] = statistics.fmean(vals)
                row[f"{m}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def markdown(table: list[dict[str, Any]]) -> str:
    cols = [m for m in METRICS if any(m in r for r in table)]
    lines = ["| config | runs | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in table:
        cells = [f"{r[m]:.4g} +- {r[m + '_std']:.2g}" if m in r else "-" for m in cols]
        lines.append(f"| {r['label']} | {r['runs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: Path, table: list[dict[str, Any]]) -> None:
    metric = "val_accuracy" if any("val_accuracy" in r for r in table) else "val_loss"
    fig, ax = figure(1, 1, (max(6, 1.4 * len(table)), 4.5))
    labels = [r["label"] for r in table]
    ax[0][0].bar(
        range(len(table)),
        [r.get(metric, 0.0) for r in table],
        yerr=[r.get(f"{metric}_std", 0.0) for r in table],
        capsize=4,
    )
    ax[0][0].set_xticks(range(len(table)), labels, rotation=20, ha="right", fontsize=8)
    ax[0][0].set(ylabel=metric, title=f"{metric} per configuration (mean +- std over seeds)")
    save(fig, path)
