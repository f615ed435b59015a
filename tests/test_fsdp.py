"""strategy: fsdp on real 2-rank gloo groups: the same numbers as allreduce, one reduce-scatter per unit
per optimizer step, 1/N of the bytes per rank, sharded checkpoints that reshard (to 1 rank, into
allreduce and back), activation checkpointing, the finite check, frozen layers, export, bad configs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from shoal.config import JobConfig, config_from_dict, load_config

from _ranks import spawn_ranks, spawn_sequence
from conftest import REPO, TINY_LM, shoal_cli, tiny_overrides

QUICKSTART = REPO / "configs" / "quickstart.yaml"
MLP = {
    "data.dataset": "synthetic",
    "data.num_samples": 805,
    "data.input_shape": [12],
    "data.num_classes": 4,
    "model.width": 16,
    "model.depth": 2,
}


def cfg_of(strategy: str, model: dict, **updates) -> JobConfig:
    base = {
        **model,
        "strategy": strategy,
        "optim.name": "adamw",
        "optim.lr": 0.01,
        "optim.implementation": "foreach",  # the same kernels on both sides (auto: fused whole tensors, foreach shards)
        "train.eval_every": 0,
        "train.grad_accum_steps": 3,
        "train.clip_grad_norm": 0.05,
        "data.batch_size": 4,
        "log.tensorboard": False,
    }
    return JobConfig().replace({**base, **updates})


def full_params(job) -> dict[str, torch.Tensor]:
    """The whole parameters on every rank (a sharded model's gathered)."""
    out = {}
    for k, v in job.bare_model.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def steps_on_rank(cfg_dict: dict, steps: int, count: bool = False) -> dict:
    """Train `steps` steps on this rank; the global losses, grad norms, reductions per step and final params."""
    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.job import build_job

    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    return train_steps(job, steps, ReduceScatterCounter().attach(job) if count else None)


def train_steps(job, steps: int, counter: ReduceScatterCounter | None = None) -> dict:
    """`steps` steps of a built job: the global losses, grad norms, reductions per step and final params."""
    from shoal import dist
    from shoal.engine import train_step
    from shoal.strategies.memory import memory_report

    losses, norms, calls = [], [], []
    for _ in range(steps):
        before = counter.calls if counter else 0
        r = train_step(job)
        total, n = dist.all_sum(torch.stack([r.loss_sum, torch.tensor(float(r.count), dtype=torch.float64)])).tolist()
        losses.append(total / n)
        norms.append(float(r.grad_norm))
        calls.append((counter.calls if counter else 0) - before)
    units = len(job.strategy.units) + 1 if hasattr(job.strategy, "units") else 0
    memory = memory_report(job.bare_model, job.optimizer, job.strategy.grads_bytes, job.device)
    return {
        "losses": losses,
        "norms": norms,
        "calls": calls,
        "units": units,
        "params": full_params(job),
        "memory": memory,
    }


class ReduceScatterCounter:
    """Counts gradient reduce-scatters through FSDP2's own hook for them (set_custom_reduce_scatter)."""

    def __init__(self) -> None:
        self.calls = 0

    def attach(self, job) -> ReduceScatterCounter:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultReduceScatter

        counter = self

        class Counting(DefaultReduceScatter):
            def __call__(self, *args, **kwargs):
                counter.calls += 1
                return super().__call__(*args, **kwargs)

        for m in job.bare_model.modules():
            if isinstance(m, FSDPModule):
                m.set_custom_reduce_scatter(Counting())
        return self


STEPS = 5
WIDE = {**MLP, "model.width": 256, "model.depth": 3, "train.grad_accum_steps": 1}
AC_LM = {**TINY_LM, "model.depth": 3, "model.width": 32, "data.seq_len": 16, "train.grad_accum_steps": 1}
FROZEN = cfg_of("fsdp", MLP, **{"model.freeze": ["layers.0.*"]})


def shared_calls() -> dict[str, tuple]:
    """Every short 2-rank training of this file's tests: one spawned group runs them all, one after another."""
    calls: dict[str, tuple] = {}
    for model, shape in (("mlp", MLP), ("transformer_lm", TINY_LM)):
        calls[f"fsdp-{model}"] = (steps_on_rank, (cfg_of("fsdp", shape).to_dict(), STEPS, True))
        calls[f"ddp-{model}"] = (steps_on_rank, (cfg_of("allreduce", shape).to_dict(), STEPS))
    calls["fsdp-wide"] = (steps_on_rank, (cfg_of("fsdp", WIDE).to_dict(), 2))
    calls["ddp-wide"] = (steps_on_rank, (cfg_of("allreduce", WIDE).to_dict(), 2))
    calls["nan"] = (nan_on_one_rank, (cfg_of("fsdp", MLP, **{"train.grad_accum_steps": 2}).to_dict(),))
    calls["frozen"] = (steps_on_rank, (FROZEN.to_dict(), 3))
    for strategy in ("allreduce", "fsdp"):
        for ac in ("none", "full", "every_n"):
            ac_cfg = cfg_of(strategy, AC_LM, **({} if ac == "none" else {"train.activation_checkpointing": ac}))
            calls[f"ac-{strategy}-{ac}"] = (saved_activation_bytes, (ac_cfg.to_dict(),))
    return calls


@pytest.fixture(scope="module")
def trained() -> dict[str, list]:
    """Each shared_calls run's results in rank order, by name."""
    calls = shared_calls()
    return dict(zip(calls, spawn_sequence(list(calls.values()), 2, timeout_s=600), strict=True))


@pytest.mark.parametrize("model", ["mlp", "transformer_lm"])
def test_fsdp_gives_the_numbers_of_allreduce_with_accumulation_and_clipping(model, trained):
    steps = STEPS
    fsdp, ddp = trained[f"fsdp-{model}"], trained[f"ddp-{model}"]
    assert fsdp[0]["losses"] == pytest.approx(ddp[0]["losses"], rel=1e-5, abs=1e-6)
    assert fsdp[0]["norms"] == pytest.approx(ddp[0]["norms"], rel=1e-5)
    assert all(n > 0.05 for n in ddp[0]["norms"])  # clipping was active at every step
    for k, v in ddp[0]["params"].items():
        assert torch.allclose(fsdp[0]["params"][k], v, atol=1e-5, rtol=0), (
            f"{k}: {(fsdp[0]['params'][k] - v).abs().max():.3g}"
        )
    assert fsdp[0]["params"].keys() == ddp[0]["params"].keys()
    # exactly one reduce-scatter per shard unit per optimizer step, whatever the accumulation (k=3)
    assert fsdp[0]["calls"] == [fsdp[0]["units"]] * steps and fsdp[0]["units"] >= 2


def test_each_rank_holds_about_half_the_parameters_and_optimizer_state(trained):
    fsdp, ddp = trained["fsdp-wide"], trained["ddp-wide"]
    for key in ("params_mb", "grads_mb", "optimizer_mb"):
        for rank in (0, 1):
            ratio = fsdp[rank]["memory"][key] / ddp[rank]["memory"][key]
            assert 0.45 <= ratio <= 0.55, (key, rank, ratio)


def run_worker_on_rank(cfg_dict: dict, resume: bool = False) -> dict:
    from shoal.worker import run_worker

    return run_worker(config_from_dict(cfg_dict), resume=resume)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from shoal.checkpoint import export, find_latest

    out = run_dir.parent / f"{run_dir.name}-export.pt"
    export(find_latest(run_dir), out, overwrite=True)
    return torch.load(out, weights_only=True)


def job(run_dir: Path, strategy: str = "fsdp", **updates) -> dict:
    base = {
        **MLP,
        "strategy": strategy,
        "data.batch_size": 8,
        "model.dropout": 0.1,
        "optim.name": "adamw",
        "optim.lr": 0.01,
        "train.max_steps": 40,
        "train.eval_every": 20,
        "log.every": 5,
        "log.tensorboard": False,
        "checkpoint.every_steps": 20,
        "run.dir": str(run_dir),
    }
    return JobConfig().replace({**base, **updates}).to_dict()


def worker_runs(*runs: tuple) -> list[list[dict]]:
    """run_worker_on_rank with each run's args, one after another on one spawned 2-rank group; their summaries."""
    return spawn_sequence([(run_worker_on_rank, args) for args in runs], 2)


def test_sharded_checkpoints_resume_bitwise_and_reshard(tmp_path, straight):
    # the uninterrupted run ("a"): the straight fixture (its status checked there)
    ckpt = straight / "checkpoints" / "step-000040"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["format"] == "sharded" and {"model/__0_0.distcp", "model/__1_0.distcp", "model/.metadata"} <= set(
        meta["sha256"]
    )
    # stopped at 20, resumed on the same 2 ranks: bitwise the uninterrupted run
    _, resumed, _, _ = worker_runs(
        (job(tmp_path / "b", **{"train.max_steps": 20}),),
        (job(tmp_path / "b"), True),
        (job(tmp_path / "c", **{"train.max_steps": 20, "model.dropout": 0.0}),),
        (job(tmp_path / "d", **{"model.dropout": 0.0}),),
    )
    assert resumed[0]["resumed_from"].endswith("step-000020") and resumed[0]["steps"] == 40
    a, b = weights(straight), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # saved on 2 ranks, resumed on 1 with the same global batch: the uninterrupted run within fp32 tolerance
    # (without dropout, whose masks are drawn per rank by design)
    one = run_worker_on_rank(job(tmp_path / "c", **{"data.batch_size": 16, "model.dropout": 0.0}), True)
    assert one["world_size"] == 1 and one["steps"] == 40 and one["resumed_from"].endswith("step-000020")
    c, d = weights(tmp_path / "c"), weights(tmp_path / "d")
    for k in d:
        assert torch.allclose(c[k], d[k], atol=1e-5, rtol=0), f"{k}: {(c[k] - d[k]).abs().max():.3g}"


def test_a_sharded_checkpoint_resumes_into_allreduce_and_back(tmp_path):
    _, into, back = worker_runs(
        (job(tmp_path / "run", **{"train.max_steps": 20}),),
        (job(tmp_path / "run", "allreduce", **{"train.max_steps": 40}), True),
        (job(tmp_path / "run", **{"train.max_steps": 60}), True),
    )
    assert (
        into[0]["strategy"] == "allreduce"
        and into[0]["resumed_from"].endswith("step-000020")
        and into[0]["steps"] == 40
    )
    # allreduce writes the full format (the resume to 60 after it starts at 41: it writes no step 40)
    assert not (tmp_path / "run" / "checkpoints" / "step-000040" / "model").exists()
    assert back[0]["resumed_from"].endswith("step-000040") and back[0]["steps"] == 60
    assert math.isfinite(back[0]["train_loss"]) and back[0]["val_accuracy"] > 0.4


def test_a_corrupt_shard_falls_back_to_the_previous_checkpoint(tmp_path, caplog, straight):
    from shoal.checkpoint import find_latest

    shutil.copytree(straight, tmp_path / "run")  # a copy of the same 2-rank fsdp run (checkpoints at 20, 40)
    shard = tmp_path / "run" / "checkpoints" / "step-000040" / "optimizer" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="shoal"):
        assert find_latest(tmp_path / "run").name == "step-000020"
    assert "optimizer/__1_0.distcp does not match its checksum" in caplog.text


