"""timm models as model.target (`timm:create_model`): sized by the data (channels, classes), never pretrained,
trained with augmentation as the built-in CNN is. timm needs a torchvision built for this torch: on this
project's CPU machines pip has only CUDA builds of it, so these tests run where a matching one is installed."""

from __future__ import annotations

import pytest
import torch

from shoal.config import JobConfig
from shoal.dist import WorldInfo
from shoal.engine import train
from shoal.job import build_job

try:
    import timm  # noqa: F401  (imported to find out whether it can be)
except Exception as e:  # torchvision's operators fail to load beside a CPU torch
    pytest.skip(
        f"timm does not import here ({type(e).__name__}): install timm with a torchvision built for this torch",
        allow_module_level=True,
    )


def timm_cfg(tmp_path, **updates) -> JobConfig:
    return JobConfig().replace({
        "data.dataset": "digits", "data.batch_size": 32, "model.target": "timm:create_model",
        "model.kwargs": {"model_name": "resnet10t"}, "train.max_steps": 60, "train.eval_every": 60,
        "optim.lr": 0.003, "log.tensorboard": False, "run.dir": str(tmp_path), **updates,
    })  # fmt: skip


def test_a_timm_resnet_sized_by_the_data_beats_the_majority_class_with_augmentation(tmp_path):
    job = build_job(timm_cfg(tmp_path, **{"data.augment": ["hflip"]}), WorldInfo(), torch.device("cpu"))
    model = job.bare_model
    assert model.num_classes == 10 and model.conv1[0].in_channels == 1  # digits: 1 channel, 10 classes
    assert train(job, lambda r: None)["val_accuracy"] > 0.3  # the majority class is 0.1
