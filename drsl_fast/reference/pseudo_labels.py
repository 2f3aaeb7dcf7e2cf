"""References for the class-balanced pseudo-labels of docs/method.md §5.

Two oracles:
- the exact, sort-based thresholds (:class:`SortedThresholds`): keeps every
  pixel's (class, confidence) and sorts them per class, as CBST/CRST do;
- the confidence histogram and the label selection in plain PyTorch, against
  which the fast backends are compared bit for bit.
"""
import math
from typing import List, Tuple

import torch
from torch import Tensor

IGNORE_LABEL = 255
# bits(2^-24) as an fp32 pattern; see kernels/confidence_bins.h.
SMALLEST_GAP = 2.0**-24
SMALLEST_GAP_BITS = 103 << 23


def num_confidence_bins(mantissa_bits: int) -> int:
    return 1 + (24 << mantissa_bits)


def pixel_confidence(scores: Tensor, from_logits: bool) -> Tuple[Tensor, Tensor]:
    """Per pixel of (B, C, H, W) scores: (argmax class (ties: lowest; the
    first NaN, as ``torch.max``), fp32 confidence max_c prob[c]), both
    flattened. For logits the confidence is ``1 / sum_c exp(l_c - max l)``,
    the softmax probability of the argmax (NaN when a logit is NaN or +inf)."""
    x = scores.float()
    best, cls = x.max(1)
    conf = 1.0 / torch.exp(x - best[:, None]).sum(1) if from_logits else best
    return cls.flatten(), conf.flatten()


def confidence_bin(conf: Tensor, mantissa_bits: int) -> Tensor:
    """Bin of each fp32 confidence (kernels/confidence_bins.h): by the bit
    pattern of ``1 - conf``; bin 0 is the most confident."""
    gap = 1.0 - conf.float()
    bits = gap.contiguous().view(torch.int32).long()
    fine = 1 + ((bits - SMALLEST_GAP_BITS) >> (23 - mantissa_bits))
    last = num_confidence_bins(mantissa_bits) - 1
    return torch.where(gap < SMALLEST_GAP, 0, torch.where(gap < 1.0, fine, last))


def confidence_histogram(scores: Tensor, from_logits: bool, mantissa_bits: int) -> Tensor:
    """(C, num_bins) int64 pixel counts per (argmax class, confidence bin)."""
    C = scores.shape[1]
    nbins = num_confidence_bins(mantissa_bits)
    cls, conf = pixel_confidence(scores, from_logits)
    index = cls * nbins + confidence_bin(conf, mantissa_bits)
    return torch.bincount(index, minlength=C * nbins).view(C, nbins)


def select_labels(probs: Tensor, thresholds: Tensor) -> Tensor:
    """docs/method.md §5: ``y = argmax_c prob[c] / t[c]`` (ties: lowest c), 255 where
    ``max_c prob[c] / t[c] < 1``, or NaN (``torch.max`` keeps a NaN ratio).
    (B, C, H, W) -> (B, H, W) uint8."""
    ratio = probs.float() / thresholds.float().to(probs.device)[None, :, None, None]
    best, label = ratio.max(1)
    return torch.where(best >= 1.0, label, IGNORE_LABEL).to(torch.uint8)


def rank_threshold(values: Tensor, portion: float) -> float:
    """docs/method.md §5 for one class: the value at rank floor(n * portion) of the
    descending order (1-based); 1 when the class has no pixels, +inf (nothing
    selected) when the rank is 0."""
    n = values.numel()
    if n == 0:
        return 1.0
    rank = math.floor(n * portion)
    if rank == 0:
        return math.inf
    return float(values.sort(descending=True).values[rank - 1])


class SortedThresholds:
    """Exact CBST/CRST thresholds: keeps every pixel's confidence per class
    (memory grows with the data) and sorts at the end. ``stride`` keeps every
    stride-th pixel only, as CRST's code does with stride 4."""

    def __init__(self, num_classes: int, stride: int = 1):
        self.num_classes = num_classes
        self.stride = stride
        self.classes: List[Tensor] = []
        self.confidences: List[Tensor] = []

    def update(self, scores: Tensor, from_logits: bool = False) -> None:
        cls, conf = pixel_confidence(scores, from_logits)
        self.classes.append(cls[:: self.stride])
        self.confidences.append(conf[:: self.stride])

    def thresholds(self, portion: float) -> Tensor:
        cls = torch.cat(self.classes) if self.classes else torch.zeros(0, dtype=torch.long)
        conf = torch.cat(self.confidences) if self.confidences else torch.zeros(0)
        values = [rank_threshold(conf[cls == c], portion) for c in range(self.num_classes)]
        return torch.tensor(values, dtype=torch.float32)
