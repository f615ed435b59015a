"""The job config: typed, validated, the single source of defaults and their documentation.

`load_config(path, overrides)` reads a YAML file, applies dotted `KEY=VALUE` overrides and
returns a frozen `JobConfig`. Every problem becomes a one-line `ConfigError` naming the file,
the line where the YAML has one, the dotted key and what is allowed.
"""

from __future__ import annotations

import difflib
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shoal.errors import ConfigError

QUICKSTART = "quickstart.yaml"


class Section(BaseModel):
    """A config section: unknown keys are errors, values are frozen, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True)


class ModelConfig(Section):
    name: Literal["mlp", "cnn", "resnet", "transformer_lm"] = "mlp"
    """Built-in model. Input and output sizes come from the data."""
    target: str | None = None
    """Your own model as "package.module:factory"; called with `kwargs`. Overrides `name`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for `target`."""
    width: int = Field(128, ge=1)
    """Hidden units (mlp), channels (cnn, resnet: first stage) or model dimension (transformer_lm)."""
    depth: int = Field(2, ge=1)
    """Hidden layers (mlp), conv blocks (cnn), blocks per stage (resnet) or layers (transformer_lm)."""
    activation: Literal["relu", "leaky_relu", "gelu", "tanh", "sigmoid"] = "relu"
    """Hidden activation of mlp and cnn."""
    init: Literal["default", "he", "xavier", "normal"] = "default"
    """Weight init: PyTorch's default, he (Kaiming normal), xavier (Glorot normal) or normal(0, init_std)."""
    init_std: float = Field(0.02, gt=0)
    """Standard deviation for init: normal."""
    norm: Literal["none", "batch", "layer"] = "none"
    """Normalisation after each hidden layer of mlp and cnn (resnet always uses batch norm)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout probability after each hidden layer."""
    residual: bool = False
    """Skip connections around the mlp's hidden layers of equal width."""
    heads: int = Field(4, ge=1)
    """Attention heads (transformer_lm); must divide width."""
    tie_embeddings: bool = True
    """transformer_lm: the output projection shares the token embedding's weights (as GPT-2)."""
    freeze: list[str] = Field(default_factory=list)
    """Glob patterns of parameter names to freeze (no gradient, not in the optimizer), e.g. "layers.0.*"."""
    weights: str | None = None
    """Start from these weights: a state dict file (`shoal export` or `shoal compress` output), loaded strictly."""
    keep_sparsity: bool = False
    """Keep the zeros of the starting weights zero (masks applied after every optimizer step): fine-tuning a pruned
    model. strategy allreduce without pipeline stages."""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.target is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.target):
            raise ValueError(f"model.target: must look like 'package.module:factory' (got {self.target!r})")
        if self.name == "transformer_lm" and self.width % self.heads:
            raise ValueError(f"model.heads: must divide model.width={self.width} (got {self.heads})")
        return self


class Mix(Section):
    alpha: float = Field(..., ge=0)
    """Beta(alpha, alpha) draws the share of the first sample (0 = no mixing; 0.2-1.0 are usual)."""


class DataConfig(Section):
    format: Literal["memory", "shards"] = "memory"
    """Where samples come from: memory (a built-in data set in each process) or shards (webdataset tar files, streamed)."""
    path: str | None = None
    """shards: a directory written by `shoal shard` (with manifest.json), a brace pattern such as
    "data/train-{000000..000127}.tar", or any URL webdataset opens (http://, s3 via pipe:, pipe:CMD)."""
    val_path: str | None = None
    """shards: validation shards when data.path is not a `shoal shard` directory (which holds its own split)."""
    manifest: str | None = None
    """shards: manifest.json for a pattern or URL (counts without scanning); default: the one beside local shards."""
    decode: str | None = None
    """shards: "package.module:fn" turning a sample into (x, y); for Shoal's packed shards it gets and returns whole blocks."""
    on_error: Literal["raise", "skip"] = "raise"
    """shards: a missing, truncated or malformed shard or sample stops the job (raise) or is skipped, counted and reported (skip)."""
    shuffle_buffer: int = Field(4096, ge=1)
    """shards: samples shuffled together within each window of the epoch (after the shard order is shuffled)."""
    dataset: Literal["digits", "synthetic"] = "digits"
    """digits: scikit-learn's bundled 8x8 handwritten digits (1,797 samples). synthetic: generated per index."""
    task: Literal["classification", "regression", "lm"] = "classification"
    """Synthetic task: classification (labels from a fixed random teacher), regression or lm (token sequences)."""
    num_samples: int = Field(10_000, ge=1)
    """Synthetic samples (train and validation together). Up to 256 MiB they are generated once and held; beyond, per batch (flat memory at any size)."""
    input_shape: list[int] = Field(default_factory=lambda: [32])
    """Synthetic input shape, e.g. [784] or [1, 8, 8] for a cnn."""
    num_classes: int = Field(10, ge=2)
    """Synthetic classes."""
    vocab_size: int = Field(64, ge=2)
    """Synthetic lm vocabulary."""
    seq_len: int = Field(32, ge=2)
    """Synthetic lm sequence length (tokens per sample)."""
    val_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of samples held out for validation, split by `seed`."""
    batch_size: int = Field(32, ge=1)
    """Micro-batch size per rank; an optimizer step sees batch_size x grad_accum_steps x world size samples."""
    shuffle: bool = True
    """Reshuffle every epoch, seeded by (seed, epoch)."""
    num_workers: int = Field(0, ge=0)
    """DataLoader worker processes per rank; 0 reads in the training process (best on few cores)."""
    prefetch_factor: int = Field(2, ge=1)
    """Batches each loader worker prepares ahead."""
    pin_memory: Literal["auto"] | bool = "auto"
    """Pin host memory for faster copies to the GPU; auto = on with CUDA."""
    persistent_workers: bool = True
    """Keep loader workers alive across epochs."""
    augment: list[str | dict[str, Any]] = Field(default_factory=list)
    """Training-batch transforms, in order (never on validation): crop, hflip, rotate, translate, color_jitter (images
    [C, H, W]); noise, erase (any tensor input); token_mask (lm); or "package.module:fn" (fn(x, generator) -> x, batched).
    Options as {name: {...}}, e.g. {crop: {padding: 1}}; see Augmentation."""
    mixup: Mix | None = None
    """Mix pairs of training samples and their targets: {alpha} (Beta(alpha, alpha) proportions; classification)."""
    cutmix: Mix | None = None
    """Paste a box of one image into another, targets mixed by area: {alpha} (images; classification). With mixup
    too, each batch takes one of the two at random."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.format == "shards" and not self.path:
            raise ValueError(
                "data.path: data.format=shards needs data.path (a `shoal shard` directory, a pattern or a URL)"
            )
        if self.decode is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.decode):
            raise ValueError(f"data.decode: must look like 'package.module:fn' (got {self.decode!r})")
        if any(d < 1 for d in self.input_shape) or not self.input_shape:
            raise ValueError(f"data.input_shape: must be a non-empty list of positive sizes (got {self.input_shape})")
        return self


