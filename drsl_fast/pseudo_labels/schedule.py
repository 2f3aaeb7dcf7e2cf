"""Portion schedule of the class-balanced pseudo-labels (SPEC.md §5)."""


def portion_for_round(round_index: int, start: float = 0.2, step: float = 0.05, cap: float = 0.5) -> float:
    """Portion of each class's pixels kept in self-training round
    ``round_index`` (0-based): ``min(start + step * round_index, cap)``,
    i.e. 0.2, 0.25, 0.3, ... up to 0.5."""
    if round_index < 0:
        raise ValueError(f"portion_for_round: round_index must be >= 0, got {round_index}")
    return min(round(start + step * round_index, 12), cap)
