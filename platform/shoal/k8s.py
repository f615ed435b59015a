"""Kubernetes manifests for a Shoal job: one job YAML, three ways to run it, rendered offline.

`render(cfg, target, image, namespace)` is a pure function: it returns {relative path: YAML text}
for a kustomize base (ServiceAccount, ConfigMap holding the job YAML, PersistentVolumeClaim for the
run directory) and one overlay per target:

- rayjob:     a KubeRay RayJob (ray.io/v1, KubeRay v1.7): a head with no CPUs for ranks, one worker
              pod per rank; the entrypoint runs `shoal train` against the in-cluster Ray.
- pytorchjob: a Kubeflow PyTorchJob (kubeflow.org/v1, training-operator v1.9): one worker pod per
              rank running `torchrun ... -m shoal worker` with c10d rendezvous and an elastic policy.
- job:        a plain indexed batch/v1 Job plus a headless Service for torchrun's rendezvous.

Every container command passes `--resume` and an explicit run.dir on the volume, so a restarted
pod continues from the latest checkpoint (or starts at step 0 when there is none yet). The same
inputs always give byte-identical output: fixed key order, no timestamps.
"""

from __future__ import annotations

import argparse
import math
import posixpath
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from shoal.errors import ConfigError

if TYPE_CHECKING:
    from shoal.config import JobConfig

TARGETS = ("rayjob", "pytorchjob", "job")
CONFIG_DIR = "/etc/shoal"
CONFIG_FILE = "job.yaml"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
WORKDIR = "/workspace"  # the image's working directory: relative run.dir values resolve here
SHM_DIR = "/dev/shm"
RDZV_PORT = 29400
# KubeRay appends 6 characters to a RayJob name (max 47) and pods are <name>-worker-<index>
MAX_NAME_LENGTH = 40
# c10d rendezvous: pods may wait minutes for a node or an image pull before all have joined
RDZV_JOIN_TIMEOUT_S = 900
RDZV_READ_TIMEOUT_S = 600
DNS_WAIT_S = 600
# the agent (torchrun, Ray's job supervisor) must finish before the kubelet's SIGKILL
SHUTDOWN_MARGIN_S = 30
MIN_GRACE_S = 60
HEAD_CPU = "1"
HEAD_MEMORY = "4Gi"
USER_ID = 1000
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"

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


# ---------------------------------------------------------------- rendering


def render(
    cfg: JobConfig, target: str, image: str, namespace: str | None = None, options: RenderOptions = RenderOptions()
) -> dict[str, str]:
    """{relative path: YAML text}: the base plus the target's overlay. Raises ConfigError first."""
    if target not in TARGETS:
        raise ConfigError(f"must be one of {', '.join(TARGETS)} (got {target!r})", key="--target")
    p = plan(cfg, image, namespace, options)
    if target == "rayjob" and cfg.scaling.cpus_per_worker < 1:
        # Ray counts whole CPUs per pod: ranks of 0.5 CPU would pile onto one worker pod
        raise ConfigError(
            f"the rayjob target runs one rank per Ray worker pod, and Ray counts whole CPUs: use >= 1 "
            f"(got {cfg.scaling.cpus_per_worker:g}), or --target job or pytorchjob",
            key="scaling.cpus_per_worker",
        )
    base = {"serviceaccount.yaml": service_account(p), "configmap.yaml": config_map(p), "pvc.yaml": run_volume_claim(p)}
    overlay = target_objects(p, target)
    files = {f"base/{n}": manifest_text(o, p.name) for n, o in base.items()}
    files["base/kustomization.yaml"] = manifest_text(kustomization(list(base)), p.name)
    files.update({f"overlays/{target}/{n}": manifest_text(o, p.name) for n, o in overlay.items()})
    files[f"overlays/{target}/kustomization.yaml"] = manifest_text(kustomization(["../../base", *overlay]), p.name)
    return files


def stream_text(files: dict[str, str]) -> str:
    """The resources of `render`'s output as one multi-document stream (for `kubectl apply -f -`)."""
    return "---\n".join(text for path, text in files.items() if not path.endswith("kustomization.yaml"))


