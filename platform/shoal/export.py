"""`shoal export SOURCE OUT --format ...`: a trained (or compressed) model in a format a serving stack loads,
checked against the PyTorch model on validation samples before the command reports success.

state_dict (.pt) and safetensors write the weights; hugging_face a save_pretrained directory (a transformers
model.target: config.json and the weights, loaded back by its class's from_pretrained); torch_export writes torch.export's program (.pt2, a
dynamic batch dimension, the input shape from the data); onnx writes an ONNX graph through torch.onnx's
exporter (needs onnx and onnxscript) and is run with onnxruntime for the check when that is installed.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shoal.checkpoint import export as export_weights
from shoal.data.loaders import open_splits
from shoal.errors import CheckpointError, ShoalError
from shoal.trained import VARIANT, load, resolve

FORMATS = ("state_dict", "safetensors", "torch_export", "onnx", "hugging_face")
CHECK_SAMPLES = 64
RTOL, ATOL = 1e-4, 1e-5  # |exported - pytorch| <= ATOL + RTOL * max|pytorch|


def format_of(out: Path, fmt: str | None) -> str:
    if fmt is None:
        return {".safetensors": "safetensors", ".pt2": "torch_export", ".onnx": "onnx"}.get(out.suffix, "state_dict")
    if fmt not in FORMATS:
        raise ShoalError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def export(source: Path, out: Path, fmt: str | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write OUT (beside it first, renamed into place once checked); returns what was checked."""
    fmt = format_of(out, fmt)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass --overwrite to replace it, or choose another name")
    if out.is_dir() and fmt != "hugging_face":
        raise CheckpointError(f"{out} is a directory; give a file name such as model.{_suffix(fmt)}")

    source = resolve(source)
    if fmt in ("state_dict", "safetensors") and not (source / VARIANT).exists():
        export_weights(source, out, overwrite=overwrite, safetensors=fmt == "safetensors")
        return {"format": fmt, "path": str(out)}

    trained = load(source)
    _, val = open_splits(trained.cfg)
    sample_source = val if val is not None and len(val) else open_splits(trained.cfg)[0]
    x = sample_source.get_batch(np.arange(min(CHECK_SAMPLES, len(sample_source)), dtype=np.int64))[0]
    model = trained.model.eval()
    with torch.inference_mode():
        want = model(x)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        got, runtime = WRITERS[fmt](model, x, tmp, fmt)
        check = _compare(got, want, fmt, runtime)
        if out.is_dir():  # --overwrite of a hugging_face directory
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
    return {"format": fmt, "path": str(out), **check}


def _suffix(fmt: str) -> str:
    return {"state_dict": "pt", "safetensors": "safetensors", "torch_export": "pt2", "onnx": "onnx"}.get(fmt, "")


def _weights(model: torch.nn.Module, x: torch.Tensor, tmp: Path, fmt: str) -> tuple[torch.Tensor | None, str]:
    state = model.state_dict()
    if fmt == "safetensors":
        try:
            from safetensors.torch import save_file  # an optional package: only this format needs it
        except ImportError:
            raise ShoalError("--format safetensors needs the safetensors package (pip install safetensors)") from None
        try:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        except Exception as e:  # quantised weights are tensor subclasses safetensors cannot hold
            raise ShoalError(
                f"--format safetensors: this model's weights cannot be stored so ({type(e).__name__}); "
                "use --format state_dict or torch_export"
            ) from None
        return None, "weights"
    torch.save(state, tmp)
    return None, "weights"


def _dynamic_batch(x: torch.Tensor) -> Any:
    return ({0: torch.export.Dim("batch", min=1, max=1 << 16)},)


def _torch_export(model: torch.nn.Module, x: torch.Tensor, tmp: Path, fmt: str) -> tuple[torch.Tensor, str]:
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_batch(x))
    except Exception as e:
        raise ShoalError(
            f"--format torch_export: torch.export cannot trace this model: {type(e).__name__}: {_first_line(e)}"
        ) from None
    torch.export.save(program, str(tmp))
    loaded = torch.export.load(str(tmp)).module()
    with torch.inference_mode():
        return loaded(x), "torch.export.load"


def _onnx(model: torch.nn.Module, x: torch.Tensor, tmp: Path, fmt: str) -> tuple[torch.Tensor | None, str]:
    for module, extra in (("onnx", "onnx"), ("onnxscript", "onnx")):
        try:
            __import__(module)
        except ImportError:
            raise ShoalError(f"--format onnx needs the {module} package: pip install 'shoal[{extra}]'") from None
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=_dynamic_batch(x), verbose=False)
        program.save(str(tmp))
    except Exception as e:
        raise ShoalError(
            f"--format onnx: this model cannot be exported to ONNX: {type(e).__name__}: {_first_line(e)}"
        ) from None
    runner = _onnxruntime(tmp)
    if runner is None:
        return None, "not run (onnxruntime is not installed)"
    return torch.from_numpy(runner(x.numpy())), "onnxruntime"


def _hugging_face(model: torch.nn.Module, x: Any, tmp: Path, fmt: str) -> tuple[torch.Tensor, str]:
    """save_pretrained's directory (config.json and safetensors weights), loaded back by the model's own class."""
    base = getattr(type(model), "_shoal_base", type(model))
    if not hasattr(base, "from_pretrained") or not hasattr(model, "save_pretrained"):
        raise ShoalError(f"--format hugging_face: {base.__name__} is not a Hugging Face transformers model")
    model.save_pretrained(tmp)
    loaded = base.from_pretrained(tmp, local_files_only=True).eval()
    loaded.shoal_io, loaded.__class__ = model.shoal_io, type(model)  # called on the batch as the trained one is
    with torch.inference_mode():
        return loaded(x), f"{base.__name__}.from_pretrained"


def _onnxruntime(path: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    try:
        import onnxruntime as ort  # an optional extra (shoal[onnx])
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


WRITERS = {
    "state_dict": _weights,
    "safetensors": _weights,
    "torch_export": _torch_export,
    "onnx": _onnx,
    "hugging_face": _hugging_face,
}


def _compare(got: torch.Tensor | None, want: torch.Tensor, fmt: str, runtime: str) -> dict[str, Any]:
    if got is None:
        return {"checked": False, "runtime": runtime}
    scale = float(want.abs().max())
    diff = float((got.float() - want.float()).abs().max())
    tol = ATOL + RTOL * scale
    if not diff <= tol:
        raise ShoalError(
            f"--format {fmt}: the exported model's outputs differ from PyTorch's by {diff:.3g} "
            f"(tolerance {tol:.3g}) on {len(want)} validation samples; nothing was written"
        )
    return {"checked": True, "runtime": runtime, "samples": len(want), "max_abs_diff": diff, "tolerance": tol}


def _first_line(e: Exception) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # the exporters colour their messages
    return text.splitlines()[0][:300] if text else ""
