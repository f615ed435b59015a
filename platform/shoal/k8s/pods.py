"""Pod building blocks: the Shoal container, its volumes and resources, pod specs, the torchrun rank command."""

from __future__ import annotations

from typing import Any

from shoal.k8s.base import labels
from shoal.k8s.placement import CONFIG_DIR, CONFIG_PATH, SHM_DIR, Plan

RDZV_PORT = 29400
# c10d rendezvous: pods may wait minutes for a node or an image pull before all have joined
RDZV_JOIN_TIMEOUT_S = 900
RDZV_READ_TIMEOUT_S = 600
USER_ID = 1000


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