def test_sharded_metadata_that_would_run_code_is_refused(tmp_path, straight):
    import os
    import pickle

    from shoal.checkpoint import export, find_latest

    shutil.copytree(straight / "checkpoints" / "step-000020", tmp_path / "run" / "checkpoints" / "step-000020")
    ckpt = find_latest(tmp_path / "run")
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(Evil()))
    meta = json.loads((ckpt / "meta.json").read_text())
    from shoal.checkpoint import sha256

    meta["sha256"]["model/.metadata"] = sha256(ckpt / "model" / ".metadata")  # even with matching checksums
    (ckpt / "meta.json").write_text(json.dumps(meta))
    from shoal.errors import CheckpointError

    with pytest.raises(CheckpointError, match="cannot read model/.metadata safely"):
        export(ckpt, tmp_path / "out.pt")
    assert not marker.exists()


def test_export_of_a_sharded_checkpoint_loads_into_the_bare_model(tmp_path, straight):
    from shoal.data.spec import DataSpec
    from shoal.models import build_model

    shutil.copytree(straight / "checkpoints" / "step-000020", tmp_path / "run" / "checkpoints" / "step-000020")
    proc = shoal_cli("export", str(tmp_path / "run"), str(tmp_path / "model.pt"))
    assert proc.returncode == 0, proc.stderr
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    cfg = config_from_dict(job(tmp_path / "x"))
    model = build_model(cfg.model, DataSpec(task="classification", input_shape=(12,), num_classes=4), 4)
    model.load_state_dict(state)  # every key, whole shapes
    assert not any(hasattr(v, "placements") for v in state.values())


