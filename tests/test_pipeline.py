"""Pipeline stages on real gloo ranks: the numbers of one rank training the same samples (GPipe, 1F1B,
interleaved), 2 stages x 2 replicas with allreduce and with fsdp, a NaN in one piece on stage 0,
exact resume, resume into another layout, export, the bubble and the split, and bad layouts."""

from __future__ import annotations

import json

import pytest
import torch

from shoal.config import JobConfig, config_from_dict
from shoal.errors import ConfigError

from _ranks import spawn_ranks
from conftest import REPO, TINY_LM, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
MLP = {
    "data.dataset": "synthetic",
    "data.num_samples": 805,
    "data.input_shape": [12],
    "data.num_classes": 4,
    "model.width": 16,
    "model.depth": 3,
}
LM = {**TINY_LM, "model.depth": 3, "model.tie_embeddings": False}


def cfg(model: dict, **updates) -> JobConfig:
    base = {
        **model,
        "optim.name": "sgd",
        "optim.lr": 0.1,
        "optim.momentum": 0.9,
        "train.eval_every": 0,
        "log.tensorboard": False,
        "train.clip_grad_norm": 0.5,
        "data.batch_size": 8,
    }
    return JobConfig().replace({**base, **updates})


def steps(cfg_dict: dict, n: int, poison: bool = False) -> dict:
    """n steps on this rank: the global loss, grad norm and stepped flag of each, the evaluation, the params."""
    import math

    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.engine import evaluate, train_step
    from shoal.job import build_job

    c = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job = build_job(c, world, torch.device("cpu"))
    if poison:
        stream = job.data.train

        def batches():
            for i, (x, y) in enumerate(stream):
                if i == 2 and job.strategy.stage == 0:  # step 2's first micro-batch, only where stage 0 reads it
                    x = x.clone()
                    x[1, 0] = math.nan
                yield x, y

        job.data.train = batches()
    out = []
    for _ in range(n):
        r = train_step(job)
        total, count = dist.all_sum(
            torch.stack([r.loss_sum, torch.tensor(float(r.count), dtype=torch.float64)])
        ).tolist()
        out.append((total / count, float(r.grad_norm), r.stepped))
    params = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in job.bare_model.state_dict().items()
    }
    return {"steps": out, "eval": evaluate(job), "params": params, "figures": job.strategy.log_figures()}


