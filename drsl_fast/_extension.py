"""Loads the compiled extension ``drsl_fast._C`` and keeps the reason when it
is missing, so that ``import drsl_fast`` never fails because of it."""
import warnings

import torch

try:
    from . import _C  # noqa: F401  (registers the drsl_fast::* operators)

    LOAD_ERROR = None
except (ImportError, OSError) as exc:
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "drsl_fast: the compiled extension is unavailable, so the 'cpu' and 'cuda' "
        f"backends are disabled and 'reference' is used instead ({LOAD_ERROR}). "
        "Build it with `pip install --no-build-isolation -e .` (see README).",
        RuntimeWarning,
        stacklevel=2,
    )


def has_cpu_kernels() -> bool:
    return LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    return LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "drsl_fast::mode_distance", "CUDA"
    )
