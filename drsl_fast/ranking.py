"""IntraDA's easy/hard split of the target images (SPEC.md §7).

Each image's score is the mean of its entropy map over C, H, W
(:func:`drsl_fast.ops.entropy_map`'s ``image_score``), optionally normalised
by the rare classes (Cityscapes train ids) predicted in it:
``score *= (11 - n_rare_present) / 11 + 0.5``. Images are sorted by ascending
score; the first ``floor(lam * N)`` are the easy split, the rest the hard one.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

RARE_CLASSES: Tuple[int, ...] = (3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17)


class EasyHardSplit(NamedTuple):
    """Image indices of the easy and hard splits (each in ascending score
    order) and the scores used for sorting."""

    easy: Tensor
    hard: Tensor
    scores: Tensor


def rare_classes_present(prediction: Tensor, rare_classes: Tuple[int, ...] = RARE_CLASSES) -> Tensor:
    """Number of ``rare_classes`` predicted in each image (B,) int64, from
    scores (B, C, H, W) (argmax) or class ids (B, H, W)."""
    labels = prediction.argmax(1) if prediction.dim() == 4 else prediction
    if labels.dim() != 3:
        raise ValueError(f"rare_classes_present: expected (B, C, H, W) scores or (B, H, W) ids, "
                         f"got shape {tuple(prediction.shape)}")
    top = max(rare_classes) + 1
    ids = labels.long().flatten(1).clamp(0, top)  # anything beyond the rare ids counts as `top`
    present = torch.zeros(labels.shape[0], top + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, ids, True)
    return present[:, list(rare_classes)].sum(1)


def rank_easy_hard(scores: Tensor, lam: float = 0.67, rare_counts: Optional[Tensor] = None,
                   num_rare: int = len(RARE_CLASSES)) -> EasyHardSplit:
    """SPEC.md §7 ranking of N image scores (N,); ``rare_counts`` (N,) from
    :func:`rare_classes_present` switches the rare-class normalisation on.
    Ties keep the input order (stable sort)."""
    if scores.dim() != 1:
        raise ValueError(f"rank_easy_hard: scores must be (N,), got shape {tuple(scores.shape)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"rank_easy_hard: lam must be in [0, 1], got {lam}")
    if rare_counts is not None:
        if rare_counts.shape != scores.shape:
            raise ValueError(f"rank_easy_hard: rare_counts must be shaped like scores {tuple(scores.shape)}")
        scores = scores * ((num_rare - rare_counts.to(scores)) / num_rare + 0.5)
    order = torch.sort(scores, stable=True).indices
    n_easy = math.floor(lam * scores.numel())
    return EasyHardSplit(order[:n_easy], order[n_easy:], scores)
