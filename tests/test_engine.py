"""The training step on real gloo ranks: accumulation equivalence, one AllReduce per step,
exact evaluation means, freezing, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.config import JobConfig, config_from_dict
from shoal.dist import WorldInfo
from shoal.engine import evaluate, train, train_step
from shoal.job import build_job

from _ranks import spawn_ranks
from conftest import TINY_LM


def small_cfg(**updates) -> JobConfig:
    base = JobConfig().replace(
        {
            "data.dataset": "synthetic",
            "data.num_samples": 1005,  # 201 validation samples: ranks hold unequal shares
            "data.input_shape": [12],
            "data.num_classes": 4,
            "model.depth": 2,
            "optim.name": "sgd",
            "optim.lr": 0.2,
            "optim.momentum": 0.9,
            "train.eval_every": 0,
            "log.tensorboard": False,
        }
    )
    return base.replace(updates)


def run_steps(cfg_dict: dict, steps: int) -> dict:
    """On each rank: build, count AllReduces, train `steps` steps, evaluate; return values."""
    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    from shoal import dist

    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    counter = count_allreduces(job.model)  # DDP's bucket all-reduces (None on one rank)
    calls = []
    losses = []
    for _ in range(steps):
        before = counter.calls if counter else 0
        r = train_step(job)
        calls.append((counter.calls if counter else 0) - before)
        losses.append(r.loss_sum.item() / r.count)  # this rank's mean
    params = {k: v.detach().clone() for k, v in job.bare_model.state_dict().items()}
    return {"params": params, "calls": calls, "losses": losses, "eval": evaluate(job), "frozen": job.frozen}


class Counter:
    calls = 0


def _counting_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    state.calls += 1
    return allreduce_hook(None, bucket)


def count_allreduces(model) -> Counter | None:
    """A communication hook of the test's own that counts DDP's bucket all-reduces (Shoal installs none)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not isinstance(model, DDP):
        return None
    counter = Counter()
    model.register_comm_hook(counter, _counting_hook)
    return counter


def reference(cfg: JobConfig, steps: int) -> dict:
    """The same in this process as one rank (no process group)."""
    return run_steps(cfg.to_dict(), steps)


def assert_params_close(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol, rtol=0), f"{k}: max diff {(a[k] - b[k]).abs().max():.3g}"


DDP_OPTIONS = {  # name: (options, micro-batch, accumulation)
    "default": ({}, 3, 4),  # k = 4: still exactly one AllReduce per optimizer step
    "no_bucket_view": ({"ddp.gradient_as_bucket_view": False}, 4, 3),
    "static_graph": ({"ddp.static_graph": True}, 12, 1),  # static graph forbids accumulation (config error)
}


@pytest.mark.parametrize("ddp", list(DDP_OPTIONS))
def test_two_ranks_with_accumulation_equal_one_rank_with_the_whole_batch(ddp):
    options, b, k = DDP_OPTIONS[ddp]
    steps = 4
    dist_cfg = small_cfg(**{"data.batch_size": b, "train.grad_accum_steps": k, **options})
    one_cfg = small_cfg(**{"data.batch_size": 2 * b * k, "train.grad_accum_steps": 1})
    ranks = spawn_ranks(run_steps, 2, dist_cfg.to_dict(), steps)
    ref = reference(one_cfg, steps)
    # identical replicas, equal to the single process that saw the same samples in one batch
    assert_params_close(ranks[0]["params"], ranks[1]["params"], atol=0)
    assert_params_close(ranks[0]["params"], ref["params"], atol=1e-6)
    # equal counts per rank: the mean of the rank means is the global mean
    global_losses = [(a + b) / 2 for a, b in zip(ranks[0]["losses"], ranks[1]["losses"])]
    assert global_losses == pytest.approx(ref["losses"], abs=1e-6)
    # exactly one gradient AllReduce per optimizer step (the model fits one bucket)
    assert ranks[0]["calls"] == [1] * steps
    # evaluation is the exact global mean over 201 samples split 101/100, not a mean of rank means
    assert ranks[0]["eval"] == ranks[1]["eval"]
    assert ranks[0]["eval"]["val_loss"] == pytest.approx(ref["eval"]["val_loss"], abs=1e-6)
    assert ranks[0]["eval"]["val_accuracy"] == pytest.approx(ref["eval"]["val_accuracy"], abs=1e-12)


def test_steps_that_measure_the_noise_scale_reduce_by_hand_to_the_same_numbers():
    """With train.gns_every: 1 every step reduces by hand (no DDP all-reduce, no comm hook of Shoal's): the
    replicas still equal one rank on the whole batch, accumulation included."""
    steps, b, k = 3, 3, 2
    dist_cfg = small_cfg(**{"data.batch_size": b, "train.grad_accum_steps": k, "train.gns_every": 1})
    ranks = spawn_ranks(run_steps, 2, dist_cfg.to_dict(), steps)
    ref = reference(small_cfg(**{"data.batch_size": 2 * b * k}), steps)
    assert_params_close(ranks[0]["params"], ranks[1]["params"], atol=0)
    assert_params_close(ranks[0]["params"], ref["params"], atol=1e-6)
    assert ranks[0]["calls"] == [0] * steps  # DDP's reducer never ran: the one reduction was the strategy's


