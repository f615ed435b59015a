"""Strategies: how a model is spread over the ranks (see base.py for the interface)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the driver never loads torch
    import torch

    from shoal.config import JobConfig
    from shoal.dist import WorldInfo
    from shoal.strategies.base import Strategy


def build_strategy(cfg: JobConfig, world: WorldInfo, device: torch.device) -> Strategy:
    """The strategy object for this rank (async_ps workers accumulate locally: the single-process one)."""
    from shoal.strategies.base import Strategy

    if cfg.parallel.pipeline_stages > 1:  # stages, with the job's strategy across the replicas
        from shoal.strategies.pipeline import PipelineStrategy

        return PipelineStrategy(cfg, world, device)
    if cfg.strategy == "allreduce":
        from shoal.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, world, device)
    if cfg.strategy == "fsdp":
        from shoal.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, world, device)
    return Strategy(cfg, world, device)
