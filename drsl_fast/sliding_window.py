"""Sliding-window inference (docs/method.md §9): an input larger than a window
is predicted in overlapping tiles of the window's size, so the network's
activations are those of one tile whatever the image size.

Tiles start every ``stride = floor(window * (1 - overlap))`` pixels (at least
1) along each side, the last one flush with the image's end, so every pixel is
covered. Each tile's logits are upsampled bilinearly (``align_corners=False``)
to the tile's pixels and summed into a (B, C, H, W) fp32 map at the input's
resolution; every pixel's sum is divided by the number of tiles covering it.
"""
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops.validation import check_dim, check_float_tensor, check_int, check_real, describe
from .tta import Forward


def tile_starts(length: int, tile: int, stride: int) -> List[int]:
    """Starts of the tiles of ``tile`` pixels that cover [0, length): 0,
    stride, 2 stride, ..., the last one at ``length - tile``."""
    if length <= tile:
        return [0]
    count = -(-(length - tile) // stride) + 1
    return [min(i * stride, length - tile) for i in range(count)]


def check_window(op: str, window: Sequence[int], overlap: float) -> List[int]:
    if not isinstance(window, (list, tuple)) or len(window) != 2:
        raise TypeError(f"{op}: window must be (H, W), got {describe(window)}")
    check_real(op, "overlap", overlap, low=0.0)
    if overlap >= 1:
        raise ValueError(f"{op}: overlap must be a fraction of the window in [0, 1), got {overlap}")
    return [check_int(op, "window", n, 1) for n in window]


@torch.no_grad()
def sliding_window_logits(forward: Forward, images: Tensor, window: Sequence[int], overlap: float = 0.25) -> Tensor:
    """``forward(images)`` when ``images`` (B, 3, H, W) fit in ``window`` (H, W);
    otherwise the tiled logits (B, C, H, W) fp32 of the module docstring
    (a side shorter than the window is one tile of its own length)."""
    op = "sliding_window_logits"
    check_float_tensor(op, "images", images)
    check_dim(op, "images", images, (4,), "(B, 3, H, W)")
    window = check_window(op, window, overlap)
    height, width = images.shape[-2:]
    if height <= window[0] and width <= window[1]:
        return forward(images)
    tile_h, tile_w = min(window[0], height), min(window[1], width)
    rows = tile_starts(height, tile_h, max(1, int(tile_h * (1 - overlap))))
    columns = tile_starts(width, tile_w, max(1, int(tile_w * (1 - overlap))))
    total, count = None, torch.zeros(height, width, device=images.device)
    for y in rows:
        for x in columns:
            logits = forward(images[..., y:y + tile_h, x:x + tile_w])
            logits = F.interpolate(logits.float(), size=(tile_h, tile_w), mode="bilinear", align_corners=False)
            if total is None:
                total = logits.new_zeros(images.shape[0], logits.shape[1], height, width)
            total[..., y:y + tile_h, x:x + tile_w] += logits
            count[y:y + tile_h, x:x + tile_w] += 1
            del logits
    return total.div_(count)
