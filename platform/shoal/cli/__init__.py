"""The `shoal` command. The only place that turns a ShoalError into one line and an exit status.

The subcommands live in the modules named for what they do (run, remote, tuning, data, model,
reports, reference); `registry.COMMANDS` lists them, and the parser is built from it."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from shoal import __version__
from shoal.cli.command import split_config as _split_config
from shoal.cli.output import INTERRUPTED, say
from shoal.cli.output import exit_code as _exit_code
from shoal.cli.registry import COMMANDS
from shoal.errors import ShoalError

__all__ = ["_exit_code", "_split_config", "build_parser", "main"]  # the names tests import


def build_parser() -> argparse.ArgumentParser:
    """The full command-line grammar (tests parse launch scripts and manifests with it)."""
    p = argparse.ArgumentParser(
        prog="shoal", description="Distributed data-parallel training for PyTorch from one YAML file."
    )
    p.add_argument("--version", action="version", version=f"shoal {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return p


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The parsed command line; KEY=VALUE overrides may also follow the options
    (`shoal compress RUN --sparsity 0.9 scaling.num_workers=2`)."""
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `shoal` console script and `python -m shoal`."""
    args = parse(build_parser(), argv)
    try:
        return args.func(args)
    except ShoalError as e:
        say(f"shoal: error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        say("shoal: interrupted", err=True)
        return INTERRUPTED
