"""Reference for Fourier domain adaptation (docs/method.md §6, ISA), written
apart from the op: NumPy, float64, one image and channel at a time, the full
centred spectrum and an explicit loop over the window."""
import math

import numpy as np
import torch
from torch import Tensor


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H', W') -> (height, width), bilinear with half-pixel centres and the
    edge pixels repeated (PyTorch's ``align_corners=False``, no antialias)."""

    def taps(size_in: int, size_out: int):
        position = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, size_in - 1), position - low

    r0, r1, fr = taps(image.shape[0], height)
    c0, c1, fc = taps(image.shape[1], width)
    rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


def fda_image(source: np.ndarray, target: np.ndarray, beta: float) -> np.ndarray:
    """One channel (H, W): the centred amplitudes within b = floor(beta min(H, W))
    of the centre taken from ``target`` (resized first), the phase of ``source``."""
    height, width = source.shape
    if beta == 0:
        return source.copy()
    target = resize_bilinear(target, height, width)
    spectrum = np.fft.fftshift(np.fft.fft2(source))
    amplitude, phase = np.abs(spectrum), np.angle(spectrum)
    target_amplitude = np.abs(np.fft.fftshift(np.fft.fft2(target)))
    half = math.floor(beta * min(height, width))
    for row in range(height // 2 - half, height // 2 + half + 1):
        for column in range(width // 2 - half, width // 2 + half + 1):
            if 0 <= row < height and 0 <= column < width:
                amplitude[row, column] = target_amplitude[row, column]
    mixed = amplitude * np.exp(1j * phase)
    return np.fft.ifft2(np.fft.ifftshift(mixed)).real


def fourier_domain_adaptation(source: Tensor, target: Tensor, beta: float = 0.01) -> Tensor:
    """docs/method.md §6 on (B, C, H, W) and (B, C, H', W') tensors; float64 result."""
    s = source.detach().cpu().double().numpy()
    t = target.detach().cpu().double().numpy()
    out = np.empty_like(s)
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            out[b, c] = fda_image(s[b, c], t[b, c], beta)
    return torch.from_numpy(out)
