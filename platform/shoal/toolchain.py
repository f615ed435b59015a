"""What torch.compile's inductor needs to build kernels (train.compile), found without importing torch, so
`shoal validate` and the driver's checks can say what is missing before any rank starts."""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path


def compiler(on_cpu: bool) -> str | None:
    """The compiler inductor will run, or None where none is found. On CPU it writes C++ kernels and calls $CXX,
    else g++ (clang++ on macOS), as torch._inductor.config.cpp.cxx says; on GPUs Triton builds its launcher with
    $CC, else gcc or clang."""
    if on_cpu:
        names = [os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")]
    else:
        names = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
    return next((found for found in map(shutil.which, names) if found), None)


def missing(on_cpu: bool) -> str | None:
    """What to install, in one line, where torch.compile cannot build its kernels here; None where it can. Both
    kinds of kernel include Python.h: Python's headers are needed too."""
    if compiler(on_cpu) is None:
        what, variable = ("a C++ compiler (g++)", "CXX") if on_cpu else ("a C compiler for Triton (gcc)", "CC")
        return (
            f"torch.compile needs {what} and none is on PATH here: install it (apt-get install g++), "
            f"name another with ${variable}, or set train.compile: false"
        )
    headers = Path(sysconfig.get_paths()["include"])
    if not (headers / "Python.h").exists():
        return (
            f"torch.compile's kernels include Python.h and {headers} has none: install Python's headers "
            "(apt-get install python3-dev), or set train.compile: false"
        )
    return None