def nan_on_one_rank(cfg_dict: dict) -> dict:
    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.engine import train_step
    from shoal.job import build_job

    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job_ = build_job(cfg, world, torch.device("cpu"))
    stream = job_.data.train

    def batches():
        for i, (x, y) in enumerate(stream):
            if i == 3 and world.rank == 1:  # the second micro-batch of step 2, on rank 1 only
                x = x.clone()
                x[0, 0] = math.nan
            yield x, y

    job_.data.train = batches()
    stepped = [train_step(job_).stepped for _ in range(3)]
    return {"stepped": stepped, "params": full_params(job_)}


def test_nan_on_one_rank_is_skipped_on_both_without_a_hang(trained):
    ranks = trained["nan"]  # a hang fails the shared group's spawn (its timeout)
    assert [r["stepped"] for r in ranks] == [[True, False, True]] * 2
    assert all(torch.isfinite(v).all() for v in ranks[0]["params"].values())
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])


def test_frozen_layers_stay_put_under_fsdp(trained):
    from shoal.job import build_job

    initial = build_job(
        FROZEN.replace({"strategy": "allreduce"}), __import__("shoal.dist").dist.WorldInfo(), torch.device("cpu")
    ).bare_model.state_dict()
    ranks = trained["frozen"]
    after = ranks[0]["params"]
    assert torch.equal(after["layers.0.linear.weight"], initial["layers.0.linear.weight"])
    assert not torch.equal(after["head.weight"], initial["head.weight"])


