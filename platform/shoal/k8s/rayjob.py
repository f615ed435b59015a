"""The rayjob target: a KubeRay RayJob (ray.io/v1) whose head runs `shoal train`, one worker pod per rank."""

from __future__ import annotations

import shlex
from typing import Any

from shoal.k8s.base import metadata
from shoal.k8s.placement import Plan
from shoal.k8s.pods import container, pod_spec, pod_template, resources, shoal_args, volume_mounts, volumes

HEAD_CPU = "1"
HEAD_MEMORY = "4Gi"


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
