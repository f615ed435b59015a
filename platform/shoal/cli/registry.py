"""Every `shoal` subcommand, in the order `shoal --help` lists them."""

from __future__ import annotations

import argparse
from typing import Protocol

from shoal import k8s
from shoal.cli import data, model, reference, remote, reports, run, tokenizer, tuning


class Registers(Protocol):
    """A Command, or a module such as `shoal.k8s` that registers its own subcommands."""

    def add_parser(self, subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser: ...


COMMANDS: tuple[Registers, ...] = (
    run.TRAIN,
    run.WORKER,
    run.VALIDATE,
    run.DOWN,
    remote.SUBMIT,
    remote.JOBS,
    tuning.COMPARE,
    data.CHECK,
    tuning.BATCH_FIND,
    tuning.SCHEDULE,
    reports.REPORT,
    reports.DOCTOR,
    tuning.LR_FIND,
    tuning.SWEEP,
    model.EXPORT,
    model.COMPRESS,
    data.SHARD,
    tokenizer,  # `shoal tokenizer train`: tokenizer.add_parser
    k8s,  # `shoal k8s render`: k8s.add_parser; imports yaml only, no torch/ray
    reference.CONFIG_REFERENCE,
)
