"""Rendering: the base and one target's overlay as {relative path: YAML text}, deterministic to the byte."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

from shoal.errors import ConfigError
from shoal.k8s.base import config_map, kustomization, run_volume_claim, service_account
from shoal.k8s.indexed_job import indexed_job, rendezvous_service
from shoal.k8s.placement import Plan, RenderOptions, plan
from shoal.k8s.pytorchjob import pytorch_job
from shoal.k8s.rayjob import ray_job

if TYPE_CHECKING:
    from shoal.config import JobConfig

TARGETS = ("rayjob", "pytorchjob", "job")


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
