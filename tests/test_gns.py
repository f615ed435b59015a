"""The gradient noise scale measured during real 2-rank DDP training, against its true value."""

from __future__ import annotations

import torch

from shoal.config import JobConfig, config_from_dict
from shoal.data.memory import build_memory_data
from shoal.dist import WorldInfo
from shoal.engine import train
from shoal.job import build_job

from _ranks import spawn_ranks


def regression_cfg(**extra) -> JobConfig:
    return JobConfig().replace(
        {
            "data.dataset": "synthetic",
            "data.task": "regression",
            "data.input_shape": [8],
            "data.num_samples": 20000,
            "data.val_fraction": 0.0,
            "data.batch_size": 16,
            "model.target": "helpers:linear_regressor",
            "train.loss": "mse",
            "optim.name": "sgd",
            "optim.lr": 1e-12,  # the weights stay where they start: the true noise scale is fixed
            "train.max_steps": 300,
            "train.eval_every": 0,
            "train.gns_every": 1,
            "log.every": 300,
            "log.tensorboard": False,
            **extra,
        }
    )


def run_and_record(cfg_dict: dict) -> dict:
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from shoal import dist

    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    records: list[dict] = []
    train(job, records.append)
    weights = {k: v.clone() for k, v in job.bare_model.state_dict().items()}
    return {"records": records, "weights": weights}


def true_noise_scale(cfg: JobConfig, weights: dict) -> float:
    """tr(Sigma) / |G|^2 over every training sample, from the per-sample mse gradients 2 r (x, 1)."""
    data = build_memory_data(cfg.data, cfg.seed, "train")
    x, y = data.get_batch(torch.arange(len(data)).numpy())
    w, c = weights["1.weight"].double(), weights["1.bias"].double()
    r = x.double() @ w.T + c - y.double()
    per_sample = 2 * r * torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], dim=1)
    mean = per_sample.mean(0)
    trace = ((per_sample - mean) ** 2).sum(1).mean()
    return float(trace / mean.pow(2).sum())


def test_noise_scale_is_within_20_percent_of_the_truth_and_the_same_on_every_rank():
    cfg = regression_cfg()
    results = spawn_ranks(run_and_record, 2, cfg.to_dict(), timeout_s=180)
    last = [r["records"][-1] for r in results]
    assert last[0]["gns"] == last[1]["gns"]
    truth = true_noise_scale(cfg, results[0]["weights"])
    assert abs(last[0]["gns"] / truth - 1) < 0.2, (last[0]["gns"], truth)
    assert last[0]["batch"] == 32


def test_doctor_says_where_the_batch_stands_against_the_noise_scale():
    from shoal.health.doctor import batch_verdict

    assert batch_verdict([{"step": 10, "loss": 1.0}]) is None
    low = batch_verdict([{"step": 10, "gns": 4000.0, "batch": 64}])
    assert "far below" in low and "train.batch_ramp: auto" in low
    assert "far above" in batch_verdict([{"step": 10, "gns": 10.0, "batch": 256}])
    assert "near it" in batch_verdict([{"step": 10, "gns": 100.0, "batch": 64}])


def auto_ramp_cfg(log_every: int) -> JobConfig:
    return JobConfig().replace(
        {
            "data.batch_size": 4,
            "train.max_steps": 100,
            "train.eval_every": 0,
            "log.every": log_every,
            "log.tensorboard": False,
            "train.gns_every": 1,  # estimated every 10 steps (gns.ESTIMATE_STEPS)
            "train.batch_ramp": "auto",
            "optim.lr": 0.003,
        }
    )  # digits: a noise scale of about 40 samples, against a start batch of 8


def test_auto_ramp_grows_the_batch_on_two_ranks():
    """train.batch_ramp: auto follows the reduced estimate, identically on both ranks, within its bounds."""
    results = spawn_ranks(run_and_record, 2, auto_ramp_cfg(10).to_dict(), timeout_s=180)
    seen = [[(r["batch"], r["gns"]) for r in res["records"] if "gns" in r] for res in results]
    assert seen[0] == seen[1]
    batches = [b for b, _ in seen[0]]
    assert batches[0] == 8 and batches == sorted(batches) and 8 < batches[-1] <= 64
    # a log line every 10 steps shows each estimate, made at its step: the steps after it take
    # floor(gns / 8) micro-batches of 8, within bounds, never fewer than before
    for (b, gns), (nxt, _) in zip(seen[0], seen[0][1:]):
        assert nxt == max(b, min(64, 8 * int(gns // 8)))


def test_log_every_does_not_change_an_auto_ramped_run():
    """The ramp adapts when the noise scale is estimated, not at log lines: log.every 10 and 7 train alike."""
    runs = [spawn_ranks(run_and_record, 2, auto_ramp_cfg(n).to_dict(), timeout_s=180)[0] for n in (10, 7)]
    assert all(torch.equal(runs[0]["weights"][k], runs[1]["weights"][k]) for k in runs[0]["weights"])
    batch_at = [{r["step"]: r["batch"] for r in run["records"] if "batch" in r} for run in runs]
    assert batch_at[0][70] == batch_at[1][70] > 8 and batch_at[0][100] == batch_at[1][100]
