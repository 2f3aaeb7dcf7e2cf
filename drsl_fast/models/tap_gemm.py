"""Summed dilated 3x3 convolutions (DeepLab-v2's classifier, docs/method.md §2)
computed as one matrix product and a sum of shifted planes.

With filters W_d of the convolution at dilation d (padding d), the summed
output at pixel p is

    out(p) = sum_d b_d + sum_d sum_{i,j in {-1,0,1}} W_d[:, :, i+1, j+1] x(p + d (i, j)),

x read as zero outside the map. Every term is a 1x1 convolution of x by one
tap's filter, read at an offset: with the distinct offsets o_t = d (i, j)
(the centre taps of every dilation share o = (0, 0), so their filters are
added) and Y_t = V_t x (V_t: the sum of the filters at offset o_t),

    out(p) = sum_b + sum_t Y_t(p + o_t).                                (1)

Y = [V_1; ...; V_T] x is one product of a (T C) x Cin matrix by the
Cin x (H W) map, the shape matrix units run well (T C = 33 x 83 rows for a
DRSL+ step), where the convolutions themselves are products with few output
channels (19 or 83) that the GPU's libraries tile poorly
(bench/bench_head_convs.py). The products cost the same FLOPs as the
convolutions (a convolution multiplies the padding's zeros too); offsets
with |o| at least the map's size read only zeros and are dropped. The
product runs as a 1x1 convolution, so fp32 gets the same tensor-core
precision the 3x3 convolutions get (torch.backends.cudnn.allow_tf32).

Backward of (1): dL/dY_t(q) = dL/dout(q - o_t) where q - o_t lies in the map,
else 0: the output gradient zero-padded and read at T offsets; the product's
gradients (input and filters) are autograd's of the 1x1 convolution.
"""
import functools
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

Offset = Tuple[int, int]


def tap_offsets(dilations: Sequence[int], height: int, width: int) -> List[Tuple[Offset, List[Tuple[int, int]]]]:
    """The distinct offsets of Eq. (1) that reach into a height x width map,
    centre first, each with its (dilation index, tap index) pairs."""
    taps = {(0, 0): []}
    for k, d in enumerate(dilations):
        for tap in range(9):
            offset = ((tap // 3 - 1) * d, (tap % 3 - 1) * d)
            if abs(offset[0]) < height and abs(offset[1]) < width:
                taps.setdefault(offset, []).append((k, tap))
    return list(taps.items())


@functools.lru_cache(maxsize=64)
def tap_sums(dilations: Tuple[int, ...], height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(T, D 9) of 0 and 1: row t picks the filters at offset o_t of Eq. (1)
    (built once per map size and device: no host-to-device copy per step)."""
    taps = tap_offsets(dilations, height, width)
    picks = torch.zeros(len(taps), len(dilations) * 9, dtype=dtype)
    for t, (_, pairs) in enumerate(taps):
        picks[t, [9 * k + tap for k, tap in pairs]] = 1
    return picks.to(device)


class ShiftedSum(torch.autograd.Function):
    """sum_t Y_t(p + o_t) of Eq. (1), zero outside the map, plus a bias; Y: (B, T C, H, W)."""

    @staticmethod
    def forward(ctx, y: Tensor, bias: Tensor, offsets: List[Offset]) -> Tensor:
        batch, _, h, w = y.shape
        planes = y.view(batch, len(offsets), -1, h, w)
        out = planes[:, 0] + bias.to(y.dtype)[:, None, None]  # offsets[0] is the centre
        for t, (dy, dx) in enumerate(offsets[1:], 1):
            out[:, :, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)] += \
                planes[:, t, :, max(0, dy):h - max(0, -dy), max(0, dx):w - max(0, -dx)]
        ctx.offsets, ctx.bias_dtype = offsets, bias.dtype
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        h, w = grad.shape[-2:]
        pad = max(max(abs(dy), abs(dx)) for dy, dx in ctx.offsets)
        padded = F.pad(grad, (pad, pad, pad, pad))
        grad_y = torch.stack([padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w] for dy, dx in ctx.offsets], 1)
        return grad_y.flatten(1, 2), grad.sum((0, 2, 3)).to(ctx.bias_dtype), None


def summed_dilated_convs_as_gemm(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                                 dilations: Sequence[int]) -> Tensor:
    """sum_d conv2d(x, weights[d], biases[d], padding=d, dilation=d), Eq. (1):
    one 1x1 convolution of x by every tap's filter, then the shifted sum.
    weights: (C, Cin, 3, 3) each; biases: (C,) each; x: (B, Cin, H, W)."""
    if not (len(weights) == len(biases) == len(dilations)) or not weights:
        raise ValueError("summed_dilated_convs_as_gemm: one weight and one bias per dilation")
    if any(w.shape != weights[0].shape or w.shape[-2:] != (3, 3) for w in weights):
        raise ValueError(f"summed_dilated_convs_as_gemm: 3x3 filters of one shape, got {[tuple(w.shape) for w in weights]}")
    if x.dim() != 4 or x.shape[1] != weights[0].shape[1]:
        raise ValueError(f"summed_dilated_convs_as_gemm: x (B, {weights[0].shape[1]}, H, W), got {tuple(x.shape)}")
    channels, in_channels = weights[0].shape[:2]
    taps = tap_offsets(dilations, *x.shape[-2:])
    by_tap = torch.stack(weights).permute(0, 3, 4, 1, 2).reshape(len(weights) * 9, -1)  # (D 9, C Cin)
    picks = tap_sums(tuple(dilations), *x.shape[-2:], by_tap.device, by_tap.dtype)
    filters = (picks @ by_tap).reshape(-1, in_channels, 1, 1)
    y = F.conv2d(x, filters)
    return ShiftedSum.apply(y, torch.stack(list(biases)).sum(0), [offset for offset, _ in taps])
