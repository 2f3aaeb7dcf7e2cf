"""Cross-domain mode consistency, docs/method.md §4 Eq. 6 (DRSL+).

Anchors are target embeddings with a valid pseudo-label c (the per-class
samples of :func:`sample_per_class`); the anchor's mode is m = mstar[c](e_t).
The positive is a uniformly random source pixel with ground truth c whose own
mstar[c] is m; the negative a uniformly random source pixel of any other
(valid) class. Both are drawn among all source pixels of the batch, with
replacement across anchors. Then
    L_cons = mean relu(||e_t - e_s+||^2 - ||e_t - e_s-||^2 + beta),
over the anchors that have both; the others are skipped and counted.

One call, no host synchronisation, no pairwise distance matrix: the source
pixels are ordered by (class, mode) group, and each anchor picks its positive
and negative by one uniform draw into its group's run (resp. the labelled
pixels outside its class's run); kernels/consistency_triplets.h states the rule.
Operator drsl_fast::consistency_triplets: C++ CPU (a stable counting sort) and
CUDA (one device sort, a binary search per group, a thread per anchor); the
reference (:func:`drsl_fast.reference.consistency_triplets`, also Triton's
backend) does the same with plain torch ops. The three give the same
triplets for the same draws. The hinge over the triplets is operator
drsl_fast::consistency_hinge (C++ CPU and CUDA, one autograd node, the rows
read in place). Extra memory is O(source pixels + anchors), and the backward
writes one gradient map per embedding tensor.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _extension, reference
from ..backends import resolve
from ..ops.class_sampling import repeated_rows
from ..ops.mmdl_losses import label_mode
from ..ops.mode_distance import empty_like_pixel_viewable
from ..ops.registration import register_differentiable
from ..reference import accumulate_dtype, pixel_rows


class ConsistencyTriplets(NamedTuple):
    """Per anchor (shape of the anchor index, (Bt, S)): flat positions
    ``b * H*W + p`` of the anchor in the target batch and of its positive and
    negative in the source batch (-1 where absent), and ``valid`` (both found).
    ``skipped_no_positive`` / ``skipped_no_negative`` count anchors with a valid
    label that lack one (an anchor can lack both)."""

    anchor: Tensor
    positive: Tensor
    negative: Tensor
    valid: Tensor
    skipped_no_positive: Tensor
    skipped_no_negative: Tensor


class ConsistencyLoss(NamedTuple):
    """Eq. 6 (0 when no anchor is valid), the number of anchors used and the
    skip counts (int64 tensors)."""

    loss: Tensor
    anchors: Tensor
    skipped_no_positive: Tensor
    skipped_no_negative: Tensor


def consistency_triplets(
    target_emb: Tensor, anchor_index: Tensor, anchor_label: Tensor, source_emb: Tensor, source_labels: Tensor,
    modes: Tensor, generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None,
) -> ConsistencyTriplets:
    """Draws the Eq. 6 triplets (see the module docstring).

    target_emb (Bt, D, H, W); anchor_index, anchor_label (Bt, S) as for
    :func:`mmdl_losses` (e.g. ``sample_per_class(...).pairs()`` of the target
    pseudo-labels); source_emb (Bs, D, H', W'); source_labels (Bs, H', W') at
    embedding resolution (255 ignored); modes (C, M, D).
    """
    C, M, _ = modes.shape
    device = target_emb.device
    Bs = source_labels.shape[0]
    source_pixels = pixel_rows(source_emb).shape[2]
    anchor_index, anchor_label = anchor_index.long(), anchor_label.long()
    anchor_mode = label_mode(target_emb, anchor_index, anchor_label, modes, backend=backend)
    source_label = source_labels.reshape(Bs, -1)
    every_pixel = repeated_rows(Bs, source_pixels, 1, source_label.device)
    source_mode = label_mode(source_emb, every_pixel, source_label, modes, backend=backend)
    draws = torch.rand((2,) + anchor_index.shape, generator=generator, device=device, dtype=torch.float64)
    args = (anchor_index, anchor_label, anchor_mode, source_label, source_mode, draws, C, M,
            pixel_rows(target_emb).shape[2])
    if resolve(backend, device) in ("cpu", "cuda"):
        anchor, positive, negative, valid, skipped = torch.ops.drsl_fast.consistency_triplets(*args)
    else:  # the reference, and Triton's backend (a sort is not a Triton kernel): plain torch ops
        anchor, positive, negative, valid, skipped = reference.consistency_triplets(*args)
    return ConsistencyTriplets(anchor, positive, negative, valid, skipped[0], skipped[1])


def consistency_hinge(target_emb: Tensor, source_emb: Tensor, triplets: ConsistencyTriplets, beta: float = 1.0, *,
                      backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Eq. 6: the mean hinge over the valid triplets (0 when there are none)
    and their number, reading the (anchors, D) rows in place; differentiable
    in both embeddings. Operator drsl_fast::consistency_hinge (C++ CPU, CUDA;
    its formulas are atop csrc/cpu/consistency_hinge.cpp), one autograd node;
    the reference (also Triton's backend) is :func:`drsl_fast.reference.consistency_hinge`."""
    args = (target_emb, source_emb, triplets.anchor, triplets.positive, triplets.negative, beta)
    if resolve(backend, target_emb.device) in ("cpu", "cuda"):
        return torch.ops.drsl_fast.consistency_hinge(*args)
    return reference.consistency_hinge(*args)


def consistency_loss(
    target_emb: Tensor, anchor_index: Tensor, anchor_label: Tensor, source_emb: Tensor, source_labels: Tensor,
    modes: Tensor, beta: float = 1.0, generator: Optional[torch.Generator] = None, *, backend: Optional[str] = None,
) -> ConsistencyLoss:
    """docs/method.md Eq. 6 in one call: draws the triplets
    (:func:`consistency_triplets`) and returns their mean hinge with margin
    ``beta`` (docs/method.md §4: 1). Gradients reach both embeddings (detach
    ``source_emb`` to move only the target side); the modes only choose
    positives, so they get none."""
    triplets = consistency_triplets(
        target_emb, anchor_index, anchor_label, source_emb, source_labels, modes, generator, backend=backend
    )
    loss, used = consistency_hinge(target_emb, source_emb, triplets, beta, backend=backend)
    return ConsistencyLoss(loss, used, triplets.skipped_no_positive, triplets.skipped_no_negative)


def _fake_consistency_triplets(anchor_index, anchor_label, anchor_mode, source_label, source_mode, draws,
                               num_classes, num_modes, target_pixels):
    positions = [anchor_index.new_empty(anchor_index.shape) for _ in range(3)]
    return (*positions, anchor_index.new_empty(anchor_index.shape, dtype=torch.bool), anchor_index.new_empty((2,)))


def _fake_consistency_hinge(target_emb, source_emb, anchor, positive, negative, beta):
    acc = accumulate_dtype(target_emb.dtype)
    return target_emb.new_empty((), dtype=acc), anchor.new_empty(())


def _fake_consistency_hinge_backward(grad, used, target_emb, source_emb, anchor, positive, negative, beta,
                                     target_requires_grad, source_requires_grad):
    return tuple(empty_like_pixel_viewable(emb) if wanted else emb.new_empty((0,))
                 for emb, wanted in ((target_emb, target_requires_grad), (source_emb, source_requires_grad)))


if _extension.has_cpu_kernels():
    torch.library.register_fake("drsl_fast::consistency_triplets")(_fake_consistency_triplets)
    register_differentiable("consistency_hinge", _fake_consistency_hinge,
                            _fake_consistency_hinge_backward)  # autograd: csrc/autograd/
