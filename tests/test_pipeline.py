"""Pipeline stages on real gloo ranks: the numbers of one rank training the same samples (GPipe, 1F1B,
interleaved), 2 stages x 2 replicas with allreduce and with fsdp, a NaN in one piece on stage 0,
exact resume, resume into another layout, export, the bubble and the split, and bad layouts."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

from shoal.config import JobConfig, config_from_dict
from shoal.errors import ConfigError

from _ranks import spawn_ranks, spawn_sequence
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
    figures = job.strategy.log_figures() if job.strategy.log_figures else {}
    split = getattr(job.strategy, "split", None)  # [(stage, its pieces' names, its parameters)]
    return {"steps": out, "eval": evaluate(job), "params": params, "figures": figures, "split": split}


def one_rank(cfg_dict: dict, n: int) -> dict:
    """steps() in this process, once per config (several tests compare against the same one-rank run)."""
    return _one_rank(json.dumps(cfg_dict, sort_keys=True), n)


@functools.cache
def _one_rank(cfg_json: str, n: int) -> dict:
    return steps(json.loads(cfg_json), n)


SLOW_HEAD = {**MLP, "model.target": "helpers:slow_head_mlp"}
TOWER = {**MLP, "model.target": "helpers:tower", "parallel.split_fn": "helpers:tower_split"}
NESTED = {**MLP, "model.target": "helpers:nested_sequential"}


def shared_calls() -> dict[str, tuple]:
    """Every short 2-rank training of this file's tests: one spawned group runs them all, one after another."""
    calls: dict[str, tuple] = {}
    for model, shape in (("mlp", MLP), ("transformer_lm", LM)):
        for schedule in ("gpipe", "1f1b"):
            layout = {"parallel.pipeline_stages": 2, "parallel.schedule": schedule, "train.grad_accum_steps": 2}
            calls[f"{model}-{schedule}"] = (steps, (cfg(shape, **layout).to_dict(), 3))
    interleaved = {"parallel.pipeline_stages": 2, "parallel.schedule": "interleaved_1f1b"}
    calls["interleaved"] = (steps, (cfg(MLP, **interleaved).to_dict(), 3))
    poisoned = cfg(MLP, **{"parallel.pipeline_stages": 2, "train.grad_accum_steps": 2})
    calls["nan"] = (steps, (poisoned.to_dict(), 3, True))
    calls["bubble"] = (steps, (cfg(MLP, **{"parallel.pipeline_stages": 2, "parallel.microbatches": 4}).to_dict(), 2))
    calls["by_params"] = (steps, (cfg(SLOW_HEAD, **{"parallel.pipeline_stages": 2}).to_dict(), 1))
    by_time = {"parallel.pipeline_stages": 2, "parallel.balance": "time"}
    calls["by_time"] = (steps, (cfg(SLOW_HEAD, **by_time).to_dict(), 2))
    calls["tower"] = (steps, (cfg(TOWER, **{"parallel.pipeline_stages": 2}).to_dict(), 3))
    calls["nested"] = (steps, (cfg(NESTED, **{"parallel.pipeline_stages": 2}).to_dict(), 3))
    return calls


@pytest.fixture(scope="module")
def trained() -> dict[str, list[dict]]:
    """Each shared_calls run's results in rank order, by name."""
    calls = shared_calls()
    return dict(zip(calls, spawn_sequence(list(calls.values()), 2, timeout_s=600), strict=True))


@pytest.fixture(scope="module")
def replicated() -> dict[str, list[dict]]:
    """2 stages x 2 replicas on 4 ranks, under each strategy (one spawned group for both)."""
    strategies = ("allreduce", "fsdp")
    layout = {"parallel.pipeline_stages": 2, "parallel.microbatches": 2}
    calls = [(steps, (cfg(MLP, **{"strategy": s, **layout}).to_dict(), 3)) for s in strategies]
    return dict(zip(strategies, spawn_sequence(calls, 4, timeout_s=360), strict=True))