def target_objects(p: Plan, target: str) -> dict[str, dict[str, Any]]:
    """The overlay's resources by file name, in the order they are applied."""
    if target == "rayjob":
        return {"rayjob.yaml": ray_job(p)}
    if target == "pytorchjob":
        return {"pytorchjob.yaml": pytorch_job(p)}
    return {"service.yaml": rendezvous_service(p), "job.yaml": indexed_job(p)}


def manifest_text(obj: dict[str, Any], name: str) -> str:
    """One YAML document with a header saying where it came from."""
    header = f"# Rendered by `shoal k8s render` from the job config '{name}'; render again rather than edit.\n"
    return header + yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=4096)


class _Dumper(yaml.SafeDumper):
    """Lists indented under their key, multi-line strings as literal blocks (kubectl's look)."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _represent_str)


# ---------------------------------------------------------------- validation


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


# ---------------------------------------------------------------- base: ServiceAccount, ConfigMap, PVC


def metadata(p: Plan, name: str, component: str | None = None) -> dict[str, Any]:
    """Object metadata: name, namespace when given, Shoal's labels."""
    meta: dict[str, Any] = {"name": name}
    if p.namespace:
        meta["namespace"] = p.namespace
    meta["labels"] = labels(p, component)
    return meta


def labels(p: Plan, component: str | None = None) -> dict[str, str]:
    """The labels that tie every object (and pod) to this job."""
    out = {LABEL_NAME: "shoal", LABEL_INSTANCE: p.name}
    if component:
        out[LABEL_COMPONENT] = component
    return out


def service_account(p: Plan) -> dict[str, Any]:
    """The pods' identity; they never call the Kubernetes API, so no token is mounted."""
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(p, p.name),
        "automountServiceAccountToken": False,
    }


def config_map(p: Plan) -> dict[str, Any]:
    """The job YAML (the keys it sets), with run.dir pointing at the volume."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(p, f"{p.name}-config"),
        "data": {CONFIG_FILE: p.config_yaml},
    }


def run_volume_claim(p: Plan) -> dict[str, Any]:
    """Run directory and checkpoints; ReadWriteMany because every pod of the job mounts it."""
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": p.storage}}}
    if p.storage_class:
        spec["storageClassName"] = p.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(p, f"{p.name}-runs"),
        "spec": spec,
    }


def kustomization(resources: list[str]) -> dict[str, Any]:
    """A kustomization listing its resources."""
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}


# ---------------------------------------------------------------- pods


def shoal_args(p: Plan, command: str, *overrides: str) -> list[str]:
    """`shoal train|worker` arguments: the mounted config, run.dir on the volume, --resume last."""
    # overrides before --resume: argparse takes no positionals after an option
    return [command, CONFIG_PATH, f"run.dir={p.run_dir}", *overrides, "--resume"]


def torchrun_command(p: Plan, nnodes: str, endpoint: str) -> list[str]:
    """torchrun with c10d rendezvous, one rank per pod, and time to save when stopped."""
    return [
        "torchrun",
        f"--nnodes={nnodes}",
        "--nproc-per-node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={endpoint}",
        f"--rdzv-id={p.name}",
        f"--rdzv-conf={rdzv_conf(p)}",
        f"--max-restarts={p.max_failures}",
        f"--shutdown-timeout={p.stop_wait_s}",
        "-m",
        "shoal",
        *shoal_args(p, "worker"),
    ]


def rdzv_conf(p: Plan) -> str:
    """Rendezvous timeouts long enough for pods that are scheduled or pulled late."""
    return f"join_timeout={RDZV_JOIN_TIMEOUT_S},read_timeout={RDZV_READ_TIMEOUT_S}"


def resources(p: Plan, cpu: str, memory: str, gpus: int) -> dict[str, Any]:
    """Requests (and memory and GPU limits); no CPU limit, which would only throttle the ranks."""
    gpu = {p.gpu_resource: str(gpus)} if gpus and p.gpu_resource else {}
    return {"requests": {"cpu": cpu, "memory": memory, **gpu}, "limits": {"memory": memory, **gpu}}


def volumes(p: Plan, with_config: bool = True) -> list[dict[str, Any]]:
    """The ConfigMap, the run-directory claim and a memory-backed /dev/shm (NCCL, DataLoader)."""
    out: list[dict[str, Any]] = []
    if with_config:
        out.append({"name": "config", "configMap": {"name": f"{p.name}-config"}})
    out.append({"name": "runs", "persistentVolumeClaim": {"claimName": f"{p.name}-runs"}})
    out.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
    return out


def volume_mounts(p: Plan, with_config: bool = True) -> list[dict[str, Any]]:
    """Where `volumes` appear in the container: the run directory exactly at run.dir."""
    out: list[dict[str, Any]] = []
    if with_config:
        out.append({"name": "config", "mountPath": CONFIG_DIR, "readOnly": True})
    out.append({"name": "runs", "mountPath": p.run_dir})
    out.append({"name": "dshm", "mountPath": SHM_DIR})
    return out


def container(p: Plan, name: str, **fields: Any) -> dict[str, Any]:
    """A container of the Shoal image; `fields` (command, env, ports, resources, ...) in that order."""
    return {
        "name": name,
        "image": p.image,
        "imagePullPolicy": "IfNotPresent",
        **fields,
        "securityContext": {"allowPrivilegeEscalation": False},
    }


def pod_spec(p: Plan, containers: list[dict[str, Any]], vols: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """A pod spec: the job's ServiceAccount, a non-root user, the grace period for the preemption checkpoint."""
    spec: dict[str, Any] = {
        "serviceAccountName": p.name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,  # a Service named like MASTER would otherwise set MASTER_PORT in the pods
        "terminationGracePeriodSeconds": p.grace_s,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": USER_ID,
            "runAsGroup": USER_ID,
            "fsGroup": USER_ID,
            "fsGroupChangePolicy": "OnRootMismatch",
        },
        **fields,
    }
    if p.gpus:
        spec["tolerations"] = [{"key": p.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}]
    spec["containers"] = containers
    spec["volumes"] = vols
    return spec


