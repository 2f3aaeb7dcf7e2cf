"""IntraDA's easy/hard split of the target images (docs/method.md §7).

Each image's score is the mean of its entropy map over C, H, W
(:func:`drsl_fast.ops.entropy_map`'s ``image_score``), optionally normalised
by the rare classes (Cityscapes train ids) predicted in it:
``score *= (11 - n_rare_present) / 11 + 0.5``. Images are sorted by ascending
score; the first ``floor(lam * N)`` are the easy split, the rest the hard one.
"""
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .ops.validation import (check_dim, check_float_tensor, check_int, check_integer_tensor, check_no_nan,
                             check_real, check_same_device, check_tensor, describe)

RARE_CLASSES: Tuple[int, ...] = (3, 4, 5, 6, 7, 9, 12, 14, 15, 16, 17)


class EasyHardSplit(NamedTuple):
    """Image indices of the easy and hard splits (each in ascending score
    order) and the scores used for sorting."""

    easy: Tensor
    hard: Tensor
    scores: Tensor


def rare_classes_present(prediction: Tensor, rare_classes: Tuple[int, ...] = RARE_CLASSES) -> Tensor:
    """Number of ``rare_classes`` predicted in each image (B,) int64, from
    scores (B, C, H, W) (argmax; floating point, no NaN: a NaN score has no
    argmax, checked on the host) or class ids (B, H, W) (an integer dtype;
    ids that are no rare class, -1 and 255 included, count for nothing).
    ``rare_classes``: distinct ints >= 0, at least one."""
    op = "rare_classes_present"
    check_tensor(op, "prediction", prediction)
    check_dim(op, "prediction", prediction, (3, 4), "(B, C, H, W) scores or (B, H, W) class ids")
    rare = check_rare_classes(rare_classes)
    if prediction.dim() == 4:
        check_float_tensor(op, "prediction", prediction)
        check_no_nan(op, "prediction", prediction, "a NaN score has no argmax")
        labels = prediction.argmax(1)
    else:
        labels = check_integer_tensor(op, "prediction", prediction, "class ids")
    top = max(rare) + 1
    ids = labels.long().flatten(1)
    ids = torch.where((ids >= 0) & (ids < top), ids, top)  # anything else counts as `top`, no rare class
    present = torch.zeros(labels.shape[0], top + 1, dtype=torch.bool, device=labels.device)
    present.scatter_(1, ids, True)
    return present[:, list(rare)].sum(1)


def check_rare_classes(rare_classes) -> Tuple[int, ...]:
    op = "rare_classes_present"
    if isinstance(rare_classes, (str, bytes)) or not isinstance(rare_classes, Sequence) or not rare_classes:
        raise TypeError(f"{op}: rare_classes must be a non-empty sequence of class ids, got {describe(rare_classes)}")
    rare = tuple(check_int(op, "rare_classes[i]", c, 0) for c in rare_classes)
    if len(set(rare)) != len(rare):
        raise ValueError(f"{op}: rare_classes must be distinct, got {rare}")
    return rare


def rank_easy_hard(scores: Tensor, lam: float = 0.67, rare_counts: Optional[Tensor] = None,
                   num_rare: int = len(RARE_CLASSES)) -> EasyHardSplit:
    """docs/method.md §7 ranking of N image scores (N,); ``rare_counts`` (N,) from
    :func:`rare_classes_present` switches the rare-class normalisation on.
    Ties keep the input order (stable sort).

    Rejected with a ValueError or TypeError naming the argument, because the
    split would be arbitrary: scores that are not a floating-point (N,)
    tensor or not finite (NaN or inf, checked on the host), lam outside
    [0, 1], and with ``rare_counts``: counts that are not integer (N,) or
    outside [0, num_rare], and num_rare < 1. N = 0 gives empty splits.
    """
    op = "rank_easy_hard"
    check_float_tensor(op, "scores", scores)
    check_dim(op, "scores", scores, (1,), "(N,)")
    lam = check_real(op, "lam", lam, low=0.0, high=1.0)
    if not bool(torch.isfinite(scores).all()):
        bad = (~torch.isfinite(scores)).nonzero()[0, 0]
        raise ValueError(f"{op}: scores must be finite, got {float(scores[bad])} for image {int(bad)}")
    if rare_counts is not None:
        scores = scores * rare_factor(scores, rare_counts, num_rare)
    order = torch.sort(scores, stable=True).indices
    n_easy = math.floor(lam * scores.numel())
    return EasyHardSplit(order[:n_easy], order[n_easy:], scores)


def rare_factor(scores: Tensor, rare_counts: Tensor, num_rare: int) -> Tensor:
    """``(num_rare - n_rare) / num_rare + 0.5`` per image, after checking the inputs."""
    op = "rank_easy_hard"
    num_rare = check_int(op, "num_rare", num_rare, 1)
    check_integer_tensor(op, "rare_counts", rare_counts, "rare classes per image")
    if rare_counts.shape != scores.shape:
        raise ValueError(f"{op}: rare_counts must be shaped like scores {tuple(scores.shape)}, "
                         f"got {tuple(rare_counts.shape)}")
    check_same_device(op, "rare_counts", rare_counts, "scores", scores)
    if bool(((rare_counts < 0) | (rare_counts > num_rare)).any()):
        raise ValueError(f"{op}: rare_counts must be in [0, num_rare={num_rare}], got values from "
                         f"{int(rare_counts.min())} to {int(rare_counts.max())}")
    return (num_rare - rare_counts.to(scores)) / num_rare + 0.5
