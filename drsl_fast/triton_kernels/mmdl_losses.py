"""Triton kernels of the fused MMDL losses (docs/method.md §4 Eq. 4 and Eq. 5) and of
label_mode, and their launchers.

Imported as ``drsl_fast.triton_kernels.mmdl_losses``. Samples are the
flattened (B, S) pairs (index, label); one program handles a block of
BLOCK_SAMPLES of them, gathering each sample's embedding row in place through
the (b, channel, pixel) strides. Samples whose index is outside [0, P) or
whose label is outside [0, C) count for nothing. Computation is fp32.

For a sample e with label y, classes are streamed (nothing per class is kept):
  dmin[c] = min_m ||e - r[c, m]||^2, mstar[c] its argmin (ties: lowest m)  (docs/method.md §3)
  Eq. 4   triplet = relu(dmin[y] - min_{c != y} dmin[c] + alpha)   (0 when C = 1)
  Eq. 5   z[c] = s exp(-dmin[c] / (2 sigma^2)),  ce = logsumexp_c(z) - z[y]
Backward recomputes the distances; with
  g[c] = dL/ddmin[c] = -g_ce (softmax(z)[c] - [c == y]) z[c] / (2 sigma^2)
                       + g_tri [hinge > 0] ([c == y] - [c == nearest wrong class])
it writes dL/de = 2 sum_c g[c] (e - r[c, mstar[c]]) as one row per sample and,
per block of samples, the partial dL/dr[c, m] = -sum over the block's samples
with mstar[c] == m of 2 g[c] (e - r[c, m]). Both are then reduced in a fixed
order (rows by :func:`scatter_rows`, partials by the caller), so gradients are
deterministic. Extra memory is linear in the number of samples: B*S*D fp32 rows
and one fp32 (C, M, D) partial per BLOCK_SAMPLES samples.
"""
import torch
import triton
import triton.language as tl

from .layout import channel_block, pixel_view
from .rules import posterior_exponent, relu_keep_nan, replaces_min

BLOCK_SAMPLES = 32


@triton.jit
def _load_samples(
    emb_ptr, index_ptr, label_ptr, total, S, P, C, D, emb_sb, emb_sd, emb_sp,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """This program's samples: flat ids, in-range mask, counting mask, labels
    and the fp32 embedding rows (BLOCK_S, BLOCK_D) (0 where nothing counts);
    then the channels and their mask."""
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < D
    samples = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)
    in_range = samples < total
    pixel = tl.load(index_ptr + samples, mask=in_range, other=-1).to(tl.int64)
    y = tl.load(label_ptr + samples, mask=in_range, other=-1).to(tl.int64)
    counts = in_range & (pixel >= 0) & (pixel < P) & (y >= 0) & (y < C)
    image = samples // S
    e = tl.load(
        emb_ptr + image[:, None] * emb_sb + pixel[:, None] * emb_sp + channels[None, :] * emb_sd,
        mask=counts[:, None] & channel_ok[None, :], other=0.0,
    ).to(tl.float32)
    return samples, in_range, counts, y, e, channels, channel_ok


@triton.jit
def _class_dmin(e, modes_ptr, c, M, D, channels, channel_ok):
    """dmin[c] and mstar[c] (docs/method.md §3) of every row of e; ties keep the lowest m."""
    r = tl.load(modes_ptr + c * M * D + channels, mask=channel_ok, other=0.0)
    diff = e - r[None, :]
    best = tl.sum(diff * diff, axis=1)
    winner = tl.zeros_like(best).to(tl.int32)
    for m in range(1, M):
        r = tl.load(modes_ptr + (c * M + m) * D + channels, mask=channel_ok, other=0.0)
        diff = e - r[None, :]
        dist = tl.sum(diff * diff, axis=1)
        closer = replaces_min(dist, best)  # ties keep the lowest mode; NaN wins
        best = tl.where(closer, dist, best)
        winner = tl.where(closer, m, winner)
    return best, winner


@triton.jit
def _summarise(e, y, modes_ptr, C, M, D, channels, channel_ok, inv_two_var, scale, BLOCK_S: tl.constexpr):
    """First pass over the classes: dmin[y], the nearest wrong class and its
    dmin (class -1 and +inf when C = 1; NaN propagates), and logsumexp_c(z[c])
    of Eq. 5 (online)."""
    positive = tl.zeros([BLOCK_S], dtype=tl.float32)
    nearest_wrong = tl.full([BLOCK_S], float("inf"), dtype=tl.float32)
    negative = tl.full([BLOCK_S], -1, dtype=tl.int32)
    z_max = tl.full([BLOCK_S], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_S], dtype=tl.float32)
    for c in range(0, C):
        dmin, _ = _class_dmin(e, modes_ptr, c, M, D, channels, channel_ok)
        is_label = y == c
        positive = tl.where(is_label, dmin, positive)
        closer = (~is_label) & replaces_min(dmin, nearest_wrong)  # ties: lowest c
        nearest_wrong = tl.where(closer, dmin, nearest_wrong)
        negative = tl.where(closer, c, negative)
        z = scale * tl.exp(posterior_exponent(dmin, -inv_two_var))
        new_max = tl.maximum(z_max, z)
        total = total * tl.exp(z_max - new_max) + tl.exp(z - new_max)
        z_max = new_max
    return positive, nearest_wrong, negative, z_max + tl.log(total)


