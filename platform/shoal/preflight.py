"""Every check that needs only the config and the files, in one place.

`check` is what `shoal train` (and `shoal worker`, `shoal submit`) run before anything starts, in about a
second and without torch: the run directory, the data paths, the checkpoint to resume from, that
model.target, data.decode and parallel.split_fn can be found (found, not imported: the user's module runs
in the ranks only), the trackers' packages, data.augment against the data's shape, the world's layout, and
the compiler train.compile needs.
`shoal validate` runs `check` and then `check_model`: the model built on the meta device (no memory, no
data) and checked as the ranks would check it (freeze patterns, fsdp units, pipeline splits, the output
size against the data). So `shoal train` never refuses what `shoal validate` passed."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from shoal import rundir
from shoal.config import JobConfig
from shoal.data.augment_options import IMAGE_OPS, parse
from shoal.data.locate import check_paths
from shoal.data.spec import describe
from shoal.errors import CheckpointError, ConfigError, ShoalError
from shoal.imports import locate_object
from shoal.toolchain import missing


def check(cfg: JobConfig, *, resume: bool = False, local_files: bool = True) -> Path:
    """Raise the first problem as a one-line ShoalError; returns the resolved run directory.

    local_files=False skips the local data and checkpoint paths: on a cluster of other machines they are
    the nodes' paths, not this one's (the ranks check them where they read them). s3:// data is checked
    either way: a URL names the same objects from every machine.
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
    check_paths(cfg.data, local=local_files)  # s3:// data is checked from any machine
    if local_files:
        check_compiler(cfg)
        if cfg.checkpoint.resume_from and not resume:
            check_checkpoint_dir(Path(cfg.checkpoint.resume_from).expanduser())
    return path


def check_model(cfg: JobConfig) -> None:
    """The model as the ranks build it, on the meta device: what it says about the config, without a run.

    A model that cannot be built on the meta device (a factory that reads real values) is left to the ranks,
    which check the same things when they build it.
    """
    import torch  # only here: `shoal train`'s driver never loads torch

    from shoal.losses import Loss
    from shoal.models import apply_freeze, blocks, build_model

    spec = describe(cfg.data)[0]
    loss = Loss.of(cfg, spec)
    try:
        with torch.device("meta"):
            model = build_model(cfg.model, spec, loss.out_features())
    except ShoalError:
        raise
    except Exception:  # not buildable without real memory: the ranks check it
        return
    apply_freeze(model, cfg.model.freeze)
    if cfg.strategy == "fsdp" or cfg.train.activation_checkpointing != "none" or cfg.train.compile == "blocks":
        blocks(model, cfg.fsdp.units or None)
    if cfg.parallel.pipeline_stages > 1:
        from shoal.strategies.pipeline import stage_chain, stage_starts  # torch, as above

        stage_starts(stage_chain(model, cfg), cfg, times=None)
    _check_output(model, spec, loss)


def _check_output(model, spec, loss) -> None:
    """One meta forward: the outputs per sample must fit the classes, vocabulary or targets."""
    import torch  # as in check_model

    dtype = torch.long if spec.task == "lm" or spec.token_ids else torch.float32
    x = torch.zeros((2, *spec.input_shape), dtype=dtype, device="meta")
    try:
        with torch.no_grad():
            out = model(x)
    except Exception:  # a forward that needs real values (or other inputs): checked at the first step
        return
    if isinstance(out, torch.Tensor):
        loss.check_output(out)


def check_trackers(cfg: JobConfig) -> None:
    """log.mlflow / log.wandb need their package where rank 0 runs (checked on every rank alike)."""
    for section in ("mlflow", "wandb"):
        if getattr(cfg.log, section) is not None and not installed(section):
            raise ConfigError(f"needs the {section} package: pip install 'shoal[{section}]'", key=f"log.{section}")


def check_compiler(cfg: JobConfig) -> None:
    """train.compile needs the compiler inductor calls (and Python's headers) where the ranks run: this machine,
    for local files."""
    problem = missing(cfg.scaling.on_cpu) if cfg.train.compile else None
    if problem:
        raise ConfigError(problem, key="train.compile")


def installed(module: str) -> bool:
    """Importable here, found without importing it (importing mlflow costs the driver seconds)."""
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
