"""`shoal doctor RUN_DIR`: a report (markdown and PNG plots) of a finished, failed or running job,
from the files it writes: metrics.jsonl, health.jsonl, summary.json."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from shoal.errors import ShoalError
from shoal.health import HEALTH_FILE
from shoal.health.detectors import REMEDIES
from shoal.metrics import RESIZE_COLUMNS, read_jsonl, read_metrics, resizes
from shoal.plots import figure, save
from shoal.rundir import METRICS, read_summary


def read_alerts(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / HEALTH_FILE)


def diagnose(run_dir: Path) -> Path:
    """Write RUN_DIR/doctor/report.md and its plots; returns the report's path."""
    if not (run_dir / METRICS).exists():
        raise ShoalError(f"{run_dir}: no {METRICS} here (is it a Shoal run directory?)")
    records = read_metrics(run_dir)
    alerts = read_alerts(run_dir)
    summary = read_summary(run_dir) or {"status": "running (no summary.json yet)"}
    out = run_dir / "doctor"
    out.mkdir(exist_ok=True)
    plots = _plots(records, out)
    (out / "report.md").write_text(_markdown(run_dir, summary, records, alerts, plots))
    return out / "report.md"


def _plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """The plots these records allow, written to `out`."""
    plots = (
        _plot_loss(records, out),
        _plot_lr(records, out),
        _plot_layers(records, out),
        _plot_stages(records, out),
        _plot_distributions(records, out),
        _plot_gns(records, out),
    )
    return [p for p in plots if p is not None]


def _markdown(
    run_dir: Path,
    summary: dict[str, Any],
    records: list[dict[str, Any]],
    alerts: list[dict[str, Any]],
    plots: list[Path],
) -> str:
    lines = [f"# Shoal doctor: {run_dir.name}", "", f"Status: **{summary.get('status')}**"]
    if summary.get("error"):
        lines.append(f"Error: `{summary['error']}`")
    lines += ["", "| figure | value |", "|---|---|", *_figure_rows(records)]
    lines += ["", "## Alerts", "", *_alert_sections(alerts)]
    lines += _resize_section(records)
    verdict = batch_verdict(records)
    if verdict:
        lines += ["## Batch size and gradient noise", "", verdict, ""]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    return "\n".join(lines)


def _resize_section(records: list[dict[str, Any]]) -> list[str]:
    """Elastic training: when the group shrank or grew, why, and what it cost."""
    rows = resizes(records)
    if not rows:
        return []
    cells = [" | ".join("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in r) for r in rows]
    head = ["| " + " | ".join(RESIZE_COLUMNS) + " |", "|" + "---|" * len(RESIZE_COLUMNS)]
    return ["## Workers (elastic resizes)", "", *head, *(f"| {c} |" for c in cells), ""]


def _figure_rows(records: list[dict[str, Any]]) -> list[str]:
    """The report's table rows: the last logged step's and the last evaluation's figures."""
    last = next((r for r in reversed(records) if "loss" in r), {})
    last_eval = next((r for r in reversed(records) if "val_loss" in r), {})
    rows = []
    for key, value in (
        ("last logged step", last.get("step")),
        ("training loss", last.get("loss")),
        ("validation loss", last_eval.get("val_loss")),
        ("validation accuracy", last_eval.get("val_accuracy")),
        ("samples/s", last.get("samples_per_s")),
        ("data wait share", last.get("data_wait")),
        ("skipped steps", last.get("skipped_steps")),
    ):
        if value is not None:
            rows.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    return rows


def _alert_sections(alerts: list[dict[str, Any]]) -> list[str]:
    """A section per kind of alert: how often, the first one's message, where, and the usual remedies."""
    if not alerts:
        return [
            "None: no vanishing or exploding gradients, NaN/Inf, divergence, plateau, overfitting or input-bound steps were seen."
        ]
    lines = []
    for kind in dict.fromkeys(a["kind"] for a in alerts):
        of_kind = [a for a in alerts if a["kind"] == kind]
        first = of_kind[0]
        lines += [f"### {kind} (x{len(of_kind)}, first at step {first['step']})", "", first["message"] + ".", ""]
        if first.get("where"):
            lines.append("Where: " + ", ".join(f"`{w}`" for w in first["where"][:8]))
        lines += ["Usual remedies: " + "; ".join(f"`{r}`" for r in REMEDIES.get(kind, [])), ""]
    return lines


FAR = 4.0  # a global batch this many times below or above the noise scale is far from it


BELOW = (
    " The batch is far below it: steps are noisy, and a larger batch would need proportionally fewer "
    "steps for almost the same samples (faster on more devices): raise data.batch_size or "
    "train.grad_accum_steps towards it, or set train.batch_ramp: auto."
)
ABOVE = (
    " The batch is far above it: past the critical batch each extra sample buys little progress per "
    "step, so samples (compute) are wasted: lower train.grad_accum_steps or data.batch_size towards it."
)


def batch_verdict(records: list[dict[str, Any]]) -> str | None:
    """The global batch against the measured gradient noise scale (the critical batch, McCandlish et al.)."""
    last = next((r for r in reversed(records) if isinstance(r.get("gns"), (int, float)) and "batch" in r), None)
    if last is None:
        return None
    gns, batch = float(last["gns"]), int(last["batch"])
    head = (
        f"At step {last['step']} the gradient noise scale (gns) is {gns:,.0f} samples and the global batch {batch:,}."
    )
    if batch * FAR < gns:
        return head + BELOW
    if batch > FAR * gns:
        return head + ABOVE
    return head + " The batch is near it: a good trade of time against samples."


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, finite values only (the doctor's plots and `shoal report`'s curves)."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def _plot_loss(records: list[dict[str, Any]], out: Path) -> Path | None:
    steps, loss = series(records, "loss")
    if not steps:
        return None
    fig, ax = figure(1, 1, (8, 4.5))
    ax[0][0].plot(steps, loss, label="training loss")
    vs, vl = series(records, "val_loss")
    if vs:
        ax[0][0].plot(vs, vl, "o-", label="validation loss")
    ax[0][0].set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    ax[0][0].legend()
    return save(fig, out / "loss.png")


def _plot_lr(records: list[dict[str, Any]], out: Path) -> Path | None:
    steps, lr = series(records, "lr")
    if not steps:
        return None
    fig, ax = figure(1, 1, (8, 3.5))
    ax[0][0].plot(steps, lr)
    ax[0][0].set(xlabel="step", ylabel="learning rate", title="learning rate")
    return save(fig, out / "lr.png")


def _plot_layers(records: list[dict[str, Any]], out: Path) -> Path | None:
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("grad_norm/")))
    if not keys:
        return None
    fig, ax = figure(1, 1, (9, 5))
    for k in keys:
        steps, v = series(records, k)
        ax[0][0].plot(steps, v, label=k.split("/", 1)[1])
    ax[0][0].set(xlabel="step", ylabel="gradient norm", yscale="log", title="gradient norm per layer")
    if len(keys) <= 12:
        ax[0][0].legend(fontsize=7)
    return save(fig, out / "grad_norms.png")


