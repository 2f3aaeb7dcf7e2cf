"""Triton kernels of the ADVENT/IntraDA entropy map (docs/method.md §7), and their
launchers.

Imported as ``drsl_fast.triton_kernels.entropy``. A program owns BLOCK_P
pixels of one image and all C classes as a (BLOCK_C, BLOCK_P) tile, loaded
once in the logits' dtype and computed in fp32. Logits are addressed as
(b, class, pixel) with explicit strides (contiguous and channels-last in place).
"""
import math

import triton
import triton.language as tl

from .layout import pixel_view

BLOCK_PIXELS = 32
# Globals read inside a kernel must be constexprs.
EPS = tl.constexpr(1e-30)
INV_LN2 = tl.constexpr(1.0 / math.log(2.0))


@triton.jit
def _softmax_tile(x_ptr, b, pixels, classes, C, P, x_sb, x_sc, x_sp):
    ok = (classes < C)[:, None] & (pixels < P)[None, :]
    x = tl.load(x_ptr + b * x_sb + classes[:, None] * x_sc + pixels[None, :] * x_sp, mask=ok,
                other=-float("inf")).to(tl.float32)
    best = tl.max(x, axis=0)
    best = tl.where(pixels < P, best, 0.0)
    e = tl.where(ok, tl.exp(x - best[None, :]), 0.0)
    total = tl.where(pixels < P, tl.sum(e, axis=0), 1.0)
    return e / total[None, :], ok


@triton.jit
def _forward_kernel(
    x_ptr, map_ptr, pixel_ptr, C, P, x_sb, x_sc, x_sp, scale,
    WITH_MAP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    classes = tl.arange(0, BLOCK_C)
    p, ok = _softmax_tile(x_ptr, b, pixels, classes, C, P, x_sb, x_sc, x_sp)
    v = tl.where(ok, scale * p * tl.log2(p + EPS), 0.0)
    if WITH_MAP:
        tl.store(map_ptr + (b * C + classes[:, None]) * P + pixels[None, :], v, mask=ok)
    tl.store(pixel_ptr + b * P + pixels, tl.sum(v, axis=0), mask=pixels < P)


@triton.jit
def _backward_kernel(
    x_ptr, grad_map_ptr, grad_pixel_ptr, out_ptr, C, P, x_sb, x_sc, x_sp, o_sb, o_sc, o_sp, scale,
    WITH_MAP_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    classes = tl.arange(0, BLOCK_C)
    p, ok = _softmax_tile(x_ptr, b, pixels, classes, C, P, x_sb, x_sc, x_sp)
    g = tl.load(grad_pixel_ptr + b * P + pixels, mask=pixels < P, other=0.0)[None, :]
    if WITH_MAP_GRAD:
        g = g + tl.load(grad_map_ptr + (b * C + classes[:, None]) * P + pixels[None, :], mask=ok, other=0.0)
    q = p + EPS
    a = tl.where(ok, g * scale * (tl.log2(q) + p / q * INV_LN2), 0.0)
    s = tl.sum(p * a, axis=0)
    grad = p * (a - s[None, :])
    tl.store(out_ptr + b * o_sb + classes[:, None] * o_sc + pixels[None, :] * o_sp,
             grad.to(out_ptr.dtype.element_ty), mask=ok)


def forward(logits, entropy_map, pixel_entropy, launch=lambda kernel: kernel):
    """Fills ``pixel_entropy`` (B, H, W) and, if not None, ``entropy_map``
    (B, C, H, W), both contiguous fp32."""
    x = pixel_view(logits)
    B, C, P = x.shape
    launch(_forward_kernel)[(triton.cdiv(P, BLOCK_PIXELS), B)](
        x, pixel_entropy if entropy_map is None else entropy_map, pixel_entropy, C, P, *x.stride(),
        -1.0 / math.log2(C), WITH_MAP=entropy_map is not None, BLOCK_C=triton.next_power_of_2(C),
        BLOCK_P=BLOCK_PIXELS,
    )


def backward(logits, grad_map, grad_pixel, grad_logits, launch=lambda kernel: kernel):
    """Fills ``grad_logits`` (like logits); ``grad_map`` contiguous fp32 or None."""
    x, out = pixel_view(logits), pixel_view(grad_logits)
    B, C, P = x.shape
    launch(_backward_kernel)[(triton.cdiv(P, BLOCK_PIXELS), B)](
        x, grad_pixel if grad_map is None else grad_map, grad_pixel, out, C, P, *x.stride(), *out.stride(),
        -1.0 / math.log2(C), WITH_MAP_GRAD=grad_map is not None, BLOCK_C=triton.next_power_of_2(C),
        BLOCK_P=BLOCK_PIXELS,
    )
