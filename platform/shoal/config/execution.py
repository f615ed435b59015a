"""The sections that say where and how the job runs and what it keeps: scaling, the strategies' own sections
(ddp, fsdp, parallel, ps), health, check, log, checkpoint and run."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from shoal.config.section import Section, WatchedMetric, check_target


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    """DDP ranks started by `shoal train` (torchrun decides this itself for `shoal worker`)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs reserved for each rank in the Ray cluster."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs reserved for each rank in the Ray cluster; 0 trains on CPU."""
    threads_per_worker: int | None = Field(None, ge=1)
    """torch intra-op threads per rank; None = cpus_per_worker under Ray, torch's choice otherwise."""

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
    """Start the Ray dashboard (and Jobs API) with the embedded cluster, on 127.0.0.1 only, behind the cluster's token."""
    keep_alive_s: float = Field(300.0, ge=0)
    """Seconds the embedded cluster stays up after a run for the next `shoal train` to join (it starts in a
    fraction of the time); `shoal down` stops it sooner. 0 = a cluster of the run's own, stopped with it."""
    max_failures: int = Field(0, ge=0)
    """Restarts allowed for the whole job: a rank that dies, fails or hangs restarts every worker from the latest checkpoint."""
    hang_timeout_s: float | None = Field(None, gt=0)
    """A rank that finishes no step for this long counts as failed (None: never; set it above your slowest step, eval or save)."""
    min_workers: int | None = Field(None, ge=1)
    """Elastic training: when a rank dies (within max_failures), go on at once with the ranks that can be placed, if at
    least this many, and grow back to num_workers when resources return; the global batch, learning-rate schedule and
    sample order stay exactly as configured. None = num_workers (not elastic: every rank restarts)."""

    @property
    def elastic(self) -> bool:
        """Whether the world may shrink below num_workers (min_workers set below it)."""
        return self.min_workers is not None and self.min_workers < self.num_workers

    @property
    def on_cpu(self) -> bool:
        """Whether the ranks train on CPU as far as the config tells (device cpu, or auto with no GPU reserved)."""
        return self.device == "cpu" or (self.device == "auto" and self.gpus_per_worker == 0)

    @property
    def reserved_threads(self) -> int:
        """torch threads of a rank with CPUs reserved for it (a Ray actor, a Kubernetes pod)."""
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def threads(self, under_ray: bool) -> int | None:
        """torch intra-op threads for a rank; None leaves torch's own choice (torchrun, a plain `shoal worker`)."""
        return self.reserved_threads if under_ray else self.threads_per_worker


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
        check_target("parallel.split_fn", self.split_fn)
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
    label_noise_threshold: float = Field(0.05, ge=0, le=1)
    """`shoal check`: the estimated share of wrong labels (confident learning on the sample's out-of-sample
    predictions) above which `label_noise` is a problem; below it, a note."""


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


class KeepBest(WatchedMetric):
    """checkpoint.keep_best: the metric that picks the checkpoint kept as the best."""


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
    memory_every: int | None = Field(None, ge=1)
    """Snapshot the whole train state to the node's shared memory (/dev/shm) every this many steps (a copy, no
    collective); a resized or restarted group resumes from it (falling back to the newest disk checkpoint). None =
    off, or, when scaling.min_workers makes the job elastic, every step stretched to the fewest steps that keep
    snapshots within 3% of the training time (measured over the run's steps 6-25: a tiny model's snapshot
    costs about as much as its step)."""
    resume_from: str | None = None
    """Start from this checkpoint directory (a fresh run directory is fine); `--resume` uses the run's latest instead."""


class RunConfig(Section):
    dir: str | None = None
    """Run directory; None = runs/<name>-<YYYYmmdd-HHMMSS> under the current directory."""
    overwrite: bool = False
    """Allow writing into a run directory that already holds a run (otherwise an error)."""
