"""Streaming class-balanced thresholds (docs/method.md §5) in fixed memory.

CBST/CRST sort every pixel's confidence per class over the whole target set.
:class:`ClassBalancedThresholds` instead keeps, on the model's device, one
int64 histogram per class over the confidence bins of
kernels/confidence_bins.h: bins on the fp32 bits of ``1 - conf``, with
``mantissa_bits`` (k) bits of each octave kept. Its memory is
``C * (1 + 24 * 2**k) * 8`` bytes (0.9 MiB for C = 19, k = 8), whatever the
number of images, and states add: ``merge`` and a DDP all-reduce sum integer
counts, so they equal the one-shot state exactly.

Resolution. Let t* be the exact threshold of a class (the value at rank
r = floor(n * portion) of its confidences in descending order) and t the one
returned here: the bin holding t* is found exactly from the cumulative counts,
and t is that bin's lowest confidence edge, rounded down to fp32. Hence

    t <= t*   and   1 - t <= max((1 - t*) (1 + 2**-k), 2**-24)

(up to one fp32 rounding of 1 - conf, 2**-24 absolute), i.e. the error is
relative to 1 - t* (0.4 % of it for k = 8), never coarser near 1. Since t <= t*,
every pixel the exact threshold keeps in its class is kept, plus at most the
pixels of the one bin that holds t*.
"""
from typing import Optional

import torch
from torch import Tensor

from ..ops.pseudo_labels import MAX_MANTISSA_BITS, confidence_histogram
from ..ops.validation import check_bool, check_class_maps, check_int, check_integer_tensor, check_real, describe
from ..reference import SMALLEST_GAP_BITS, num_confidence_bins


class ClassBalancedThresholds:
    """Per-class confidence histograms over a stream of predictions.

    Args:
        num_classes: C.
        device: where the state lives (the model's device).
        mantissa_bits: k, the resolution (see the module docstring).
        backend: backend of the histogram op (see :mod:`drsl_fast.backends`).

    Example::

        acc = ClassBalancedThresholds(19, device="cuda")
        for images in target_loader:
            acc.update(model(images).softmax(1))
        torch.distributed.all_reduce(acc.counts)  # optional, DDP
        t = acc.thresholds(portion_for_round(round_index))
    """

    def __init__(self, num_classes: int, device=None, mantissa_bits: int = 8, backend: Optional[str] = None):
        num_classes = check_int("ClassBalancedThresholds", "num_classes", num_classes, 1, 255)
        mantissa_bits = check_int("ClassBalancedThresholds", "mantissa_bits", mantissa_bits, 0, MAX_MANTISSA_BITS)
        self.num_classes = num_classes
        self.mantissa_bits = mantissa_bits
        self.backend = backend
        self.num_bins = num_confidence_bins(mantissa_bits)
        self.counts = torch.zeros(num_classes, self.num_bins, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device:
        return self.counts.device

    def update(self, scores: Tensor, from_logits: bool = False) -> None:
        """Adds the pixels of a batch of probabilities (or logits with
        ``from_logits``) shaped (B, C, H, W), on the state's device. Edge
        cases as in :func:`drsl_fast.ops.confidence_histogram` (a NaN pixel
        counts as the least confident of its first NaN class)."""
        check_class_maps("ClassBalancedThresholds.update", "scores", scores, 1, 255, "labels are uint8")
        from_logits = check_bool("ClassBalancedThresholds.update", "from_logits", from_logits)
        if scores.shape[1] != self.num_classes:
            raise ValueError(f"ClassBalancedThresholds.update: scores must be (B, {self.num_classes}, H, W) "
                             f"(the state's classes), got shape {tuple(scores.shape)}")
        if scores.device != self.device:
            raise ValueError(f"ClassBalancedThresholds.update: scores are on {scores.device} but the state is on "
                             f"{self.device}; they must be on one device")
        self.counts += confidence_histogram(scores, from_logits, self.mantissa_bits, backend=self.backend)

    def merge(self, other: "ClassBalancedThresholds") -> "ClassBalancedThresholds":
        """Adds another state (same C and resolution) into this one."""
        if not isinstance(other, ClassBalancedThresholds):
            raise TypeError(f"ClassBalancedThresholds.merge: other must be a ClassBalancedThresholds, "
                            f"got {describe(other)}")
        if (other.num_classes, other.mantissa_bits) != (self.num_classes, self.mantissa_bits):
            raise ValueError("ClassBalancedThresholds.merge: states differ in num_classes or mantissa_bits")
        self.counts += other.counts.to(self.device)
        return self

    def all_reduce(self, group=None) -> None:
        """Sums the state over the ranks of a torch.distributed group."""
        torch.distributed.all_reduce(self.counts, group=group)

    def reset(self) -> None:
        self.counts.zero_()

    def pixels_per_class(self) -> Tensor:
        return self.counts.sum(1)

    def thresholds(self, portion: float) -> Tensor:
        """t (C,) fp32 of docs/method.md §5, on the state's device, without a host
        synchronisation: the confidence at rank floor(n_c * portion) in
        descending order, to the resolution of the module docstring; 1 for a
        class with no pixels; +inf (nothing selected) where the rank is 0."""
        check_real("ClassBalancedThresholds.thresholds", "portion", portion, low=0.0, high=1.0)
        n = self.pixels_per_class()
        rank = torch.floor(n.double() * portion).long()
        cumulative = self.counts.cumsum(1)
        # first bin whose cumulative count reaches the rank holds the rank-th value
        bin_index = torch.searchsorted(cumulative, rank[:, None].clamp(min=1)).squeeze(1).clamp(max=self.num_bins - 1)
        threshold = round_down_to_float32(1.0 - self.gap_upper_edges()[bin_index])
        inf = torch.full_like(threshold, float("inf"))
        threshold = torch.where(rank == 0, inf, threshold)
        return torch.where(n == 0, torch.ones_like(threshold), threshold)

    def gap_upper_edges(self) -> Tensor:
        """Exclusive upper edge of every bin in ``1 - conf``, float64."""
        b = torch.arange(self.num_bins, device=self.device, dtype=torch.int64)
        bits = (SMALLEST_GAP_BITS + (b << (23 - self.mantissa_bits))).to(torch.int32)
        return bits.view(torch.float32).double()

    def state_dict(self) -> dict:
        return {"counts": self.counts, "mantissa_bits": self.mantissa_bits}

    def load_state_dict(self, state: dict) -> None:
        """Loads :meth:`state_dict`'s output: int64 counts of this state's
        shape and the same mantissa_bits."""
        op = "ClassBalancedThresholds.load_state_dict"
        if not isinstance(state, dict) or not {"counts", "mantissa_bits"} <= state.keys():
            raise TypeError(f"{op}: state must be a dict with 'counts' and 'mantissa_bits', got {describe(state)}")
        counts = check_integer_tensor(op, "state['counts']", state["counts"], "pixel counts")
        if state["mantissa_bits"] != self.mantissa_bits or counts.shape != self.counts.shape:
            raise ValueError(f"{op}: the state has another shape or resolution: state['counts'] "
                             f"{tuple(counts.shape)} with mantissa_bits {state['mantissa_bits']!r}, expected "
                             f"{tuple(self.counts.shape)} with {self.mantissa_bits}")
        self.counts.copy_(counts)


def round_down_to_float32(x: Tensor) -> Tensor:
    """float64 -> the largest float32 <= x."""
    y = x.float()
    return torch.where(y.double() > x, torch.nextafter(y, torch.full_like(y, -float("inf"))), y)