@triton.jit
def _forward_kernel(
    emb_ptr, index_ptr, label_ptr, modes_ptr, triplet_ptr, ce_ptr,
    total, S, P, C, M, D, emb_sb, emb_sd, emb_sp,
    inv_two_var, alpha, scale,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    samples, in_range, counts, y, e, channels, channel_ok = _load_samples(
        emb_ptr, index_ptr, label_ptr, total, S, P, C, D, emb_sb, emb_sd, emb_sp, BLOCK_S, BLOCK_D,
    )
    positive, nearest_wrong, negative, log_sum_exp = _summarise(
        e, y, modes_ptr, C, M, D, channels, channel_ok, inv_two_var, scale, BLOCK_S,
    )
    triplet = tl.where(counts, relu_keep_nan(positive - nearest_wrong + alpha), 0.0)
    ce = tl.where(counts, log_sum_exp - scale * tl.exp(posterior_exponent(positive, -inv_two_var)), 0.0)
    tl.store(triplet_ptr + samples, triplet, mask=in_range)
    tl.store(ce_ptr + samples, ce, mask=in_range)


@triton.jit
def _backward_kernel(
    grad_triplet_ptr, grad_ce_ptr, emb_ptr, index_ptr, label_ptr, modes_ptr, rows_ptr, partial_ptr,
    total, S, P, C, M, D, emb_sb, emb_sd, emb_sp,
    inv_two_var, alpha, scale,
    EMB_GRAD: tl.constexpr, MODES_GRAD: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """rows[sample] = dL/de (BLOCK_S rows per program); partial[program, c, m]
    = this block's dL/dr[c, m]."""
    samples, in_range, counts, y, e, channels, channel_ok = _load_samples(
        emb_ptr, index_ptr, label_ptr, total, S, P, C, D, emb_sb, emb_sd, emb_sp, BLOCK_S, BLOCK_D,
    )
    positive, nearest_wrong, negative, log_sum_exp = _summarise(
        e, y, modes_ptr, C, M, D, channels, channel_ok, inv_two_var, scale, BLOCK_S,
    )
    hinge_active = counts & (negative >= 0) & (positive - nearest_wrong + alpha > 0)
    grad_triplet = tl.where(hinge_active, tl.load(grad_triplet_ptr + samples, mask=counts, other=0.0), 0.0)
    grad_ce = tl.load(grad_ce_ptr + samples, mask=counts, other=0.0)
    grad_rows = tl.zeros([BLOCK_S, BLOCK_D], dtype=tl.float32)
    block = tl.program_id(0).to(tl.int64)
    for c in range(0, C):
        dmin, winner = _class_dmin(e, modes_ptr, c, M, D, channels, channel_ok)
        is_label = (y == c).to(tl.float32)
        z = scale * tl.exp(posterior_exponent(dmin, -inv_two_var))
        g = -grad_ce * (tl.exp(z - log_sum_exp) - is_label) * z * inv_two_var
        g += grad_triplet * (is_label - (negative == c).to(tl.float32))
        r = tl.load(
            modes_ptr + (c * M + winner)[:, None] * D + channels[None, :], mask=channel_ok[None, :], other=0.0
        )
        step = 2.0 * g[:, None] * (e - r)  # this class's term of dL/de, per sample
        if EMB_GRAD:
            grad_rows += step
        if MODES_GRAD:
            for m in range(0, M):
                mode_grad = tl.sum(tl.where((winner == m)[:, None], -step, 0.0), axis=0)
                tl.store(partial_ptr + ((block * C + c) * M + m) * D + channels, mode_grad, mask=channel_ok)
    if EMB_GRAD:
        tl.store(
            rows_ptr + samples[:, None] * D + channels[None, :], grad_rows,
            mask=in_range[:, None] & channel_ok[None, :],
        )


@triton.jit
def _scatter_rows_kernel(
    keys_ptr, order_ptr, rows_ptr, grad_emb_ptr,
    n, P, end_key, D,
    gemb_sb, gemb_sd, gemb_sp,
    BLOCK_D: tl.constexpr,
):
    """One program per position of the sorted keys (b * P + pixel; end_key for
    samples that do not count). The first position of each run of equal keys
    sums the run's rows in sample order and writes the pixel's gradient once."""
    i = tl.program_id(0).to(tl.int64)
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < D
    key = tl.load(keys_ptr + i)
    previous = tl.load(keys_ptr + i - 1, mask=i > 0, other=-1)
    first_of_run = (key != previous) & (key < end_key)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    j = i
    same_key = first_of_run
    while same_key:
        sample = tl.load(order_ptr + j)
        acc += tl.load(rows_ptr + sample * D + channels, mask=channel_ok, other=0.0)
        j += 1
        same_key = (j < n) & (tl.load(keys_ptr + j, mask=j < n, other=-1) == key)
    image = key // P
    pixel = key % P
    tl.store(
        grad_emb_ptr + image * gemb_sb + channels * gemb_sd + pixel * gemb_sp,
        acc.to(grad_emb_ptr.dtype.element_ty), mask=channel_ok & first_of_run,
    )


@triton.jit
def _label_mode_kernel(
    emb_ptr, index_ptr, label_ptr, modes_ptr, mode_ptr,
    total, S, P, C, M, D, emb_sb, emb_sd, emb_sp,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """mstar[y] (docs/method.md §3, ties: lowest m) of every sample; 255 where it does not count."""
    samples, in_range, counts, y, e, channels, channel_ok = _load_samples(
        emb_ptr, index_ptr, label_ptr, total, S, P, C, D, emb_sb, emb_sd, emb_sp, BLOCK_S, BLOCK_D,
    )
    own_class = tl.where(counts, y, 0)
    best = tl.zeros([BLOCK_S], dtype=tl.float32)
    winner = tl.zeros([BLOCK_S], dtype=tl.int32)
    for m in range(0, M):
        r = tl.load(
            modes_ptr + (own_class * M + m)[:, None] * D + channels[None, :], mask=channel_ok[None, :], other=0.0
        )
        diff = e - r
        dist = tl.sum(diff * diff, axis=1)
        closer = replaces_min(dist, best) | (m == 0)  # ties keep the lowest mode; NaN wins
        best = tl.where(closer, dist, best)
        winner = tl.where(closer, m, winner)
    tl.store(mode_ptr + samples, tl.where(counts, winner, 255).to(tl.uint8), mask=in_range)


def sample_blocks(samples: int) -> int:
    """Programs (and mode-gradient partials) for ``samples`` flattened samples."""
    return triton.cdiv(samples, BLOCK_SAMPLES)


def _launch_shape(emb, index, modes):
    bdp = pixel_view(emb)
    C, M, D = modes.shape
    return bdp, (index.numel(), index.shape[1], bdp.shape[2], C, M, D)


def forward(emb, index, label, modes, triplet, ce, inv_two_var, alpha, scale, launch=lambda kernel: kernel):
    """Fills triplet and ce (B, S). index and label are contiguous (B, S);
    ``modes`` is fp32, contiguous; inv_two_var = 1 / (2 sigma^2)."""
    bdp, sizes = _launch_shape(emb, index, modes)
    launch(_forward_kernel)[(sample_blocks(index.numel()),)](
        bdp, index, label, modes, triplet, ce,
        *sizes, *bdp.stride(),
        inv_two_var, alpha, scale,
        BLOCK_S=BLOCK_SAMPLES, BLOCK_D=channel_block(sizes[-1]),
    )


def backward(grad_triplet, grad_ce, emb, index, label, modes, rows, partial, inv_two_var, alpha, scale,
             launch=lambda kernel: kernel):
    """Fills rows (B * S, D) with dL/de per sample and partial
    (sample_blocks(B * S), C, M, D) with per-block dL/dR; either may be None
    (not computed). Gradients are contiguous fp32 (B, S); modes as in forward."""
    bdp, sizes = _launch_shape(emb, index, modes)
    launch(_backward_kernel)[(sample_blocks(index.numel()),)](
        grad_triplet, grad_ce, bdp, index, label, modes,
        grad_triplet if rows is None else rows, grad_triplet if partial is None else partial,
        *sizes, *bdp.stride(),
        inv_two_var, alpha, scale,
        EMB_GRAD=rows is not None, MODES_GRAD=partial is not None,
        BLOCK_S=BLOCK_SAMPLES, BLOCK_D=channel_block(sizes[-1]),
    )


def scatter_rows(rows, index, label, num_classes, grad_emb, launch=lambda kernel: kernel):
    """Writes the sum of the rows of the samples at each pixel into the zeroed
    ``grad_emb`` (shaped like emb). Samples are stably sorted by (image,
    pixel), so each pixel is written by one program that adds its rows in
    sample order: deterministic, no atomics."""
    gbdp = pixel_view(grad_emb)
    B, D, P = gbdp.shape
    counts = (index >= 0) & (index < P) & (label >= 0) & (label < num_classes)
    first_pixel = torch.arange(B, device=index.device)[:, None] * P
    keys = torch.where(counts, first_pixel + index, B * P).flatten()
    sorted_keys, order = torch.sort(keys, stable=True)
    launch(_scatter_rows_kernel)[(keys.numel(),)](
        sorted_keys, order, rows, gbdp,
        keys.numel(), P, B * P, D,
        *gbdp.stride(),
        BLOCK_D=channel_block(D),
    )


def label_mode(emb, index, label, modes, mode, launch=lambda kernel: kernel):
    """Fills mode (uint8 (B, S)) with each sample's own-class mstar; arguments as in forward."""
    bdp, sizes = _launch_shape(emb, index, modes)
    launch(_label_mode_kernel)[(sample_blocks(index.numel()),)](
        bdp, index, label, modes, mode,
        *sizes, *bdp.stride(),
        BLOCK_S=BLOCK_SAMPLES, BLOCK_D=channel_block(sizes[-1]),
    )
