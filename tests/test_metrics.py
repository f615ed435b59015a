"""The run's record: metrics.jsonl as a resumed run rewrites it and as readers take it, torn last lines included."""

from __future__ import annotations

import json

from shoal.metrics import MetricsWriter, read_metrics


def test_a_torn_last_line_is_left_out_by_readers_and_by_a_resumed_run(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 4, "lo')  # rank 0 killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    writer = MetricsWriter(tmp_path, tensorboard=False, truncate_after_step=2)  # resumed from step 2
    writer.log({"step": 3, "loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]
