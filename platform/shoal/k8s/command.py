"""`shoal k8s render`: its command line and what it writes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shoal.k8s.manifests import TARGETS, render, stream_text
from shoal.k8s.placement import RenderOptions


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `shoal k8s render ...` on the `shoal` command's subparsers."""
    k = subparsers.add_parser("k8s", help="Kubernetes manifests for a job (render)")
    actions = k.add_subparsers(dest="k8s_command", metavar="ACTION")
    actions.required = True
    r = actions.add_parser(
        "render", help="write the manifests for a job: KubeRay RayJob, Kubeflow PyTorchJob or indexed Job"
    )
    add_job_arguments(r)
    add_cluster_options(r, RenderOptions())
    r.set_defaults(func=cmd_render)
    return r


def add_job_arguments(r: argparse.ArgumentParser) -> None:
    """What to render: the job, the target, the image, where the objects and files go."""
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


def add_cluster_options(r: argparse.ArgumentParser, d: RenderOptions) -> None:
    """The RenderOptions fields as options, defaulting to d's values."""
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
    from shoal.config import load_config  # pydantic: kept out of `shoal --help`

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
