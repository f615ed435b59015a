"""`shoal compare`: allreduce and async_ps on one budget; report in markdown, JSON and a plot."""

from __future__ import annotations

import json

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_compare_writes_all_three_reports_with_both_strategies(ray_cluster, tmp_path):
    proc = shoal_cli(
        "compare",
        str(QUICKSTART),
        *tiny_overrides(tmp_path / "run", **{"scaling.address": ray_cluster, "train.eval_every": 40}),
        "--budget",
        "40",
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "run" / "compare"
    report = json.loads((out / "report.json").read_text())
    assert set(report["strategies"]) == {"allreduce", "async_ps"}
    assert report["strategies"]["allreduce"]["steps"] == 40 and report["strategies"]["async_ps"]["steps"] == 80
    assert report["strategies"]["allreduce"]["samples"] == report["strategies"]["async_ps"]["samples"]
    md = (out / "report.md").read_text()
    assert "| allreduce |" in md and "| async_ps |" in md
    png = (out / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "| allreduce |" in proc.stdout