class GradNoise(Section):
    eta: float = Field(..., gt=0)
    """Noise variance at step 0 (Neelakantan et al. 2015 use 0.01-1.0)."""
    gamma: float = Field(0.55, ge=0)
    """Annealing: the variance at step t is eta / (1 + t)^gamma."""


class BatchRamp(Section):
    start: int | None = Field(None, ge=1)
    """Global batch (samples per optimizer step, all ranks) at step 0; default: data.batch_size x data-parallel ranks.
    A multiple of that product: the ramp raises the accumulation count, never the micro-batch."""
    end: int | None = Field(None, ge=1)
    """Global batch at the end of the ramp (auto: the most it may grow to; default 8 x start)."""
    steps: int = Field(0, ge=0)
    """Optimizer steps over which the batch grows linearly from start to end (not with auto)."""
    auto: bool = False
    """Grow the batch towards the measured gradient noise scale (gns) instead, at log steps, never shrinking."""
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    """Scale optim.lr with the batch: lr x (batch / start) or its square root (optim.lr is the start batch's rate)."""

    @model_validator(mode="before")
    @classmethod
    def _auto(cls, value: Any) -> Any:
        return {"auto": True} if value == "auto" else value

    @model_validator(mode="after")
    def _check(self) -> BatchRamp:
        if not self.auto and (self.end is None or self.steps < 1):
            raise ValueError("train.batch_ramp: give end and steps (or auto: true, or the string auto)")
        if self.start is not None and self.end is not None and self.end < self.start:
            raise ValueError(f"train.batch_ramp: end {self.end} is below start {self.start}")
        return self


