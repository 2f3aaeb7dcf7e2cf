"""Test-time augmentation (docs/method.md §9): class probabilities averaged over
views of an image, each the image rescaled by one of a list of factors and,
optionally, mirrored left-right.

For every view the network's logits are mirrored back (a mirrored view),
upsampled bilinearly (``align_corners=False``) to the output size and turned
into probabilities by a softmax over classes, as single-scale inference does;
the probabilities of all views are averaged. They are summed in one running
map on the device, so memory is the sum, one view's upsampled logits and their
softmax -- three (B, C, H, W) maps whatever the number of views -- plus the
network's own activations at the largest scale. One view (scale 1, no flip)
gives exactly the single-scale probabilities.
"""
import math
from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.validation import check_bool, check_dim, check_float_tensor, check_int, check_real, describe

Forward = Callable[[Tensor], Tensor]  # images (B, 3, h, w) -> logits (B, C, h', w') at any resolution


def view_size(size: Sequence[int], scale: float) -> Tuple[int, int]:
    """(H, W) of an input of ``size`` rescaled by ``scale``: each side rounded
    to the nearest integer (halves up), at least 1."""
    return tuple(max(1, math.floor(n * scale + 0.5)) for n in size)


def upsampled_softmax(logits: Tensor, size: Sequence[int]) -> Tensor:
    """softmax over classes of ``logits`` upsampled bilinearly to ``size``, fp32."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False).softmax(dim=1)


def check_views(op: str, size: Sequence[int], scales: Sequence[float], flip: bool) -> Tuple[Tuple[int, int], list]:
    if not isinstance(size, (list, tuple, torch.Size)) or len(size) != 2:
        raise TypeError(f"{op}: size must be (H, W), got {describe(size)}")
    size = tuple(check_int(op, "size", int(n) if torch.is_tensor(n) else n, 1) for n in size)
    if not isinstance(scales, (list, tuple)) or not scales:
        raise ValueError(f"{op}: scales must be a non-empty list of numbers > 0, got {describe(scales)}")
    scales = [check_real(op, "scales", s, positive=True) for s in scales]
    check_bool(op, "flip", flip)
    return size, scales


@torch.no_grad()
def tta_probabilities(forward: Forward, images: Tensor, size: Sequence[int], scales: Sequence[float] = (1.0,),
                      flip: bool = False) -> Tensor:
    """docs/method.md §9: ``mean over views v of softmax(up(logits_v))``, (B, C, H, W) fp32 at ``size``.

    Args:
        forward: the network, images -> logits (e.g. a sliding window,
            :func:`drsl_fast.sliding_window.sliding_window_logits`).
        images: (B, 3, h, w) network inputs.
        size: (H, W) of the output (the label or original image size).
        scales: input sizes of the views relative to (h, w) (:func:`view_size`).
        flip: each scale also mirrored left-right.
    """
    op = "tta_probabilities"
    check_float_tensor(op, "images", images)
    check_dim(op, "images", images, (4,), "(B, 3, H, W)")
    size, scales = check_views(op, size, scales, flip)
    total, views = None, 0
    for scale in scales:
        scaled = images if scale == 1.0 else F.interpolate(
            images, size=view_size(images.shape[-2:], scale), mode="bilinear", align_corners=False)
        for mirrored in (False, True) if flip else (False,):
            logits = forward(scaled.flip(-1)) if mirrored else forward(scaled)
            probs = upsampled_softmax(logits.flip(-1) if mirrored else logits, size)
            del logits
            if total is None:
                total = probs
            else:
                total += probs
            del probs
            views += 1
    if views > 1:
        total /= views
    return total
