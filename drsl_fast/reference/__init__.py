"""Pure-PyTorch reference implementations: the oracles the fast backends are
tested against. Readable first; they follow SPEC.md line by line."""
from .mode_distance import mode_distance

__all__ = ["mode_distance"]
