"""What can be checked on the driver's machine before a cluster starts, in about a second: the run
directory, the data paths, the checkpoint to resume from, and that model.target and data.decode
can be found (found, not imported: the user's module runs in the ranks only)."""

from __future__ import annotations

from pathlib import Path

from shoal import rundir
from shoal.config import JobConfig
from shoal.data.locate import check_paths
from shoal.errors import CheckpointError, ConfigError
from shoal.imports import locate_object


def check(cfg: JobConfig, *, resume: bool = False, local_files: bool = True) -> Path:
    """Raise the first problem as a one-line ShoalError; returns the resolved run directory.

    local_files=False skips the data and checkpoint paths: on a cluster of other machines they are
    the nodes' paths, not this one's (the ranks check them where they read them).
    """
    for key, target in (
        ("model.target", cfg.model.target),
        ("data.decode", cfg.data.decode),
        ("parallel.split_fn", cfg.parallel.split_fn),
    ):
        if target:
            locate_object(target, key)
    check_trackers(cfg)
    if cfg.data.augment or cfg.data.mixup is not None or cfg.data.cutmix is not None:
        from shoal.data.augment_options import IMAGE_OPS, parse
        from shoal.data.spec import describe

        steps = parse(cfg.data, describe(cfg.data)[0])  # the data's shape, from the config or the shards' manifest
        needs_kornia = cfg.data.cutmix is not None or any(n in IMAGE_OPS or n == "erase" for n, _ in steps)
        if needs_kornia and not installed("kornia"):
            raise ConfigError(
                "image transforms and cutmix need kornia: pip install 'shoal[augment]'", key="data.augment"
            )
    stages = cfg.parallel.pipeline_stages
    if cfg.scaling.num_workers % stages:
        raise ConfigError(
            f"{stages} must divide scaling.num_workers={cfg.scaling.num_workers} (the world is stages x replicas)",
            key="parallel.pipeline_stages",
        )
    path = rundir.resolve(cfg)
    rundir.check(path, cfg, resume)
    if local_files:
        check_paths(cfg.data)
        if cfg.checkpoint.resume_from and not resume:
            check_checkpoint_dir(Path(cfg.checkpoint.resume_from).expanduser())
    return path


def check_trackers(cfg: JobConfig) -> None:
    """log.mlflow / log.wandb need their package where rank 0 runs (checked on every rank alike)."""
    for section in ("mlflow", "wandb"):
        if getattr(cfg.log, section) is not None and not installed(section):
            raise ConfigError(f"needs the {section} package: pip install 'shoal[{section}]'", key=f"log.{section}")


def installed(module: str) -> bool:
    """Importable here, found without importing it (importing mlflow costs the driver seconds)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ValueError, ImportError):  # a module set to None in sys.modules, or a broken package
        return False


def check_checkpoint_dir(path: Path) -> None:
    """A checkpoint directory that exists and was completed (its meta.json is written last)."""
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint.resume_from: {path}: not found (a checkpoint directory such as RUN_DIR/checkpoints/step-000100)"
        )
    if not (path / "meta.json").exists():
        raise CheckpointError(f"checkpoint.resume_from: {path}: incomplete (no meta.json); use a complete checkpoint")
