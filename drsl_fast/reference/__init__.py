"""Pure-PyTorch reference implementations: the oracles the fast backends are
tested against. Readable first; they follow docs/method.md line by line."""
from . import pseudo_labels
from .entropy import entropy_map
from .fda import fourier_domain_adaptation
from .mmdl_losses import label_mode, mmdl_losses
from .mode_distance import mode_distance
from .class_sampling import sample_per_class

__all__ = ["entropy_map", "fourier_domain_adaptation", "label_mode", "mmdl_losses", "mode_distance", "pseudo_labels",
           "sample_per_class"]
