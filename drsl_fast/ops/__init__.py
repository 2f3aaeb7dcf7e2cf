"""Drop-in fast ops (SPEC.md §10). Each picks its backend as described in
:mod:`drsl_fast.backends`."""
from .entropy import EntropyMaps, entropy_map
from .mode_distance import ModeDistance, mode_distance, mode_posterior
from .pseudo_labels import confidence_histogram, select_labels

__all__ = [
    "EntropyMaps",
    "ModeDistance",
    "confidence_histogram",
    "entropy_map",
    "mode_distance",
    "mode_posterior",
    "select_labels",
]