def saved_activation_bytes(cfg_dict: dict) -> dict:
    """Bytes the forward saves for backward at one step, and the losses of 3 steps."""
    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.engine import train_step
    from shoal.job import build_job

    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job_ = build_job(cfg, world, torch.device("cpu"))
    saved = [0]

    def pack(t):
        saved[0] += t.numel() * t.element_size()
        return t

    losses = []
    for i in range(3):
        if i == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                r = train_step(job_)
        else:
            r = train_step(job_)
        losses.append(r.loss_sum.item() / r.count)
    return {"saved": saved[0], "losses": losses}


@pytest.mark.parametrize("strategy", ["allreduce", "fsdp"])
def test_activation_checkpointing_changes_no_number_and_saves_less(strategy, trained):
    plain, full, every = (trained[f"ac-{strategy}-{ac}"] for ac in ("none", "full", "every_n"))
    for r in (0, 1):
        assert full[r]["losses"] == pytest.approx(plain[r]["losses"], rel=1e-6)
        assert every[r]["losses"] == pytest.approx(plain[r]["losses"], rel=1e-6)
    assert full[0]["saved"] < every[0]["saved"] < plain[0]["saved"]
    assert full[0]["saved"] < 0.6 * plain[0]["saved"]


def test_quickstart_trains_under_fsdp_on_ray_and_reports_memory(ray_cluster, tmp_path):
    from shoal import launcher

    cfg = load_config(
        QUICKSTART,
        tiny_overrides(tmp_path / "run", **{"strategy": "fsdp", "scaling.address": ray_cluster}),
    )
    summary = launcher.run(cfg)
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["val_accuracy"] >= 0.95
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(saved["memory"]["params_mb"]) == 2 and all(m > 0 for m in saved["memory"]["peak_mb"])
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["mem_mb"] > 0 for r in records if "loss" in r)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (
            {"train.precision": "fp16", "scaling.device": "cuda"},
            "train.precision: fp16 is not offered with strategy=fsdp",
        ),
        ({"fsdp.cpu_offload": True}, "fsdp.cpu_offload: needs CUDA"),
        ({"fsdp.reshard_after_forward": 0}, "fsdp.reshard_after_forward"),
        ({"fsdp.units": ["NoSuchBlock"]}, "fsdp.units: ['NoSuchBlock'] match no module"),
        ({"fsdp.reshard_after_forward": 3}, "fsdp.reshard_after_forward: 3 does not divide the 1 ranks"),
    ],
)
def test_what_cannot_combine_is_a_config_error(tmp_path, overrides, needle):
    proc = shoal_cli(
        "worker",
        str(QUICKSTART),
        *tiny_overrides(tmp_path / "run", **{"strategy": "fsdp", "train.max_steps": 3, **overrides}),
    )
    assert proc.returncode == 2, proc.stderr[-1500:]
    assert needle in proc.stderr and "Traceback" not in proc.stderr