def test_frozen_parameters_stay_bit_identical_and_leave_the_optimizer():
    cfg = small_cfg(**{"model.freeze": ["layers.0.*"], "data.batch_size": 4, "train.grad_accum_steps": 2})
    world = WorldInfo()
    job = build_job(cfg, world, torch.device("cpu"))
    initial = {k: v.clone() for k, v in job.bare_model.state_dict().items()}
    in_optimizer = {id(p) for g in job.optimizer.param_groups for p in g["params"]}
    named = dict(job.bare_model.named_parameters())
    assert job.frozen == ["layers.0.linear.weight", "layers.0.linear.bias"]
    assert all(id(named[n]) not in in_optimizer for n in job.frozen)
    assert all(not named[n].requires_grad for n in job.frozen)
    ranks = spawn_ranks(run_steps, 2, cfg.to_dict(), 3)
    after = ranks[0]["params"]
    for name in job.frozen:
        assert torch.equal(after[name], initial[name]), name
    assert not torch.equal(after["head.weight"], initial["head.weight"])


def test_same_seed_same_trajectory_other_seed_differs():
    cfg = small_cfg(**{"data.batch_size": 8})
    a = reference(cfg, 5)["losses"]
    b = reference(cfg, 5)["losses"]
    c = reference(cfg.replace({"seed": 1}), 5)["losses"]
    assert a == b
    assert a != c


def test_train_loop_logs_records_and_learns():
    cfg = small_cfg(**{"data.batch_size": 16, "train.max_steps": 60, "train.eval_every": 20, "log.every": 10})
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    records: list[dict] = []
    summary = train(job, records.append)
    assert [r["step"] for r in records] == [10, 20, 30, 40, 50, 60]
    assert {"step", "epoch", "samples", "loss", "lr", "grad_norm", "samples_per_s"} <= records[0].keys()
    assert [r["step"] for r in records if "val_loss" in r] == [20, 40, 60]
    assert records[-1]["samples"] == 60 * 16
    assert summary["steps"] == 60 and summary["status"] == "completed"
    assert records[-1]["loss"] < records[0]["loss"]
    assert summary["val_accuracy"] > 0.5  # 4 classes: chance is 0.25


def test_nonfinite_step_is_skipped_and_counted():
    cfg = small_cfg(**{"data.batch_size": 8})
    job = build_job(cfg, WorldInfo(), torch.device("cpu"))
    before = {k: v.clone() for k, v in job.bare_model.state_dict().items()}
    stream = job.data.train

    def poisoned():
        for x, y in stream:
            x[0, 0] = math.nan
            yield x, y

    job.data.train = poisoned()
    r = train_step(job)
    assert not r.stepped and math.isnan(r.loss_sum.item()) and math.isnan(r.grad_norm.item())
    for k, v in job.bare_model.state_dict().items():
        assert torch.equal(v, before[k]), k


def poisoned_rank_steps(cfg_dict: dict, bad_rank: int) -> dict:
    """Train 3 steps; the second batch of `bad_rank` carries a NaN."""
    cfg = config_from_dict(cfg_dict)
    world = WorldInfo.from_env()
    from shoal import dist

    dist.init_process_group(world, "gloo", 60, torch.device("cpu"))
    job = build_job(cfg, world, torch.device("cpu"))
    stream = job.data.train

    def batches():
        for i, (x, y) in enumerate(stream):
            if i == 1 and world.rank == bad_rank:
                x = x.clone()
                x[0, 0] = math.nan
            yield x, y

    job.data.train = batches()
    stepped = []
    for _ in range(3):
        stepped.append(train_step(job).stepped)
    params = torch.cat([p.detach().flatten() for p in job.bare_model.parameters()])
    return {"stepped": stepped, "params": params}


def test_nan_on_one_rank_skips_the_step_on_both_without_a_hang():
    cfg = small_cfg(**{"data.batch_size": 4})
    ranks = spawn_ranks(poisoned_rank_steps, 2, cfg.to_dict(), 1, timeout_s=60)
    assert [r["stepped"] for r in ranks] == [[True, False, True]] * 2
    assert torch.isfinite(ranks[0]["params"]).all()
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])


def test_tied_language_model_two_ranks_with_accumulation_equal_one_rank():
    # sgd: Adam would blow the float noise of gradients that are zero in exact arithmetic (the key
    # bias) up to full-size steps
    lm = {**TINY_LM, "optim.weight_decay": 0.1}
    steps = 3
    ranks = spawn_ranks(
        run_steps, 2, small_cfg(**lm, **{"data.batch_size": 2, "train.grad_accum_steps": 2}).to_dict(), steps
    )
    ref = reference(small_cfg(**lm, **{"data.batch_size": 8}), steps)
    assert_params_close(ranks[0]["params"], ranks[1]["params"], atol=0)
    assert_params_close(ranks[0]["params"], ref["params"], atol=1e-6)
    assert torch.equal(ranks[0]["params"]["head.weight"], ranks[0]["params"]["tok.weight"])  # still one tensor
