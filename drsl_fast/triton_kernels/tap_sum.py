"""Triton kernels of the shifted sum of taps in the classifier as a matrix
product (Eq. 1 of drsl_fast/models/tap_gemm.py), and their launchers.

Imported as ``drsl_fast.triton_kernels.tap_sum``. The taps Y are one
contiguous (B, D, C, 9, H, W) tensor, the product's output: for dilation
d_k (k < D), channel c and row r, Y holds tap (i, j) = (2 - r // 3, 2 - r % 3),
read at the offset d_k (i - 1, j - 1) = d_k (1 - r // 3, 1 - r % 3):

    out[b, c, p] = sum_k sum_r Y[b, k, c, r, p + d_k (1 - r // 3, 1 - r % 3)],    (1)

Y read as zero outside the H x W map. Its gradient is a gather too, each
tap the output's gradient read at minus the offset:

    dY[b, k, c, r, q] = dout[b, c, q - d_k (1 - r // 3, 1 - r % 3)]  (zero outside).

Both are copies at offsets, bound by memory: the forward reads Y once and
writes out, the backward reads dout (from cache, 9 D times) and writes dY
once. A program owns BLOCK_P pixels of one (b, c) and walks the taps; the
loads and stores run along image rows, so they coalesce. Sums are fp32
(fp64 for fp64 taps). The dilations are compile-time constants (one
compilation per tuple of dilations; a network has one), so a launch copies
nothing to the GPU and the offsets fold into the code.
"""
import torch
import triton
import triton.language as tl

BLOCK_PIXELS = 512
MAX_GRID_Y = 65535


@triton.jit
def _shifted(pixels, H, W, d, r: tl.constexpr, sign: tl.constexpr):
    """Flat index of each pixel moved by sign * d (1 - r // 3, 1 - r % 3), and whether it is inside."""
    y = pixels // W + sign * d * (1 - r // 3)
    x = pixels % W + sign * d * (1 - r % 3)
    return y * W + x, (pixels < H * W) & (y >= 0) & (y < H) & (x >= 0) & (x < W)


@triton.jit
def _program_pixels(first_plane, C, BLOCK_P: tl.constexpr):
    """(b, c, the flat index b C + c of its plane, its pixels) of this
    program: grid axis 0 walks the blocks of pixels, axis 1 the planes from
    ``first_plane`` (at most 65535 per launch)."""
    plane = first_plane + tl.program_id(1).to(tl.int64)
    return plane // C, plane % C, plane, tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)


@triton.jit
def _forward_kernel(y_ptr, out_ptr, first_plane, C, H, W, DILATIONS: tl.constexpr, D: tl.constexpr,
                    FP64: tl.constexpr, BLOCK_P: tl.constexpr):
    P = H * W
    b, c, bc, pixels = _program_pixels(first_plane, C, BLOCK_P)
    if FP64:
        total = tl.zeros([BLOCK_P], dtype=tl.float64)
    else:
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for k in tl.static_range(D):
        d = DILATIONS[k]
        taps = y_ptr + ((b * D + k) * C + c) * 9 * P
        for r in tl.static_range(9):
            at, ok = _shifted(pixels, H, W, d, r, 1)
            total += tl.load(taps + r * P + at, mask=ok, other=0.0).to(total.dtype)
    tl.store(out_ptr + bc * P + pixels, total.to(out_ptr.dtype.element_ty), mask=pixels < P)


@triton.jit
def _backward_kernel(grad_out_ptr, grad_y_ptr, first_plane, C, H, W, DILATIONS: tl.constexpr, D: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    P = H * W
    b, c, bc, pixels = _program_pixels(first_plane, C, BLOCK_P)
    k = tl.program_id(2)  # this program's dilation
    d = 0
    for j in tl.static_range(D):
        d = tl.where(k == j, DILATIONS[j], d)
    taps = grad_y_ptr + ((b * D + k) * C + c) * 9 * P
    for r in tl.static_range(9):
        at, ok = _shifted(pixels, H, W, d, r, -1)
        g = tl.load(grad_out_ptr + bc * P + at, mask=ok, other=0.0)
        tl.store(taps + r * P + pixels, g.to(grad_y_ptr.dtype.element_ty), mask=pixels < P)


def _plane_chunks(planes: int, most: int = MAX_GRID_Y):
    """(first plane, planes) of each launch: grid axes 1 and 2 hold at most 65535."""
    return [(first, min(most, planes - first)) for first in range(0, planes, most)]


def forward(y, dilations, out, launch=lambda kernel: kernel):
    """Fills ``out`` (B, C, H, W) from ``y`` (B, D, C, 9, H, W), both contiguous, Eq. (1)."""
    B, D, C, _, H, W = y.shape
    for first, planes in _plane_chunks(B * C):
        launch(_forward_kernel)[(triton.cdiv(H * W, BLOCK_PIXELS), planes)](
            y, out, first, C, H, W, DILATIONS=tuple(dilations), D=D, FP64=y.dtype == torch.float64,
            BLOCK_P=BLOCK_PIXELS)


def backward(grad_out, dilations, grad_y, launch=lambda kernel: kernel):
    """Fills ``grad_y`` (B, D, C, 9, H, W) from ``grad_out`` (B, C, H, W), both contiguous."""
    B, D, C, _, H, W = grad_y.shape
    for first, planes in _plane_chunks(B * C):
        launch(_backward_kernel)[(triton.cdiv(H * W, BLOCK_PIXELS), planes, D)](
            grad_out, grad_y, first, C, H, W, DILATIONS=tuple(dilations), D=D, BLOCK_P=BLOCK_PIXELS)
