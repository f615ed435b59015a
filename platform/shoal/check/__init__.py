"""`shoal check CONFIG`: the data, loss, model and config mistakes that doom a run, found before it starts.

run() scans the job's data (check.data) and finds what is wrong with it (check.data_findings), probes its
model on a sample (check.model), lints the config (check.lints) and writes check/report.md, report.json and
plots (check.figures). The quick subset `shoal train` runs before every job is check.task.before_run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shoal.check.findings import Finding, notes, problems
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
    from shoal.check import data  # torch: `shoal train`'s driver loads this package
    from shoal.data.loaders import open_splits  # torch, as above

    start = time.perf_counter()
    train_src, val_src = open_splits(cfg)
    say(
        f"[shoal] check: scanning {len(train_src):,} training and {len(val_src) if val_src else 0:,} validation samples"
    )
    spec: DataSpec = train_src.spec
    scanned = data.scan(cfg, train_src, val_src, spec)
    scan_s = time.perf_counter() - start
    found, numbers = _data_and_config_findings(cfg, scanned, spec)
    names = (getattr(train_src, "manifest", None) or {}).get("classes")
    if names:
        numbers["class_names"] = list(names)
    probed, base = _model_findings(cfg, spec, scanned, _labels_ok(found), say)
    found += probed.findings
    noise = _label_noise(cfg, spec, scanned, names, say) if _labels_ok(found) else None
    thumbs: list = []
    if noise is not None:
        found += [noise[0]] if noise[0] is not None else []
        numbers["label_noise"], thumbs = noise[1], noise[2]
    numbers.update(model=probed.numbers, baselines=base, scan_seconds=scan_s, seconds=time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(out, scanned, probed, thumbs if noise is not None and noise[0] is not None else [])
    return Result(found, _write(out, cfg, found, numbers, probed.layers, plots), numbers)


def _data_and_config_findings(cfg: Any, scanned: Any, spec: DataSpec) -> tuple[list[Finding], dict[str, Any]]:
    from shoal.check.data_findings import findings  # torch, as in run

    found, numbers = findings(scanned, spec, cfg)
    return found + task_findings(cfg, spec) + lint(cfg, scanned.train.samples), numbers


def _labels_ok(found: list[Finding]) -> bool:
    """Whether the loss can be computed on the samples (the model probes and baselines need it)."""
    return not any(f.kind in ("labels_out_of_range", "nonfinite_samples") for f in found)


def _model_findings(cfg: Any, spec: DataSpec, scanned: Any, labels_ok: bool, say: Any) -> tuple[Any, dict[str, Any]]:
    """The model probes' report, and the baselines (none when the labels are unusable)."""
    from shoal.check import model  # torch, as in run

    sx, sy = scanned.sample
    say(f"[shoal] check: probing the model on {min(len(sx), cfg.check.overfit_batch)} samples")
    probed = model.probe(cfg, spec, sx, sy, labels_ok)
    base = model.baselines(spec, scanned.sample, scanned.val_sample) if labels_ok else {}
    return probed, base


def _label_noise(
    cfg: Any, spec: DataSpec, scanned: Any, names: Any, say: Any
) -> tuple[Finding | None, dict, list] | None:
    """Confident learning on the training sample (classification): K-fold logistic regression on the
    standardised features (images of raw pixels alike), or on the bag of tokens of rows of token ids."""
    from shoal.check import labels  # sklearn, as the baselines

    x, y = scanned.sample
    if spec.task != "classification" or len(x) < 2 * labels.FOLDS:
        return None
    keep = labels.spread(len(x))
    inputs = "bag of tokens (TF-IDF)" if spec.token_ids else "features"
    say(f"[shoal] check: estimating label noise on {len(keep):,} samples ({labels.FOLDS}-fold, {inputs})")
    start = time.perf_counter()
    rows, ys = x[keep].reshape(len(keep), -1).numpy(), y[keep].numpy().astype("int64")
    places = [scanned.train.places[i] for i in keep] if len(scanned.train.places) == len(x) else []
    if spec.token_ids:
        bag = labels.bag_of_tokens(rows.astype("int64"), spec.pad_id)
        probs = labels.out_of_sample(bag, ys, spec.num_classes, cfg.seed, grid=labels.TEXT_REGULARISATION)
    else:
        probs = labels.out_of_sample(rows.astype("float64"), ys, spec.num_classes, cfg.seed)
    if probs is None:
        return None
    noise = labels.estimate(probs, ys)
    found = labels.finding(noise, cfg.check.label_noise_threshold, names)
    report = {**labels.report(noise, places, names, ys), "inputs": inputs, "seconds": time.perf_counter() - start}
    images = len(spec.input_shape) == 3
    thumbs = [(x[keep[r]].numpy(), report["suspects"][i]) for i, (r, _, _) in enumerate(noise.suspects[:20])]
    return found, report, thumbs if images else []


