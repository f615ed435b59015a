"""`shoal report` and `shoal doctor`: read a run directory (finished, failed or running) and say
what happened in it.

The modules that do the work are imported inside the handlers: they load torch, which the
driver's start-up (`shoal --help`) must not."""

from __future__ import annotations

import argparse
from pathlib import Path

from shoal.cli.command import Command
from shoal.cli.output import say


def _run_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR")


def write_report(args: argparse.Namespace) -> int:
    from shoal.report import write

    say(f"[shoal] report: {write(Path(args.run_dir))}")
    return 0


def diagnose_run(args: argparse.Namespace) -> int:
    from shoal.health.doctor import diagnose

    path = diagnose(Path(args.run_dir))
    say(path.read_text(), end="")
    say(f"\n[shoal] report: {path}")
    return 0


REPORT = Command(
    "report", "one self-contained HTML page of a run (or a sweep / comparison)", _run_dir_arg, write_report
)
DOCTOR = Command(
    "doctor", "report on a run (finished, failed or running): alerts, suggestions, plots", _run_dir_arg, diagnose_run
)