def test_fsdp_under_torchrun_writes_a_sharded_checkpoint(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
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
        *tiny_overrides(tmp_path / "run", **{"strategy": "fsdp", "train.max_steps": 60}),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "fsdp" and summary["world_size"] == 2 and summary["steps"] == 60
    meta = json.loads((tmp_path / "run" / "checkpoints" / "step-000060" / "meta.json").read_text())
    assert meta["format"] == "sharded" and meta["world_size"] == 2


# ---------------------------------------------------------------- 4 ranks as 2 nodes x 2: hybrid, reshard N

FOUR_RANK_STEPS = 3


def variants_on_2_nodes_x_2(variants: dict[str, dict], steps: int, bad: dict[str, dict]) -> dict:
    """A 4-rank group spawned as 2 nodes x 2 ranks (LOCAL_WORLD_SIZE=2, as torchrun sets it): each variant's
    job trained `steps` steps, what it holds locally, and the ConfigError of each `bad` config."""
    from shoal import dist
    from shoal.dist import WorldInfo
    from shoal.errors import ConfigError
    from shoal.job import build_job

    world = WorldInfo.from_env()
    assert (world.local_world_size, world.local_rank, world.node_rank) == (2, world.rank % 2, world.rank // 2)
    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    out: dict = {}
    for name, cfg_dict in variants.items():
        job_ = build_job(config_from_dict(cfg_dict), world, torch.device("cpu"))
        trained = train_steps(job_, steps)
        local = {n: p.to_local().detach().clone() for n, p in job_.bare_model.named_parameters()}
        units = [m for _, m in job_.strategy.units]
        out[name] = {
            **trained,
            "mesh": tuple(job_.strategy.mesh.shape),
            "local": local,
            "held": sum(t.numel() for t in local.values()) / sum(p.numel() for p in job_.bare_model.parameters()),
            # the group size each unit's parameters stay sharded over between forward and backward (FSDP2's own)
            "post_forward": [u._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info for u in units],
        }
        out[name]["post_forward"] = [None if i is None else i.shard_mesh_size for i in out[name]["post_forward"]]
    for name, cfg_dict in bad.items():
        try:
            build_job(config_from_dict(cfg_dict), world, torch.device("cpu"))
            out[name] = None
        except ConfigError as e:
            out[name] = str(e)
    return out


@pytest.fixture(scope="module")
def two_nodes_x_2():
    variants = {
        "hybrid": cfg_of("fsdp", MLP, **{"fsdp.sharding": "hybrid"}).to_dict(),
        "reshard_true": cfg_of("fsdp", MLP).to_dict(),
        "reshard_2": cfg_of("fsdp", MLP, **{"fsdp.reshard_after_forward": 2}).to_dict(),
    }
    bad = {
        "full_3": cfg_of("fsdp", MLP, **{"fsdp.reshard_after_forward": 3}).to_dict(),
        # 4 divides the world, but a hybrid mesh shards each parameter over the 2 ranks of a node
        "hybrid_4": cfg_of("fsdp", MLP, **{"fsdp.sharding": "hybrid", "fsdp.reshard_after_forward": 4}).to_dict(),
    }
    return spawn_ranks(variants_on_2_nodes_x_2, 4, variants, FOUR_RANK_STEPS, bad, timeout_s=240, per_node=2)


def assert_same_params(got: dict, want: dict, atol: float = 1e-5) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.allclose(got[k], v, atol=atol, rtol=0), f"{k}: {(got[k] - v).abs().max():.3g}"


def test_hybrid_sharding_on_2_nodes_x_2_equals_one_process_and_shards_over_a_node(two_nodes_x_2):
    # one process on the whole global batch (4 ranks x 4 samples per micro-batch, 3 micro-batches per step)
    one = steps_on_rank(cfg_of("allreduce", MLP, **{"data.batch_size": 16}).to_dict(), FOUR_RANK_STEPS)
    hybrid = [r["hybrid"] for r in two_nodes_x_2]
    assert all(h["mesh"] == (2, 2) for h in hybrid)  # nodes x ranks per node
    assert hybrid[0]["losses"] == pytest.approx(one["losses"], rel=1e-5, abs=1e-6)
    assert hybrid[0]["norms"] == pytest.approx(one["norms"], rel=1e-5)
    for h in hybrid:
        assert_same_params(h["params"], one["params"])
    # each rank holds half the parameters (the shard dimension is the 2 ranks of a node), not a quarter as
    # full sharding over the 4 ranks does
    assert all(0.45 <= h["held"] <= 0.55 for h in hybrid), [h["held"] for h in hybrid]
    assert all(0.2 <= r["reshard_true"]["held"] <= 0.3 for r in two_nodes_x_2)
    # the same local rank on the two nodes holds the same shard (replicated), its neighbour the other half
    for k in hybrid[0]["local"]:
        assert torch.equal(hybrid[0]["local"][k], hybrid[2]["local"][k]), k
        assert torch.equal(hybrid[1]["local"][k], hybrid[3]["local"][k]), k
        whole = torch.cat([hybrid[0]["local"][k], hybrid[1]["local"][k]])
        assert torch.equal(whole[: hybrid[0]["params"][k].shape[0]], hybrid[0]["params"][k]), k


def test_reshard_after_forward_2_gives_the_numbers_of_true_and_a_size_that_does_not_divide_is_refused(two_nodes_x_2):
    for r in two_nodes_x_2:
        two, true = r["reshard_2"], r["reshard_true"]
        # FSDP2 keeps each unit sharded over groups of 2 between forward and backward (true: over all 4)
        assert two["post_forward"] == [2] * len(two["post_forward"]) and len(two["post_forward"]) >= 2
        assert true["post_forward"] == [4] * len(true["post_forward"])
        assert two["losses"] == pytest.approx(true["losses"], rel=1e-6, abs=1e-7)
        assert two["norms"] == pytest.approx(true["norms"], rel=1e-6)
        assert_same_params(two["params"], true["params"], atol=1e-6)
        assert all(n > 0.05 for n in true["norms"])  # clipping was active
    assert (
        two_nodes_x_2[0]["full_3"]
        == "fsdp.reshard_after_forward: 3 does not divide the 4 ranks that shard each parameter"
    )
    assert (
        two_nodes_x_2[0]["hybrid_4"]
        == "fsdp.reshard_after_forward: 4 does not divide the 2 ranks that shard each parameter"
    )
    assert all(r["full_3"] == two_nodes_x_2[0]["full_3"] and r["hybrid_4"] for r in two_nodes_x_2)


# ---------------------------------------------------------------- whole runs under fsdp: async saves, stops, health


def keep_best_job(run_dir: Path) -> dict:
    # mode max on val_loss: the best is an early checkpoint, not the newest one keep_last keeps anyway
    return job(
        run_dir,
        **{
            "train.max_steps": 20,
            "train.eval_every": 5,
            "checkpoint.every_steps": 5,
            "checkpoint.keep_last": 1,
            "checkpoint.keep_best": {"metric": "val_loss", "mode": "max"},
        },
    )


def rollback_job(run_dir: Path) -> dict:
    return job(
        run_dir,
        **{
            "model.target": "helpers:nan_once_mlp",
            "model.kwargs": {"at_call": 8, "nan_rank": 1},  # step 8's forward is NaN on rank 1 only
            "model.dropout": 0.0,
            "optim.lr": 0.03,
            "train.max_steps": 12,
            "train.eval_every": 0,
            "log.every": 1,
            "checkpoint.every_steps": 5,
            "health.on_nonfinite": "rollback",
            "health.rollback_lr_factor": 0.1,
        },
    )


def early_stopping_job(run_dir: Path) -> dict:
    # min_delta 10: no later evaluation improves on the first, so the run stops at the second (patience 1)
    return job(
        run_dir,
        **{
            "train.eval_every": 5,
            "checkpoint.every_steps": 5,
            "train.early_stopping": {"metric": "val_loss", "mode": "min", "patience": 1, "min_delta": 10.0},
        },
    )


@pytest.fixture(scope="module")
def whole_runs(tmp_path_factory) -> dict[str, tuple[Path, dict, list[dict]]]:
    """The independent whole 2-rank runs of this file, one after another on one spawned group: each one's
    run directory, config and summaries (in rank order), by name."""
    root = tmp_path_factory.mktemp("fsdp-runs")
    cfgs = {
        "straight": job(root / "straight"),
        "keep_best": keep_best_job(root / "keep_best"),
        "rollback": rollback_job(root / "rollback"),
        "early_stopping": early_stopping_job(root / "early_stopping"),
    }
    summaries = worker_runs(*((c,) for c in cfgs.values()))
    return {name: (root / name, c, s) for (name, c), s in zip(cfgs.items(), summaries, strict=True)}


@pytest.fixture(scope="module")
def straight(whole_runs):
    """The uninterrupted 2-rank fsdp run of `job` (40 steps, with dropout: bitwise comparisons need the RNG state)."""
    run_dir, _, summary = whole_runs["straight"]
    assert summary[0]["status"] == "completed" and summary[0]["steps"] == 40
    return run_dir


def exported(checkpoint: Path) -> dict[str, torch.Tensor]:
    from shoal.checkpoint import export

    out = checkpoint.parent.parent.parent / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    export(checkpoint, out, overwrite=True)
    return torch.load(out, weights_only=True)


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: {(a[k] - b[k]).abs().max():.3g}"


def records_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_resume_from_an_async_sharded_save_is_bitwise_the_uninterrupted_run(tmp_path, straight):
    # saves at 10 (written in the background while steps 11-20 train) and at 20 (the end)
    mid = tmp_path / "b" / "checkpoints" / "step-000010"
    first, resumed = worker_runs(
        (job(tmp_path / "b", **{"checkpoint.async": True, "checkpoint.every_steps": 10, "train.max_steps": 20}),),
        # resumed from the background save at 10 into a fresh run directory, on to 40 (saving async again)
        (job(tmp_path / "c", **{"checkpoint.async": True, "checkpoint.resume_from": str(mid)}),),
    )
    assert first[0]["status"] == "completed" and first[0]["steps"] == 20
    meta = json.loads((mid / "meta.json").read_text())
    assert meta["format"] == "sharded" and {"model/__0_0.distcp", "model/__1_0.distcp"} <= set(meta["sha256"])
    # the async save at 20 holds the uninterrupted run's weights at 20
    assert_bitwise(
        exported(tmp_path / "b" / "checkpoints" / "step-000020"), exported(straight / "checkpoints" / "step-000020")
    )
    assert resumed[0]["resumed_from"] == str(mid) and resumed[0]["steps"] == 40 and resumed[0]["steps_this_run"] == 30
    assert_bitwise(weights(tmp_path / "c"), weights(straight))


def run_worker_stopped_on_rank(cfg_dict: dict, stop_at: int, stop_rank: int) -> dict:
    """run_worker with a stop asked for on one rank only, once it has finished step `stop_at` (as a SIGTERM does)."""
    import threading

    from shoal.dist import WorldInfo
    from shoal.worker import run_worker

    stop = threading.Event()
    rank = WorldInfo.from_env().rank

    def on_step(step: int) -> None:
        if rank == stop_rank and step >= stop_at:
            stop.set()

    return run_worker(config_from_dict(cfg_dict), stop=stop, on_step=on_step)


def checkpoint_formats(run_dir: Path) -> dict[str, str]:
    """The checkpoints of a run directory now: each one's format, by name."""
    return {
        p.name: json.loads((p / "meta.json").read_text())["format"] for p in (run_dir / "checkpoints").glob("step-*")
    }


def test_a_stop_mid_run_saves_a_sharded_checkpoint_that_resumes_bitwise(tmp_path, straight):
    stopped, listed, resumed = spawn_sequence(
        [
            (run_worker_stopped_on_rank, (job(tmp_path / "p"), 7, 1)),
            (checkpoint_formats, (tmp_path / "p",)),  # what the stop saved, before the resume saves more
            (run_worker_on_rank, (job(tmp_path / "p"), True)),
        ],
        2,
    )
    at = stopped[0]["steps"]
    assert [s["status"] for s in stopped] == ["preempted"] * 2 and [s["steps"] for s in stopped] == [at] * 2
    assert 7 <= at < 20  # agreed by both ranks at the step after the flag travelled, before any periodic save
    saved = sorted(listed[0])  # rank 0's listing: its run returned once the save was whole
    assert saved == [f"step-{at:06d}"]
    assert listed[0][saved[0]] == "sharded"
    assert resumed[0]["status"] == "completed" and resumed[0]["resumed_from"].endswith(saved[0])
    assert resumed[0]["steps"] == 40 and resumed[0]["steps_this_run"] == 40 - at
    assert_bitwise(weights(tmp_path / "p"), weights(straight))


def evaluate_in_one_process(cfg_dict: dict, state: dict[str, torch.Tensor]) -> dict[str, float]:
    from shoal.dist import WorldInfo
    from shoal.engine import evaluate
    from shoal.job import build_job

    cfg = config_from_dict(cfg_dict).replace({"strategy": "allreduce", "run.dir": None})
    job_ = build_job(cfg, WorldInfo(), torch.device("cpu"))
    job_.bare_model.load_state_dict(state)
    return evaluate(job_)


def test_keep_best_keeps_the_checkpoint_of_the_best_evaluation_under_fsdp(whole_runs):
    run_dir, cfg, _ = whole_runs["keep_best"]  # keep_best_job
    evals = {r["step"]: r["val_loss"] for r in records_of(run_dir) if "val_loss" in r}
    assert sorted(evals) == [5, 10, 15, 20]
    best = max(evals, key=evals.get)
    assert best != 20, evals
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert kept == [f"step-{best:06d}", "step-000020"]
    ckpt = run_dir / "checkpoints" / f"step-{best:06d}"
    assert json.loads((ckpt / "meta.json").read_text())["metrics"]["val_loss"] == evals[best]
    # and it holds the weights that scored it
    assert evaluate_in_one_process(cfg, exported(ckpt))["val_loss"] == pytest.approx(evals[best], rel=1e-5)


def test_rollback_under_fsdp_restores_the_checkpointed_weights_with_a_lower_rate(whole_runs):
    run_dir, _, summary = whole_runs["rollback"]  # rollback_job
    assert [s["rollbacks"] for s in summary] == [1, 1]
    assert summary[0]["status"] == "completed" and summary[0]["steps"] == 12 and summary[0]["skipped_steps"] == 0
    records = [r for r in records_of(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 7, 8, 6, 7, 8, 9, 10, 11, 12]
    before, after = records[5], records[8]  # step 6 before the NaN at 8, and again after rolling back to step 5
    assert not math.isfinite(float(records[7]["loss"]))  # written as the string "nan"
    # the same weights (step 5's checkpoint) on the same batch: the same loss and gradient, whatever the rate
    assert after["loss"] == before["loss"] and after["grad_norm"] == before["grad_norm"]
    assert after["lr"] == pytest.approx(0.1 * before["lr"], rel=1e-12)
    assert records[9]["loss"] != records[6]["loss"]  # from there the lower rate trains otherwise


def test_early_stopping_under_fsdp_ends_with_the_best_evaluations_weights(whole_runs):
    run_dir, cfg, summary = whole_runs["early_stopping"]  # early_stopping_job
    s = summary[0]
    assert s["early_stopped"] and s["status"] == "completed" and s["steps"] == 10 and s["best_step"] == 5
    evals = {r["step"]: r["val_loss"] for r in records_of(run_dir) if "val_loss" in r}
    assert evals[10] != evals[5] and s["best_val_loss"] == evals[5]
    # the run ends with step 5's weights: evaluated again, and saved as the final checkpoint
    assert s["val_loss"] == pytest.approx(evals[5], rel=1e-9)
    root = run_dir / "checkpoints"
    final = exported(root / "step-000010")
    assert_bitwise(final, exported(root / "step-000005"))
    assert evaluate_in_one_process(cfg, final)["val_loss"] == pytest.approx(evals[5], rel=1e-5)
