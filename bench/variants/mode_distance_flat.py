"""Variant of the Triton mode-distance forward kept for comparison (bench
only): one masked min over all of a pass's columns per class, instead of the
library's grouped (pixels, classes, modes) view. Same results.
"""

import triton
import triton.language as tl

from drsl_fast.triton_kernels.layout import channel_block, pixel_view
from drsl_fast.triton_kernels.rules import posterior_exponent, replaces_min

BLOCK_PIXELS = 64
# The modes of one pass of the forward: as many whole classes as fit in
# MODE_COLUMNS columns of the product (at least one class).
MODE_COLUMNS = 64


@triton.jit
def _pixel_tile(emb_ptr, b, pixels, channels, P, D, emb_sb, emb_sd, emb_sp):
    """The fp32 embedding tile (BLOCK_P, BLOCK_D), 0 outside (P, D)."""
    ok = (pixels < P)[:, None] & (channels < D)[None, :]
    return tl.load(emb_ptr + b * emb_sb + pixels[:, None] * emb_sp + channels[None, :] * emb_sd,
                   mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _mode_rows_t(modes_ptr, first_mode, columns, n_modes, channels, D):
    """Modes first_mode + columns as a (BLOCK_D, BLOCK_K) tile, 0 outside."""
    ok = (columns < n_modes)[None, :] & (channels < D)[:, None]
    return tl.load(modes_ptr + (first_mode + columns)[None, :] * D + channels[:, None], mask=ok, other=0.0)


@triton.jit
def _forward_kernel(
    emb_ptr, modes_ptr, dmin_ptr, mstar_ptr, posterior_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp,
    posterior_scale, classes_per_pass, rounding,
    WITH_POSTERIOR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < P
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < D
    columns = tl.arange(0, BLOCK_K)
    e = _pixel_tile(emb_ptr, b, pixels, channels, P, D, emb_sb, emb_sd, emb_sp)
    for first_class in range(0, C, classes_per_pass):
        n_classes = tl.minimum(classes_per_pass, C - first_class)
        r_t = _mode_rows_t(modes_ptr, first_class * M, columns, n_classes * M, channels, D)
        # the product runs on e - mu and r - mu (mu: the pass's mean mode):
        # distances do not change, the numbers (and their rounding) shrink
        mu = tl.sum(r_t, axis=1) / (n_classes * M)
        r_t = tl.where((columns < n_classes * M)[None, :], r_t - mu[:, None], 0.0)
        e_centred = e - mu[None, :]
        e_norm = tl.sqrt(tl.sum(e_centred * e_centred, axis=1))
        r_sq = tl.sum(r_t * r_t, axis=0)
        key = r_sq[None, :] - 2.0 * tl.dot(e_centred, r_t, input_precision=PRECISION)
        key = tl.where(key != key, float("-inf"), key)  # NaN ranks first
        # keys are exact to within `slack` (a bound on the product's rounding)
        r_norm = tl.sqrt(tl.max(r_sq, axis=0))
        slack = rounding * (2.0 * e_norm * r_norm + r_norm * r_norm)
        for j in range(0, n_classes):
            c = first_class + j
            own = (columns >= j * M) & (columns < j * M + M)
            own_key = tl.where(own[None, :], key, float("inf"))
            best, winner = tl.min(own_key, axis=1, return_indices=True, return_indices_tie_break_left=True)
            runner_up = tl.min(tl.where(columns[None, :] == winner[:, None], float("inf"), own_key), axis=1)
            winner = winner - j * M
            if tl.max((runner_up - best <= 2.0 * slack).to(tl.int32)) > 0:
                # a near-tie the product cannot settle: rank this class's modes
                # directly, for the whole block (ties keep the lowest mode)
                exact = tl.full([BLOCK_P], float("inf"), tl.float32)
                for m in range(0, M):
                    r = tl.load(modes_ptr + (c * M + m) * D + channels, mask=channel_ok, other=0.0)
                    diff = e - r[None, :]
                    dist = tl.sum(diff * diff, axis=1)
                    closer = replaces_min(dist, exact) | (m == 0)
                    exact = tl.where(closer, dist, exact)
                    winner = tl.where(closer, m, winner)
            # dmin recomputed directly from the winning mode (no cancellation)
            r = tl.load(modes_ptr + (c * M + winner)[:, None] * D + channels[None, :],
                        mask=channel_ok[None, :], other=0.0)
            diff = e - r
            dmin = tl.sum(diff * diff, axis=1)
            out = b * out_sb + c * out_sc + pixels * out_sp
            tl.store(dmin_ptr + out, dmin, mask=pixel_ok)
            tl.store(mstar_ptr + out, winner.to(tl.uint8), mask=pixel_ok)
            if WITH_POSTERIOR:
                tl.store(posterior_ptr + out, tl.exp(posterior_exponent(dmin, posterior_scale)), mask=pixel_ok)


def _shape_arguments(emb, modes):
    """emb viewed as (B, D, P), B, and the arguments every kernel takes after
    its pointers: P, C, M, D, the embedding's and the per-class outputs' strides."""
    bdp = pixel_view(emb)
    B, D, P = bdp.shape
    C, M, _ = modes.shape
    out_strides = (0, 1, C) if emb.dim() == 2 else (C * P, P, 1)
    return bdp, B, (P, C, M, D, *bdp.stride(), *out_strides)


def mode_block(n_modes: int) -> int:
    """Columns of a product over n_modes modes: a power of two, at least 16."""
    return max(16, triton.next_power_of_2(n_modes))


# Relative rounding of one product entry, per channel of the reduction
# (unit roundoff of the operands' precision, with room for the accumulation).
UNIT_ROUNDING = {"ieee": 2.0**-23, "tf32x3": 2.0**-20, "tf32": 2.0**-10}


def forward(emb, modes, dmin, mstar, posterior, posterior_scale, precision="ieee", launch=lambda kernel: kernel):
    """Fills dmin, mstar and (if not None) posterior. ``modes`` is fp32, contiguous."""
    bdp, B, shape = _shape_arguments(emb, modes)
    P, C, M, D = shape[:4]
    classes_per_pass = _classes_per_pass(C, M)
    rounding = (D + 4) * UNIT_ROUNDING[precision]
    launch(_forward_kernel)[(triton.cdiv(P, BLOCK_PIXELS), B)](
        bdp, modes, dmin, mstar, dmin if posterior is None else posterior,
        *shape, posterior_scale, classes_per_pass, rounding,
        WITH_POSTERIOR=posterior is not None, PRECISION=precision,
        BLOCK_P=BLOCK_PIXELS, BLOCK_D=channel_block(D), BLOCK_K=mode_block(classes_per_pass * M),
    )


def _classes_per_pass(C: int, M: int) -> int:
    """Whole classes per product of at most MODE_COLUMNS columns (at least one)."""
    return max(1, min(C, MODE_COLUMNS // M))
