"""Reference for the MMDL losses of docs/method.md §4: Eq. 4 (triplet) and Eq. 5
(cross-entropy over the scaled class posteriors), per sampled embedding."""
from typing import Tuple

import torch
import torch.nn.functional as F

from .mode_distance import accumulate_dtype, class_posterior


def pixel_rows(emb: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) as (B, D, P); (N, D) as (1, D, N)."""
    return emb.t().unsqueeze(0) if emb.dim() == 2 else emb.flatten(2)


def valid_samples(index: torch.Tensor, label: torch.Tensor, pixels: int, num_classes: int) -> torch.Tensor:
    """Samples that count: pixel index in [0, P) and label in [0, C)."""
    return (index >= 0) & (index < pixels) & (label >= 0) & (label < num_classes)


def gather_samples(emb: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The sampled embeddings (B, S, D); invalid samples read 0."""
    bdp = pixel_rows(emb)
    if bdp.shape[2] == 0:  # no pixels: no sample is valid
        return bdp.new_zeros((index.shape[0], index.shape[1], bdp.shape[1]))
    safe = torch.where(valid, index, torch.zeros_like(index))
    rows = bdp.gather(2, safe[:, None, :].expand(-1, bdp.shape[1], -1)).transpose(1, 2)
    return torch.where(valid[..., None], rows, torch.zeros_like(rows))


def mmdl_losses(
    emb: torch.Tensor, index: torch.Tensor, label: torch.Tensor, modes: torch.Tensor,
    sigma: float = 0.5, alpha: float = 1.0, scale: float = 15.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Eq. 4 and Eq. 5.

    emb (B, D, H, W) or (N, D) (then B = 1); index (B, S) flat pixel indices;
    label (B, S) class ids; modes (C, M, D). For every valid sample e with label y:
      dmin[c]   = min_m ||e - r[c, m]||^2                          (docs/method.md §3)
      triplet   = relu(dmin[y] - min_{c != y} dmin[c] + alpha)      (Eq. 4; 0 when C = 1)
      ce        = -log softmax_c(scale * exp(-dmin[c] / (2 sigma^2)))[y]   (Eq. 5)
    Invalid samples (index outside [0, P), label outside [0, C)) give 0.
    NaN propagates (``min`` and ``relu`` keep it; with C = 1 the nearest wrong
    class is at +inf, so Eq. 4 is NaN only for a NaN or inf dmin[y]).
    Returns (triplet, ce), each (B, S) in the accumulation dtype.
    Materialises (B, S, C, M, D): it is the oracle.
    """
    acc = accumulate_dtype(emb.dtype)
    C = modes.shape[0]
    valid = valid_samples(index, label, pixel_rows(emb).shape[2], C)
    e = gather_samples(emb, index, valid).to(acc)
    r = modes.to(acc)
    dist = ((e[:, :, None, None, :] - r) ** 2).sum(-1)  # (B, S, C, M)
    dmin = dist.min(-1).values  # (B, S, C)
    y = torch.where(valid, label, torch.zeros_like(label)).long()
    positive = dmin.gather(-1, y[..., None]).squeeze(-1)
    is_label = F.one_hot(y, C).bool()
    negative = dmin.masked_fill(is_label, float("inf")).min(-1).values
    triplet = torch.relu(positive - negative + alpha)
    logits = scale * class_posterior(dmin, sigma)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(positive)
    zero = torch.zeros((), dtype=acc, device=emb.device)
    return torch.where(valid, triplet, zero), torch.where(valid, ce, zero)


def label_mode(emb: torch.Tensor, index: torch.Tensor, label: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """``mstar[y]`` of every sample (docs/method.md §3: the nearest mode of its own
    class, ties to the lowest m) as uint8 (B, S); 255 for invalid samples."""
    acc = accumulate_dtype(emb.dtype)
    C = modes.shape[0]
    valid = valid_samples(index, label, pixel_rows(emb).shape[2], C)
    e = gather_samples(emb, index, valid).to(acc)
    y = torch.where(valid, label, torch.zeros_like(label)).long()
    r = modes.to(acc)[y]  # (B, S, M, D)
    mode = ((e[:, :, None, :] - r) ** 2).sum(-1).argmin(-1).to(torch.uint8)
    return torch.where(valid, mode, torch.full_like(mode, 255))
