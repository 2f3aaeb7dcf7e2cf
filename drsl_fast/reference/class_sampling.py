"""Reference for the per-class sampling of docs/method.md §4: per image and per class,
up to k pixels drawn uniformly without replacement."""
from typing import Optional, Tuple

import torch


def sample_per_class(
    labels: torch.Tensor, num_classes: int, k: int, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A plain loop over images x classes with ``nonzero`` and ``randperm``.

    labels: (B, H, W) integer class ids; 255 and any value outside
    [0, num_classes) are ignored. Returns ``index`` (B, C, k) int64 flat pixel
    indices (h * W + w) in random order, padded with -1, and ``count`` (B, C)
    int64, the number of valid entries per row (min(k, pixels of the class)).
    Synchronises with the host once per (image, class): it is the oracle.
    """
    B = labels.shape[0]
    flat = labels.flatten(1)
    index = torch.full((B, num_classes, k), -1, dtype=torch.int64, device=labels.device)
    count = torch.zeros((B, num_classes), dtype=torch.int64, device=labels.device)
    for b in range(B):
        for c in range(num_classes):
            pixels = (flat[b] == c).nonzero().squeeze(1)
            order = torch.randperm(pixels.numel(), generator=generator,
                                   device=generator.device if generator is not None else "cpu").to(labels.device)
            chosen = pixels[order[:k]]
            index[b, c, : chosen.numel()] = chosen
            count[b, c] = chosen.numel()
    return index, count