def merged(ranks: list[dict]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for r in ranks:
        out.update(r["params"])
    return out


@pytest.mark.parametrize("model", ["mlp", "transformer_lm"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_two_stages_with_accumulation_equal_one_rank(model, schedule, trained):
    shape = MLP if model == "mlp" else LM
    n = 3
    pp = trained[f"{model}-{schedule}"]
    ref = one_rank(cfg(shape, **{"data.batch_size": 16}).to_dict(), n)
    for (a, na, sa), (b, nb, sb) in zip(pp[0]["steps"], ref["steps"]):
        assert a == pytest.approx(b, rel=1e-5) and na == pytest.approx(nb, rel=1e-5) and sa and sb
    assert pp[0]["eval"] == pytest.approx(ref["eval"], rel=1e-6) and pp[1]["eval"] == pp[0]["eval"]
    whole = merged(pp)
    assert whole.keys() == ref["params"].keys()  # the stages hold every layer once, under its own name
    assert not set(pp[0]["params"]) & set(pp[1]["params"])
    for k, v in ref["params"].items():
        assert torch.allclose(whole[k], v, atol=1e-5, rtol=0), f"{k}: {(whole[k] - v).abs().max():.3g}"


def test_interleaved_schedule_equals_one_rank(trained):
    pp = trained["interleaved"]
    ref = one_rank(cfg(MLP).to_dict(), 3)
    assert [s[0] for s in pp[0]["steps"]] == pytest.approx([s[0] for s in ref["steps"]], rel=1e-5)
    whole = merged(pp)
    assert all(torch.allclose(whole[k], v, atol=1e-5, rtol=0) for k, v in ref["params"].items())


@pytest.mark.parametrize("strategy", ["allreduce", "fsdp"])
def test_two_stages_by_two_replicas_equal_one_rank(strategy, replicated):
    pp = replicated[strategy]
    ref = one_rank(cfg(MLP, **{"data.batch_size": 16}).to_dict(), 3)
    assert [s[0] for s in pp[0]["steps"]] == pytest.approx([s[0] for s in ref["steps"]], rel=1e-5)
    whole = {}
    for r in pp[:2]:  # replica 0's two stages
        whole.update(r["params"])
    for k, v in ref["params"].items():
        assert torch.allclose(whole[k], v, atol=1e-5, rtol=0), k


def test_a_nan_in_one_piece_on_stage_0_skips_the_step_everywhere(trained):
    pp = trained["nan"]  # a hang fails the shared group's spawn (its timeout)
    assert [[s[2] for s in r["steps"]] for r in pp] == [[True, False, True]] * 2
    assert all(torch.isfinite(v).all() for r in pp for v in r["params"].values())


def test_the_bubble_is_measured_next_to_the_theory(trained):
    pp = trained["bubble"]
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


def doctor_job(run_dir: Path) -> dict:
    # a head that sleeps 2 ms a forward on stage 1 (split by parameters): stage 1 computes longer, stage 0 waits
    return job(
        run_dir,
        **{
            "model.target": "helpers:slow_head_mlp",
            "model.kwargs": {"sleep_s": 0.002},
            "train.max_steps": 10,
            "train.eval_every": 0,
            "checkpoint.every_steps": None,
        },
    )


@pytest.fixture(scope="module")
def worker_runs(tmp_path_factory) -> tuple[Path, dict[str, list[dict]]]:
    """The 2-rank whole runs of this file, one after another on one spawned group: their root directory (a run
    directory each, by name) and each run's summaries in rank order, by name."""
    root = tmp_path_factory.mktemp("pipeline-runs")
    runs = {
        "a": (job(root / "a"),),
        "b-15": (job(root / "b", **{"train.max_steps": 15}),),
        "b": (job(root / "b"), True),
        "split-15": (job(root / "split", **{"train.max_steps": 15}),),
        "doctor": (doctor_job(root / "doctor"),),
    }
    summaries = spawn_sequence([(run_worker_on_rank, args) for args in runs.values()], 2, timeout_s=480)
    return root, dict(zip(runs, summaries, strict=True))


def test_resume_is_exact_at_the_same_layout_and_export_holds_every_stage(tmp_path, worker_runs):
    from shoal.checkpoint import export, find_latest

    root, summaries = worker_runs
    a, b = summaries["a"], summaries["b"]
    assert a[0]["status"] == "completed" and a[0]["steps"] == 30
    assert b[0]["resumed_from"].endswith("step-000015")
    export(find_latest(root / "a"), tmp_path / "a.pt")
    export(find_latest(root / "b"), tmp_path / "b.pt")
    wa, wb = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    from shoal.data.spec import DataSpec
    from shoal.models import build_model

    model = build_model(
        config_from_dict(job(tmp_path)).model, DataSpec(task="classification", input_shape=(12,), num_classes=4), 4
    )
    model.load_state_dict(wa)  # the whole model, every stage's layers
    records = [json.loads(line) for line in (root / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert all("bubble" in r and "bubble_theory" in r and "stage_busy_s/1" in r for r in logged)
    # alerts and measurements name every layer by its full name, whatever stage holds it
    assert {"grad_norm/layers.0.linear", "grad_norm/layers.2.linear", "grad_norm/head"} <= set(logged[0])


def test_a_pipeline_checkpoint_resumes_without_stages_and_with_another_split(tmp_path, worker_runs):
    shutil.copytree(worker_runs[0] / "split", tmp_path / "run")  # a 2-stage run of job to step 15
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


# ---------------------------------------------------------------- user models, split_fn, balance by time, doctor


def assert_equal_to_one_rank(pp: list[dict], ref: dict) -> None:
    """Two stages trained the numbers of one rank on the same samples: losses, norms, evaluation, every param."""
    for (a, na, sa), (b, nb, sb) in zip(pp[0]["steps"], ref["steps"], strict=True):
        assert a == pytest.approx(b, rel=1e-5) and na == pytest.approx(nb, rel=1e-5) and sa and sb
    assert pp[0]["eval"] == pytest.approx(ref["eval"], rel=1e-6)
    whole = merged(pp)
    assert whole.keys() == ref["params"].keys() and not set(pp[0]["params"]) & set(pp[1]["params"])
    for k, v in ref["params"].items():
        assert torch.allclose(whole[k], v, atol=1e-5, rtol=0), f"{k}: {(whole[k] - v).abs().max():.3g}"
    assert any(not torch.equal(v, w) for v, w in zip(ref["params"].values(), ref["initial"].values()))


def steps_from_initial(cfg_dict: dict, n: int) -> dict:
    """steps() on one process, with the weights it started from (to see that training moved them)."""
    from shoal.dist import WorldInfo
    from shoal.job import build_job

    initial = {
        k: v.clone()
        for k, v in build_job(config_from_dict(cfg_dict), WorldInfo(), torch.device("cpu"))
        .bare_model.state_dict()
        .items()
    }
    return {**steps(cfg_dict, n), "initial": initial}


def stage_keys(r: dict) -> set[str]:
    return {k.rsplit(".", 1)[0] for k in r["params"]}


def test_balance_time_gives_a_slow_layer_a_stage_of_its_own_and_trains_equal_to_one_rank(trained):
    # slow_head_mlp: 0 Linear(12,32), 1 ReLU, 2 Linear(32,32), 3 ReLU, 4 a light Linear(32,4) that sleeps 50 ms
    shape = SLOW_HEAD
    by_params, by_time = trained["by_params"], trained["by_time"]
    # by parameters the heavy Linear(32,32) goes with the head; by time the sleeping head stands alone
    assert [names for _, names, _ in by_params[0]["split"]] == [["0", "1"], ["2", "3", "4"]]
    assert [names for _, names, _ in by_time[0]["split"]] == [["0", "1", "2", "3"], ["4"]]
    assert by_time[1]["split"] == by_time[0]["split"]  # rank 0 measured; every rank took its numbers
    assert stage_keys(by_time[0]) == {"0", "2"} and stage_keys(by_time[1]) == {"4"}
    assert_equal_to_one_rank(by_time, steps_from_initial(cfg(shape).to_dict(), 2))


def test_split_fn_names_the_chain_of_a_model_that_is_not_sequential_and_trains_equal_to_one_rank(trained):
    from shoal.models import pieces

    from helpers import tower

    with pytest.raises(ConfigError, match="give parallel.split_fn"):  # without it the Tower cannot be split
        pieces(tower())
    pp = trained["tower"]  # TOWER: the Tower with parallel.split_fn
    # parameters 208 | 272 | 272 | 68: the heaviest stage is smallest cut after body.0
    assert [names for _, names, _ in pp[0]["split"]] == [["stem", "body.0"], ["body.1", "head"]]
    assert stage_keys(pp[0]) == {"stem.linear", "body.0.linear"} and stage_keys(pp[1]) == {"body.1.linear", "head"}
    assert_equal_to_one_rank(pp, steps_from_initial(cfg({**MLP, "model.target": "helpers:tower"}).to_dict(), 3))


def test_a_user_sequential_given_as_model_target_splits_into_stages_and_trains_equal_to_one_rank(trained):
    shape = NESTED
    pp = trained["nested"]
    # the nested Sequentials unrolled into one chain of 7 pieces, cut by parameters (208 1 272 1 272 1 68) inside
    # the second inner Sequential; each stage keeps the model's own names
    assert [names for _, names, _ in pp[0]["split"]] == [["0.0", "0.1", "1.0"], ["1.1", "1.2", "1.3", "2"]]
    assert [params for _, _, params in pp[0]["split"]] == [208 + 272, 272 + 68]
    assert stage_keys(pp[0]) == {"0.0", "1.0"} and stage_keys(pp[1]) == {"1.2", "2"}
    assert_equal_to_one_rank(pp, steps_from_initial(cfg(shape).to_dict(), 3))


def chart_bars(png: Path, color: tuple[int, int, int], half: int) -> tuple[list[int], tuple[int, int]]:
    """The bars of one colour in the left (0) or right (1) plot of a two-plot chart, left to right: each bar's
    height in pixels (its tallest column: a legend may hide part of its top), and the plot's frame (the rows of
    its top and bottom spines, the continuous black lines across it)."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(png).convert("RGB")).astype(int)
    width = img.shape[1] // 2
    img = img[:, half * width : (half + 1) * width]
    dark = img.sum(axis=2) < 150
    longest = []
    for row in dark:
        best = run = 0
        for d in row:
            run = run + 1 if d else 0
            best = max(best, run)
        longest.append(best)
    spines = [y for y, n in enumerate(longest) if n > 0.6 * width]
    top, bottom = min(spines), max(spines)
    mask = np.abs(img - np.array(color)).sum(axis=2) < 12
    bars, run = [], []
    for x in range(width + 1):
        rows = np.flatnonzero(mask[:, x]) if x < width else []
        if len(rows):
            run.append(bottom - rows.min())
        elif run:
            if len(run) > 10:  # a bar, not an edge or a legend swatch
                bars.append(max(run))
            run = []
    return bars, (top, bottom)


def test_the_doctor_draws_the_stage_chart_of_a_pipeline_run_from_its_metrics(tmp_path, worker_runs):
    from shoal.health.doctor import diagnose

    run_dir = tmp_path / "run"
    shutil.copytree(worker_runs[0] / "doctor", run_dir)  # the 2-rank run of doctor_job
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "loss" in r]
    assert [r["step"] for r in logged] == [5, 10]
    busy = [sum(r[f"stage_busy_s/{s}"] for r in logged) for s in (0, 1)]
    bubble = [sum(r[f"bubble/{s}"] for r in logged) / len(logged) for s in (0, 1)]
    assert busy[1] > 1.5 * busy[0] and bubble[0] > bubble[1]

    report = diagnose(run_dir)
    chart = run_dir / "doctor" / "stages.png"
    assert chart.stat().st_size > 1000 and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.read_text()
    assert "![stages](stages.png)" in text
    last = logged[-1]
    assert f"| last logged step | {last['step']} |" in text
    assert f"| training loss | {last['loss']:.4g} |" in text and f"| samples/s | {last['samples_per_s']:.4g} |" in text
    # the bars are the metrics: compute seconds summed over the logged steps (left, in proportion stage to
    # stage), the mean bubble of each stage (right, on its 0-1 axis)
    blue, _ = chart_bars(chart, (31, 119, 180), 0)
    orange, (top, bottom) = chart_bars(chart, (255, 127, 14), 1)
    assert len(blue) == 2 and len(orange) == 2, (blue, orange)
    assert blue[0] / blue[1] == pytest.approx(busy[0] / busy[1], abs=0.02), (blue, busy)
    assert [h / (bottom - top) for h in orange] == pytest.approx(bubble, abs=0.02), (orange, top, bottom, bubble)
    assert all(r["bubble_theory"] == pytest.approx(1 / 5) for r in logged)  # the dashed line: P=2, M=4
    # the chart comes from those figures: the same records without them draw none, and the report links none
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(
        "".join(json.dumps({k: v for k, v in r.items() if not k.startswith("stage_busy_s/")}) + "\n" for r in records)
    )
    assert "stages.png" not in diagnose(bare).read_text() and not (bare / "doctor" / "stages.png").exists()
