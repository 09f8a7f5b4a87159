"""The engine's optional C++ kernel, built on first use by torch's extension loader.

``lbfgs_direction.cpp`` computes the batched L-BFGS direction instance by instance, so each
instance's history is read from memory once per iteration instead of twice (see the file). It is
built with the machine's C++ compiler into torch's extension cache (``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``) the first time it is asked for, which takes about half a
minute; later processes load the cached build. Where it cannot be built (no C++ compiler, or no
ninja, which torch's loader builds with), the engine warns once and keeps the torch path, which
computes the same directions.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("lbfgs_direction.cpp")
_built: dict[str, ModuleType | None] = {}


def lbfgs_kernel() -> ModuleType | None:
    """The compiled kernel module, or None (with one warning) where it cannot be built."""
    if "kernel" not in _built:
        _built["kernel"] = _build()
    return _built["kernel"]


def _build() -> ModuleType | None:
    from torch.utils.cpp_extension import load

    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    flags = ["-O3", "-fopenmp"]
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]  # the dot products are only memory-bound with FMA vectors
    try:
        # the name carries the instruction set, so a cache shared between machines never hands an
        # AVX2 build to a CPU without it
        return load(name=f"leakbench_lbfgs_{capability.lower()}", sources=[str(SOURCE)],
                    extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path still works
        first_line = (str(exc).strip().splitlines() or [""])[0]
        warnings.warn(f"native L-BFGS kernel unavailable ({type(exc).__name__}: {first_line}); "
                      "using the torch implementation", RuntimeWarning, stacklevel=3)
        return None