def _plot_stages(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Pipeline runs: each stage's compute time and measured bubble, against the theoretical bubble."""
    stages = sorted({int(k.split("/")[1]) for r in records for k in r if k.startswith("stage_busy_s/")})
    if not stages:
        return None
    busy = [sum(r.get(f"stage_busy_s/{s}", 0.0) for r in records) for s in stages]
    bubble = [_mean([r[f"bubble/{s}"] for r in records if f"bubble/{s}" in r]) for s in stages]
    theory = _mean([r["bubble_theory"] for r in records if "bubble_theory" in r])
    fig, ax = figure(1, 2, (10, 4))
    ax[0][0].bar([f"stage {s}" for s in stages], busy, color="tab:blue")
    ax[0][0].set(ylabel="compute seconds (logged steps)", title="time each stage computes")
    ax[0][1].bar([f"stage {s}" for s in stages], bubble, color="tab:orange", label="measured")
    ax[0][1].axhline(theory, color="black", linestyle="--", label=f"theory (P-1)/(M+P-1) = {theory:.2f}")
    ax[0][1].set(ylim=(0, 1), ylabel="share of the step waiting", title="pipeline bubble")
    ax[0][1].legend()
    return save(fig, out / "stages.png")


def _plot_distributions(records: list[dict[str, Any]], out: Path) -> Path | None:
    """health.histograms_every: each layer's weight and activation distribution over time (median, the 25-75%
    and 5-95% bands), from the quantiles in metrics.jsonl."""
    kinds = [
        k for k in ("weight", "activation", "grad") if any(key.startswith(f"dist_{k}/") for r in records for key in r)
    ]
    if not kinds:
        return None
    layers = {
        k: list(dict.fromkeys(key for r in records for key in r if key.startswith(f"dist_{k}/")))[:6] for k in kinds
    }
    cols = max(len(v) for v in layers.values())
    fig, ax = figure(len(kinds), cols, (3.2 * cols, 2.8 * len(kinds)))
    for i, kind in enumerate(kinds):
        for j, key in enumerate(layers[kind]):
            _plot_quantiles(ax[i][j], records, key)
        for j in range(len(layers[kind]), cols):
            ax[i][j].axis("off")
    ax[0][0].legend(fontsize=6)
    return save(fig, out / "distributions.png")


def _plot_quantiles(a: Any, records: list[dict[str, Any]], key: str) -> None:
    """One layer's distribution over time: the median and the 25-75% and 5-95% bands."""
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), list) and len(r[key]) == 7]
    steps = [s for s, _ in pts]
    q = list(zip(*[v for _, v in pts]))
    a.fill_between(steps, q[1], q[5], alpha=0.2, color="tab:blue", label="5-95%")
    a.fill_between(steps, q[2], q[4], alpha=0.4, color="tab:blue", label="25-75%")
    a.plot(steps, q[3], color="tab:blue", lw=1, label="median")
    a.set_title(key.removeprefix("dist_"), fontsize=8)
    a.tick_params(labelsize=7)


def _plot_gns(records: list[dict[str, Any]], out: Path) -> Path | None:
    steps, gns = series(records, "gns")
    if not steps:
        return None
    fig, ax = figure(1, 1, (8, 4))
    ax[0][0].plot(steps, gns, label="gradient noise scale (gns)")
    bs, batch = series(records, "batch")
    ax[0][0].plot(bs, batch, drawstyle="steps-post", label="global batch")
    ax[0][0].set(xlabel="step", ylabel="samples", yscale="log", title="critical batch (gns) and the batch used")
    ax[0][0].legend()
    return save(fig, out / "gns.png")


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0
