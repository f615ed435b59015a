"""The kustomize base every target shares: ServiceAccount, ConfigMap with the job YAML, run-directory claim;
and the metadata and labels of every object."""

from __future__ import annotations

from typing import Any

from shoal.k8s.placement import CONFIG_FILE, Plan

LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"


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
