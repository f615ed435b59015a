"""The sections that say what is learned and how: model, data, optim, schedule and train."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from shoal.config.section import Section, WatchedMetric, check_target


class ModelConfig(Section):
    name: Literal["mlp", "cnn", "resnet", "transformer_lm"] = "mlp"
    """Built-in model. Input and output sizes come from the data."""
    target: str | None = None
    """Your own model as "package.module:factory"; called with `kwargs`. Overrides `name`."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for `target`. A Hugging Face `from_config` or model class takes `config` as a mapping
    (`model_type` plus the config class's fields, e.g. {model_type: gpt2, n_layer: 2}); `from_pretrained`
    a local directory (nothing is downloaded)."""
    inputs: dict[str, str] | None = None
    """Batch fields -> the forward's keyword arguments, e.g. {input_ids: input_ids, attention_mask: attention_mask}.
    Default: the one input, positionally; for a Hugging Face model, the batch fields its forward takes by name
    (`labels` only with output: loss). Fields: input_ids (token data), attention_mask (padded token data),
    pixel_values (images), x (other features), labels (the targets)."""
    output: str | int | None = None
    """What of the forward's result is the model's output: unset, the tensor it returns (a Hugging Face output's
    `logits`); an attribute or key name; a tuple index; or `loss`: the model computes its own loss from the batch's
    `labels`, and Shoal weights it by the targets counted (tokens for lm), so accumulation stays an exact mean."""
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
        check_target("model.target", self.target, "package.module:factory")
        if (self.inputs is not None or self.output is not None) and not self.target:
            raise ValueError(
                "model.inputs / model.output: only for a model.target (the built-in models take one input)"
            )
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
    "data/train-{000000..000127}.tar", either of them in object storage as s3://bucket/prefix (read by ranged
    requests; see Object storage), or any URL webdataset streams (http://, pipe:CMD)."""
    val_path: str | None = None
    """shards: validation shards when data.path is not a `shoal shard` directory (which holds its own split)."""
    manifest: str | None = None
    """shards: manifest.json for a pattern or URL (counts without scanning); default: the one beside local or s3://
    shards."""
    storage_options: dict[str, Any] = Field(default_factory=dict)
    """shards in s3://: options for fsspec's s3fs (endpoint_url, client_kwargs, config_kwargs, ...) over those from the
    AWS_* environment. Secrets belong in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE), not
    here: the config is saved in the run directory."""
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
        check_target("data.decode", self.decode)
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

    @property
    def plateau(self) -> WatchedMetric:
        """The metric the plateau rule watches; its keys sit flat in this section (schedule.metric, schedule.mode)."""
        return WatchedMetric(metric=self.metric, mode=self.mode)


class EarlyStopping(WatchedMetric):
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
    compile: Literal[False, "model", "blocks"] = False
    """torch.compile: false (eager), model (the whole forward) or blocks (each repeated block on its own, as TorchTitan
    does: activation checkpointing's blocks, compiled with their recomputation, before fsdp shards them; the only
    choice with pipeline stages). In place: parameter names, checkpoints and exports are eager's, and runs resume
    across the setting. Compiles at the first step (startup.json: compile_s); needs g++ where the ranks run."""
    batch_ramp: BatchRamp | None = None
    """Grow the global batch during training: {start, end, steps, lr_scaling} or auto (see Batch size); leave
    train.grad_accum_steps at 1, the ramp sets the accumulation count."""
    gns_every: int = Field(10, ge=0)
    """Measure the gradient noise scale (gns, McCandlish et al. 2018) on every n-th step from each rank's gradient
    before the AllReduce and the reduced one (strategy allreduce, 2+ ranks); 0 = off."""

    @property
    def needs_cuda(self) -> bool:
        """Whether the precision needs CUDA: fp16 does, bf16 and fp32 run on CPU too."""
        return self.precision == "fp16"

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.clip_grad_norm is not None and self.clip_grad_value is not None:
            raise ValueError(
                "train.clip_grad_value: set either train.clip_grad_norm or train.clip_grad_value, not both"
            )
        if self.label_smoothing and self.loss != "cross_entropy":
            raise ValueError("train.label_smoothing: only applies to train.loss=cross_entropy")
        return self
