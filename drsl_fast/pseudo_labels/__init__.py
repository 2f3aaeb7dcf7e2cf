"""Class-balanced pseudo-labels (docs/method.md §5): streaming thresholds, label
selection and the portion schedule."""
from ..ops.pseudo_labels import select_labels
from .schedule import portion_for_round
from .thresholds import ClassBalancedThresholds

__all__ = ["ClassBalancedThresholds", "portion_for_round", "select_labels"]
