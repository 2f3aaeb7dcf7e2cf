"""Triton kernels of the class-balanced pseudo-label ops (docs/method.md §5), and
their launchers.

Imported as ``drsl_fast.triton_kernels.pseudo_labels``. Scores are addressed
as (b, class, pixel) with explicit strides (contiguous and channels-last read
in place) and compared in fp32. The confidence bins mirror
kernels/confidence_bins.h bit for bit.
"""
import triton
import triton.language as tl

from .layout import pixel_view
from .rules import replaces_max

BLOCK_PIXELS = 128
# Globals read inside a kernel must be constexprs.
SMALLEST_GAP = tl.constexpr(2.0**-24)
SMALLEST_GAP_BITS = tl.constexpr(103 << 23)  # the fp32 bits of SMALLEST_GAP


@triton.jit
def _histogram_kernel(
    x_ptr, counts_ptr, P, C, x_sb, x_sc, x_sp,
    FROM_LOGITS: tl.constexpr, MANTISSA_BITS: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pixels < P
    base = x_ptr + b * x_sb + pixels * x_sp
    best = tl.load(base, mask=ok, other=0.0).to(tl.float32)
    cls = tl.zeros([BLOCK_P], dtype=tl.int64)
    for c in range(1, C):
        v = tl.load(base + c * x_sc, mask=ok, other=0.0).to(tl.float32)
        better = replaces_max(v, best)  # ties keep the lowest class; NaN wins
        best = tl.where(better, v, best)
        cls = tl.where(better, c, cls)
    conf = best
    if FROM_LOGITS:
        total = tl.zeros([BLOCK_P], dtype=tl.float32)
        for c in range(0, C):
            v = tl.load(base + c * x_sc, mask=ok, other=0.0).to(tl.float32)
            total += tl.exp(v - best)
        conf = 1.0 / total
    gap = 1.0 - conf
    bits = gap.to(tl.int32, bitcast=True).to(tl.int64)
    fine = 1 + ((bits - SMALLEST_GAP_BITS) >> (23 - MANTISSA_BITS))
    bin_index = tl.where(gap < SMALLEST_GAP, 0, tl.where(gap < 1.0, fine, NUM_BINS - 1))
    tl.atomic_add(counts_ptr + cls * NUM_BINS + bin_index, tl.full([BLOCK_P], 1, tl.int64), mask=ok)


@triton.jit
def _select_kernel(
    x_ptr, t_ptr, labels_ptr, P, C, x_sb, x_sc, x_sp, BLOCK_P: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = pixels < P
    base = x_ptr + b * x_sb + pixels * x_sp
    best = tl.load(base, mask=ok, other=0.0).to(tl.float32) / tl.load(t_ptr)
    cls = tl.zeros([BLOCK_P], dtype=tl.int32)
    for c in range(1, C):
        ratio = tl.load(base + c * x_sc, mask=ok, other=0.0).to(tl.float32) / tl.load(t_ptr + c)
        better = replaces_max(ratio, best)  # ties keep the lowest class; NaN wins
        best = tl.where(better, ratio, best)
        cls = tl.where(better, c, cls)
    label = tl.where(best >= 1.0, cls, 255)  # 255 below 1 or NaN
    tl.store(labels_ptr + b * P + pixels, label.to(tl.uint8), mask=ok)


def histogram(scores, counts, from_logits, mantissa_bits, launch=lambda kernel: kernel):
    """Adds the pixels of ``scores`` to ``counts`` (C, num_bins) int64."""
    x = pixel_view(scores)
    B, C, P = x.shape
    launch(_histogram_kernel)[(triton.cdiv(P, BLOCK_PIXELS), B)](
        x, counts, P, C, *x.stride(),
        FROM_LOGITS=from_logits, MANTISSA_BITS=mantissa_bits, NUM_BINS=counts.shape[1], BLOCK_P=BLOCK_PIXELS,
    )


def select(probs, thresholds, labels, launch=lambda kernel: kernel):
    """Fills ``labels`` (B, H, W) uint8; ``thresholds`` is fp32 (C,)."""
    x = pixel_view(probs)
    B, C, P = x.shape
    launch(_select_kernel)[(triton.cdiv(P, BLOCK_PIXELS), B)](
        x, thresholds, labels, P, C, *x.stride(), BLOCK_P=BLOCK_PIXELS,
    )
