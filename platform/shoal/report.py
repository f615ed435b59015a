"""`shoal report RUN_DIR`: one self-contained HTML page a person opens to see a run (no network needed to
view it): summary, curves, alerts with their remedies, check findings, throughput and memory, checkpoints
and the config. A run directory holding a sweep or a comparison gets the comparison page instead.

Plots are plotly's (its JavaScript bundle is inlined, so the page works offline) when plotly is installed
(`pip install 'shoal[report]'`), and the doctor's PNGs embedded as data URIs otherwise.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import yaml

from shoal.errors import ShoalError
from shoal.health.doctor import diagnose, read_alerts, series
from shoal.metrics import RESIZE_COLUMNS, read_metrics, resizes
from shoal.rundir import CONFIG, METRICS, read_summary

CURVES = [  # (title, metric keys, log scale)
    ("loss", ["loss", "val_loss"], True),
    ("accuracy", ["val_accuracy"], False),
    ("learning rate", ["lr"], False),
    ("gradient norm", ["grad_norm"], True),
    ("throughput (samples/s)", ["samples_per_s"], False),
    ("memory (MiB, rank 0 peak)", ["mem_mb"], False),
    ("gradient noise scale and batch", ["gns", "batch"], True),
]


def write(run_dir: Path) -> Path:
    """RUN_DIR/report.html (a sweep's or comparison's page when the directory holds one)."""
    run_dir = run_dir.resolve()
    if (run_dir / "sweep" / "results.json").exists():
        page = _sweep_page(run_dir)
    elif (run_dir / "compare" / "report.json").exists():
        page = _compare_page(run_dir)
    elif (run_dir / METRICS).exists():
        page = _run_page(run_dir)
    else:
        raise ShoalError(f"{run_dir}: no {METRICS}, sweep or comparison here (is it a Shoal run directory?)")
    out = run_dir / "report.html"
    out.write_text(page)
    return out


# ---------------------------------------------------------------- pages


def _run_page(run_dir: Path) -> str:
    records = read_metrics(run_dir)
    summary = read_summary(run_dir) or {"status": "running (no summary.json yet)"}
    plots = Plots()
    curves = [plots.lines(title, {k: series(records, k) for k in keys}, log) for title, keys, log in CURVES]
    body = [
        f"<h1>Shoal run: {_e(summary.get('name') or run_dir.name)}</h1>",
        _summary_table(summary),
        "<h2>Curves</h2>",
        "<div class='grid'>" + "".join(c for c in curves if c) + "</div>",
        "<h2>Alerts</h2>",
        _alerts(read_alerts(run_dir)),
        "<h2>Check findings</h2>",
        _findings(run_dir / "check" / "report.json"),
        _classes(run_dir),
        _resizes(records),
        "<h2>Throughput and memory</h2>",
        _throughput(summary),
        "<h2>Checkpoints</h2>",
        _checkpoints(run_dir / "checkpoints"),
        "<h2>Config</h2>",
        f"<pre id='config'>{_e((run_dir / CONFIG).read_text()) if (run_dir / CONFIG).exists() else ''}</pre>",
    ]
    if not plots.interactive:
        body.insert(3, _doctor_pngs(run_dir))
    return _page(f"Shoal: {run_dir.name}", body, plots)


def _sweep_page(run_dir: Path) -> str:
    report = json.loads((run_dir / "sweep" / "results.json").read_text())
    table = report["table"]
    plots = Plots()
    metric = "val_accuracy" if any("val_accuracy" in r for r in table) else "val_loss"
    bars = plots.bars(
        f"{metric} per configuration (mean +- std over seeds)",
        [r["label"] for r in table],
        [r.get(metric, 0.0) for r in table],
        [r.get(f"{metric}_std", 0.0) for r in table],
    )
    curves = {
        f"{r['label']} seed {r['seed']}": series(read_metrics(Path(r["run_dir"])), "loss") for r in report["runs"]
    }
    cols = sorted({k for r in table for k in r if k not in ("label", "runs")})
    rows = [[r["label"], r["runs"], *[r.get(c) for c in cols]] for r in table]
    body = [
        f"<h1>Shoal sweep: {_e(run_dir.name)}</h1>",
        _table(["config", "runs", *cols], rows, "results"),
        "<div class='grid'>" + bars + plots.lines("training loss of every run", curves, True) + "</div>",
    ]
    return _page(f"Shoal sweep: {run_dir.name}", body, plots)


def _compare_page(run_dir: Path) -> str:
    report = json.loads((run_dir / "compare" / "report.json").read_text())
    rows_ = report["strategies"]
    plots = Plots()
    by_time = {}
    for name in rows_:
        recs = read_metrics(run_dir / "compare" / name)
        pts = [(r["elapsed_s"], r["loss"]) for r in recs if isinstance(r.get("loss"), float) and "elapsed_s" in r]
        by_time[name] = ([t for t, _ in pts], [v for _, v in pts])
    cols = ["samples_per_s", "updates_per_s", "train_loss", "val_loss", "val_accuracy", "time_to_target_s"]
    body = [
        f"<h1>Shoal compare: {_e(run_dir.name)}</h1>",
        f"<p>Budget {_e(str(report['budget']))}; target loss {_fmt(report['target_loss'])}.</p>",
        _table(["strategy", *cols], [[n, *[r.get(c) for c in cols]] for n, r in rows_.items()], "results"),
        "<div class='grid'>" + plots.lines("training loss against time (s)", by_time, True) + "</div>",
    ]
    return _page(f"Shoal compare: {run_dir.name}", body, plots)


# ---------------------------------------------------------------- pieces


class Plots:
    """Plotly figures as divs (the bundle inlined once per page), or nothing when plotly is missing."""

    def __init__(self) -> None:
        try:
            import plotly.graph_objects as go  # an optional extra (shoal[report])
        except ImportError:
            self.go = None
        else:
            self.go = go
        self.count = 0

    @property
    def interactive(self) -> bool:
        return self.go is not None

    def script(self) -> str:
        if self.go is None:
            return ""
        from plotly.offline import get_plotlyjs  # optional, as in __init__

        return f"<script>{get_plotlyjs()}</script>"

    def _div(self, fig: Any) -> str:
        self.count += 1
        fig.update_layout(height=320, margin={"l": 50, "r": 10, "t": 40, "b": 40}, template="plotly_white")
        return (
            "<div class='plot'>"
            + fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"plot{self.count}")
            + "</div>"
        )

    def lines(self, title: str, series: dict[str, tuple[list[float], list[float]]], log: bool) -> str:
        series = {k: v for k, v in series.items() if v[0]}
        if self.go is None or not series:
            return ""
        fig = self.go.Figure([self.go.Scatter(x=x, y=y, mode="lines+markers", name=k) for k, (x, y) in series.items()])
        fig.update_layout(title=title, yaxis_type="log" if log else "linear", xaxis_title="step")
        return self._div(fig)

    def bars(self, title: str, labels: list[str], values: list[float], errors: list[float]) -> str:
        if self.go is None:
            return ""
        fig = self.go.Figure([self.go.Bar(x=labels, y=values, error_y={"type": "data", "array": errors})])
        fig.update_layout(title=title)
        return self._div(fig)


def _summary_table(summary: dict[str, Any]) -> str:
    keys = [
        "status",
        "steps",
        "samples",
        "epochs",
        "wall_s",
        "samples_per_s",
        "world_size",
        "strategy",
        "train_loss",
        "val_loss",
        "val_accuracy",
        "skipped_steps",
        "resumed_from",
        "error",
    ]
    return _table(["figure", "value"], [[k, summary[k]] for k in keys if k in summary], "summary")


def _alerts(alerts: list[dict[str, Any]]) -> str:
    if not alerts:
        return "<p id='alerts'>None: no vanishing or exploding gradients, NaN/Inf, divergence, plateau, overfitting or input-bound steps.</p>"
    items = []
    for a in alerts:
        remedies = "; ".join(a.get("remedies", []))
        items.append(
            f"<li class='alert'><b>{_e(a['kind'])}</b> at step {a['step']}: {_e(a['message'])}"
            f"<br><span class='fix'>Remedies: {_e(remedies)}</span></li>"
        )
    return "<ul id='alerts'>" + "".join(items) + "</ul>"


def _findings(path: Path) -> str:
    if not path.exists():
        return "<p id='findings'>No check report (run <code>shoal check CONFIG</code> with this run directory).</p>"
    doc = json.loads(path.read_text())
    findings = doc["findings"]
    if not findings:
        return "<p id='findings'>`shoal check` found nothing wrong.</p>"
    items = [
        f"<li class='finding {f['severity']}'><b>{_e(f['area'])}: {_e(f['kind'])}</b>: {_e(f['message'])}"
        f"<br><span class='fix'>Fix: {_e(f['fix'])}</span></li>"
        for f in findings
    ]
    return "<ul id='findings'>" + "".join(items) + "</ul>" + _suspects(doc.get("numbers", {}).get("label_noise"))


def _suspects(noise: dict[str, Any] | None) -> str:
    """The label-noise suspects `shoal check` listed (the first 20), when it found label noise."""
    if not noise or not noise.get("suspects"):
        return ""
    rows = "".join(
        f"<tr><td>{_e(str(s['at']))}</td><td>{_e(str(s.get('given', '')))}</td><td>{_e(str(s['likely']))}</td>"
        f"<td>{s['self_confidence']:.3f}</td></tr>"
        for s in noise["suspects"][:20]
    )
    head = "<tr><th>sample</th><th>given</th><th>likely</th><th>confidence in the given label</th></tr>"
    return f"<table id='suspects'><caption>Suspected wrong labels</caption>{head}{rows}</table>"


def _classes(run_dir: Path) -> str:
    """The class names the shards' manifest keeps (string labels, image folders), with the check's counts."""
    names, counts = _class_names(run_dir), None
    check = run_dir / "check" / "report.json"
    if check.exists():
        numbers = json.loads(check.read_text()).get("numbers", {})
        names, counts = numbers.get("class_names") or names, numbers.get("classes")
    if not names:
        return ""
    rows = [[i, name, counts[i] if counts and i < len(counts) else ""] for i, name in enumerate(names)]
    return "<h2>Classes</h2>" + _table(["id", "name", "training samples"], rows, "classes")


def _class_names(run_dir: Path) -> list[str] | None:
    """From the run's config: data.path's manifest, local or in s3:// (when it can be read from here)."""
    from shoal.config import DataConfig
    from shoal.data.spec import readable_manifest

    try:
        cfg = yaml.safe_load((run_dir / CONFIG).read_text()) or {}
        manifest = readable_manifest(DataConfig(**(cfg.get("data") or {})))
    except (ShoalError, OSError, ValueError, yaml.YAMLError, AttributeError, TypeError):
        return None  # no manifest, an old config, or storage out of reach: the report goes without names
    return (manifest or {}).get("classes")


