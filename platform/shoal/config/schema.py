"""The job config: every section in its place, validated as one.

Each section checks its own keys; the rules that join keys of several sections live in rules.py.
"""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, model_validator

from shoal.config import rules
from shoal.config.execution import (
    CheckConfig,
    CheckpointConfig,
    DDPConfig,
    FSDPConfig,
    HealthConfig,
    LogConfig,
    ParallelConfig,
    PSConfig,
    RunConfig,
    ScalingConfig,
)
from shoal.config.learning import DataConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from shoal.config.section import Section


class JobConfig(Section):
    name: str = Field("shoal-job", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=63)
    """Job name: letters, digits, '_', '.', '-'; used for the run directory."""
    seed: int = Field(0, ge=0)
    """Seed for data order, model init and every random generator."""
    strategy: Literal["allreduce", "fsdp", "async_ps"] = "allreduce"
    """allreduce: synchronous DDP (a full replica per rank). fsdp: fully sharded data parallel (FSDP2: parameters,
    gradients and optimizer state sharded over the ranks). async_ps: workers push gradients to parameter servers
    without waiting."""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    ddp: DDPConfig = Field(default_factory=DDPConfig)
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    ps: PSConfig = Field(default_factory=PSConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    check: CheckConfig = Field(default_factory=CheckConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        rules.check(self)
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every value, defaults included (JSON/YAML safe), with YAML key names."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        """The resolved config as YAML, the form saved into the run directory."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, updates: dict[str, Any]) -> JobConfig:
        """A copy with dotted keys changed ({"run.dir": "/x"}), validated again."""
        # load.py validates through this module, so it is imported here, where it is first needed
        from shoal.config.load import replace

        return replace(self, updates)
