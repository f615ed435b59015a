"""`shoal export` writes a trained model for inference; `shoal compress` prunes and quantises one.

The modules that do the work are imported inside the handlers: they load torch, which the
driver's start-up (`shoal --help`) must not."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shoal.cli.command import Command, out_arg
from shoal.cli.output import note, say
from shoal.errors import ShoalError

if TYPE_CHECKING:
    from shoal.compress import Options


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "checkpoint",
        metavar="SOURCE",
        help="a checkpoint directory (RUN_DIR/checkpoints/step-000100), a run directory (its latest), "
        "or a model `shoal compress` wrote (RUN_DIR/compress/<variant>)",
    )
    p.add_argument("out", metavar="OUT", help="output file (a directory for --format hugging_face)")
    p.add_argument(
        "--format",
        default=None,
        help="state_dict | safetensors | torch_export | onnx | hugging_face (a save_pretrained directory of a "
        "transformers model; default: from OUT's suffix: .safetensors, .pt2, .onnx, else .pt)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def export_model(args: argparse.Namespace) -> int:
    from shoal.export import export
    from shoal.trained import resolve

    path = resolve(Path(args.checkpoint))
    done = export(path, Path(args.out), args.format, overwrite=args.overwrite)
    say(f"[shoal] wrote {done['path']} ({done['format']} of {path}){_verdict(done)}")
    return 0


def _verdict(done: dict[str, Any]) -> str:
    """How the export was checked against PyTorch, or why it was not run."""
    if done.get("checked"):
        return (
            f"; outputs match PyTorch's on {done['samples']} validation samples ({done['runtime']}, max |diff| "
            f"{done['max_abs_diff']:.2g} <= {done['tolerance']:.2g})"
        )
    if "runtime" in done and done["runtime"] != "weights":
        return f"; not run: {done['runtime']}"
    return ""


def _compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="RUN_DIR_OR_CHECKPOINT")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="overrides for the fine-tune job")
    p.add_argument("--sparsity", default="", help="target sparsities, e.g. 0.5 or 0.3,0.5,0.7,0.9 (a sweep)")
    p.add_argument("--structured", action="store_true", help="prune whole neurons/channels instead of single weights")
    p.add_argument("--per-layer", action="store_true", help="the sparsity in every layer, instead of over all of them")
    p.add_argument("--quantize", default=None, choices=["dynamic", "weight_only"], help="int8 (torchao)")
    p.add_argument("--finetune", type=int, default=0, metavar="STEPS", help="fine-tune each pruned model, zeros kept")
    out_arg(p, "DIR", "default: RUN_DIR/compress")


def compress_model(args: argparse.Namespace) -> int:
    from shoal.compress import run

    report = run(Path(args.source), Path(args.out) if args.out else None, _compress_options(args), say=note)
    md = Path(report["plot"]).parent / "report.md"
    say(md.read_text())
    say(f"[shoal] report: {md}")
    return 0


def _compress_options(args: argparse.Namespace) -> Options:
    """The variants to make, from the command line; a bad value fails before the model loads."""
    from shoal.compress import Options

    sparsities = _sparsities(args.sparsity)
    if not sparsities and not args.quantize:
        raise ShoalError("shoal compress: give --sparsity and/or --quantize")
    if args.finetune < 0:
        raise ShoalError(f"--finetune: must be >= 0 (got {args.finetune})")
    return Options(
        sparsities=sparsities,
        method="structured" if args.structured else "unstructured",
        scope="layer" if args.per_layer else "global",
        quantize=args.quantize,
        finetune_steps=args.finetune,
        overrides=list(args.overrides),
    )


def _sparsities(text: str) -> list[float]:
    """--sparsity's comma-separated values, each in [0, 1)."""
    try:
        sparsities = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ShoalError(f"--sparsity: expected numbers like 0.5 or 0.3,0.5 (got {text!r})") from None
    bad = [s for s in sparsities if not 0 <= s < 1]
    if bad:
        raise ShoalError(f"--sparsity: each value must be in [0, 1) (got {bad[0]:g})")
    return sparsities


EXPORT = Command(
    "export", "write a trained or compressed model for inference, checked against PyTorch", _export_args, export_model
)
COMPRESS = Command(
    "compress",
    "prune / quantise a trained model and measure each variant on validation data",
    _compress_args,
    compress_model,
)
