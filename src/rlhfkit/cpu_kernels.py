"""rlhfkit's fused CPU kernels (`cpu_kernels.cpp`), compiled on first use.

A decode step at one row runs ~120 small linear products; in eager PyTorch each of the int8
copy's products is ten kernels (quantise the input per row, the integer product, rescale), and
their dispatch costs more than the product. `int8_linear` does the same arithmetic in one call
(and optionally the RMS norm or the gated activation in front of it). It is built with
`torch.utils.cpp_extension` the first time a process asks for it (~12 s on 2 cores; cached under
`TORCH_EXTENSIONS_DIR`, `~/.cache/torch_extensions` by default, one build per source text, its
path, and PyTorch and Python version). Where it cannot be built (no C++ compiler, no ninja) or
`RLHFKIT_CPU_KERNELS=0` is set, callers get None and keep the eager path, which computes the same
numbers (with the norm inside the kernel, up to float rounding: its sum runs in another order).
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
DISABLE_VARIABLE = "RLHFKIT_CPU_KERNELS"

Int8Linear = Callable[..., torch.Tensor]


def int8_linear_kernel() -> Int8Linear | None:
    """The fused int8 product `(inputs (rows, in) float32, weight (out, in) int8, weight_scale
    (out) float32, bias (out) | None, inverse (in) | None, norm_weight (in) | None = None, eps = 0,
    gated = False) -> (rows, out) float32`: each row x (gated: x = silu(gate) · up of its two
    halves; norm_weight: RMS-normed, x / √(mean x² + eps) · norm_weight) times inverse, quantised
    as `round(x / s)` with `s = max(max|x|, 1e-12) / 127`, times the weight, rescaled by
    `s · weight_scale`, plus bias; None where the kernels are unavailable."""
    if os.environ.get(DISABLE_VARIABLE, "1") == "0":
        return None
    return _built()


@functools.cache
def _built() -> Int8Linear | None:
    from torch.utils import cpp_extension

    # one folder per source text, its place (ninja rebuilds when the path changes, so two
    # installs would rebuild in turn) and PyTorch and Python version: never a stale build
    identity = f"{SOURCE} {torch.__version__} {sys.version}".encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + identity).hexdigest()[:12]
    name = f"rlhfkit_cpu_{digest}"
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    folder = cache / "rlhfkit" / name
    try:
        _put_ninja_on_path()
        folder.mkdir(parents=True, exist_ok=True)
        if not any(folder.glob(f"{name}.*")):
            print("rlhfkit: compiling the fused CPU kernels (once, ~12 s)", file=sys.stderr, flush=True)
        cpp_extension.load(
            name, [str(SOURCE)], extra_cflags=["-O3"], build_directory=str(folder), is_python_module=False
        )
    except (RuntimeError, OSError, ImportError, ValueError, subprocess.SubprocessError) as error:  # no compiler, ninja
        reason = next(iter(str(error).strip().splitlines()), type(error).__name__)
        print(f"rlhfkit: CPU kernels unavailable ({reason}); the eager path runs", file=sys.stderr, flush=True)
        return None
    return torch.ops.rlhfkit_cpu.int8_linear.default


def _put_ninja_on_path() -> None:
    """PyTorch runs the `ninja` command; the pip package's sits in the environment's bin folder,
    which is not on PATH when the environment's Python runs without being activated."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
