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

Modules: `placement` (options, checks, the Plan), `base` (shared objects, labels), `pods` (containers,
pod specs), `rayjob` / `pytorchjob` / `indexed_job` (one per target), `manifests` (rendering), `command` (the CLI).
"""

from shoal.k8s.command import add_parser, cmd_render
from shoal.k8s.indexed_job import WAIT_FOR_DNS
from shoal.k8s.manifests import TARGETS, manifest_text, render, stream_text
from shoal.k8s.placement import SHUTDOWN_MARGIN_S, WORKDIR, Plan, RenderOptions, plan
from shoal.k8s.rayjob import STOP_DRIVER

__all__ = [
    "STOP_DRIVER",
    "SHUTDOWN_MARGIN_S",
    "TARGETS",
    "WAIT_FOR_DNS",
    "WORKDIR",
    "Plan",
    "RenderOptions",
    "add_parser",
    "cmd_render",
    "manifest_text",
    "plan",
    "render",
    "stream_text",
]
