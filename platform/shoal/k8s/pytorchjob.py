"""The pytorchjob target: a Kubeflow PyTorchJob (kubeflow.org/v1), torchrun ranks with c10d rendezvous."""

from __future__ import annotations

from typing import Any

from shoal.k8s.base import metadata
from shoal.k8s.placement import Plan
from shoal.k8s.pods import RDZV_PORT, pod_spec, pod_template, rdzv_conf, torchrun_worker, volumes


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
