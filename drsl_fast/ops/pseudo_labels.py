"""Fused ops of the class-balanced pseudo-labels (SPEC.md §5, §10).

- :func:`confidence_histogram`: one pass over a batch of probabilities or
  logits (B, C, H, W) -> int64 counts (C, num_bins) of pixels per (argmax
  class, confidence bin); the bins are those of kernels/confidence_bins.h.
- :func:`select_labels`: one pass, ``argmax_c prob[c] / t[c]``, 255 where the
  largest ratio is below 1, written as uint8 (B, H, W).

Inputs are read in place (contiguous or channels-last) in fp16/bf16/fp32/fp64
and compared in fp32. Both are integer-valued, so every backend gives the same
bits as the reference.

Operators (``torch.library``):
  drsl_fast::confidence_histogram / select_labels                 C++ CPU and CUDA
  drsl_fast::confidence_histogram_triton / select_labels_triton   Triton
"""
from typing import Optional

import torch
from torch import Tensor

from .. import _extension
from ..backends import resolve, triton_import_error
from ..reference import pseudo_labels as reference
from .validation import check_class_maps

MAX_MANTISSA_BITS = 16


def confidence_histogram(
    scores: Tensor, from_logits: bool = False, mantissa_bits: int = 8, *, backend: Optional[str] = None
) -> Tensor:
    """Counts (C, 1 + 24 * 2**mantissa_bits) int64 of the pixels of ``scores``
    (B, C, H, W) per argmax class (ties: lowest) and bin of their confidence
    (the largest probability; ``softmax`` of logits when ``from_logits``)."""
    check_class_maps("confidence_histogram", "scores", scores, 1, 255, "labels are uint8, 255 = ignore")
    if not isinstance(mantissa_bits, int) or not 0 <= mantissa_bits <= MAX_MANTISSA_BITS:
        raise ValueError(f"confidence_histogram: mantissa_bits must be an int in [0, {MAX_MANTISSA_BITS}], "
                         f"got {mantissa_bits!r}")
    name = resolve(backend, scores.device)
    if name == "reference":
        return reference.confidence_histogram(scores, from_logits, mantissa_bits)
    op = torch.ops.drsl_fast.confidence_histogram_triton if name == "triton" else torch.ops.drsl_fast.confidence_histogram
    return op(scores, from_logits, mantissa_bits)


def select_labels(probs: Tensor, thresholds: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """SPEC.md §5 label selection: ``y = argmax_c prob[c] / t[c]`` (ties:
    lowest c); 255 where ``max_c prob[c] / t[c] < 1``.

    Args:
        probs: class probabilities (B, C, H, W).
        thresholds: t (C,), e.g. from
            :meth:`drsl_fast.pseudo_labels.ClassBalancedThresholds.thresholds`;
            ``inf`` never selects its class.
    Returns:
        uint8 labels (B, H, W).
    """
    check_class_maps("select_labels", "scores", probs, 1, 255, "labels are uint8, 255 = ignore")
    if not isinstance(thresholds, Tensor) or thresholds.shape != (probs.shape[1],):
        shape = tuple(thresholds.shape) if isinstance(thresholds, Tensor) else type(thresholds).__name__
        raise ValueError(f"select_labels: thresholds must be a ({probs.shape[1]},) tensor, one per class, got {shape}")
    if thresholds.device != probs.device:
        raise ValueError(f"select_labels: probs are on {probs.device} but thresholds on {thresholds.device}")
    thresholds = thresholds.float().contiguous()
    name = resolve(backend, probs.device)
    if name == "reference":
        return reference.select_labels(probs, thresholds)
    op = torch.ops.drsl_fast.select_labels_triton if name == "triton" else torch.ops.drsl_fast.select_labels
    return op(probs, thresholds)


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
