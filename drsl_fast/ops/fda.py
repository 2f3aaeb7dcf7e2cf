"""Fourier domain adaptation (FDA), the built-in input-space adaptation of
docs/method.md §6: a source image keeps the phase of its spectrum and takes the
low-frequency amplitudes of a target image. One batched ``torch.fft`` pass on
any device; no compiled backend.
"""
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import accumulate_dtype
from .validation import check_dim, check_float_tensor, check_real, check_same_device

OP = "fourier_domain_adaptation"


def window_half_size(beta: float, height: int, width: int) -> int:
    """b = floor(beta * min(H, W)) (docs/method.md §6)."""
    return math.floor(beta * min(height, width))


def low_frequency_mask(height: int, width: int, half: int, device) -> Tensor:
    """The centred (2 half + 1)^2 window, clipped to the spectrum, in the
    uncentred layout of ``torch.fft.rfft2`` (H, W // 2 + 1)."""
    centred = torch.zeros(height, width, dtype=torch.bool, device=device)
    top, left = height // 2, width // 2
    centred[max(0, top - half):top + half + 1, max(0, left - half):left + half + 1] = True
    return torch.fft.ifftshift(centred)[:, :width // 2 + 1]


def fourier_domain_adaptation(source: Tensor, target: Tensor, beta: float = 0.01) -> Tensor:
    """docs/method.md §6 (ISA, FDA): ``source`` (B, C, H, W) with the
    low-frequency amplitude spectrum of ``target`` (B, C, H', W'), per image
    and channel, its phase kept.

    ``target`` is first resized to (H, W) (bilinear, half-pixel centres). In
    the centred 2-D spectrum the amplitudes of the (2b + 1)^2 coefficients
    with |row - H//2| <= b and |column - W//2| <= b, b = floor(beta min(H, W)),
    become the target's; beta = 0 returns ``source`` unchanged, a beta with
    b = 0 replaces only the DC term (the mean). Images should be in a space
    where 0 is black (not mean-subtracted; see docs/method.md §6).

    fp32 result (fp64 for fp64 inputs); differentiable by autograd. Wrong
    types, dtypes, shapes or devices, and beta not finite or outside
    [0, 0.5], raise TypeError or ValueError naming the argument.
    """
    check_float_tensor(OP, "source", source)
    check_float_tensor(OP, "target", target)
    check_dim(OP, "source", source, (4,), "(B, C, H, W)")
    check_dim(OP, "target", target, (4,), "(B, C, H, W)")
    check_same_device(OP, "target", target, "source", source)
    if target.dtype != source.dtype:
        raise TypeError(f"{OP}: target must have the dtype of source "
                        f"({str(source.dtype).replace('torch.', '')}), got {str(target.dtype).replace('torch.', '')}")
    if target.shape[:2] != source.shape[:2]:
        raise ValueError(f"{OP}: target must have the batch size and channels of source {tuple(source.shape[:2])} "
                         f"(B, C), got shape {tuple(target.shape)}")
    if min(source.shape[-2:]) < 1 or min(target.shape[-2:]) < 1:
        raise ValueError(f"{OP}: source and target must have H, W >= 1, got shapes {tuple(source.shape)} "
                         f"and {tuple(target.shape)}")
    beta = check_real(OP, "beta", beta, low=0.0, high=0.5)
    dtype = accumulate_dtype(source.dtype)
    source, target = source.to(dtype), target.to(dtype)
    if beta == 0 or source.shape[0] == 0:
        return source.clone()
    height, width = source.shape[-2:]
    if target.shape[-2:] != source.shape[-2:]:
        target = F.interpolate(target, size=(height, width), mode="bilinear", align_corners=False)
    spectrum = torch.fft.rfft2(source)
    mask = low_frequency_mask(height, width, window_half_size(beta, height, width), source.device)
    amplitude = torch.where(mask, torch.fft.rfft2(target).abs(), spectrum.abs())
    return torch.fft.irfft2(torch.polar(amplitude, spectrum.angle()), s=(height, width))
