"""`shoal config-reference`: the config reference in markdown, printed or written into a README."""

from __future__ import annotations

import argparse
from pathlib import Path

from shoal.cli.command import Command
from shoal.cli.output import say
from shoal.errors import ShoalError

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--update", metavar="README", help="rewrite the reference between the markers in this file instead")


def print_reference(args: argparse.Namespace) -> int:
    # pydantic builds the config models on import (about half a second): `shoal --help` skips it
    from shoal.config import config_reference

    if not args.update:
        say(config_reference(), end="")
        return 0
    path = Path(args.update)
    text = path.read_text()
    if START not in text or END not in text:
        raise ShoalError(f"{path}: no {START} ... {END} markers to write between")
    head, rest = text.split(START, 1)
    path.write_text(head + START + "\n" + config_reference() + END + rest.split(END, 1)[1])
    return 0


CONFIG_REFERENCE = Command(
    "config-reference", "print the config reference (markdown)", _reference_args, print_reference
)