def pod_template(p: Plan, component: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A pod template labelled for this job and component."""
    return {"metadata": {"labels": labels(p, component)}, "spec": spec}


def torchrun_worker(p: Plan, name: str, nnodes: str, endpoint: str, port_name: str) -> dict[str, Any]:
    """The container that runs one rank under torchrun."""
    return container(
        p,
        name,
        command=torchrun_command(p, nnodes, endpoint),
        # torch would otherwise start a thread per core of the node, not of the pod
        env=[{"name": "OMP_NUM_THREADS", "value": str(p.threads)}],
        ports=[{"name": port_name, "containerPort": RDZV_PORT, "protocol": "TCP"}],
        resources=resources(p, p.cpu, p.memory, p.gpus),
        volumeMounts=volume_mounts(p),
    )


# ---------------------------------------------------------------- rayjob


def ray_job(p: Plan) -> dict[str, Any]:
    """KubeRay RayJob: a cluster with one worker pod per rank, `shoal train` as the entrypoint."""
    entrypoint = shlex.join(["shoal", *shoal_args(p, "train", "scaling.address=auto")])
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": metadata(p, p.name),
        "spec": {
            "entrypoint": entrypoint,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 300,
            "backoffLimit": p.restarts,  # each retry is a new cluster; --resume continues the run
            "rayClusterSpec": {"headGroupSpec": ray_head(p), "workerGroupSpecs": [ray_workers(p)]},
        },
    }


def ray_head(p: Plan) -> dict[str, Any]:
    """The head runs the driver only: zero CPUs for Ray, so every rank lands on a worker pod."""
    head = container(
        p,
        "ray-head",
        env=[{"name": "RAY_JOB_STOP_WAIT_TIME_S", "value": str(p.stop_wait_s)}],
        resources=resources(p, HEAD_CPU, HEAD_MEMORY, 0),
        volumeMounts=volume_mounts(p),
        # a drained head first stops the driver with SIGTERM: the ranks save, then Ray goes down
        lifecycle={"preStop": {"exec": {"command": ["python", "-c", STOP_DRIVER]}}},
    )
    return {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": pod_template(p, "head", pod_spec(p, [head], volumes(p))),
    }


def ray_workers(p: Plan) -> dict[str, Any]:
    """scaling.num_workers pods, each with exactly one rank's CPUs and GPUs."""
    params = {"num-cpus": str(p.ray_cpus)}
    if p.gpus:
        params["num-gpus"] = str(p.gpus)
    worker = container(
        p,
        "ray-worker",
        resources=resources(p, p.cpu, p.memory, p.gpus),
        volumeMounts=volume_mounts(p, with_config=False),
    )
    return {
        "groupName": "workers",
        "replicas": p.workers,
        "minReplicas": p.workers,
        "maxReplicas": p.workers,
        "rayStartParams": params,
        "template": pod_template(p, "worker", pod_spec(p, [worker], volumes(p, with_config=False))),
    }


# SIGTERM to this container's `shoal train` driver, then wait for it to save and exit
STOP_DRIVER = """\
import os, signal, time
def drivers():
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\\0")
        except OSError:
            continue
        if b"train" in argv and any(a.endswith(b"shoal") for a in argv):
            found.append(int(pid))
    return found
for pid in drivers():
    os.kill(pid, signal.SIGTERM)
while drivers():
    time.sleep(1)
"""


# ---------------------------------------------------------------- pytorchjob


def pytorch_job(p: Plan) -> dict[str, Any]:
    """Kubeflow PyTorchJob (v1): worker pods only, rendezvous on worker 0 through the operator's Service."""
    # the operator names pod and Service <job>-worker-0; that pod's host name matches, so it hosts the store
    endpoint = f"{p.name}-worker-0:{RDZV_PORT}"
    # the port name the operator looks for: its per-pod Service then exposes the rendezvous port
    worker = torchrun_worker(p, "pytorch", f"{p.workers}:{p.workers}", endpoint, "pytorchjob-port")
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": metadata(p, p.name),
        "spec": {
            "nprocPerNode": "1",
            "elasticPolicy": {
                "rdzvBackend": "c10d",
                "rdzvPort": RDZV_PORT,
                "rdzvId": p.name,
                "rdzvConf": [{"key": k, "value": v} for k, v in (kv.split("=") for kv in rdzv_conf(p).split(","))],
                # a fixed world size: the global batch (and so the learning rate) stays the one configured
                "minReplicas": p.workers,
                "maxReplicas": p.workers,
                "maxRestarts": p.max_failures,
            },
            "runPolicy": {"backoffLimit": p.restarts * p.workers},
            "pytorchReplicaSpecs": {
                "Worker": {
                    "replicas": p.workers,
                    "restartPolicy": "OnFailure",
                    "template": pod_template(p, "worker", pod_spec(p, [worker], volumes(p))),
                }
            },
        },
    }


