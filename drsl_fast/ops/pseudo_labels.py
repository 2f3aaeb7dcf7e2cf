"""Fused ops of the class-balanced pseudo-labels (docs/method.md §5, §10).

- :func:`confidence_histogram`: one pass over a batch of probabilities or
  logits (B, C, H, W) -> int64 counts (C, num_bins) of pixels per (argmax
  class, confidence bin); the bins are those of kernels/confidence_bins.h.
- :func:`select_labels`: one pass, ``argmax_c prob[c] / t[c]``, 255 where the
  largest ratio is below 1, written as uint8 (B, H, W).

Inputs are read in place (contiguous or channels-last) in fp16/bf16/fp32/fp64
and compared in fp32. Both are integer-valued, so every backend gives the same
bits as the reference, NaN inputs included (maxima keep the first NaN, as
``torch.max`` does).

Operators (``torch.library``):
  drsl_fast::confidence_histogram / select_labels                 C++ CPU and CUDA
  drsl_fast::confidence_histogram_triton / select_labels_triton   Triton
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..backends import resolve, triton_import_error
from .. import reference
from .validation import check_bool, check_class_maps, check_float_tensor, check_int, check_same_device

MAX_MANTISSA_BITS = 16


def confidence_histogram(
    scores: Tensor, from_logits: bool = False, mantissa_bits: int = 8, *, backend: Optional[str] = None
) -> Tensor:
    """Counts (C, 1 + 24 * 2**mantissa_bits) int64 of the pixels of ``scores``
    (B, C, H, W) per argmax class (ties: lowest) and bin of their confidence
    (the largest probability; ``softmax`` of logits when ``from_logits``).

    Edge cases, the same on every backend as in the reference: the argmax
    is ``torch.max``'s, so a pixel with a NaN score counts for its first NaN
    class, in the last bin (with the confidences <= 0); so does a logit
    pixel whose softmax is NaN (a +inf logit). Empty inputs count nothing.
    Wrong types, dtypes or shapes, C outside [1, 255], a from_logits that is
    not a bool and mantissa_bits outside [0, 16] raise TypeError or
    ValueError naming the argument.
    """
    op = "confidence_histogram"
    check_class_maps(op, "scores", scores, 1, 255, "labels are uint8, 255 = ignore")
    from_logits = check_bool(op, "from_logits", from_logits)
    mantissa_bits = check_int(op, "mantissa_bits", mantissa_bits, 0, MAX_MANTISSA_BITS)
    name = resolve(backend, scores.device)
    if name == "reference":
        return reference.confidence_histogram(scores, from_logits, mantissa_bits)
    op = torch.ops.drsl_fast.confidence_histogram_triton if name == "triton" else torch.ops.drsl_fast.confidence_histogram
    return op(scores, from_logits, mantissa_bits)


def select_labels(probs: Tensor, thresholds: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """docs/method.md §5 label selection: ``y = argmax_c prob[c] / t[c]`` (ties:
    lowest c); 255 where ``max_c prob[c] / t[c] < 1``.

    Args:
        probs: class probabilities (B, C, H, W), 1 <= C <= 255.
        thresholds: t (C,) floating point, e.g. from
            :meth:`drsl_fast.pseudo_labels.ClassBalancedThresholds.thresholds`;
            each > 0 in float32, and ``inf`` never selects its class.
    Returns:
        uint8 labels (B, H, W).

    Edge cases, the same on every backend as in the reference: a pixel with
    a NaN ratio (a NaN probability, or inf / inf) is not selected (255), as
    ``torch.max`` makes its largest ratio NaN. Empty inputs give empty labels.
    Thresholds that are NaN or <= 0 (where the ratio has no meaning) raise
    ValueError, read on the host (one synchronisation on a (C,) tensor);
    wrong types, dtypes, shapes or devices raise TypeError or ValueError
    naming the argument.
    """
    thresholds = check_select_inputs(probs, thresholds)
    name = resolve(backend, probs.device)
    if name == "reference":
        return reference.select_labels(probs, thresholds)
    op = torch.ops.drsl_fast.select_labels_triton if name == "triton" else torch.ops.drsl_fast.select_labels
    return op(probs, thresholds)


def check_select_inputs(probs: Tensor, thresholds: Tensor) -> Tensor:
    """The validation of :func:`select_labels`; returns the thresholds as
    contiguous float32."""
    op = "select_labels"
    check_class_maps(op, "probs", probs, 1, 255, "labels are uint8, 255 = ignore")
    check_float_tensor(op, "thresholds", thresholds)
    classes = probs.shape[1]
    if thresholds.shape != (classes,):
        raise ValueError(f"{op}: thresholds must be a ({classes},) tensor, one per class of probs, "
                         f"got shape {tuple(thresholds.shape)}")
    check_same_device(op, "thresholds", thresholds, "probs", probs)
    thresholds = thresholds.float().contiguous()
    bad = ~(thresholds > 0)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"{op}: thresholds must be > 0 in float32 (inf never selects the class), "
                         f"got {float(thresholds[first])} for class {first}")
    return thresholds


# ---------------------------------------------------------------- registration


def _fake_histogram(scores: Tensor, from_logits: bool, mantissa_bits: int) -> Tensor:
    return scores.new_empty((scores.shape[1], reference.num_confidence_bins(mantissa_bits)), dtype=torch.int64)


def _fake_select(probs: Tensor, thresholds: Tensor) -> Tensor:
    return probs.new_empty((probs.shape[0], probs.shape[2], probs.shape[3]), dtype=torch.uint8)


if _extension.has_cpu_kernels():
    torch.library.register_fake("drsl_fast::confidence_histogram")(_fake_histogram)
    torch.library.register_fake("drsl_fast::select_labels")(_fake_select)


if triton_import_error() is None:
    from torch.library import triton_op, wrap_triton

    from ..triton_kernels import pseudo_labels as triton_kernels

    @triton_op("drsl_fast::confidence_histogram_triton", mutates_args=())
    def _confidence_histogram_triton(scores: Tensor, from_logits: bool, mantissa_bits: int) -> Tensor:
        counts = torch.zeros_like(_fake_histogram(scores, from_logits, mantissa_bits))
        if scores.numel() > 0:
            triton_kernels.histogram(scores, counts, from_logits, mantissa_bits, launch=wrap_triton)
        return counts

    @triton_op("drsl_fast::select_labels_triton", mutates_args=())
    def _select_labels_triton(probs: Tensor, thresholds: Tensor) -> Tensor:
        labels = _fake_select(probs, thresholds)
        if labels.numel() > 0:
            triton_kernels.select(probs, thresholds, labels, launch=wrap_triton)
        return labels

    # Explicit fake kernels: the Triton interpreter (CPU tensors) cannot be traced.
    _confidence_histogram_triton.register_fake(_fake_histogram)
    _select_labels_triton.register_fake(_fake_select)
