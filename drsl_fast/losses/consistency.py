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
pixels are ordered by (class, mode) group with one device sort, group sizes
come from a scatter, and each anchor picks its positive and negative by one
uniform draw into its group's run (resp. the complement of its class's run).
Extra memory is O(source pixels + anchors x D).
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops.mmdl_losses import label_mode
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
    target_pixels = pixel_rows(target_emb).shape[2]
    anchor_index, anchor_label = anchor_index.long(), anchor_label.long()

    # modes stay uint8 (255: no label); int64 arithmetic with them promotes, no int64 copy of every pixel's mode
    anchor_mode = label_mode(target_emb, anchor_index, anchor_label, modes, backend=backend)
    source_label = source_labels.reshape(Bs, -1).long()
    every_pixel = torch.arange(source_pixels, device=device).expand(Bs, -1)
    source_mode = label_mode(source_emb, every_pixel, source_label, modes, backend=backend)

    groups = C * M  # group g = class * M + mode; invalid source pixels go to group `groups`
    source_group = torch.where(source_mode == 255, groups, source_label * M + source_mode).reshape(-1)
    order = torch.sort(source_group, stable=True).indices  # flat source positions, grouped by (class, mode)
    group_size = torch.zeros(groups + 1, dtype=torch.int64, device=device)
    group_size.scatter_add_(0, source_group, torch.ones_like(source_group))
    group_start = group_size.cumsum(0) - group_size
    class_size = group_size[:groups].view(C, M).sum(1)
    class_start = group_start[: groups : M]
    labelled = class_size.sum()

    has_label = anchor_mode != 255
    y = torch.where(has_label, anchor_label, 0)
    group = y * M + torch.where(has_label, anchor_mode, 0)
    n_positive = group_size[group]
    n_negative = labelled - class_size[y]
    draws = torch.rand((2,) + anchor_index.shape, generator=generator, device=device, dtype=torch.float64)
    # draws lie in [0, 1) and counts below 2^53, so draw * n rounds to below n: picks in [0, n) (0 when n = 0)
    pick_positive = (draws[0] * n_positive).long()
    pick_negative = (draws[1] * n_negative).long()
    # The i-th pixel outside class y's run: runs of the other classes before it, then after.
    negative_slot = torch.where(pick_negative < class_start[y], pick_negative, pick_negative + class_size[y])
    last = max(order.numel() - 1, 0)
    positive = order[(group_start[group] + pick_positive).clamp(max=last)] if order.numel() else pick_positive
    negative = order[negative_slot.clamp(max=last)] if order.numel() else pick_negative

    has_positive, has_negative = n_positive > 0, n_negative > 0
    valid = has_label & has_positive & has_negative
    absent = torch.full_like(positive, -1)
    batch = torch.arange(anchor_index.shape[0], device=device)[:, None]
    anchor = torch.where(has_label, batch * target_pixels + anchor_index, absent)
    return ConsistencyTriplets(
        anchor, torch.where(valid, positive, absent), torch.where(valid, negative, absent), valid,
        (has_label & ~has_positive).sum(), (has_label & ~has_negative).sum(),
    )


def gather_rows(emb: Tensor, flat: Tensor) -> Tensor:
    """Embeddings at flat positions ``b * H*W + p`` as (len(flat), D), read
    from (B, D, H, W) in place (no permuted copy of the map); (N, D) rows likewise.
    One image (the training step's case) needs no division of the positions."""
    bdp = pixel_rows(emb)
    if bdp.shape[0] == 1:
        return bdp[0].t()[flat]
    pixels = bdp.shape[2]
    return bdp[flat // pixels, :, flat % pixels]


def add_rows(emb: Tensor, flat: Tensor, rows: Tensor) -> Tensor:
    """The gradient of ``emb`` whose row at each flat position is the sum of
    the rows given for it: a zero map and ``index_add_``, which on the CPU
    adds repeated positions one after the other in the order of ``flat`` (a
    fixed-order sum, so a training step gives the same bits on every run and
    thread count; advanced indexing's backward adds with racing atomics).
    Laid out as (B, H, W, D) memory viewed as (B, D, H, W)."""
    bdp = pixel_rows(emb)
    batch, channels, pixels = bdp.shape
    grad = emb.new_zeros(batch * pixels, channels).index_add_(0, flat, rows.to(emb.dtype))
    return grad if emb.dim() == 2 else grad.view(batch, *emb.shape[2:], channels).movedim(-1, 1)


class TripletHinge(torch.autograd.Function):
    """Eq. 6 from the gathered rows, as one autograd node with its gradient
    written out (instead of a node per elementwise step). The source rows are
    gathered in one call, positives then negatives (``pairs``, 2N positions),
    and the differences ``d = (e_t - e_p, e_t - e_n)`` kept for the backward.
    With ``h = ||d_p||^2 - ||d_n||^2 + beta`` per kept triplet and
    ``w = 2 [h > 0] / used`` times the loss's gradient:
        dL/de_t = w (d_p - d_n),  dL/de_p = -w d_p,  dL/de_n = w d_n,
    added into one gradient map per embedding tensor (:func:`add_rows`; the
    source map takes the positives' rows, then the negatives')."""

    @staticmethod
    def forward(ctx, target_emb: Tensor, source_emb: Tensor, anchor: Tensor, pairs: Tensor, keep: Tensor,
                beta: float) -> Tensor:
        acc = accumulate_dtype(target_emb.dtype)
        e_t = gather_rows(target_emb, anchor).to(acc)
        d = e_t - gather_rows(source_emb, pairs).to(acc).view(2, *e_t.shape)
        squared = (d * d).sum(-1)
        hinge = squared[0] - squared[1] + beta
        used = keep.sum().clamp(min=1).to(acc)
        ctx.save_for_backward(target_emb, source_emb, anchor, pairs, d, keep & (hinge > 0), used)
        return torch.where(keep, hinge.relu(), 0.0).sum() / used

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        target_emb, source_emb, anchor, pairs, d, active, used = ctx.saved_tensors
        w, inactive = 2 * grad_loss / used, ~active[:, None]
        # fresh tensors, masked in place; a fill, not a product with 0: absent triplets read row 0,
        # which may hold inf or NaN
        grad_target = grad_source = None
        if ctx.needs_input_grad[0]:
            grad_target = add_rows(target_emb, anchor, ((d[0] - d[1]) * w).masked_fill_(inactive, 0))
        if ctx.needs_input_grad[1]:
            rows = d * w
            rows[0].neg_()
            grad_source = add_rows(source_emb, pairs, rows.masked_fill_(inactive, 0).view(-1, d.shape[-1]))
        return grad_target, grad_source, None, None, None, None


def triplet_hinge(target_emb: Tensor, source_emb: Tensor, triplets: ConsistencyTriplets, beta: float = 1.0) -> Tensor:
    """Eq. 6 mean over the valid triplets (0 when there are none), from the
    gathered (anchors, D) rows only (:class:`TripletHinge`); differentiable in
    both embeddings."""
    # absent positions (-1) read row 0; the triplets not kept are masked out
    pairs = torch.cat((triplets.positive.reshape(-1), triplets.negative.reshape(-1))).clamp_(min=0)
    return TripletHinge.apply(target_emb, source_emb, triplets.anchor.reshape(-1).clamp(min=0), pairs,
                              triplets.valid.reshape(-1), beta)


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
    loss = triplet_hinge(target_emb, source_emb, triplets, beta)
    return ConsistencyLoss(loss, triplets.valid.sum(), triplets.skipped_no_positive, triplets.skipped_no_negative)