# ---------------------------------------------------------------- plain indexed Job


def rendezvous_service(p: Plan) -> dict[str, Any]:
    """Headless Service giving each Job pod a DNS name (<job>-<index>.<service>), ready or not."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(p, p.name),
        "spec": {
            "clusterIP": "None",
            # pod 0 must resolve before it is ready: torchrun looks itself up to decide to host the store
            "publishNotReadyAddresses": True,
            "selector": labels(p, "worker"),
            "ports": [{"name": "rdzv", "port": RDZV_PORT, "targetPort": RDZV_PORT, "protocol": "TCP"}],
        },
    }


def indexed_job(p: Plan) -> dict[str, Any]:
    """batch/v1 Job with one pod per rank; pod 0 hosts torchrun's c10d rendezvous."""
    host = f"{p.name}-0.{p.name}"
    # a namespace with a ResourceQuota refuses containers, init ones included, that ask for nothing
    small = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "128Mi"}}
    wait = container(
        p, "wait-for-rendezvous", command=["python", "-c", WAIT_FOR_DNS, host, str(DNS_WAIT_S)], resources=small
    )
    worker = torchrun_worker(p, "worker", str(p.workers), f"{host}:{RDZV_PORT}", "rdzv")
    spec = pod_spec(p, [worker], volumes(p), subdomain=p.name, restartPolicy="OnFailure", initContainers=[wait])
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(p, p.name),
        "spec": {
            "completionMode": "Indexed",
            "completions": p.workers,
            "parallelism": p.workers,
            # one failure or preemption restarts every pod's agent, so the budget scales with pods
            "backoffLimit": p.restarts * p.workers,
            "template": pod_template(p, "worker", spec),
        },
    }


