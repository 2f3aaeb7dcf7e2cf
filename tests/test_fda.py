"""Fourier domain adaptation (docs/method.md §6, ISA): the op against the
NumPy float64 reference, its edge cases and its input checks."""
import math

import pytest
import torch

from drsl_fast.ops.fda import fourier_domain_adaptation
from drsl_fast.reference import fourier_domain_adaptation as reference

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def images(shape, dtype=torch.float64, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    return (255 * torch.rand(shape, generator=generator, dtype=torch.float64)).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-9), (torch.float32, 1e-3)])
@pytest.mark.parametrize("source_size, target_size, beta", [
    ((7, 9), (7, 9), 0.2),      # odd sizes
    ((8, 10), (8, 10), 0.01),   # b = 0: the DC term only
    ((16, 12), (16, 12), 0.5),  # the window clipped to the whole spectrum
    ((5, 4), (5, 4), 0.3),
    ((9, 13), (4, 21), 0.15),   # target resized to the source's size
    ((24, 32), (48, 96), 0.1),
])
def test_matches_reference(device, dtype, tolerance, source_size, target_size, beta):
    source, target = images((2, 3, *source_size), dtype, 1, device), images((2, 3, *target_size), dtype, 2, device)
    out = fourier_domain_adaptation(source, target, beta)
    assert out.dtype == dtype and out.shape == source.shape and out.device == source.device
    expected = reference(source, target, beta)
    assert torch.allclose(out.cpu().double(), expected, rtol=0, atol=tolerance * 255)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beta_zero_is_identity(dtype):
    source = images((2, 3, 9, 11), dtype)
    out = fourier_domain_adaptation(source, images((2, 3, 5, 5), dtype, 3), 0.0)
    assert torch.equal(out, source) and out.data_ptr() != source.data_ptr()


def test_b_zero_replaces_only_the_mean():
    """b = floor(beta min(H, W)) = 0: the DC amplitude, i.e. each channel's mean
    (non-negative images), becomes the target's; everything else is kept."""
    source, target = images((2, 3, 15, 20)), images((2, 3, 15, 20), seed=4)
    beta = 0.9 / 15
    assert math.floor(beta * 15) == 0
    out = fourier_domain_adaptation(source, target, beta)
    shifted = source - source.mean((2, 3), keepdim=True) + target.mean((2, 3), keepdim=True)
    assert torch.allclose(out, shifted, atol=1e-9)


def test_full_window_takes_the_target_amplitude():
    """b = 4 covers all of an 8 x 9 spectrum."""
    source, target = images((1, 3, 8, 9)), images((1, 3, 8, 9), seed=5)
    out = fourier_domain_adaptation(source, target, 0.5)
    expected = torch.polar(torch.fft.fft2(target).abs(), torch.fft.fft2(source).angle())
    assert torch.allclose(torch.fft.fft2(out), expected, rtol=1e-9, atol=1e-6)


def test_half_precision_computes_in_float32_and_empty_batch():
    source, target = images((1, 3, 8, 8), torch.float16), images((1, 3, 8, 8), torch.float16, 6)
    out = fourier_domain_adaptation(source, target, 0.25)
    assert out.dtype == torch.float32
    assert torch.allclose(out.double(), reference(source, target, 0.25), atol=0.05)
    empty = torch.empty(0, 3, 8, 8)
    assert fourier_domain_adaptation(empty, empty, 0.1).shape == (0, 3, 8, 8)


GOOD = torch.zeros(2, 3, 8, 8)


@pytest.mark.parametrize("source, target, beta, error, message", [
    ("image", GOOD, 0.01, TypeError, "source must be a tensor"),
    (GOOD.long(), GOOD, 0.01, TypeError, "source must be a float16, bfloat16, float32 or float64 tensor"),
    (GOOD[0], GOOD, 0.01, ValueError, r"source must be \(B, C, H, W\), got shape \(3, 8, 8\)"),
    (GOOD, GOOD[:1], 0.01, ValueError, r"target must have the batch size and channels of source \(2, 3\)"),
    (GOOD, GOOD[:, :1], 0.01, ValueError, r"target must have the batch size and channels"),
    (GOOD, GOOD.double(), 0.01, TypeError, "target must have the dtype of source"),
    (GOOD, GOOD[..., :0], 0.01, ValueError, "source and target must have H, W >= 1"),
    (GOOD, GOOD, float("nan"), ValueError, "beta must be a finite number >= 0.0 and <= 0.5, got nan"),
    (GOOD, GOOD, 0.6, ValueError, "beta must be a finite number >= 0.0 and <= 0.5, got 0.6"),
    (GOOD, GOOD, -0.1, ValueError, "beta must be a finite number"),
    (GOOD, GOOD, "0.1", TypeError, "beta must be a real number"),
])
def test_bad_inputs(source, target, beta, error, message):
    with pytest.raises(error, match="fourier_domain_adaptation: " + message):
        fourier_domain_adaptation(source, target, beta)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_devices_must_match():
    with pytest.raises(ValueError, match="fourier_domain_adaptation: target is on cuda"):
        fourier_domain_adaptation(GOOD, GOOD.cuda(), 0.01)