def summary_lines(result: Result) -> list[str]:
    """The one-screen terminal summary: problems first, then notes, then where the report is."""
    from shoal.check.model import baseline_line  # torch, as in run

    bad, rest = problems(result.findings), notes(result.findings)
    n = result.numbers
    lines = [
        f"[shoal] check: {len(bad)} problem(s), {len(rest)} note(s); {n.get('train_samples', 0):,} training and "
        f"{n.get('val_samples', 0):,} validation samples in {n['seconds']:.1f} s"
    ]
    lines += [f"  PROBLEM {f.area}: {f.kind}: {f.message}\n          fix: {f.fix}" for f in bad]
    lines += [f"  note    {f.area}: {f.kind}: {f.message}" for f in rest]
    if n.get("class_names"):
        lines.append(f"  classes: {class_line(n['class_names'], n.get('classes'))}")
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
    (out / "report.md").write_text("\n".join(_markdown(cfg.name, found, numbers, layers, plots)) + "\n")
    return out / "report.md"


def _markdown(
    name: str, found: list[Finding], numbers: dict[str, Any], layers: list[dict], plots: list[Path]
) -> list[str]:
    """report.md's lines: the findings, then the numbers behind them, then the figures."""
    lines = [f"# shoal check: {name}", ""]
    lines.append(f"**{len(problems(found))} problem(s)**, {len(notes(found))} note(s).\n")
    lines += _findings_table("Problems", problems(found)) + _findings_table("Notes", notes(found))
    lines += _classes_table(numbers.get("class_names"), numbers.get("classes"))
    lines += _features_table(numbers.get("features"))
    lines += _listed("Baselines", numbers.get("baselines"))
    lines += _suspects(numbers.get("label_noise"))
    lines += _listed("Model on one batch", numbers.get("model", {}))
    lines += _layers_table(layers)
    return lines + [f"![{p.stem}]({p.name})" for p in plots]


def _suspects(noise: dict[str, Any] | None) -> list[str]:
    from shoal.check.labels import markdown  # sklearn, as in _label_noise

    return markdown(noise) if noise else []


def _findings_table(title: str, group: list[Finding]) -> list[str]:
    if not group:
        return []
    lines = [f"## {title}", "", "| area | finding | what | fix |", "|---|---|---|---|"]
    lines += [f"| {f.area} | {f.kind} | {_cell(f.message)} | {_cell(f.fix)} |" for f in group]
    return lines + [""]


def class_line(names: list[str], counts: list[int] | None, shown: int = 12) -> str:
    """'0 cat (312), 1 dog (300), ...': the class ids by name, with their training counts when scanned."""
    parts = [
        f"{i} {name}" + (f" ({counts[i]:,})" if counts and i < len(counts) else "") for i, name in enumerate(names)
    ]
    more = f", ... ({len(names) - shown} more)" if len(names) > shown else ""
    return ", ".join(parts[:shown]) + more


def _classes_table(names: list[str] | None, counts: list[int] | None) -> list[str]:
    if not names:
        return []
    lines = ["## Classes (training split)", "", "| id | name | samples |", "|---|---|---|"]
    lines += [
        f"| {i} | {_cell(str(name))} | {counts[i] if counts and i < len(counts) else ''} |"
        for i, name in enumerate(names)
    ]
    return lines + [""]


def _features_table(feats: dict[str, dict[str, float]] | None) -> list[str]:
    if not feats:
        return []
    lines = [
        "## Input features (training split, every sample)",
        "",
        "| statistic | min | median | max |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['min']:.4g} | {v['median']:.4g} | {v['max']:.4g} |" for k, v in feats.items()]
    return lines + [""]


def _listed(title: str, values: dict[str, Any] | None) -> list[str]:
    if not values:
        return []
    return [f"## {title}", ""] + [f"- {k}: {_fmt(v)}" for k, v in values.items()] + [""]


def _layers_table(layers: list[dict]) -> list[str]:
    if not layers:
        return []
    lines = ["| layer | grad norm | weight norm | activation std | dead ReLU share |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['layer']} | {_fmt(r.get('grad_norm'))} | {_fmt(r.get('weight_norm'))} | "
        f"{_fmt(r.get('activation_std'))} | {_fmt(r.get('dead'))} |"
        for r in layers
    ]
    return lines + [""]


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


def _plots(out: Path, scanned: Any, probed: Any, thumbs: list) -> list[Path]:
    from shoal.check.figures import figures  # numpy, matplotlib: kept out of `shoal train`'s start-up too

    return figures(out, scanned, probed, thumbs)
