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


def _doctor_args(p: argparse.ArgumentParser) -> None:
    _run_dir_arg(p)
    p.add_argument(
        "--labels",
        action="store_true",
        help="also estimate the wrong labels from the trained model's view (confident learning), with the "
        "suspects by shard and index: its predictions on the validation split (the training split when "
        "there is none)",
    )
    p.add_argument(
        "--split",
        choices=("val", "train"),
        help="--labels on this split (implies --labels); train: K-fold logistic regression on the trained "
        "model's penultimate features, since its own predictions there saw the labels",
    )
    p.add_argument(
        "--kfold",
        type=_folds,
        metavar="K",
        help="--labels by K-fold logistic regression on the model's penultimate features (implies --labels; "
        "the training split's method, 5 folds unless given)",
    )


def _folds(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError(f"K must be a whole number of at least 2 (got {text!r})")
    return int(text)


def diagnose_run(args: argparse.Namespace) -> int:
    from shoal.health.doctor import diagnose

    path = diagnose(Path(args.run_dir))
    if args.labels or args.split or args.kfold:
        _labels(Path(args.run_dir), path, args.split, args.kfold)
    say(path.read_text(), end="")
    say(f"\n[shoal] report: {path}")
    return 0


def _labels(run_dir: Path, report: Path, split: str | None, kfold: int | None) -> None:
    """The trained model's view of the labels, in doctor/labels.json and at the end of the report."""
    import json

    from shoal.check.labels import after_training, markdown

    found, noise = after_training(run_dir, split, kfold)
    if split is None and noise["split"] == "train":
        say(f"[shoal] --labels: the run has no validation split; judging the training split instead ({_method(noise)})")
    doc = {"finding": found.as_dict() if found else None, **noise}
    (report.parent / "labels.json").write_text(json.dumps(doc, indent=2))
    with report.open("a") as f:
        f.write(f"\n## Labels ({_view(noise)})\n\n")
        f.write(
            (found.line() if found else "no label_noise finding (at or below check.label_noise_threshold)") + "\n\n"
        )
        f.write("\n".join(markdown(noise)) + "\n")


def _view(noise: dict) -> str:
    """Which split and method a labels section is about, for its title."""
    return f"{ {'val': 'validation', 'train': 'training'}[noise['split']] } split: {_method(noise)}"


def _method(noise: dict) -> str:
    if noise["method"] == "kfold":
        return f"{noise['folds']}-fold logistic regression on the trained model's penultimate features"
    return "the trained model's predictions"


REPORT = Command(
    "report", "one self-contained HTML page of a run (or a sweep / comparison)", _run_dir_arg, write_report
)
DOCTOR = Command(
    "doctor", "report on a run (finished, failed or running): alerts, suggestions, plots", _doctor_args, diagnose_run
)
