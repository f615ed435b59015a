"""`shoal check CONFIG`: the data, loss, model and config mistakes that doom a run, found before it starts.

run() scans the job's data (check.data), probes its model on a sample (check.model), lints the config
(check.lints) and writes check/report.md, report.json and plots. The quick subset `shoal train` runs
before every job is check.task.before_run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.check.findings import Finding, problems
from shoal.check.lints import lint
from shoal.check.task import task_findings
from shoal.data.spec import DataSpec


@dataclass
class Result:
    findings: list[Finding]
    report: Path
    numbers: dict[str, Any]

    @property
    def exit_code(self) -> int:
        return 1 if problems(self.findings) else 0


def run(cfg: Any, out: Path, say: Any = print) -> Result:
    from shoal.check import data, model  # torch: `shoal train`'s driver loads this package
    from shoal.data.loaders import open_splits  # torch, as above

    start = time.perf_counter()
    train_src, val_src = open_splits(cfg)
    spec: DataSpec = train_src.spec
    say(
        f"[shoal] check: scanning {len(train_src):,} training and {len(val_src) if val_src else 0:,} validation samples"
    )
    scanned = data.scan(cfg, train_src, val_src, spec)
    scan_s = time.perf_counter() - start
    found, numbers = data.findings(scanned, spec, cfg)
    found += task_findings(cfg, spec)
    found += lint(cfg, scanned.train.samples)
    labels_ok = not any(f.kind in ("labels_out_of_range", "nonfinite_samples") for f in found)
    sx, sy = scanned.sample
    say(f"[shoal] check: probing the model on {min(len(sx), cfg.check.overfit_batch)} samples")
    probed = model.probe(cfg, spec, sx, sy, labels_ok)
    found += probed.findings
    base = model.baselines(spec, scanned.sample, scanned.val_sample) if labels_ok else {}
    numbers.update(model=probed.numbers, baselines=base, scan_seconds=scan_s, seconds=time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, scanned, probed)
    report = _write(out, cfg, found, numbers, probed.layers, plots)
    return Result(found, report, numbers)


def summary_lines(result: Result) -> list[str]:
    """The one-screen terminal summary: problems first, then notes, then where the report is."""
    from shoal.check.model import baseline_line  # torch, as in run

    bad = problems(result.findings)
    notes = [f for f in result.findings if f not in bad]
    n = result.numbers
    lines = [
        f"[shoal] check: {len(bad)} problem(s), {len(notes)} note(s); {n.get('train_samples', 0):,} training and "
        f"{n.get('val_samples', 0):,} validation samples in {n['seconds']:.1f} s"
    ]
    lines += [f"  PROBLEM {f.area}: {f.kind}: {f.message}\n          fix: {f.fix}" for f in bad]
    lines += [f"  note    {f.area}: {f.kind}: {f.message}" for f in notes]
    line = baseline_line(n.get("baselines", {}))
    if line:
        lines.append(f"  baselines: {line}")
    lines.append(f"[shoal] report: {result.report}")
    return lines


def _write(
    out: Path, cfg: Any, found: list[Finding], numbers: dict[str, Any], layers: list[dict], plots: list[Path]
) -> Path:
    doc = {
        "job": cfg.name,
        "problems": len(problems(found)),
        "findings": [f.as_dict() for f in found],
        "numbers": numbers,
        "layers": layers,
        "plots": [p.name for p in plots],
    }
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=_plain))
    lines = [f"# shoal check: {cfg.name}", ""]
    bad = problems(found)
    lines.append(f"**{len(bad)} problem(s)**, {len(found) - len(bad)} note(s).\n")
    for title, group in (("Problems", bad), ("Notes", [f for f in found if f not in bad])):
        if group:
            lines += [f"## {title}", "", "| area | finding | what | fix |", "|---|---|---|---|"]
            lines += [f"| {f.area} | {f.kind} | {_cell(f.message)} | {_cell(f.fix)} |" for f in group]
            lines.append("")
    feats = numbers.get("features")
    if feats:
        lines += [
            "## Input features (training split, every sample)",
            "",
            "| statistic | min | median | max |",
            "|---|---|---|---|",
        ]
        lines += [f"| {k} | {v['min']:.4g} | {v['median']:.4g} | {v['max']:.4g} |" for k, v in feats.items()]
        lines.append("")
    if numbers.get("baselines"):
        lines += ["## Baselines", ""] + [f"- {k}: {_fmt(v)}" for k, v in numbers["baselines"].items()] + [""]
    m = numbers.get("model", {})
    if m:
        lines += ["## Model on one batch", ""] + [f"- {k}: {_fmt(v)}" for k, v in m.items()] + [""]
    if layers:
        lines += ["| layer | grad norm | weight norm | activation std | dead ReLU share |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['layer']} | {_fmt(r.get('grad_norm'))} | {_fmt(r.get('weight_norm'))} | "
            f"{_fmt(r.get('activation_std'))} | {_fmt(r.get('dead'))} |"
            for r in layers
        ]
        lines.append("")
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def _plain(v: Any) -> Any:
    import numpy as np  # kept out of `shoal train`'s start-up, as matplotlib in _plots

    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    return str(v)


def _plots(out: Path, scanned: Any, probed: Any) -> list[Path]:
    import numpy as np  # numpy, matplotlib: kept out of `shoal train`'s start-up too

    from shoal import plots

    made = []
    feats = scanned.train.features()
    classes = scanned.train.classes
    if feats is not None or classes is not None:
        fig, ax = plots.figure(1, 2, (12, 4))
        if feats is not None:
            i = np.arange(len(feats["mean"]))
            a = ax[0][0]
            a.fill_between(i, feats["min"], feats["max"], alpha=0.2, label="min..max")
            a.errorbar(i, feats["mean"], yerr=feats["std"], fmt=".", ms=3, lw=0.6, label="mean +/- std")
            a.set_xlabel("input feature")
            a.set_title("input features (training split)")
            a.legend(fontsize=8)
        if classes is not None:
            a = ax[0][1]
            k = np.arange(len(classes))
            a.bar(k - 0.2, classes / max(1, classes.sum()), width=0.4, label="train")
            if scanned.val is not None and scanned.val.classes is not None:
                v = scanned.val.classes
                a.bar(k + 0.2, v / max(1, v.sum()), width=0.4, label="val")
            a.set_xlabel("class")
            a.set_ylabel("share of samples")
            a.set_title("class balance")
            a.legend(fontsize=8)
        made.append(plots.save(fig, out / "data.png"))
    if probed.layers or probed.overfit_curve:
        fig, ax = plots.figure(1, 2, (12, 4))
        rows = [r for r in probed.layers if r.get("grad_norm")]
        if rows:
            a = ax[0][0]
            a.bar(range(len(rows)), [r["grad_norm"] for r in rows])
            a.set_yscale("log")
            a.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=60, ha="right", fontsize=7)
            a.set_title("gradient norm per layer, first batch")
        if probed.overfit_curve:
            a = ax[0][1]
            a.plot(probed.overfit_curve)
            a.set_yscale("log")
            a.set_xlabel("step")
            a.set_ylabel("loss")
            a.set_title("overfit one batch")
        made.append(plots.save(fig, out / "model.png"))
    return made
