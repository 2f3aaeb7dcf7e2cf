"""Backend choice for every op: ``reference`` (pure PyTorch, the oracle),
``cpu`` (C++), ``cuda`` (CUDA C++) and ``triton``.

``auto`` picks the fastest backend available for the tensor's device: ``cpu``
on CPU tensors; ``cuda`` then ``triton`` on GPUs (Triton needs compute
capability >= 8.0); ``reference`` when nothing else is there. A backend is
forced per call (``backend=``) or for the whole process with the environment
variable ``DRSL_FAST_BACKEND``; forcing one that cannot run raises
:class:`BackendUnavailableError` saying why.
"""
import functools
import importlib.util
import os
from typing import Dict, Optional, Tuple

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "DRSL_FAST_BACKEND"
AUTO_ORDER: Dict[str, Tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}
TRITON_MIN_CAPABILITY = (8, 0)
# The CUDA backend's tensor-core mode-distance kernels, each run on request on
# GPUs of compute capability >= 8.0: the environment variable named here, read
# by the CUDA launcher at every call, set to 1. By default every GPU runs the
# fp32 kernels in difference form, the ones a GTX 1080 Ti runs (on an H200
# faster than the tensor-core ones: bench/NOTES.md).
CUDA_KERNEL_VARIANTS = {"cuda-tc-backward": "DRSL_FAST_TENSOR_CORE_BACKWARD",
                        "cuda-tc-forward": "DRSL_FAST_TENSOR_CORE_FORWARD"}


class BackendUnavailableError(RuntimeError):
    """A backend was forced that cannot run here."""


@functools.lru_cache(maxsize=None)
def triton_import_error() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not break drsl_fast
        return f"importing triton failed ({type(exc).__name__}: {exc})"
    return None


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def why_unavailable(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None when it can."""
    if backend == "reference":
        return None
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors, and these are on {device}"
        if not _extension.has_cpu_kernels():
            return f"the compiled extension is missing ({_extension.LOAD_ERROR})"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors, and these are on {device}"
        if not _extension.has_cpu_kernels():
            return f"the compiled extension is missing ({_extension.LOAD_ERROR})"
        if not _extension.has_cuda_kernels():
            return "the extension was built without CUDA kernels (no CUDA torch or no nvcc at build time)"
        return None
    if backend == "triton":
        error = triton_import_error()
        if error is not None:
            return error
        if device.type == "cpu":
            return None if triton_interpreter_on() else "on CPU tensors it needs TRITON_INTERPRET=1 (the interpreter)"
        if device.type != "cuda":
            return f"it runs on CUDA tensors, and these are on {device}"
        capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
        if capability < TRITON_MIN_CAPABILITY:
            return f"it needs compute capability >= 8.0 and {device} has {capability[0]}.{capability[1]}"
        return None
    raise ValueError(f"unknown backend {backend!r}; choose one of {('auto',) + BACKENDS}")


@torch.compiler.assume_constant_result
def resolve(backend: Optional[str], device: torch.device) -> str:
    """The backend to run on ``device``: ``backend`` if given, else the
    ``DRSL_FAST_BACKEND`` environment variable, else ``auto``."""
    requested = backend or os.environ.get(ENV_VAR) or "auto"
    if requested == "auto":
        for candidate in AUTO_ORDER.get(device.type, ("reference",)):
            if why_unavailable(candidate, device) is None:
                return candidate
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of {('auto',) + BACKENDS}")
    reason = why_unavailable(requested, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {requested!r} cannot run on {device}: {reason}")
    return requested


def available_backends(device="cpu") -> Tuple[str, ...]:
    """Backends that can run on ``device`` in this process."""
    device = torch.device(device)
    return tuple(name for name in BACKENDS if why_unavailable(name, device) is None)