class OptimConfig(Section):
    name: Literal["sgd", "adam", "adamw", "rmsprop"] = "adamw"
    """Optimizer."""
    lr: float = Field(1e-3, gt=0)
    """Peak learning rate (after warmup)."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """Momentum for sgd and rmsprop."""
    nesterov: bool = False
    """Nesterov momentum (sgd; needs momentum > 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam and AdamW betas."""
    eps: float = Field(1e-8, gt=0)
    """Adam, AdamW and RMSprop epsilon."""
    weight_decay: float = Field(0.0, ge=0)
    """Weight decay (decoupled for adamw, L2 in the gradient for the others)."""
    decay_bias_and_norm: bool = False
    """Also decay tensors of fewer than two dimensions (biases, normalisation gains, scalars); by default only
    tensors of two or more dimensions are decayed, whatever module owns them."""
    l1: float = Field(0.0, ge=0)
    """L1 penalty on the decayed weights, added to their gradients."""
    grad_noise: GradNoise | None = None
    """Annealed Gaussian noise added to the gradients after clipping, e.g. {eta: 0.01, gamma: 0.55}."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """Optimizer kernels: fused (one kernel for every tensor; sgd, adam, adamw), foreach (batched ops) or for_loop
    (one tensor at a time, torch's CPU default); auto = fused where torch has it for these parameters, else foreach."""

    @model_validator(mode="after")
    def _check(self) -> OptimConfig:
        if self.nesterov and (self.name != "sgd" or self.momentum <= 0):
            raise ValueError("optim.nesterov: needs optim.name=sgd and optim.momentum > 0")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas: each must be in [0, 1) (got {list(self.betas)})")
        return self


class ScheduleConfig(Section):
    name: Literal[
        "constant", "step", "multistep", "cosine", "plateau", "range_test", "cyclic", "one_cycle", "cosine_restarts"
    ] = "constant"
    """Learning-rate schedule after warmup (range_test: exponential from optim.lr x range_start_ratio to optim.lr, as
    `shoal lr-find` uses; cyclic, one_cycle and cosine_restarts: see Schedules)."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to optim.lr over this many steps (any schedule)."""
    step_size: int = Field(100, ge=1)
    """step: multiply by gamma every step_size steps."""
    gamma: float = Field(0.1, gt=0, le=1)
    """step and multistep: decay factor."""
    milestones: list[int] = Field(default_factory=list)
    """multistep: steps at which to multiply by gamma (ascending)."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """cosine: final learning rate as a fraction of optim.lr."""
    range_start_ratio: float = Field(1e-5, gt=0, le=1)
    """range_test: first learning rate as a fraction of optim.lr."""
    metric: str = "val_loss"
    """plateau: evaluation metric watched."""
    mode: Literal["min", "max"] = "min"
    """plateau: whether the metric should go down or up."""
    patience: int = Field(3, ge=0)
    """plateau: evaluations without improvement before the rate drops."""
    factor: float = Field(0.1, gt=0, lt=1)
    """plateau: factor applied to the rate on a plateau."""
    threshold: float = Field(1e-4, ge=0)
    """plateau: relative improvement that counts."""
    min_lr: float = Field(0.0, ge=0)
    """plateau: lower bound of the rate."""
    cycle_steps: int = Field(200, ge=2)
    """cyclic: steps of one whole cycle (up, then down: Smith's step_size is half of it)."""
    cyclic_mode: Literal["triangular", "triangular2", "exp_range"] = "triangular"
    """cyclic: constant amplitude, halved every cycle, or scaled by gamma^step."""
    base_lr_ratio: float = Field(0.1, gt=0, le=1)
    """cyclic: the low end of the cycle as a fraction of optim.lr (the high end)."""
    pct_start: float = Field(0.3, gt=0, lt=1)
    """one_cycle: share of the run spent raising the rate to optim.lr."""
    div_factor: float = Field(25.0, ge=1)
    """one_cycle: the first rate is optim.lr / div_factor."""
    final_div_factor: float = Field(1e4, ge=1)
    """one_cycle: the last rate is optim.lr / (div_factor x final_div_factor)."""
    cycle_momentum: bool = True
    """one_cycle: move momentum (sgd/rmsprop momentum, adam's beta1) inversely to the rate, max_momentum to base."""
    base_momentum: float = Field(0.85, ge=0, lt=1)
    """one_cycle: momentum at the peak rate."""
    max_momentum: float = Field(0.95, ge=0, lt=1)
    """one_cycle: momentum at the lowest rates."""
    restart_period: int = Field(100, ge=1)
    """cosine_restarts: steps until the first restart (SGDR's T_0)."""
    restart_mult: int = Field(1, ge=1)
    """cosine_restarts: each period is this many times the previous one (T_mult); min_lr_ratio sets the floor."""

    @model_validator(mode="after")
    def _check(self) -> ScheduleConfig:
        if self.name == "multistep":
            if not self.milestones:
                raise ValueError("schedule.milestones: multistep needs at least one milestone")
            if sorted(set(self.milestones)) != self.milestones or self.milestones[0] < 1:
                raise ValueError(
                    f"schedule.milestones: must be strictly ascending positive steps (got {self.milestones})"
                )
        if self.name == "one_cycle" and self.warmup_steps:
            raise ValueError("schedule.warmup_steps: one_cycle warms up itself (schedule.pct_start); leave it at 0")
        if self.max_momentum < self.base_momentum:
            raise ValueError("schedule.max_momentum: must be at least schedule.base_momentum")
        return self


class EarlyStopping(Section):
    metric: str = "val_loss"
    """Evaluation metric watched."""
    mode: Literal["min", "max"] = "min"
    """Whether the metric should go down or up."""
    patience: int = Field(3, ge=1)
    """Evaluations without improvement before training stops."""
    min_delta: float = Field(0.0, ge=0)
    """Smallest change that counts as an improvement."""
    restore_best: bool = True
    """End with the weights of the best evaluation (and save them as the final checkpoint)."""


class TrainConfig(Section):
    max_steps: int = Field(1000, ge=1)
    """Optimizer steps to run."""
    max_time_s: float | None = Field(None, gt=0)
    """Also stop (as completed) after this many seconds of training; all ranks agree on it."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step; gradients are AllReduced once, after the last one."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype. fp16 adds a GradScaler and needs CUDA; bf16 runs on CPU and recent GPUs."""
    clip_grad_norm: float | None = Field(None, gt=0)
    """Clip gradients to this global L2 norm (after unscaling)."""
    clip_grad_value: float | None = Field(None, gt=0)
    """Clip each gradient element to [-v, v] (after unscaling)."""
    loss: Literal["cross_entropy", "mse", "bce_with_logits"] = "cross_entropy"
    """Loss function."""
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    """cross_entropy label smoothing."""
    eval_every: int = Field(100, ge=0)
    """Evaluate on the validation split every this many steps (and at the end); 0 = only at the end."""
    eval_batches: int | None = Field(None, ge=1)
    """Limit each evaluation to this many batches per rank; None = the whole validation split."""
    early_stopping: EarlyStopping | None = None
    """Stop when the metric stops improving, e.g. {metric: val_loss, mode: min, patience: 3, min_delta: 0, restore_best: true}."""
    activation_checkpointing: Literal["none", "full", "every_n"] = "none"
    """Recompute blocks' activations in the backward pass instead of keeping them (less memory, more compute): every
    block (full) or every activation_checkpointing_every-th one; blocks are the built-in models' layers/blocks, or the
    modules fsdp.units names for your own model."""
    activation_checkpointing_every: int = Field(2, ge=1)
    """every_n: checkpoint blocks 0, n, 2n, ..."""
    batch_ramp: BatchRamp | None = None
    """Grow the global batch during training: {start, end, steps, lr_scaling} or auto (see Batch size); leave
    train.grad_accum_steps at 1, the ramp sets the accumulation count."""
    gns_every: int = Field(10, ge=0)
    """Measure the gradient noise scale (gns, McCandlish et al. 2018) on every n-th step from each rank's gradient
    before the AllReduce and the reduced one (strategy allreduce, 2+ ranks); 0 = off."""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.clip_grad_norm is not None and self.clip_grad_value is not None:
            raise ValueError(
                "train.clip_grad_value: set either train.clip_grad_norm or train.clip_grad_value, not both"
            )
        if self.label_smoothing and self.loss != "cross_entropy":
            raise ValueError("train.label_smoothing: only applies to train.loss=cross_entropy")
        return self


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    """DDP ranks started by `shoal train` (torchrun decides this itself for `shoal worker`)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved for each rank in the Ray cluster."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs reserved for each rank in the Ray cluster; 0 trains on CPU."""
    threads_per_worker: int | None = Field(None, ge=1)
    """torch intra-op threads per rank; None = cpus_per_worker under Ray, torch's choice otherwise."""

    def threads(self, under_ray: bool) -> int | None:
        """threads_per_worker resolved: the one place its default is derived."""
        if self.threads_per_worker is not None:
            return self.threads_per_worker
        return max(1, int(self.cpus_per_worker)) if under_ray else None

    address: str | None = None
    """Ray cluster to join (e.g. "auto" or "HOST:6379"); None = RAY_ADDRESS if set, else an embedded local cluster."""
    placement: Literal["pack", "spread", "strict_spread"] = "pack"
    """How ranks are placed on nodes: pack onto few, spread over many, or one per node."""
    placement_timeout_s: float = Field(60.0, gt=0)
    """How long to wait for the cluster to grant the workers' resources before failing."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Training device; auto = CUDA when the rank sees a GPU."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    timeout_s: float = Field(300.0, gt=0)
    """Collective timeout: a lost rank fails the job after this long, not after torch's 30-minute default."""
    dashboard: bool = False
    """Start the Ray dashboard (and Jobs API) with the embedded cluster, on 127.0.0.1 only."""
    max_failures: int = Field(0, ge=0)
    """Restarts allowed for the whole job: a rank that dies, fails or hangs restarts every worker from the latest checkpoint."""
    hang_timeout_s: float | None = Field(None, gt=0)
    """A rank that finishes no step for this long counts as failed (None: never; set it above your slowest step, eval or save)."""


class FSDPConfig(Section):
    units: list[str] = Field(default_factory=list)
    """strategy=fsdp: modules that become their own shard unit, by class name (e.g. DecoderBlock) or name glob
    (e.g. "blocks.*"); also the blocks train.activation_checkpointing acts on. Empty: the built-in models' layers
    and blocks, or the direct children that hold parameters of a model.target."""
    reshard_after_forward: bool | int = True
    """Free the gathered parameters after forward (true: least memory), keep them for backward (false: no second
    all-gather), or keep them sharded over groups of this many ranks in between (an integer dividing the ranks per shard group)."""
    param_dtype: Literal["fp32", "bf16"] | None = None
    """Mixed precision through FSDP's policy: the dtype parameters are gathered and computed in (bf16 halves the
    all-gather); None = fp32 (train.precision's autocast still applies)."""
    reduce_dtype: Literal["fp32", "bf16"] | None = None
    """Dtype gradients are reduced in; None = fp32 (e.g. bf16 compute with fp32 reduction)."""
    cpu_offload: bool = False
    """Keep sharded parameters, gradients and optimizer state in host memory and compute on the GPU (needs CUDA)."""
    sharding: Literal["full", "hybrid"] = "full"
    """full: shard over every rank. hybrid: shard within each node and replicate across nodes (a 2-D device mesh:
    nodes x ranks per node), so the all-gathers stay on a node's fast links."""


class ParallelConfig(Section):
    pipeline_stages: int = Field(1, ge=1)
    """Split the model's layers into this many pipeline stages, each on its own rank; the world is stages x
    replicas, and the replicas are data parallel with the job's strategy (allreduce or fsdp). Ranks r*P..r*P+P-1
    form replica r's pipeline (neighbours on one node, as torchrun numbers ranks node after node)."""
    schedule: Literal["gpipe", "1f1b", "interleaved_1f1b"] = "1f1b"
    """Pipeline schedule: gpipe (all forwards, then all backwards), 1f1b (one forward, one backward: fewer
    activations held), interleaved_1f1b (two stages per rank, a smaller bubble)."""
    microbatches: int = Field(4, ge=1)
    """Pieces each data.batch_size micro-batch is cut into for the pipeline (must divide data.batch_size); with
    train.grad_accum_steps = k one schedule runs k x microbatches of them, with one gradient reduction."""
    balance: Literal["params", "time"] = "params"
    """How the built-in models' layers are balanced over the stages: by parameter count, or by their measured
    forward and backward time on a sample batch (rank 0 measures; every rank uses its split)."""
    split_points: list[str] = Field(default_factory=list)
    """Module names where a new stage starts, e.g. ["layers.4", "layers.8"] (an nn.Sequential model.target, or a
    built-in model); overrides the balancing."""
    split_fn: str | None = None
    """"package.module:fn" for a model whose forward is not a plain chain: fn(model) returns the names of the
    modules whose forwards, applied in order, make the model's forward."""

    @model_validator(mode="after")
    def _check(self) -> ParallelConfig:
        if self.split_fn is not None and not re.fullmatch(r"[\w.]+:[\w.]+", self.split_fn):
            raise ValueError(f"parallel.split_fn: must look like 'package.module:fn' (got {self.split_fn!r})")
        return self


class DDPConfig(Section):
    bucket_cap_mb: float = Field(25.0, gt=0)
    """Gradient bucket size for AllReduce."""
    gradient_as_bucket_view: bool = True
    """Gradients are views into the AllReduce buckets (saves a copy and memory)."""
    static_graph: bool = False
    """Tell DDP the graph is the same every step (enables some optimisations)."""
    find_unused_parameters: bool = False
    """Allow parameters that get no gradient in a step (slower; only for models that need it)."""
    broadcast_buffers: bool = True
    """Broadcast buffers (batch-norm statistics) from rank 0 at every forward."""


class PSConfig(Section):
    num_shards: int = Field(1, ge=1)
    """strategy=async_ps: parameter-server actors, each owning a slice of the parameters balanced by bytes."""
    max_staleness: int | None = Field(None, ge=0)
    """Bounded staleness (SSP): an update computed on parameters more than this many versions old is
    dropped and its worker pulls again; None = no bound."""
    staleness_lr: Literal["none", "inverse"] = "none"
    """Scale each update's learning rate by 1/staleness (inverse; staleness 0 counts as 1)."""
    overlap: bool = False
    """Compute the next gradient while the last push travels (hides the round trip; staleness grows by about 1)."""
    cpus_per_server: float = Field(0.0, ge=0)
    """CPUs reserved per parameter server in the Ray cluster."""


class HealthConfig(Section):
    every: int = Field(10, ge=1)
    """Measure per-layer gradient and weight norms and update ratios every this many steps (rank 0)."""
    activations: bool = False
    """Also record activation mean/std and the dead-ReLU fraction through forward hooks (costs a little)."""
    warmup_steps: int = Field(20, ge=0)
    """Steps before the gradient detectors start judging (early steps are noisy)."""
    vanishing_ratio: float = Field(1e-3, gt=0, lt=1)
    """Vanishing: the first layers' gradient norm below this fraction of the last layers'."""
    vanishing_floor: float = Field(1e-7, ge=0)
    """Vanishing: any layer's gradient norm below this."""
    explode_norm: float = Field(1e3, gt=0)
    """Exploding: global gradient norm above this."""
    spike_factor: float = Field(10.0, gt=1)
    """Exploding: global gradient norm this many times its running median."""
    divergence_factor: float = Field(5.0, gt=1)
    """Divergence: training loss this many times its starting value (or chance level for classification)."""
    plateau_evals: int = Field(5, ge=2)
    """Plateau: evaluations without improvement of the validation loss."""
    overfit_evals: int = Field(3, ge=2)
    """Overfitting: consecutive evaluations with validation loss rising while training loss falls."""
    input_bound_fraction: float = Field(0.5, gt=0, le=1)
    """Input-bound: share of the step spent waiting for data."""
    on_nonfinite: Literal["skip", "rollback", "stop"] = "skip"
    """When the loss or gradients turn NaN/Inf, or the loss diverges: skip the step (NaN/Inf only), roll back to the
    last checkpoint (or the start) with a lower learning rate, or stop with the diagnosis. Decided alike on every rank."""
    rollback_lr_factor: float = Field(0.1, gt=0, lt=1)
    """Learning-rate multiplier applied at each rollback."""
    max_rollbacks: int = Field(5, ge=1)
    """Stop after this many rollbacks."""
    histograms_every: int = Field(0, ge=0)
    """Write TensorBoard histograms of every layer's weights, gradients and activations (and quantiles to
    metrics.jsonl, which `shoal doctor` plots over time) every this many steps, rank 0; 0 = off."""


class CheckConfig(Section):
    on_findings: Literal["warn", "fail", "off"] = "warn"
    """What `shoal train` does with the findings of its quick check (config lints, loss/task fit; first-step loss
    against chance on rank 0): print them as warnings, refuse to start (exit 2), or skip the check."""
    sample_size: int = Field(5000, ge=16)
    """`shoal check`: samples drawn evenly from every shard for the model probes, baselines and plots (statistics,
    NaN, label range, duplicates and leakage are counted over every sample in one streaming pass)."""
    max_hashes: int = Field(2_000_000, ge=1000)
    """`shoal check`: samples per split whose content hashes are kept for exact duplicate and leakage counts
    (16 bytes each); past it a fixed share of the hash space is tracked and the counts are scaled (marked estimated)."""
    overfit_steps: int = Field(300, ge=10)
    """`shoal check`: most steps of the overfit-one-batch test (it stops as soon as the batch is memorised)."""
    overfit_batch: int = Field(32, ge=2)
    """`shoal check`: samples in the batch the model must memorise."""


class MLflowLog(Section):
    tracking_uri: str | None = None
    """MLflow tracking server (http://host:5000), or a local store (file:./mlruns, sqlite:///mlflow.db); None = MLflow's
    own default (MLFLOW_TRACKING_URI, else ./mlruns)."""
    experiment: str = "shoal"
    """Experiment the run is logged under (created if missing)."""
    run_name: str | None = None
    """Run name; default: the job's name."""
    log_checkpoints: bool = False
    """Also upload the checkpoints as artifacts at the end (they can be large)."""
    parent_run_id: str | None = None
    """Nest the run under this MLflow run (set by `shoal sweep` and `shoal compare` to group their runs)."""


class WandbLog(Section):
    project: str = "shoal"
    """W&B project."""
    entity: str | None = None
    """W&B team or user; default: the logged-in user's."""
    mode: Literal["online", "offline"] = "online"
    """offline writes the run under RUN_DIR/wandb for `wandb sync` later; no network needed."""
    run_name: str | None = None
    """Run name; default: the job's name."""
    group: str | None = None
    """Group runs together (set by `shoal sweep` and `shoal compare`)."""
    tags: list[str] = Field(default_factory=list)
    """Tags on the run."""
    log_checkpoints: bool = False
    """Also upload the checkpoints at the end."""


class LogConfig(Section):
    every: int = Field(10, ge=1)
    """Write a metrics line every this many steps."""
    tensorboard: bool = True
    """Write TensorBoard event files into the run directory."""
    progress: Literal["auto", "bar", "lines", "none"] = "auto"
    """Progress display: a bar on a terminal, periodic lines otherwise (auto)."""
    print_every_s: float = Field(10.0, gt=0)
    """Seconds between progress lines when there is no bar."""
    mlflow: MLflowLog | None = None
    """Log to MLflow (rank 0, in the background): {tracking_uri, experiment, run_name, log_checkpoints}."""
    wandb: WandbLog | None = None
    """Log to Weights & Biases (rank 0, in the background): {project, mode: online | offline, ...}."""


class KeepBest(Section):
    metric: str = "val_loss"
    """Metric from the evaluations, e.g. val_loss or val_accuracy."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher is better."""


class CheckpointConfig(Section):
    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, validate_default=True, populate_by_name=True
    )

    every_steps: int | None = Field(None, ge=1)
    """Save every this many optimizer steps."""
    every_minutes: float | None = Field(None, gt=0)
    """Save when this many minutes have passed since the last save (decided by all ranks together)."""
    at_end: bool = True
    """Save when training ends (also when it is stopped by SIGTERM or SIGINT)."""
    keep_last: int | None = Field(None, ge=1)
    """Keep only the newest K checkpoints (plus the newest one from before a non-finite loss, and the best)."""
    keep_best: KeepBest | None = None
    """Also keep the checkpoint with the best evaluation metric, e.g. {metric: val_loss, mode: min}."""
    async_save: bool = Field(False, alias="async")
    """(YAML key `async`) Snapshot the state to host memory and write it in the background; one save in flight."""
    resume_from: str | None = None
    """Start from this checkpoint directory (a fresh run directory is fine); `--resume` uses the run's latest instead."""


class RunConfig(Section):
    dir: str | None = None
    """Run directory; None = runs/<name>-<YYYYmmdd-HHMMSS> under the current directory."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds a run (otherwise an error)."""


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
        s = self.scaling
        if self.train.precision == "fp16" and (s.device == "cpu" or (s.device == "auto" and s.gpus_per_worker == 0)):
            raise ValueError(
                "train.precision: fp16 needs CUDA; use bf16 or fp32 on CPU, or train on GPUs "
                "(scaling.gpus_per_worker >= 1 with Ray, scaling.device=cuda with torchrun)"
            )
        if self.strategy == "fsdp":
            self._check_fsdp()
        if self.parallel.pipeline_stages > 1:
            self._check_pipeline()
        if self.ddp.static_graph and self.train.grad_accum_steps > 1:
            # DDP's static graph and no_sync() do not mix: an internal assert, or AllReduce silently stops
            raise ValueError(
                "ddp.static_graph: cannot be combined with train.grad_accum_steps > 1; turn one of them off"
            )
        if self.train.batch_ramp is not None:
            self._check_ramp(self.train.batch_ramp)
        if self.model.keep_sparsity and (
            self.model.weights is None or self.strategy != "allreduce" or self.parallel.pipeline_stages > 1
        ):
            raise ValueError(
                "model.keep_sparsity: needs model.weights (the pruned weights) and strategy allreduce without pipeline stages"
            )
        if self.schedule.name == "plateau" and self.train.eval_every == 0:
            raise ValueError("schedule.name: plateau needs evaluations; set train.eval_every > 0")
        if self.data.format == "memory":  # shards say their task in the manifest: checked when opened
            task = self.data.task if self.data.dataset == "synthetic" else "classification"
            check_task_fits(task, self.model, self.train)
        return self

    def _check_ramp(self, r: BatchRamp) -> None:
        if self.train.grad_accum_steps != 1:
            raise ValueError("train.batch_ramp: sets the accumulation count itself; leave train.grad_accum_steps at 1")
        if self.strategy == "async_ps" or self.parallel.pipeline_stages > 1:
            raise ValueError("train.batch_ramp: needs strategy allreduce or fsdp without pipeline stages")
        if self.ddp.static_graph:
            raise ValueError("train.batch_ramp: accumulates micro-batches, which ddp.static_graph forbids")
        if r.auto and (self.strategy != "allreduce" or self.train.gns_every == 0):
            raise ValueError(
                "train.batch_ramp: auto follows the gradient noise scale, measured with strategy allreduce and "
                "train.gns_every > 0"
            )
        unit = self.data.batch_size * self.scaling.num_workers
        for name, value in (("start", r.start), ("end", r.end)):
            if value is not None and value % unit:
                raise ValueError(
                    f"train.batch_ramp: {name}={value} is not a multiple of data.batch_size x scaling.num_workers = {unit} "
                    "(the ramp adds whole micro-batches on every rank)"
                )

    def _check_pipeline(self) -> None:
        p, d = self.parallel, self.data
        if self.strategy == "async_ps":
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
        pieces = p.microbatches * self.train.grad_accum_steps
        if p.schedule != "gpipe" and pieces < p.pipeline_stages:
            raise ValueError(
                f"parallel.microbatches: {p.schedule} needs at least as many pieces per step as stages "
                f"({p.microbatches} x train.grad_accum_steps {self.train.grad_accum_steps} < {p.pipeline_stages}); "
                "raise it, or use parallel.schedule: gpipe"
            )
        if self.ddp.static_graph:
            raise ValueError("ddp.static_graph: not with pipeline stages (the schedule runs the backward)")

    def _check_fsdp(self) -> None:
        s, f = self.scaling, self.fsdp
        on_cpu = s.device == "cpu" or (s.device == "auto" and s.gpus_per_worker == 0)
        if self.train.precision == "fp16":
            raise ValueError(
                "train.precision: fp16 is not offered with strategy=fsdp (its loss scaler does not shard); "
                "use bf16, or fsdp.param_dtype: bf16 for bf16 compute with fp32 reduction"
            )
        if f.cpu_offload and on_cpu:
            raise ValueError(
                "fsdp.cpu_offload: needs CUDA (on CPU the parameters already live in host memory); "
                "turn it off or train on GPUs (scaling.gpus_per_worker >= 1)"
            )
        if not isinstance(f.reshard_after_forward, bool) and f.reshard_after_forward < 1:
            raise ValueError(
                f"fsdp.reshard_after_forward: true, false or a group size >= 1 (got {f.reshard_after_forward})"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of every value, defaults included (JSON/YAML safe), with YAML key names."""
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self) -> str:
        """The resolved config as YAML, the form saved into the run directory."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, updates: dict[str, Any]) -> JobConfig:
        """A copy with dotted keys changed ({"run.dir": "/x"}), validated again."""
        data = self.to_dict()
        for key, value in updates.items():
            _set_dotted(data, key.split("."), value, key)
        return _validate(data, source="<replace>", lines={})


def check_task_fits(task: str, model: ModelConfig, train: TrainConfig) -> None:
    """The model and loss must suit the data's task (ValueError with the key at fault)."""
    if (task == "lm") != (model.name == "transformer_lm") and model.target is None:
        raise ValueError(
            f"model.name: {model.name} does not fit data.task={task}; "
            "transformer_lm goes with data.task=lm and the other models with classification or regression"
        )
    if task == "regression" and train.loss != "mse":
        raise ValueError(f"train.loss: regression needs mse (got {train.loss})")


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job YAML (None = the bundled quickstart), apply KEY=VALUE overrides, validate."""
    source, text = _read(path)
    data, lines = _parse_yaml(text, source)
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key.split("."), value, key)
        lines[key] = 0  # 0 = "from the command line", shown instead of a line number
    return _validate(data, source=source, lines=lines)


def config_from_dict(data: dict[str, Any], source: str = "<dict>") -> JobConfig:
    """Validate a plain dict (as saved in a run directory or a checkpoint)."""
    return _validate(dict(data), source=source, lines={})


def parse_override(item: str) -> tuple[str, Any]:
    """Split 'a.b=value'; the value is parsed as YAML (numbers, booleans, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
        raise ConfigError(f"override {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=0.1")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def quickstart_path() -> Path:
    """The bundled default job (configs/quickstart.yaml in the repository)."""
    return Path(str(importlib.resources.files("shoal") / QUICKSTART))


def _read(path: str | Path | None) -> tuple[str, str]:
    if path is None:
        return QUICKSTART, quickstart_path().read_text()
    if isinstance(path, str) and path.startswith("env:"):  # `shoal submit` carries the config this way
        name = path[4:]
        if name not in os.environ:
            raise ConfigError(f"environment variable {name} is not set", source=path)
        return path, os.environ[name]
    p = Path(path)
    if not p.exists():
        raise ConfigError("file not found", source=str(path))
    if p.is_dir():
        raise ConfigError("is a directory, expected a YAML job file", source=str(path))
    try:
        return str(path), p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read: {e}", source=str(path)) from None


def _parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[str, int]]:
    """Parse YAML into a dict plus the line number of every dotted key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError(f"YAML syntax error: {e.problem}", source=where) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(data).__name__}", source=source)
    lines: dict[str, int] = {}
    _collect_lines(node, "", lines)
    return data, lines


def _collect_lines(node: yaml.Node, prefix: str, lines: dict[str, int]) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            dotted = f"{prefix}{key_node.value}"
            lines[dotted] = key_node.start_mark.line + 1
            _collect_lines(value_node, dotted + ".", lines)


def _set_dotted(data: dict[str, Any], parts: list[str], value: Any, key: str) -> None:
    cur = data
    for i, part in enumerate(parts[:-1]):
        nxt = cur.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"cannot set {key}: {'.'.join(parts[: i + 1])} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def _validate(data: dict[str, Any], source: str, lines: dict[str, int]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise _friendly(e, source, lines) from None


# ---------------------------------------------------------------- error messages


def _friendly(exc: ValidationError, source: str, lines: dict[str, int]) -> ConfigError:
    """The first validation error as one line: file[:line]: key: what is allowed (got what)."""
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
    key = ".".join(loc)
    kind = err["type"]
    got = err.get("input")
    if kind == "value_error":
        # our own validators write "key: message"; they carry the key they are about
        msg = str(err["msg"]).removeprefix("Value error, ")
        key, _, msg = msg.partition(": ") if re.match(r"^[\w.]+: ", msg) else (key, "", msg)
    elif kind == "extra_forbidden":
        msg = "unknown key" + _did_you_mean(loc)
    elif kind == "literal_error":
        allowed = err.get("ctx", {}).get("expected", "")
        msg = f"must be one of {allowed.replace(' or ', ', ')} (got {got!r})"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(err.get("ctx", {}).values()), "?")
        msg = f"must be {op} {bound} (got {got!r})"
    elif kind == "missing":
        msg = "is required"
    elif kind == "string_pattern_mismatch":
        msg = f"must match {err['ctx']['pattern']} (got {got!r})"
    else:
        msg = f"{err['msg'].lower()} (got {got!r})"
    if len(errors) > 1:
        msg += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    line = _line_of(key, lines)
    where = f"{source}:{line}" if line else f"{source} (command line)" if line == 0 else source
    return ConfigError(msg, key=key or None, source=where)


def _line_of(key: str, lines: dict[str, int]) -> int | None:
    parts = key.split(".")
    while parts:
        if ".".join(parts) in lines:
            return lines[".".join(parts)]
        parts.pop()
    return None


def _did_you_mean(loc: list[str]) -> str:
    """' (did you mean 'optim.lr'?)' from the fields of the section that holds the bad key."""
    model: type[BaseModel] = JobConfig
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return ""
        model = ann
    names = [f.alias or n for n, f in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    prefix = ".".join(loc[:-1])
    if close:
        return f" (did you mean '{prefix + '.' if prefix else ''}{close[0]}'?)"
    return f"; allowed in {prefix or 'the top level'}: {', '.join(names)}"


# ---------------------------------------------------------------- reference


def config_reference() -> str:
    """Markdown tables of every key, its default and its meaning, generated from the models."""
    out: list[str] = []
    top = [(n, f) for n, f in JobConfig.model_fields.items() if not _is_section(f.annotation)]
    out.append("| key | default | meaning |\n|---|---|---|")
    for name, field in top:
        out.append(_row(name, field))
    for name, field in JobConfig.model_fields.items():
        if _is_section(field.annotation):
            out.append(f"\n**{name}**\n\n| key | default | meaning |\n|---|---|---|")
            for sub, subfield in field.annotation.model_fields.items():
                out.append(_row(f"{name}.{subfield.alias or sub}", subfield))
    return "\n".join(out) + "\n"


def _is_section(ann: Any) -> bool:
    return isinstance(ann, type) and issubclass(ann, Section)


def _row(key: str, field: Any) -> str:
    default = field.get_default(call_default_factory=True)
    shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
    if isinstance(default, tuple):
        shown = str(list(default))
    doc = (field.description or "").replace("|", "\\|").replace("\n", " ")
    return f"| `{key}` | `{shown}` | {doc} |"