# wait until the rendezvous host resolves, so pod 0 recognises itself as the store's host
WAIT_FOR_DNS = """\
import socket, sys, time
host, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        socket.getaddrinfo(host, None)
        break
    except socket.gaierror:
        if time.monotonic() > deadline:
            sys.exit(f"{host} did not resolve within {sys.argv[2]} s; is the headless Service there?")
        time.sleep(2)
"""


# ---------------------------------------------------------------- command line


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `shoal k8s render ...` on the `shoal` command's subparsers."""
    k = subparsers.add_parser("k8s", help="Kubernetes manifests for a job (render)")
    actions = k.add_subparsers(dest="k8s_command", metavar="ACTION")
    actions.required = True
    r = actions.add_parser(
        "render", help="write the manifests for a job: KubeRay RayJob, Kubeflow PyTorchJob or indexed Job"
    )
    r.add_argument("config", metavar="CONFIG", help="job YAML file")
    r.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. scaling.num_workers=4")
    r.add_argument(
        "--target",
        required=True,
        choices=TARGETS,
        help="rayjob (KubeRay), pytorchjob (Kubeflow training-operator) or job (plain indexed Job)",
    )
    r.add_argument("--image", required=True, help="container image with Shoal installed (k8s/Dockerfile)")
    r.add_argument("--namespace", default=None, help="namespace of every object (default: the one kubectl uses)")
    r.add_argument(
        "-o",
        "--output",
        default=None,
        metavar="DIR",
        help="write base/ and overlays/TARGET/ under DIR (default: one stream on stdout)",
    )
    d = RenderOptions()
    r.add_argument(
        "--gpu-resource",
        default=d.gpu_resource,
        metavar="NAME",
        help="the cluster's GPU resource, e.g. nvidia.com/gpu (needed when scaling.gpus_per_worker > 0)",
    )
    r.add_argument(
        "--memory",
        default=d.memory,
        metavar="QTY",
        help="memory per worker pod (default: 2Gi per CPU, at least 2Gi, plus 8Gi per GPU)",
    )
    r.add_argument(
        "--storage", default=d.storage, metavar="QTY", help=f"size of the run-directory volume (default {d.storage})"
    )
    r.add_argument(
        "--storage-class",
        default=d.storage_class,
        metavar="NAME",
        help="StorageClass offering ReadWriteMany (default: the cluster's default)",
    )
    r.add_argument(
        "--grace-period",
        type=int,
        default=d.grace_period_s,
        metavar="S",
        help=f"seconds a stopped pod gets to save its checkpoint (default {d.grace_period_s})",
    )
    r.add_argument(
        "--restarts",
        type=int,
        default=d.restarts,
        metavar="N",
        help=f"restarts Kubernetes allows after a failed or preempted pod (default {d.restarts})",
    )
    r.set_defaults(func=cmd_render)
    return r


def options_from_args(args: argparse.Namespace) -> RenderOptions:
    """RenderOptions from the parsed command line."""
    return RenderOptions(
        gpu_resource=args.gpu_resource,
        memory=args.memory,
        storage=args.storage,
        storage_class=args.storage_class,
        grace_period_s=args.grace_period,
        restarts=args.restarts,
    )


def cmd_render(args: argparse.Namespace) -> int:
    """`shoal k8s render`: every check passes before a file is written."""
    from shoal.config import load_config

    cfg = load_config(args.config, args.overrides)
    files = render(cfg, args.target, args.image, args.namespace, options_from_args(args))
    if args.output is None:
        sys.stdout.write(stream_text(files))
        return 0
    out = Path(args.output)
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(
        f"[shoal] wrote {len(files)} files under {out}; apply with: kubectl apply -k {out / 'overlays' / args.target}"
    )
    return 0
