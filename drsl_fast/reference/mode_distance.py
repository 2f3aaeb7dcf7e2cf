"""Reference for the per-pixel mode model of docs/method.md §3."""
import math
from typing import Optional, Tuple

import torch


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32 inputs, fp64 for fp64 (docs/method.md §10)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def posterior_scale(sigma: float, dtype: torch.dtype) -> float:
    """``-1 / (2 sigma^2)`` as a value of ``dtype``: -inf where it overflows
    (sigma below ~4e-20 in float32), as every backend computes it."""
    scale = -0.5 / sigma / sigma
    return -math.inf if -scale > torch.finfo(dtype).max else scale


def class_posterior(dmin: torch.Tensor, sigma: float) -> torch.Tensor:
    """docs/method.md §3 ``P = exp(-dmin / (2 sigma^2))``, computed as
    ``exp(dmin * posterior_scale(sigma))`` in dmin's dtype. ``P = 1`` where
    ``dmin = 0`` for every sigma > 0 (the limit), also where the scale
    overflows to -inf (there P is 0 elsewhere); NaN where dmin is NaN."""
    scale = posterior_scale(sigma, dmin.dtype)
    if math.isinf(scale):
        return torch.exp(torch.where(dmin == 0, torch.zeros_like(dmin), dmin * scale))
    return torch.exp(dmin * scale)


def mode_distance(
    emb: torch.Tensor, modes: torch.Tensor, sigma: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """docs/method.md §3: squared distance to the nearest mode of every class.

    ``d[c, m] = ||e - r[c, m]||^2``, ``dmin[c] = min_m d[c, m]``,
    ``mstar[c] = argmin_m d[c, m]`` (ties: lowest m), and, when ``sigma`` is
    given, the class posterior ``P[c] = exp(-dmin[c] / (2 sigma^2))``
    (:func:`class_posterior`). NaN propagates: a NaN distance is the minimum
    and the first NaN mode wins, as in ``torch.min``.

    emb: (B, D, H, W) or (N, D); modes: (C, M, D). Returns dmin and mstar shaped
    (B, C, H, W) or (N, C) (mstar as uint8), and the posterior or None.
    Differentiable by plain autograd; the gradient flows only through the
    winning mode because it is gathered. Materialises (N, C, M, D): it is the
    oracle, not the fast path.
    """
    acc = accumulate_dtype(emb.dtype)
    x = emb.to(acc)
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, D)
    r = modes.to(acc)
    diff = x[..., None, None, :] - r  # (..., C, M, D)
    dist = (diff * diff).sum(-1)  # (..., C, M)
    mstar = dist.argmin(-1, keepdim=True)  # first minimum: ties keep the lowest mode
    dmin = dist.gather(-1, mstar).squeeze(-1)
    mstar = mstar.squeeze(-1).to(torch.uint8)
    if emb.dim() == 4:
        dmin = dmin.permute(0, 3, 1, 2).contiguous()
        mstar = mstar.permute(0, 3, 1, 2).contiguous()
    posterior = None if sigma is None else class_posterior(dmin, sigma)
    return dmin, mstar, posterior
