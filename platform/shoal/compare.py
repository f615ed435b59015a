"""`shoal compare`: the same job with synchronous AllReduce and with an asynchronous parameter
server, on the same resources and budget; a report in markdown, JSON and a PNG plot."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shoal import cluster, launcher, rundir, tracking
from shoal.config import JobConfig
from shoal.errors import ConfigError
from shoal.metrics import read_metrics
from shoal.plots import figure, save

STRATEGIES = ("allreduce", "async_ps")


def parse_budget(text: str) -> tuple[str, float]:
    """'300' or '300steps' -> ('steps', 300); '90s' -> ('seconds', 90)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|seconds|steps?)?\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--budget: expected STEPS (e.g. 300) or SECONDS (e.g. 60s), got {text!r}")
    unit = m.group(2) or "steps"
    return (
        ("seconds", float(m.group(1)))
        if unit.startswith("s") and not unit.startswith("step")
        else ("steps", float(m.group(1)))
    )


def run_both(cfg: JobConfig, budget: str, target_loss: float | None = None) -> dict[str, Any]:
    """Train once per strategy under run.dir/compare/<strategy>; write and return the report."""
    kind, amount = parse_budget(budget)
    base = rundir.resolve(cfg)
    out = base / "compare"
    if out.exists() and any(out.iterdir()) and not cfg.run.overwrite:
        raise ConfigError(
            f"{out} already holds a comparison; choose another run.dir or set run.overwrite=true", key="run.dir"
        )
    out.mkdir(parents=True, exist_ok=True)

    cfg = tracking.group(cfg, f"compare {base.name}")  # both strategies under one parent run / group
    conn = cluster.connect(cfg.scaling.address, cfg.scaling.dashboard, cfg.scaling.keep_alive_s)
    if conn.note:
        print(conn.note, flush=True)
    runs: dict[str, dict[str, Any]] = {}
    try:
        for strategy in STRATEGIES:
            updates: dict[str, Any] = {"strategy": strategy, "run.dir": str(out / strategy), "run.overwrite": True}
            if kind == "steps":
                # one async update carries one worker's batches: the same number of samples needs N x as many
                steps = int(amount) * (cfg.scaling.num_workers if strategy == "async_ps" else 1)
                updates["train.max_steps"] = steps
            else:
                updates.update({"train.max_time_s": amount, "train.max_steps": 10**9})
            print(f"[shoal] compare: {strategy}", flush=True)
            summary = launcher.run(cfg.replace(updates))
            runs[strategy] = {"summary": summary, "metrics": read_metrics(out / strategy)}
    finally:
        conn.close()
    report = build_report(runs, target_loss, budget)
    write_report(out, report, runs)
    return report


def _time_to(records: list[dict[str, Any]], target: float) -> float | None:
    for r in records:
        if isinstance(r.get("loss"), float) and r["loss"] <= target:
            return r.get("elapsed_s")
    return None


def build_report(runs: dict[str, dict[str, Any]], target_loss: float | None, budget: str) -> dict[str, Any]:
    """Figures per strategy: throughput, final losses, time to a target loss, staleness."""
    finals = [r["summary"].get("train_loss") for r in runs.values()]
    if target_loss is None:
        finite = [f for f in finals if isinstance(f, float) and f == f]
        target_loss = max(finite) if finite else float("nan")
    rows = {}
    for name, r in runs.items():
        s = r["summary"]
        rows[name] = {
            "steps": s.get("steps"),
            "samples": s.get("samples"),
            "wall_s": s.get("wall_s"),
            "samples_per_s": s.get("samples_per_s"),
            "updates_per_s": s.get("updates_per_s", (s.get("steps") or 0) / max(s.get("wall_s") or 1, 1e-9)),
            "train_loss": s.get("train_loss"),
            "val_loss": s.get("val_loss"),
            "val_accuracy": s.get("val_accuracy"),
            "time_to_target_s": _time_to(r["metrics"], target_loss),
            "staleness_mean": s.get("staleness_mean", 0.0),
            "staleness_p99": s.get("staleness_p99", 0.0),
            "staleness_histogram": s.get("staleness_histogram", {}),
        }
    return {"budget": budget, "target_loss": target_loss, "strategies": rows}


def table(report: dict[str, Any]) -> str:
    cols = [
        "strategy",
        "steps",
        "samples",
        "wall_s",
        "samples_per_s",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "time_to_target_s",
        "staleness_mean",
        "staleness_p99",
    ]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, row in report["strategies"].items():
        cells = [name] + [_fmt(row.get(c)) for c in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def write_report(out: Path, report: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    plot(out / "report.png", report, runs)
    md = [
        f"# Shoal compare: allreduce vs async_ps (budget {report['budget']})",
        "",
        table(report),
        "",
        f"Time to target: seconds of training until the logged training loss first reaches {report['target_loss']:.4f} "
        "(by default the worse of the two final losses).",
        "Steps are optimizer updates: one AllReduce step uses every worker's batch, one async update one worker's.",
        "",
        "![loss and throughput](report.png)",
        "",
    ]
    (out / "report.md").write_text("\n".join(md))


def plot(path: Path, report: dict[str, Any], runs: dict[str, dict[str, Any]]) -> Path:
    fig, ax = figure(2, 2)
    for name, r in runs.items():
        recs = [x for x in r["metrics"] if isinstance(x.get("loss"), float)]
        ax[0][0].plot([x.get("elapsed_s", 0) for x in recs], [x["loss"] for x in recs], label=name)
        ax[0][1].plot([x["samples"] for x in recs], [x["loss"] for x in recs], label=name)
    ax[0][0].set(title="training loss vs wall time", xlabel="seconds", ylabel="loss", yscale="log")
    ax[0][1].set(title="training loss vs samples seen", xlabel="samples", ylabel="loss", yscale="log")
    names = list(report["strategies"])
    ax[1][0].bar(
        names, [report["strategies"][n]["samples_per_s"] or 0 for n in names], color=["tab:blue", "tab:orange"]
    )
    ax[1][0].set(title="throughput", ylabel="samples/s")
    hist = report["strategies"].get("async_ps", {}).get("staleness_histogram", {})
    ax[1][1].bar([int(k) for k in hist], list(hist.values()), color="tab:orange")
    ax[1][1].set(title="async_ps staleness of applied updates", xlabel="versions behind", ylabel="updates")
    for a in (ax[0][0], ax[0][1]):
        a.legend()
    return save(fig, path)
