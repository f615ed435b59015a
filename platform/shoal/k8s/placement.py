"""What a job asks of Kubernetes, checked: RenderOptions from the command line, the Plan every manifest is built from.

Every check raises one ConfigError naming the config key or option, before anything is rendered.
"""

from __future__ import annotations

import math
import posixpath
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.config import JobConfig

CONFIG_DIR = "/etc/shoal"
CONFIG_FILE = "job.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
WORKDIR = "/workspace"  # the image's working directory: relative run.dir values resolve here
SHM_DIR = "/dev/shm"
# KubeRay appends 6 characters to a RayJob name (max 47) and pods are <name>-worker-<index>
MAX_NAME_LENGTH = 40
# the agent (torchrun, Ray's job supervisor) must finish before the kubelet's SIGKILL
SHUTDOWN_MARGIN_S = 30
MIN_GRACE_S = 60

DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
DNS_1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?")
RESOURCE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
PLAIN_PATH = re.compile(r"/[A-Za-z0-9._/-]*")


@dataclass(frozen=True)
class RenderOptions:
    """How the job maps onto the cluster; everything else comes from the job config."""

    gpu_resource: str | None = None
    """Extended resource that counts GPUs (nvidia.com/gpu, amd.com/gpu); needed when GPUs are asked for."""
    memory: str | None = None
    """Memory per worker pod; None = 2Gi per CPU (at least 2Gi) plus 8Gi per GPU."""
    storage: str = "10Gi"
    """Size of the run-directory volume."""
    storage_class: str | None = None
    """StorageClass of the volume (it must offer ReadWriteMany); None = the cluster's default."""
    grace_period_s: int = 300
    """Seconds a stopping pod gets to finish its step and save the preemption checkpoint."""
    restarts: int = 3
    """Times Kubernetes may restart the job after a failed or preempted pod (each resumes)."""


@dataclass(frozen=True)
class Plan:
    """Validated values every manifest is built from."""

    name: str
    namespace: str | None
    image: str
    config_yaml: str
    run_dir: str
    workers: int
    cpu: str
    ray_cpus: int
    threads: int
    memory: str
    gpus: int
    gpu_resource: str | None
    grace_s: int
    restarts: int
    max_failures: int
    storage: str
    storage_class: str | None

    @property
    def stop_wait_s(self) -> int:
        """How long an agent waits for its ranks to save before killing them."""
        return self.grace_s - SHUTDOWN_MARGIN_S


def plan(cfg: JobConfig, image: str, namespace: str | None, options: RenderOptions) -> Plan:
    """Check that the job can be placed and named on Kubernetes; the values to render from."""
    name = job_name(cfg.name)
    s = cfg.scaling
    if s.num_workers < 1:  # the config forbids it; a hand-built config must not render an empty job
        raise ConfigError(f"must be >= 1 to place any pod (got {s.num_workers})", key="scaling.num_workers")
    run_dir = pod_run_dir(cfg.run.dir, name)
    gpus = gpu_count(s.gpus_per_worker, options.gpu_resource)
    _check_options(image, namespace, options)
    return Plan(
        name=name,
        namespace=namespace,
        image=image,
        config_yaml=embedded_config(cfg, run_dir),
        run_dir=run_dir,
        workers=s.num_workers,
        cpu=cpu_quantity(s.cpus_per_worker),
        ray_cpus=math.ceil(s.cpus_per_worker),
        threads=s.reserved_threads,
        memory=options.memory or f"{max(2, math.ceil(2 * s.cpus_per_worker)) + 8 * gpus}Gi",
        gpus=gpus,
        gpu_resource=options.gpu_resource if gpus else None,
        grace_s=options.grace_period_s,
        restarts=options.restarts,
        max_failures=s.max_failures,
        storage=options.storage,
        storage_class=options.storage_class,
    )


def embedded_config(cfg: JobConfig, run_dir: str) -> str:
    """The job YAML for the ConfigMap: the keys the job sets, and run.dir on the volume."""
    # no defaults: an image built from another Shoal version rejects keys it does not know
    data = cfg.model_dump(mode="json", by_alias=True, exclude_unset=True)
    data.setdefault("run", {})["dir"] = run_dir
    return yaml.safe_dump(data, sort_keys=False)


