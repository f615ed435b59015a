"""One `shoal` subcommand as the registry holds it, and what commands share: the CONFIG and
cluster arguments, loading the job, and where a command writes by default."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.errors import ConfigError, ShoalError
from shoal.imports import locate_object

if TYPE_CHECKING:
    from shoal.config import JobConfig


@dataclass(frozen=True)
class Command:
    """A subcommand: its name and help, the arguments it takes, and the handler that returns its exit status."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]

    def add_parser(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        """Register on the `shoal` command's subparsers (the shape of `shoal.k8s.add_parser`)."""
        p = subparsers.add_parser(self.name, help=self.help)
        self.arguments(p)
        p.set_defaults(func=self.handler)
        return p


def config_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    p.add_argument("config", nargs="?" if optional else None, metavar="CONFIG", help="job YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=0.1")


def resume_arg(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--resume", action="store_true", help=help)


def cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", default=None, help="the cluster's Jobs API, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument(
        "--token-file",
        default=None,
        help="the cluster's auth token (default: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)",
    )


def out_arg(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    p.add_argument("--out", default=None, metavar=metavar, help=help)


def split_config(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """`shoal train optim.lr=0.1` has no CONFIG: a first positional with '=' is an override."""
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not config.endswith((".yaml", ".yml")):
        overrides.insert(0, config)
        config = None
    return config, overrides


def load_job(args: argparse.Namespace) -> JobConfig:
    """The job from CONFIG and the overrides, its model.target and data.decode found."""
    # pydantic builds the config models on import (about half a second): `shoal --help` and `shoal jobs` skip it
    from shoal.config import load_config

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # model.target modules next to the job file import as with `python -m`
    config, overrides = split_config(args)
    if config is None and args.command != "train":
        raise ShoalError(f"shoal {args.command}: CONFIG is required")
    cfg = load_config(config, overrides)
    for key, target in (("model.target", cfg.model.target), ("data.decode", cfg.data.decode)):
        if target:  # found without running it: the module is imported where it trains
            locate_object(target, key)
    return cfg


def check_resume(args: argparse.Namespace, cfg: JobConfig) -> None:
    if args.resume and not cfg.run.dir:
        raise ConfigError("--resume needs the run to continue: set run.dir", key="run.dir")


def out_path(args: argparse.Namespace, cfg: JobConfig, default: str) -> Path:
    """--out, or DEFAULT inside the run directory."""
    from shoal import rundir  # imports shoal.config: see load_job

    return Path(args.out) if args.out else rundir.resolve(cfg) / default
