"""The job config: typed, validated, the single source of defaults and their documentation.

`load_config(path, overrides)` reads a YAML file, applies dotted `KEY=VALUE` overrides and
returns a frozen `JobConfig`. Every problem becomes a one-line `ConfigError` naming the file,
the line where the YAML has one, the dotted key and what is allowed.

section.py: what sections share; learning.py and execution.py: the sections; schema.py: JobConfig;
rules.py: the rules across sections; load.py and messages.py: reading and friendly errors;
reference.py: the README's generated reference.
"""

from shoal.config.execution import (
    CheckConfig,
    CheckpointConfig,
    DDPConfig,
    FSDPConfig,
    HealthConfig,
    KeepBest,
    LogConfig,
    MLflowLog,
    ParallelConfig,
    PSConfig,
    RunConfig,
    ScalingConfig,
    WandbLog,
)
from shoal.config.learning import (
    BatchRamp,
    DataConfig,
    EarlyStopping,
    GradNoise,
    Mix,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from shoal.config.load import QUICKSTART, config_from_dict, load_config, parse_override, quickstart_path
from shoal.config.reference import config_reference
from shoal.config.rules import check_task_fits
from shoal.config.schema import JobConfig
from shoal.config.section import Section, WatchedMetric

__all__ = [
    "QUICKSTART",
    "BatchRamp",
    "CheckConfig",
    "CheckpointConfig",
    "DDPConfig",
    "DataConfig",
    "EarlyStopping",
    "FSDPConfig",
    "GradNoise",
    "HealthConfig",
    "JobConfig",
    "KeepBest",
    "LogConfig",
    "MLflowLog",
    "Mix",
    "ModelConfig",
    "OptimConfig",
    "PSConfig",
    "ParallelConfig",
    "RunConfig",
    "ScalingConfig",
    "ScheduleConfig",
    "Section",
    "TrainConfig",
    "WandbLog",
    "WatchedMetric",
    "check_task_fits",
    "config_from_dict",
    "config_reference",
    "load_config",
    "parse_override",
    "quickstart_path",
]
