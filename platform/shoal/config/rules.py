"""The rules that join keys of several sections, one per feature.

`check` runs them in the order of RULES; the first broken one raises a ValueError that starts with the
key at fault ("train.precision: ..."), which the loader turns into a one-line ConfigError.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from shoal.config.learning import BatchRamp, ModelConfig, TrainConfig

if TYPE_CHECKING:  # schema.py runs these rules from its validator: importing it here would be a cycle
    from shoal.config.schema import JobConfig


def fp16_needs_cuda(cfg: JobConfig) -> None:
    if cfg.train.needs_cuda and cfg.scaling.on_cpu:
        raise ValueError(
            "train.precision: fp16 needs CUDA; use bf16 or fp32 on CPU, or train on GPUs "
            "(scaling.gpus_per_worker >= 1 with Ray, scaling.device=cuda with torchrun)"
        )


def fsdp(cfg: JobConfig) -> None:
    if cfg.strategy != "fsdp":
        return
    f = cfg.fsdp
    if cfg.train.precision == "fp16":
        raise ValueError(
            "train.precision: fp16 is not offered with strategy=fsdp (its loss scaler does not shard); "
            "use bf16, or fsdp.param_dtype: bf16 for bf16 compute with fp32 reduction"
        )
    if f.cpu_offload and cfg.scaling.on_cpu:
        raise ValueError(
            "fsdp.cpu_offload: needs CUDA (on CPU the parameters already live in host memory); "
            "turn it off or train on GPUs (scaling.gpus_per_worker >= 1)"
        )
    if not isinstance(f.reshard_after_forward, bool) and f.reshard_after_forward < 1:
        raise ValueError(
            f"fsdp.reshard_after_forward: true, false or a group size >= 1 (got {f.reshard_after_forward})"
        )


def pipeline(cfg: JobConfig) -> None:
    p, d = cfg.parallel, cfg.data
    if p.pipeline_stages <= 1:
        return
    if cfg.strategy == "async_ps":
        raise ValueError(
            "parallel.pipeline_stages: pipelines need synchronous training; use strategy allreduce or fsdp"
        )
    if d.batch_size % p.microbatches:
        raise ValueError(
            f"parallel.microbatches: {p.microbatches} must divide data.batch_size={d.batch_size} "
            "(each micro-batch is cut into that many equal pieces)"
        )
    if d.on_error == "skip":
        raise ValueError(
            "data.on_error: skip leaves micro-batches short, and pipeline stages need whole ones; use raise"
        )
    if d.mixup is not None or d.cutmix is not None:
        raise ValueError("data.mixup: mixed targets cannot be cut into pipeline pieces; not with pipeline stages")
    _pipeline_pieces(cfg)
    if cfg.ddp.static_graph:
        raise ValueError("ddp.static_graph: not with pipeline stages (the schedule runs the backward)")


def _pipeline_pieces(cfg: JobConfig) -> None:
    p, accum = cfg.parallel, cfg.train.grad_accum_steps
    if p.schedule != "gpipe" and p.microbatches * accum < p.pipeline_stages:
        raise ValueError(
            f"parallel.microbatches: {p.schedule} needs at least as many pieces per step as stages "
            f"({p.microbatches} x train.grad_accum_steps {accum} < {p.pipeline_stages}); "
            "raise it, or use parallel.schedule: gpipe"
        )


def compile_fits(cfg: JobConfig) -> None:
    if cfg.train.compile == "model" and cfg.parallel.pipeline_stages > 1:
        raise ValueError(
            "train.compile: model compiles the model's whole forward, which pipeline stages never call (each "
            "stage runs its own blocks); use train.compile: blocks"
        )


def static_graph(cfg: JobConfig) -> None:
    if cfg.ddp.static_graph and cfg.train.grad_accum_steps > 1:
        # DDP's static graph and no_sync() do not mix: an internal assert, or AllReduce silently stops
        raise ValueError("ddp.static_graph: cannot be combined with train.grad_accum_steps > 1; turn one of them off")


def batch_ramp(cfg: JobConfig) -> None:
    r = cfg.train.batch_ramp
    if r is None:
        return
    if cfg.train.grad_accum_steps != 1:
        raise ValueError("train.batch_ramp: sets the accumulation count itself; leave train.grad_accum_steps at 1")
    if cfg.strategy == "async_ps" or cfg.parallel.pipeline_stages > 1:
        raise ValueError("train.batch_ramp: needs strategy allreduce or fsdp without pipeline stages")
    if cfg.ddp.static_graph:
        raise ValueError("train.batch_ramp: accumulates micro-batches, which ddp.static_graph forbids")
    if r.auto and (cfg.strategy != "allreduce" or cfg.train.gns_every == 0):
        raise ValueError(
            "train.batch_ramp: auto follows the gradient noise scale, measured with strategy allreduce and "
            "train.gns_every > 0"
        )
    _ramp_whole_microbatches(r, unit=cfg.data.batch_size * cfg.scaling.num_workers)


def _ramp_whole_microbatches(r: BatchRamp, unit: int) -> None:
    for name, value in (("start", r.start), ("end", r.end)):
        if value is not None and value % unit:
            raise ValueError(
                f"train.batch_ramp: {name}={value} is not a multiple of data.batch_size x scaling.num_workers = {unit} "
                "(the ramp adds whole micro-batches on every rank)"
            )


def keep_sparsity(cfg: JobConfig) -> None:
    if cfg.model.keep_sparsity and (
        cfg.model.weights is None or cfg.strategy != "allreduce" or cfg.parallel.pipeline_stages > 1
    ):
        raise ValueError(
            "model.keep_sparsity: needs model.weights (the pruned weights) and strategy allreduce without pipeline stages"
        )


def plateau_needs_evals(cfg: JobConfig) -> None:
    if cfg.schedule.name == "plateau" and cfg.train.eval_every == 0:
        raise ValueError("schedule.name: plateau needs evaluations; set train.eval_every > 0")


def task_fits(cfg: JobConfig) -> None:
    if cfg.data.format == "memory":  # shards say their task in the manifest: checked when opened
        task = cfg.data.task if cfg.data.dataset == "synthetic" else "classification"
        check_task_fits(task, cfg.model, cfg.train)


def check_task_fits(task: str, model: ModelConfig, train: TrainConfig) -> None:
    """The model and loss must suit the data's task (ValueError with the key at fault)."""
    if (task == "lm") != (model.name == "transformer_lm") and model.target is None:
        raise ValueError(
            f"model.name: {model.name} does not fit data.task={task}; "
            "transformer_lm goes with data.task=lm and the other models with classification or regression"
        )
    if task == "regression" and train.loss != "mse":
        raise ValueError(f"train.loss: regression needs mse (got {train.loss})")


