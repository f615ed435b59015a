"""Strategies: how a model is spread over the ranks (see base.py for the interface)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the driver never loads torch
    import torch

    from shoal.config import JobConfig
    from shoal.dist import WorldInfo
    from shoal.strategies.base import Strategy


def build_strategy(cfg: JobConfig, world: WorldInfo, device: torch.device) -> Strategy:
    """The strategy object for this rank: the job's strategy, or pipeline stages whose replicas use it
    (async_ps workers accumulate locally: the single-process one)."""
    kind = strategy_class(cfg.strategy)
    if cfg.parallel.pipeline_stages > 1:
        from shoal.strategies.pipeline import PipelineStrategy

        return PipelineStrategy(cfg, world, device, replicas=kind)
    return kind(cfg, world, device)


def strategy_class(name: str) -> type[Strategy]:
    """The class of strategy `name` (cfg.strategy). Only its module is imported: FSDP's and the pipeline's
    torch machinery take about a second each to load, and the driver imports this package without torch."""
    if name == "allreduce":
        from shoal.strategies.ddp import DDPStrategy

        return DDPStrategy
    if name == "fsdp":
        from shoal.strategies.fsdp import FSDPStrategy

        return FSDPStrategy
    from shoal.strategies.base import SingleStrategy

    return SingleStrategy
