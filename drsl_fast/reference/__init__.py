"""Pure-PyTorch reference implementations: the oracles the fast backends are
tested against. Readable first; they follow SPEC.md line by line."""
from . import pseudo_labels
from .entropy import entropy_map
from .mode_distance import mode_distance

__all__ = ["entropy_map", "mode_distance", "pseudo_labels"]