Rule = Callable[["JobConfig"], None]


# the order is the order of the checks' messages: with two problems, the first one listed is reported
def own_loss(cfg: JobConfig) -> None:
    """model.output: loss: the model's loss replaces train.loss, so train.loss's options have nothing to act on."""
    if cfg.model.output == "loss" and cfg.train.label_smoothing:
        raise ValueError(
            "train.label_smoothing: applies to train.loss, and model.output: loss uses the model's own loss; "
            "set it in the model's config (if it has one) or read its logits (model.output unset)"
        )


def elastic(cfg: JobConfig) -> None:
    """scaling.min_workers: a world between it and num_workers, resized within max_failures, by a strategy that can
    spread the same global batch over any number of data-parallel ranks."""
    s = cfg.scaling
    if s.min_workers is None:
        return
    if s.min_workers > s.num_workers:
        raise ValueError(
            f"scaling.min_workers: {s.min_workers} is more than scaling.num_workers={s.num_workers}; "
            "set it between 1 and num_workers"
        )
    if not s.elastic:
        return
    if cfg.parallel.pipeline_stages > 1:
        raise ValueError(
            "scaling.min_workers: pipelines cannot resize (their stages would have to be re-cut across ranks); "
            "remove scaling.min_workers or parallel.pipeline_stages"
        )
    if cfg.strategy == "async_ps":
        raise ValueError(
            "scaling.min_workers: async_ps already tolerates workers that come and go at its servers; "
            "use strategy allreduce or fsdp for elastic training"
        )
    if s.max_failures < 1:
        raise ValueError(
            "scaling.min_workers: the group resizes when a rank dies within scaling.max_failures, which is 0; "
            "set scaling.max_failures >= 1"
        )


RULES: list[Rule] = [
    fp16_needs_cuda,
    fsdp,
    pipeline,
    compile_fits,
    static_graph,
    batch_ramp,
    keep_sparsity,
    plateau_needs_evals,
    task_fits,
    own_loss,
    elastic,
]


def check(cfg: JobConfig) -> None:
    """Run every cross-section rule; the first broken one raises."""
    for rule in RULES:
        rule(cfg)
