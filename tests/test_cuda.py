"""The CUDA paths: NCCL, the device from LOCAL_RANK, pinned host memory. Skipped without a GPU
(run them on the device machine); the fp16/bf16 CUDA variants live in test_precision.py."""

from __future__ import annotations

import pytest
import torch

from shoal.config import JobConfig
from shoal.data.loaders import build_loaders
from shoal.dist import WorldInfo, init_process_group, select_backend, select_device

pytestmark = pytest.mark.cuda


def test_nccl_is_chosen_on_cuda_and_a_group_forms(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    world = WorldInfo()
    device = select_device(world, "auto")
    assert device.type == "cuda" and select_backend(device, "auto") == "nccl"
    import torch.distributed as dist

    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    t = torch.ones(3, device=device)
    dist.all_reduce(t)
    assert t.tolist() == [1.0, 1.0, 1.0]
    dist.destroy_process_group()
    init_process_group(world, "nccl", 30, device)  # a world of one needs no group


def test_batches_come_pinned_and_on_the_gpu():
    cfg = JobConfig().replace({"data.batch_size": 8})
    stream = build_loaders(cfg, WorldInfo(), torch.device("cuda", 0)).train
    assert stream._loader is not None and stream._loader.pin_memory
    x, y = next(stream)
    assert x.is_cuda and y.is_cuda


def test_ps_workers_train_on_the_gpu_they_reserve(ray_cluster, tmp_path):
    from shoal import launcher
    from shoal.config import load_config

    from conftest import REPO, tiny_overrides

    cfg = load_config(
        REPO / "configs" / "quickstart.yaml",
        tiny_overrides(
            tmp_path / "run",
            **{
                "strategy": "async_ps",
                "scaling.address": ray_cluster,
                "scaling.num_workers": 1,
                "scaling.gpus_per_worker": 1,
                "train.max_steps": 30,
                "train.eval_every": 0,
            },
        ),
    )
    summary = launcher.run(cfg)
    assert summary["status"] == "completed" and summary["steps"] == 30
    assert summary["device"].startswith("cuda"), summary["device"]


@pytest.mark.parametrize(
    "extra", [{}, {"fsdp.param_dtype": "bf16", "fsdp.reduce_dtype": "fp32"}, {"fsdp.cpu_offload": True}]
)
def test_fsdp_trains_on_the_gpu(tmp_path, extra):
    from shoal.config import load_config
    from shoal.worker import run_worker

    from conftest import REPO, tiny_overrides

    overrides = tiny_overrides(
        tmp_path / "run", **{"strategy": "fsdp", "scaling.device": "cuda", "train.max_steps": 30, **extra}
    )
    summary = run_worker(load_config(REPO / "configs" / "quickstart.yaml", overrides))
    assert summary["status"] == "completed" and summary["device"].startswith("cuda")
    assert summary["val_accuracy"] > 0.5 and summary["memory"]["peak_mb"][0] > 0
