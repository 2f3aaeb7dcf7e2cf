"""Drop-in fast ops (SPEC.md §10). Each picks its backend as described in
:mod:`drsl_fast.backends`."""
from .mode_distance import ModeDistance, mode_distance, mode_posterior

__all__ = ["ModeDistance", "mode_distance", "mode_posterior"]
