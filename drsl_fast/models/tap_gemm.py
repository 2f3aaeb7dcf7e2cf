"""Summed dilated 3x3 convolutions (DeepLab-v2's classifier, docs/method.md §2)
computed as one matrix product and a col2im.

With the filters W_d of the convolution at dilation d (padding d), the
summed output at pixel p is

    out(p) = sum_d b_d + sum_d sum_{i,j in {0,1,2}} W_d[:, :, i, j] x(p + d (i - 1, j - 1)),

x read as zero outside the map. Each term is a 1x1 convolution of x by one
tap's filter, read at an offset: with Y_{d,ij} = W_d[:, :, i, j] x,

    out(p) = sum_d b_d + sum_d sum_{i,j} Y_{d,ij}(p + d (i - 1, j - 1)).      (1)

Y = [W_d[:, :, i, j]]_{d,i,j} x is one product of a (36 C) x Cin matrix by
the Cin x (H W) map, a shape that matrix units run well (36 x 83 rows in a
DRSL+ step), where the convolutions themselves are products with few output
channels (19 or 83) that run at a few tens of TFLOP/s on an H200
(bench/bench_head_convs.py). The product computes every tap at every pixel,
as the convolutions do at the padded positions too: equal FLOPs. By default
the product runs as a 1x1 convolution, so fp32 gets the tensor-core
precision the 3x3 convolutions get (torch.backends.cudnn.allow_tf32); it
can also run as a batched matrix product (``product="matmul"``).

The inner sum of (1) for one d is col2im (torch's fold, the adjoint of the
im2col that a convolution's lowering reads its input with): fold sums
cols[(i,j)](p - d (i - 1, j - 1)) over the taps, so reading the taps in
reverse order, cols[(i,j)] = Y_{d,(2-i)(2-j)}, gives the + of (1). Its
gradient is im2col of the output's gradient (autograd's unfold): no
gradient kernel of our own, and the whole head is a handful of calls.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PRODUCTS = ("conv", "matmul")


def summed_dilated_convs_as_gemm(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                                 dilations: Sequence[int], product: str = "conv") -> Tensor:
    """sum_d conv2d(x, weights[d], biases[d], padding=d, dilation=d), Eq. (1):
    one product of x by every tap's filter, then one col2im per dilation.
    weights: (C, Cin, 3, 3) each; biases: (C,) each; x: (B, Cin, H, W).
    ``product``: "conv", a 1x1 convolution (the library's convolution
    kernels, and fp32 at their precision, tf32 on tensor cores by default);
    or "matmul", a batched matrix product (the library's matrix kernels: fp32
    stays fp32 unless torch.backends.cuda.matmul.allow_tf32)."""
    if product not in PRODUCTS:
        raise ValueError(f"summed_dilated_convs_as_gemm: product must be one of {PRODUCTS}, got {product!r}")
    if not weights or not (len(weights) == len(biases) == len(dilations)):
        raise ValueError("summed_dilated_convs_as_gemm: one weight and one bias per dilation")
    if any(w.dim() != 4 or w.shape != weights[0].shape or w.shape[-2:] != (3, 3) for w in weights):
        raise ValueError(f"summed_dilated_convs_as_gemm: 3x3 filters of one shape, got {[tuple(w.shape) for w in weights]}")
    if any(b.shape != weights[0].shape[:1] for b in biases):
        raise ValueError(f"summed_dilated_convs_as_gemm: biases ({weights[0].shape[0]},), got {[tuple(b.shape) for b in biases]}")
    if x.dim() != 4 or x.shape[1] != weights[0].shape[1]:
        raise ValueError(f"summed_dilated_convs_as_gemm: x (B, {weights[0].shape[1]}, H, W), got {tuple(x.shape)}")
    channels, in_channels = weights[0].shape[:2]
    batch, _, h, w = x.shape
    # rows ordered (d, c, tap), taps reversed: what fold reads as (channel, kernel position)
    filters = torch.stack(list(weights)).flip(-2, -1).permute(0, 1, 3, 4, 2).reshape(-1, in_channels)
    if product == "conv":
        y = F.conv2d(x, filters[:, :, None, None])
    else:
        y = torch.bmm(filters.expand(batch, -1, -1), x.reshape(batch, in_channels, h * w))
    y = y.reshape(batch, len(dilations), channels * 9, h * w)
    out = torch.stack(list(biases)).sum(0).to(y.dtype)[:, None, None]
    for cols, d in zip(y.unbind(1), dilations):
        out = out + F.fold(cols, (h, w), 3, dilation=d, padding=d)
    return out
