"""The DRSL objectives, docs/method.md §4 Eq. 7-10, usable from any training loop.

Segmentation losses (Eq. 1/2) are passed in, not computed here: the training
loop owns the segmentation output (resolution, multi-level auxiliary head with
its 0.1 weight, docs/method.md §2), so :class:`DRSLLoss` takes the already-reduced
``seg_source`` / ``seg_target``; :func:`segmentation_loss` is the documented pixel
cross-entropy with ignore 255 for loops that want it.
"""
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.class_sampling import repeated_rows, sample_per_class
from ..ops.mmdl_losses import MMDLLosses, mmdl_losses
from ..ops.mode_distance import check_sigma
from ..ops.validation import check_bool, check_dim, check_float_tensor, check_int, check_integer_tensor, check_real
from .consistency import consistency_loss

IGNORE_LABEL = 255


def segmentation_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_LABEL) -> Tensor:
    """Eq. 1/2: mean pixel cross-entropy over labelled pixels (0, not NaN, when
    none is labelled). Logits (B, C, h, w) (floating point) are upsampled
    bilinearly to the labels' (B, H, W) size first; labels are integer ids
    (a float label would be truncated: TypeError)."""
    op = "segmentation_loss"
    check_float_tensor(op, "logits", logits)
    check_dim(op, "logits", logits, (4,), "(B, C, h, w)")
    check_integer_tensor(op, "labels", labels, "class ids")
    check_dim(op, "labels", labels, (3,), "(B, H, W)")
    ignore_index = check_int(op, "ignore_index", ignore_index, -(1 << 62))
    if logits.shape[-2:] != labels.shape[-2:]:
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    per_pixel = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none")
    labelled = (labels != ignore_index).sum()
    return per_pixel.sum() / labelled.clamp(min=1).to(per_pixel.dtype)


