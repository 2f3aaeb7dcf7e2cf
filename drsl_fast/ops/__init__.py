"""Drop-in fast ops (docs/method.md §10). Each picks its backend as described in
:mod:`drsl_fast.backends`."""
from .class_sampling import ClassSamples, sample_per_class
from .entropy import EntropyMaps, entropy_map
from .fda import fourier_domain_adaptation
from .mmdl_losses import MMDLLosses, label_mode, mmdl_losses
from .mode_distance import ModeDistance, mode_distance, mode_posterior
from .pseudo_labels import confidence_histogram, select_labels

__all__ = [
    "ClassSamples",
    "EntropyMaps",
    "MMDLLosses",
    "ModeDistance",
    "confidence_histogram",
    "entropy_map",
    "fourier_domain_adaptation",
    "label_mode",
    "mmdl_losses",
    "mode_distance",
    "mode_posterior",
    "sample_per_class",
    "select_labels",
]
