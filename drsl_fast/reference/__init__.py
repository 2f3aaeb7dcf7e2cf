"""Pure-PyTorch reference implementations: the oracles the fast backends are
tested against. Readable first; they follow docs/method.md line by line."""
from . import pseudo_labels
from .entropy import entropy_map
from .mmdl_losses import label_mode, mmdl_losses
from .mode_distance import mode_distance
from .class_sampling import sample_per_class

__all__ = ["entropy_map", "label_mode", "mmdl_losses", "mode_distance", "pseudo_labels", "sample_per_class"]
