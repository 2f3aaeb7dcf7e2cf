"""Portion schedule of the class-balanced pseudo-labels (docs/method.md §5)."""
from ..ops.validation import check_int, check_real


def portion_for_round(round_index: int, start: float = 0.2, step: float = 0.05, cap: float = 0.5) -> float:
    """Portion of each class's pixels kept in self-training round
    ``round_index`` (0-based): ``min(start + step * round_index, cap)``,
    i.e. 0.2, 0.25, 0.3, ... up to 0.5. ``round_index`` is an int >= 0 and
    start, step, cap finite numbers in [0, 1]."""
    op = "portion_for_round"
    round_index = check_int(op, "round_index", round_index, 0)
    start, step, cap = (check_real(op, name, value, low=0.0, high=1.0)
                        for name, value in (("start", start), ("step", step), ("cap", cap)))
    return min(round(start + step * round_index, 12), cap)