def merged(ranks: list[dict]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for r in ranks:
        out.update(r["params"])
    return out


@pytest.mark.parametrize("model", ["mlp", "transformer_lm"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_with_accumulation_equal_one_rank(model, schedule):
    shape = MLP if model == "mlp" else LM
    n = 3
    pp = spawn_ranks(
        steps,
        2,
        cfg(
            shape, **{"parallel.pipeline_stages": 2, "parallel.schedule": schedule, "train.grad_accum_steps": 2}
        ).to_dict(),
        n,
    )
    ref = steps(cfg(shape, **{"data.batch_size": 16}).to_dict(), n)
    for (a, na, sa), (b, nb, sb) in zip(pp[0]["steps"], ref["steps"]):
        assert a == pytest.approx(b, rel=1e-5) and na == pytest.approx(nb, rel=1e-5) and sa and sb
    assert pp[0]["eval"] == pytest.approx(ref["eval"], rel=1e-6) and pp[1]["eval"] == pp[0]["eval"]
    whole = merged(pp)
    assert whole.keys() == ref["params"].keys()  # the stages hold every layer once, under its own name
    assert not set(pp[0]["params"]) & set(pp[1]["params"])
    for k, v in ref["params"].items():
        assert torch.allclose(whole[k], v, atol=1e-5, rtol=0), f"{k}: {(whole[k] - v).abs().max():.3g}"


def test_interleaved_schedule_equals_one_rank():
    pp = spawn_ranks(
        steps, 2, cfg(MLP, **{"parallel.pipeline_stages": 2, "parallel.schedule": "interleaved_1f1b"}).to_dict(), 3
    )
    ref = steps(cfg(MLP).to_dict(), 3)
    assert [s[0] for s in pp[0]["steps"]] == pytest.approx([s[0] for s in ref["steps"]], rel=1e-5)
    whole = merged(pp)
    assert all(torch.allclose(whole[k], v, atol=1e-5, rtol=0) for k, v in ref["params"].items())


@pytest.mark.parametrize("strategy", ["allreduce", "fsdp"])
def test_two_stages_by_two_replicas_equal_one_rank(strategy):
    pp = spawn_ranks(
        steps,
        4,
        cfg(MLP, **{"strategy": strategy, "parallel.pipeline_stages": 2, "parallel.microbatches": 2}).to_dict(),
        3,
        timeout_s=180,
    )
    ref = steps(cfg(MLP, **{"data.batch_size": 16}).to_dict(), 3)
    assert [s[0] for s in pp[0]["steps"]] == pytest.approx([s[0] for s in ref["steps"]], rel=1e-5)
    whole = {}
    for r in pp[:2]:  # replica 0's two stages
        whole.update(r["params"])
    for k, v in ref["params"].items():
        assert torch.allclose(whole[k], v, atol=1e-5, rtol=0), k


def test_a_nan_in_one_piece_on_stage_0_skips_the_step_everywhere():
    pp = spawn_ranks(
        steps,
        2,
        cfg(MLP, **{"parallel.pipeline_stages": 2, "train.grad_accum_steps": 2}).to_dict(),
        3,
        True,
        timeout_s=90,
    )
    assert [[s[2] for s in r["steps"]] for r in pp] == [[True, False, True]] * 2
    assert all(torch.isfinite(v).all() for r in pp for v in r["params"].values())


def test_the_bubble_is_measured_next_to_the_theory():
    pp = spawn_ranks(steps, 2, cfg(MLP, **{"parallel.pipeline_stages": 2, "parallel.microbatches": 4}).to_dict(), 2)
    f = pp[0]["figures"]
    assert f["bubble_theory"] == pytest.approx(1 / 5)  # (P-1)/(M+P-1) with P=2, M=4
    assert 0 <= f["bubble/0"] <= 1 and 0 <= f["bubble/1"] <= 1 and f["stage_busy_s/0"] > 0 and f["stage_busy_s/1"] > 0


def run_worker_on_rank(cfg_dict: dict, resume: bool = False) -> dict:
    from shoal.worker import run_worker

    return run_worker(config_from_dict(cfg_dict), resume=resume)


def job(run_dir, **updates) -> dict:
    base = {
        **MLP,
        "parallel.pipeline_stages": 2,
        "data.batch_size": 8,
        "optim.name": "adamw",
        "optim.lr": 0.01,
        "train.max_steps": 30,
        "train.eval_every": 15,
        "log.every": 5,
        "log.tensorboard": False,
        "checkpoint.every_steps": 15,
        "health.every": 5,
        "run.dir": str(run_dir),
    }
    return JobConfig().replace({**base, **updates}).to_dict()


def test_resume_is_exact_at_the_same_layout_and_export_holds_every_stage(tmp_path):
    from shoal.checkpoint import export, find_latest

    a = spawn_ranks(run_worker_on_rank, 2, job(tmp_path / "a"))
    assert a[0]["status"] == "completed" and a[0]["steps"] == 30
    spawn_ranks(run_worker_on_rank, 2, job(tmp_path / "b", **{"train.max_steps": 15}))
    b = spawn_ranks(run_worker_on_rank, 2, job(tmp_path / "b"), True)
    assert b[0]["resumed_from"].endswith("step-000015")
    export(find_latest(tmp_path / "a"), tmp_path / "a.pt")
    export(find_latest(tmp_path / "b"), tmp_path / "b.pt")
    wa, wb = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    from shoal.data.spec import DataSpec
    from shoal.models import build_model

    model = build_model(
        config_from_dict(job(tmp_path)).model, DataSpec(task="classification", input_shape=(12,), num_classes=4), 4
    )
    model.load_state_dict(wa)  # the whole model, every stage's layers
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert all("bubble" in r and "bubble_theory" in r and "stage_busy_s/1" in r for r in logged)
    # alerts and measurements name every layer by its full name, whatever stage holds it
    assert {"grad_norm/layers.0.linear", "grad_norm/layers.2.linear", "grad_norm/head"} <= set(logged[0])


def test_a_pipeline_checkpoint_resumes_without_stages_and_with_another_split(tmp_path):
    spawn_ranks(run_worker_on_rank, 2, job(tmp_path / "run", **{"train.max_steps": 15}))
    one = run_worker_on_rank(
        job(tmp_path / "run", **{"parallel.pipeline_stages": 1, "data.batch_size": 8, "train.max_steps": 20}), True
    )
    assert one["resumed_from"].endswith("step-000015") and one["steps"] == 20 and one["world_size"] == 1
    other = spawn_ranks(
        run_worker_on_rank,
        2,
        job(tmp_path / "run", **{"parallel.split_points": ["layers.1"], "train.max_steps": 25}),
        True,
    )
    assert other[0]["resumed_from"].endswith("step-000020") and other[0]["steps"] == 25


def test_the_split_is_printed_at_start(tmp_path):
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "shoal",
        "worker",
        str(QUICKSTART),
        *tiny_overrides(tmp_path / "run", **{"parallel.pipeline_stages": 2, "train.max_steps": 20, "model.depth": 3}),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr
    assert (
        "pipeline stage 0 (rank 0 of each replica): layers.0" in out
        and "pipeline stage 1 (rank 1 of each replica):" in out
    )
    assert "head" in out.split("pipeline stage 1")[1].splitlines()[0]


def test_balance_minimises_the_heaviest_stage():
    from shoal.strategies.pipeline import balance

    assert balance([1, 1, 1, 1], 2) == [0, 2]
    assert balance([10, 1, 1, 1, 1, 10], 2) == [0, 3]
    assert balance([5, 1, 1, 1], 3) == [0, 1, 3] or balance([5, 1, 1, 1], 3) == [0, 1, 2]
    with pytest.raises(ConfigError, match="parallel.pipeline_stages: 3 stages for a model of 2 layers/blocks"):
        balance([1, 1], 3)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            {"parallel.pipeline_stages": 2, "parallel.microbatches": 3},
            "parallel.microbatches: 3 must divide data.batch_size=32",
        ),
        ({"parallel.pipeline_stages": 3}, "parallel.pipeline_stages: 3 must divide scaling.num_workers=2"),
        (
            {"parallel.pipeline_stages": 2, "strategy": "async_ps"},
            "parallel.pipeline_stages: pipelines need synchronous training",
        ),
    ],
)
def test_bad_layouts_fail_before_anything_starts(tmp_path, overrides, needle):
    proc = shoal_cli(
        "train", str(QUICKSTART), *tiny_overrides(tmp_path / "run", **overrides), env={"RAY_ADDRESS": None}
    )
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"parallel.split_points": ["layers.9"]}, "parallel.split_points: ['layers.9'] name no layer"),
        (
            {"model.depth": 1, "parallel.schedule": "interleaved_1f1b"},
            "parallel.pipeline_stages: 4 stages for a model of 2 layers/blocks",
        ),
        (
            {"model.name": "transformer_lm", "data.dataset": "synthetic", "data.task": "lm"},
            "model.tie_embeddings: a tied output projection",
        ),
    ],
)
def test_bad_splits_are_config_errors_within_seconds(ray_cluster, tmp_path, overrides, needle):
    proc = shoal_cli(
        "train",
        str(QUICKSTART),
        *tiny_overrides(
            tmp_path / "run", **{"scaling.address": ray_cluster, "parallel.pipeline_stages": 2, **overrides}
        ),
    )
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert needle in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