def job_name(name: str) -> str:
    """The job's name as Kubernetes objects carry it: a DNS-1035 label short enough for suffixes."""
    if DNS_1035.fullmatch(name) and len(name) <= MAX_NAME_LENGTH:
        return name
    suggestion = (
        re.sub(r"^[^a-z]+", "", re.sub(r"[^a-z0-9]+", "-", name.lower()))[:MAX_NAME_LENGTH].strip("-") or "shoal-job"
    )
    raise ConfigError(
        f"{name!r} cannot name Kubernetes objects: use at most {MAX_NAME_LENGTH} lower-case letters, digits "
        f"and '-', starting with a letter and ending with a letter or digit (a DNS-1035 label, with room "
        f"for the suffixes KubeRay and the pods add), e.g. name={suggestion}",
        key="name",
    )


def pod_run_dir(run_dir: str | None, name: str) -> str:
    """run.dir inside the pods (where the volume is mounted): absolute, or under the image's workdir."""
    path = posixpath.normpath(posixpath.join(WORKDIR, run_dir or f"runs/{name}"))
    if not PLAIN_PATH.fullmatch(path) or path == "/":
        raise ConfigError(
            f"the volume is mounted there, so it must be a plain path below / made of letters, digits, "
            f"'.', '_', '-' and '/' (got {run_dir!r})",
            key="run.dir",
        )
    for other in (CONFIG_DIR, SHM_DIR):
        if _overlaps(path, other):
            raise ConfigError(f"{path} overlaps {other}, which the pods use for something else", key="run.dir")
    return path


def gpu_count(gpus_per_worker: float, resource: str | None) -> int:
    """Whole GPUs per pod; asking for some needs the cluster's GPU resource name."""
    if gpus_per_worker == 0:
        return 0
    if gpus_per_worker != int(gpus_per_worker):
        raise ConfigError(
            f"Kubernetes gives pods whole GPUs; use 1, 2, ... (got {gpus_per_worker:g})", key="scaling.gpus_per_worker"
        )
    if not resource:
        raise ConfigError(
            f"asks for {gpus_per_worker:g} GPU(s) per worker: pass --gpu-resource with the cluster's GPU "
            "resource name (nvidia.com/gpu, amd.com/gpu, ...)",
            key="scaling.gpus_per_worker",
        )
    return int(gpus_per_worker)


def cpu_quantity(cpus: float) -> str:
    """CPUs as a Kubernetes quantity: whole cores as "2", fractions in millicores ("1500m")."""
    milli = round(cpus * 1000)
    if milli < 1 or abs(milli - cpus * 1000) > 1e-6:
        raise ConfigError(
            f"Kubernetes counts CPU in millicores: use a multiple of 0.001 (got {cpus:g})",
            key="scaling.cpus_per_worker",
        )
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def _check_options(image: str, namespace: str | None, o: RenderOptions) -> None:
    """The command-line options, each named in its error."""
    if not image or any(c.isspace() for c in image):
        raise ConfigError(
            f"must name a container image, e.g. registry.example.com/shoal:0.1.0 (got {image!r})", key="--image"
        )
    if namespace is not None and not (DNS_1123.fullmatch(namespace) and len(namespace) <= 63):
        raise ConfigError(
            f"must be a DNS-1123 label: lower-case letters, digits and '-', at most 63 (got {namespace!r})",
            key="--namespace",
        )
    if o.gpu_resource is not None and not RESOURCE_NAME.fullmatch(o.gpu_resource):
        raise ConfigError(f"must look like vendor.com/gpu (got {o.gpu_resource!r})", key="--gpu-resource")
    for key, value in (("--memory", o.memory), ("--storage", o.storage)):
        if value is not None and not QUANTITY.fullmatch(value):
            raise ConfigError(f"must be a Kubernetes quantity such as 8Gi or 512Mi (got {value!r})", key=key)
    if o.storage_class is not None and not (DNS_SUBDOMAIN.fullmatch(o.storage_class) and len(o.storage_class) <= 253):
        raise ConfigError(f"must be a StorageClass name (got {o.storage_class!r})", key="--storage-class")
    if o.grace_period_s < MIN_GRACE_S:
        raise ConfigError(
            f"must be >= {MIN_GRACE_S} s: the ranks finish a step and save a checkpoint in it (got {o.grace_period_s})",
            key="--grace-period",
        )
    if o.restarts < 0:
        raise ConfigError(f"must be >= 0 (got {o.restarts})", key="--restarts")


def _overlaps(a: str, b: str) -> bool:
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")