def labels_at(labels: Tensor, emb: Tensor) -> Tensor:
    """Labels (B, H, W) reduced to the embedding map's size by nearest
    neighbour (docs/method.md §2: stride 2); unchanged when the sizes already match.

    Where the sizes divide (H = r h, W = s w), nearest neighbour picks label
    (r i, s j) for (i, j): a strided view, no copy and no kernel; otherwise
    ``F.interpolate(mode="nearest")``, which gives the same labels."""
    size = tuple(emb.shape[-2:])
    (H, W), (h, w) = labels.shape[-2:], size
    if (H, W) == (h, w):
        return labels
    if 0 < h <= H and 0 < w <= W and H % h == 0 and W % w == 0:
        return labels[:, :: H // h, :: W // w]
    reduced = F.interpolate(labels[:, None].float(), size=size, mode="nearest")
    return reduced[:, 0].to(labels.dtype)


def in_mode_variance(source: MMDLLosses, target: MMDLLosses) -> Tensor:
    """Eq. 7: ``mean_S L_tri + mean_T L_tri``, each mean over its own count;
    an empty set contributes 0 (which the 'mean' of :func:`mmdl_losses` is)."""
    return source.triplet + target.triplet


def weighted_sum(terms: Sequence[Tuple[Tensor, float]]) -> Tensor:
    """``sum_i w_i t_i`` over (t_i, w_i) pairs. Terms that are 0-d fp32 or fp64
    tensors of one dtype and device: ``dot(stack(t), w)``, two operators and
    two autograd nodes whose backward is one multiplication (on a GPU every
    operator is a kernel launch and every node a step of the backward's host
    work), where a chain of ``add(..., alpha=w_i)``, the way taken otherwise,
    takes one operator and one node a term, and a multiplication for each
    weight other than 1 in the backward."""
    values = [term for term, _ in terms]
    first = values[0]
    if (isinstance(first, Tensor) and first.dtype in (torch.float32, torch.float64)
            and all(isinstance(t, Tensor) and t.dim() == 0 and t.dtype == first.dtype and t.device == first.device
                    for t in values)):
        weights = term_weights(tuple(float(w) for _, w in terms), first.dtype, first.device)
        if weights is not None:
            stacked = torch.stack(values)
            if torch.is_autocast_enabled(first.device.type):  # the sum in the terms' dtype, not autocast's
                with torch.autocast(first.device.type, enabled=False):
                    return torch.dot(stacked, weights)
            return torch.dot(stacked, weights)
    (first, weight), *rest = terms
    total = torch.as_tensor(first)  # a float term (a segmentation loss given as a number) as a 0-d tensor
    total = total * weight if weight != 1 else total
    for term, weight in rest:
        total = total.add(term, alpha=weight)
    return total


_TERM_WEIGHTS: Dict[Tuple, Tensor] = {}


def term_weights(weights: Tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Optional[Tensor]:
    """The weights of :func:`weighted_sum` as a tensor on ``device``, made
    once per (weights, dtype, device), on a GPU by an asynchronous copy from
    pinned memory (no host synchronisation); None when it is not made yet and
    a CUDA graph is being captured, where a copy from the host cannot be."""
    key = (weights, dtype, device)
    if key not in _TERM_WEIGHTS:
        host = torch.tensor(weights, dtype=dtype)
        if device.type == "cuda":
            if torch.cuda.is_current_stream_capturing():
                return None
            _TERM_WEIGHTS[key] = host.pin_memory().to(device, non_blocking=True)
        else:
            _TERM_WEIGHTS[key] = host.to(device)
    return _TERM_WEIGHTS[key]


class DRSLLossOutput(NamedTuple):
    total: Tensor
    terms: Dict[str, Tensor]


class DRSLLoss(nn.Module):
    """Eq. 8 (source training), Eq. 9 (DRSL) and Eq. 10 (DRSL+).

    Eq. 8:  seg_s + lambda1 * L_tri_s + lambda2 * L_ce_s                 (no target given)
    Eq. 9:  seg_s + seg_t + lambda1 * L_mm + lambda2 * (L_ce_s + L_ce_t)
    Eq. 10: Eq. 9 + lambda3 * L_cons                                    (consistency=True)

    Per image and class, ``samples_per_class`` embeddings (N = 300) are drawn
    with :func:`sample_per_class` from the labels (source ground truth, target
    pseudo-labels; full resolution or already at embedding resolution). Eq. 6
    anchors are the sampled target embeddings. No host synchronisation.
    """

    def __init__(
        self, num_classes: int, *, samples_per_class: int = 300, sigma: float = 0.5, alpha: float = 1.0,
        scale: float = 15.0, beta: float = 1.0, lambda1: float = 0.25, lambda2: float = 0.1, lambda3: float = 0.1,
        consistency: bool = True, backend: Optional[str] = None,
    ):
        super().__init__()
        op = "DRSLLoss"
        self.num_classes = check_int(op, "num_classes", num_classes, 1)
        self.samples_per_class = check_int(op, "samples_per_class", samples_per_class, 0)
        self.sigma = check_sigma(op, sigma)
        self.alpha, self.scale, self.beta = (check_real(op, name, value) for name, value in
                                             (("alpha", alpha), ("scale", scale), ("beta", beta)))
        self.lambda1, self.lambda2, self.lambda3 = (check_real(op, name, value) for name, value in
                                                    (("lambda1", lambda1), ("lambda2", lambda2), ("lambda3", lambda3)))
        self.consistency = check_bool(op, "consistency", consistency)
        self.backend = backend

    def forward(
        self, modes: Tensor, source_emb: Tensor, source_labels: Tensor, seg_source: Tensor,
        target_emb: Optional[Tensor] = None, target_labels: Optional[Tensor] = None,
        seg_target: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
    ) -> DRSLLossOutput:
        """modes (C, M, D); *_emb (B, D, h, w); *_labels (B, H, W) with 255
        ignored; seg_* the segmentation losses (scalars). Without target
        inputs this is Eq. 8."""
        source_labels = labels_at(source_labels, source_emb)
        source_pairs = self._pairs(source_labels, generator)
        source = self._mmdl(source_emb, source_pairs, modes)
        terms = {"seg_source": seg_source, "triplet_source": source.triplet, "ce_source": source.ce}
        if target_emb is None:
            total = weighted_sum([(seg_source, 1.0), (source.triplet, self.lambda1), (source.ce, self.lambda2)])
            return DRSLLossOutput(total, terms)
        if target_labels is None or seg_target is None:
            raise ValueError("DRSLLoss: target_emb needs target_labels (pseudo-labels) and seg_target")
        target_labels = labels_at(target_labels, target_emb)
        target_pairs = self._pairs(target_labels, generator)
        target = self._mmdl(target_emb, target_pairs, modes)
        terms.update(seg_target=seg_target, triplet_target=target.triplet, ce_target=target.ce,
                     in_mode=in_mode_variance(source, target))
        # Eq. 9, with Eq. 7's in-mode term as its two means
        weighted = [(seg_source, 1.0), (seg_target, 1.0), (source.triplet, self.lambda1),
                    (target.triplet, self.lambda1), (source.ce, self.lambda2), (target.ce, self.lambda2)]
        if self.consistency:
            cons = consistency_loss(
                target_emb, *target_pairs, source_emb, source_labels, modes, self.beta, generator,
                backend=self.backend,
            )
            weighted.append((cons.loss, self.lambda3))  # Eq. 10
            terms.update(consistency=cons.loss, consistency_anchors=cons.anchors,
                         skipped_no_positive=cons.skipped_no_positive, skipped_no_negative=cons.skipped_no_negative)
        total = weighted_sum(weighted)
        return DRSLLossOutput(total, terms)

    def _pairs(self, labels, generator):
        """``sample_per_class(...).pairs()``, its labels the shared contiguous rows of :func:`repeated_rows`."""
        samples = sample_per_class(labels, self.num_classes, self.samples_per_class, generator, backend=self.backend)
        B, C, k = samples.index.shape
        return samples.index.reshape(B, C * k), repeated_rows(B, C * k, k, samples.index.device)

    def _mmdl(self, emb, pairs, modes) -> MMDLLosses:
        return mmdl_losses(emb, *pairs, modes, self.sigma, self.alpha, self.scale, backend=self.backend)
