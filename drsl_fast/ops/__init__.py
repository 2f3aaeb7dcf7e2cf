"""Drop-in fast ops (SPEC.md §10). Each picks its backend as described in
:mod:`drsl_fast.backends`."""
from .mode_distance import ModeDistance, mode_distance, mode_posterior

# DRSL losses (SPEC.md §4)
from .class_sampling import ClassSamples, sample_per_class
from .mmdl_losses import MMDLLosses, label_mode, mmdl_losses

__all__ = ["ModeDistance", "mode_distance", "mode_posterior"]
__all__ += ["ClassSamples", "MMDLLosses", "label_mode", "mmdl_losses", "sample_per_class"]
