"""`shoal lr-find`: a learning-rate range test on all the job's workers, its plot and suggestion."""

from __future__ import annotations

import json

from conftest import REPO, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"


def test_lr_find_suggests_a_rate_near_the_quickstarts(ray_cluster, tmp_path):
    proc = shoal_cli(
        "lr-find", str(QUICKSTART), *tiny_overrides(tmp_path / "run", **{"scaling.address": ray_cluster}), timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "run" / "lr-find" / "result.json").read_text())
    assert 3e-4 <= result["suggested_lr"] <= 3e-2  # the quickstart trains well at 3e-3
    assert (tmp_path / "run" / "lr-find" / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "lr-find" / "summary.json").read_text())["world_size"] == 2
