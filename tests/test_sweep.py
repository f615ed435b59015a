"""`shoal sweep`: a grid of config values x seeds, side by side on the cluster; table and plot."""

from __future__ import annotations

import json

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_sweep_runs_the_grid_with_seeds_and_writes_table_and_plot(ray_cluster, tmp_path, capsys):
    from shoal.cli import main

    proc = shoal_cli(
        "sweep",
        str(QUICKSTART),
        *tiny_overrides(
            tmp_path / "run", **{"scaling.address": ray_cluster, "train.max_steps": 30, "scaling.num_workers": 1}
        ),
        "--grid",
        "optim.lr=0.001,0.01",
        "--seeds",
        "2",
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "sweep" / "results.json").read_text())
    assert len(report["runs"]) == 4 and {r["seed"] for r in report["runs"]} == {0, 1}
    assert [r["label"] for r in report["table"]] == ["optim.lr=0.001", "optim.lr=0.01"]
    assert all(r["runs"] == 2 and "val_accuracy_std" in r for r in report["table"])
    assert "| optim.lr=0.01 | 2 |" in (tmp_path / "run" / "sweep" / "results.md").read_text()
    assert (tmp_path / "run" / "sweep" / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    # the comparison page: one row per configuration, the bar chart and every run's curve
    # the report and the refused grid in this process (the sweep above was the real command)
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert page.count("optim.lr=0.01") >= 2 and "per configuration" in page and page.count("seed 1") == 2
    capsys.readouterr()
    assert main(["sweep", str(QUICKSTART), "--grid", "optim.lr=0.1,-1"]) == 2 and "optim.lr" in capsys.readouterr().err
