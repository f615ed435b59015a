"""The job target: a plain indexed batch/v1 Job and the headless Service for torchrun's rendezvous."""

from __future__ import annotations

from typing import Any

from shoal.k8s.base import labels, metadata
from shoal.k8s.placement import Plan
from shoal.k8s.pods import RDZV_PORT, container, pod_spec, pod_template, torchrun_worker, volumes

DNS_WAIT_S = 600


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