def _throughput(summary: dict[str, Any]) -> str:
    rows = [[k, summary[k]] for k in ("samples_per_s", "wall_s", "data_skipped_samples") if k in summary]
    memory = summary.get("memory") or {}
    for k, per_rank in memory.items():
        rows.append([f"{k} per rank", ", ".join(_fmt(v) for v in per_rank) if isinstance(per_rank, list) else per_rank])
    return _table(["figure", "value"], rows, "throughput")


def _checkpoints(path: Path) -> str:
    if not path.is_dir():
        return "<p id='checkpoints'>None.</p>"
    rows = []
    for d in sorted(p for p in path.iterdir() if p.is_dir() and (p / "meta.json").exists()):
        meta = json.loads((d / "meta.json").read_text())
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        rows.append([d.name, meta.get("step"), f"{size / 2**20:.2f} MiB", meta.get("val_loss", "")])
    return _table(["checkpoint", "step", "size", "val_loss"], rows, "checkpoints")


def _doctor_pngs(run_dir: Path) -> str:
    diagnose(run_dir)
    imgs = []
    for png in sorted((run_dir / "doctor").glob("*.png")):
        data = base64.b64encode(png.read_bytes()).decode()
        imgs.append(f"<img class='plot' alt='{png.stem}' src='data:image/png;base64,{data}'>")
    return "<div class='grid'>" + "".join(imgs) + "</div>"


def _resizes(records: list[dict[str, Any]]) -> str:
    """Elastic training's resizes (none: nothing shown)."""
    rows = resizes(records)
    if not rows:
        return ""
    return "<h2>Workers (elastic resizes)</h2>" + _table(RESIZE_COLUMNS, rows, "resizes")


def _table(headers: list[str], rows: list[list[Any]], table_id: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table id='{table_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _e(text: str) -> str:
    return html.escape(str(text))


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; } td, th { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f3f3f3; text-align: left; } .grid { display: flex; flex-wrap: wrap; gap: 12px; }
.plot { width: 600px; } pre { background: #f7f7f7; padding: 1em; overflow: auto; max-height: 30em; }
.alert, .finding { margin-bottom: 0.6em; } .fix { color: #25613a; } .finding.note { color: #555; }
"""


def _page(title: str, body: list[str], plots: Plots) -> str:
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{STYLE}</style>{plots.script()}</head><body>{''.join(body)}</body></html>\n"
    )
