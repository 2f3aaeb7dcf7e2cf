"""drsl_fast: fast, memory-lean DRSL and IntraDA/ADVENT domain adaptation for
semantic segmentation, with drop-in fused ops for other UDA code.

Every op has a pure-PyTorch reference (:mod:`drsl_fast.reference`) and faster
backends (C++ CPU, CUDA, Triton) chosen by :func:`drsl_fast.backends.resolve`.
"""
from . import backends, ops, reference
from .backends import BackendUnavailableError, available_backends
from .ops import ModeDistance, mode_distance, mode_posterior

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ModeDistance",
    "available_backends",
    "backends",
    "mode_distance",
    "mode_posterior",
    "ops",
    "reference",
]
