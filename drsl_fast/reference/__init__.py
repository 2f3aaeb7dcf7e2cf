"""Pure-PyTorch reference implementations: the oracles the fast backends are
tested against. Readable first; they follow SPEC.md line by line."""
from .mmdl import label_mode, mmdl_losses
from .mode_distance import mode_distance
from .sampling import sample_per_class

__all__ = ["label_mode", "mmdl_losses", "mode_distance", "sample_per_class"]
