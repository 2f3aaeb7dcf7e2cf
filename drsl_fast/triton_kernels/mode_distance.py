"""Triton kernels of the mode-distance op (docs/method.md §3), and their launchers.

Imported as ``drsl_fast.triton_kernels.mode_distance``. Every kernel loads its
inputs in their storage dtype and computes in fp32. Embeddings are addressed
as (b, channel, pixel) with explicit strides, so (B, D, H, W), channels-last
and (N, D) inputs are all read in place.

Forward (docs/method.md §3), in difference form:

    dist[p, c, m] = sum_d (e[p, d] - r[c, m, d])^2,
    dmin[p, c] = min_m dist[p, c, m],   mstar[p, c] = its argmin.

One program holds a block of pixels, one per thread, and for each pixel the
distances to a pass of classes (all modes of each) in registers: a loop over
the channels loads one embedding value per pixel and the pass's mode values
(the same for every thread), and adds (e - r)^2 to every distance, two fp32
instructions a term. The modes are staged by the launcher as a (D, mode
slots, class columns) table padded with zeros, so that a channel's mode
values are one contiguous, aligned row. Each distance is the direct
formula's sum, so dmin needs no cancellation guard, and the min over modes
is a loop inside each thread: a NaN distance ranks first (torch.min's rule),
ties keep the lowest mode. The classes run in passes of CLASS_SLOTS (mode slots times
class slots at most MODE_COLUMNS), and one narrower pass for the rest.

Backward, with g[p, c] the gradient of dmin[p, c]:

    dL/de_p = 2 sum_c g[p, c] (e_p - r[c, mstar[p, c]])

summed directly, class by class, each pixel's winning modes gathered from the
forward's table (so inf and NaN come out as the direct formula's, and there
is no cancellation); and, with the one-hot weights W[p, c*M + m] =
g[p, c] [mstar[p, c] = m] built on the fly from mstar,

    dL/dr_k = 2 (sum_p W[p, k]) r_k - 2 (W^T E)_k,

a product on tensor cores in tf32x3 (PRODUCT_PRECISION); no (pixels, C, M)
tensor exists in memory. The mode gradient is summed per fixed chunk of
MODE_GRAD_CHUNK pixels (partials reduced on the host in a fixed order), so it
is deterministic.
"""
import torch
import triton
import triton.language as tl

from .layout import channel_block, pixel_view
from .rules import posterior_exponent, replaces_min

# The mode gradient's pixels per tile. Compiled for sm_90 (Triton 3.8, 19
# classes of 3 modes): 184 registers, and per tile of 32 pixels the one-hot
# weights (built as W^T, one class's loads two per thread) and the product
# take about 1400 instructions a warp; with 64-pixel tiles, W built as
# (pixels, modes) and transposed, 6100 (bench/NOTES.md).
BLOCK_PIXELS = 32
# dL/de: pixels per program, channels at a time, warps.
GRAD_EMB_PIXELS = 128
GRAD_EMB_CHANNELS = 32
GRAD_EMB_WARPS = 4
# The forward's pixels per program (one per thread) and warps. Compiled for
# sm_90 (Triton 3.8, 19 classes of 3 modes): 96 registers, and a full pass's
# channel loop is 169 instructions, 128 of them the sums and 17 loads (one
# embedding value and 16 four-wide loads of mode values). At 64 pixels on 2
# warps the mode values went through shared memory and took 217 registers.
FORWARD_PIXELS = 128
FORWARD_WARPS = 4
# Precision of the mode gradient's products (tl.dot input_precision): tf32x3 runs
# on tensor cores with nearly fp32 accuracy; Triton's fp32 FMA products
# ("ieee") were 5-6x slower on an H200 (bench/NOTES.md).
PRODUCT_PRECISION: tl.constexpr = tl.constexpr("tf32x3")
# Pixels summed by one program of the mode-gradient kernel into one partial of the
# mode gradient (fixed, so the summation order, and the result, do not depend
# on the launch).
MODE_GRAD_CHUNK = 512
# Distances per pixel of one pass, forward (mode slots x class slots), and
# columns of one pass of the mode gradient's products (whole classes).
MODE_COLUMNS = 64


@triton.jit
def _pixel_tile(emb_ptr, b, pixels, channels, P, D, emb_sb, emb_sd, emb_sp):
    """The fp32 embedding tile (BLOCK_P, BLOCK_D), 0 outside (P, D)."""
    ok = (pixels < P)[:, None] & (channels < D)[None, :]
    return tl.load(emb_ptr + b * emb_sb + pixels[:, None] * emb_sp + channels[None, :].to(tl.int64) * emb_sd,
                   mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _class_pass(emb_ptr, table_ptr, dmin_ptr, mstar_ptr, posterior_ptr, b, pixels, pixel_ok, first, C, M, D,
                emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp, posterior_scale,
                WITH_POSTERIOR: tl.constexpr, CLASS_COLUMNS: tl.constexpr, MODE_SLOTS: tl.constexpr,
                CLASS_SLOTS: tl.constexpr, BLOCK_P: tl.constexpr):
    """dmin, mstar (and the posterior) of classes first .. first + CLASS_SLOTS - 1."""
    slot_m = tl.arange(0, MODE_SLOTS)[:, None, None]
    slot_c = tl.arange(0, CLASS_SLOTS)[None, :, None]
    row = slot_m * CLASS_COLUMNS + first + slot_c  # within one channel's row of the table
    e_ptrs = emb_ptr + b * emb_sb + pixels * emb_sp  # 64-bit pointers, moved a channel at a time
    dist = tl.zeros([MODE_SLOTS, CLASS_SLOTS, BLOCK_P], tl.float32)
    e_next = tl.load(e_ptrs, mask=pixel_ok & (0 < D), other=0.0).to(tl.float32)
    for d in range(0, D):
        e = e_next  # the next channel's load is in flight while this one's sums run
        e_ptrs += emb_sd
        e_next = tl.load(e_ptrs, mask=pixel_ok & (d + 1 < D), other=0.0).to(tl.float32)
        r = tl.load(table_ptr + d * (MODE_SLOTS * CLASS_COLUMNS) + row)
        diff = e[None, None, :] - r
        dist += diff * diff
    # the min over modes, inside each thread: a NaN ranks first, ties keep the lower mode
    dmin = tl.sum(tl.where(slot_m == 0, dist, 0.0), axis=0)
    mstar = tl.zeros([CLASS_SLOTS, BLOCK_P], tl.int32)
    for m in tl.static_range(1, MODE_SLOTS):
        dist_m = tl.sum(tl.where(slot_m == m, dist, 0.0), axis=0)
        closer = replaces_min(dist_m, dmin) & (m < M)
        dmin = tl.where(closer, dist_m, dmin)
        mstar = tl.where(closer, m, mstar)
    classes = first + tl.arange(0, CLASS_SLOTS)
    out = b * out_sb + classes[:, None].to(tl.int64) * out_sc + pixels[None, :] * out_sp
    ok = (classes < C)[:, None] & pixel_ok[None, :]
    tl.store(dmin_ptr + out, dmin, mask=ok)
    tl.store(mstar_ptr + out, mstar.to(tl.uint8), mask=ok)
    if WITH_POSTERIOR:
        tl.store(posterior_ptr + out, tl.exp(posterior_exponent(dmin, posterior_scale)), mask=ok)


@triton.jit
def _forward_kernel(
    emb_ptr, table_ptr, dmin_ptr, mstar_ptr, posterior_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp, posterior_scale,
    WITH_POSTERIOR: tl.constexpr, CLASS_COLUMNS: tl.constexpr, MODE_SLOTS: tl.constexpr,
    CLASS_SLOTS: tl.constexpr, TAIL_SLOTS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Passes of CLASS_SLOTS classes, then one of TAIL_SLOTS (if not 0);
    the table's rows hold CLASS_COLUMNS = their sum of class slots."""
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < P
    for first in range(0, CLASS_COLUMNS - TAIL_SLOTS, CLASS_SLOTS):
        _class_pass(emb_ptr, table_ptr, dmin_ptr, mstar_ptr, posterior_ptr, b, pixels, pixel_ok, first, C, M, D,
                    emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp, posterior_scale,
                    WITH_POSTERIOR, CLASS_COLUMNS, MODE_SLOTS, CLASS_SLOTS, BLOCK_P)
    if TAIL_SLOTS > 0:
        _class_pass(emb_ptr, table_ptr, dmin_ptr, mstar_ptr, posterior_ptr, b, pixels, pixel_ok,
                    CLASS_COLUMNS - TAIL_SLOTS, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp,
                    posterior_scale, WITH_POSTERIOR, CLASS_COLUMNS, MODE_SLOTS, TAIL_SLOTS, BLOCK_P)


@triton.jit
def _grad_emb_kernel(
    grad_ptr, mstar_ptr, emb_ptr, table_ptr, grad_emb_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp, gemb_sb, gemb_sd, gemb_sp,
    CLASS_COLUMNS: tl.constexpr, MODE_SLOTS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dL/de of a block of pixels, BLOCK_D channels at a time: the direct sum
    2 sum_c g[p, c] (e_p - r[c, mstar[p, c]]), each winning mode's values
    gathered from the forward's table."""
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < P
    for first_channel in range(0, D, BLOCK_D):
        channels = (first_channel + tl.arange(0, BLOCK_D)[:, None]).to(tl.int64)
        ok = (channels < D) & pixel_ok[None, :]
        e = tl.load(emb_ptr + b * emb_sb + channels * emb_sd + pixels[None, :] * emb_sp, mask=ok,
                    other=0.0).to(tl.float32)
        rows = table_ptr + channels * (MODE_SLOTS * CLASS_COLUMNS)
        grad = tl.zeros([BLOCK_D, BLOCK_P], tl.float32)
        out = b * out_sb + pixels * out_sp  # moved a class at a time (64-bit)
        for c in range(0, C):
            g = tl.load(grad_ptr + out, mask=pixel_ok, other=0.0)
            winner = tl.load(mstar_ptr + out, mask=pixel_ok, other=0).to(tl.int32)
            r = tl.load(rows + (winner * CLASS_COLUMNS + c)[None, :], mask=ok, other=0.0)
            grad += g[None, :] * (e - r)
            out += out_sc
        tl.store(grad_emb_ptr + b * gemb_sb + channels * gemb_sd + pixels[None, :] * gemb_sp,
                 (2.0 * grad).to(grad_emb_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _one_hot(grad_ptr, mstar_ptr, b, pixels, pixel_ok, first_class, n_classes, M, columns,
             out_sb, out_sc, out_sp, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """W^T (BLOCK_K, BLOCK_P) of classes first_class .. + n_classes (row
    j * M + m is mode m of class first_class + j)."""
    one_hot = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
    for j in range(0, n_classes):
        out = b * out_sb + (first_class + j) * out_sc + pixels * out_sp
        g = tl.load(grad_ptr + out, mask=pixel_ok, other=0.0)
        winner = tl.load(mstar_ptr + out, mask=pixel_ok, other=0).to(tl.int32)
        one_hot = tl.where(columns[:, None] == (j * M + winner)[None, :], g[None, :], one_hot)
    return one_hot


@triton.jit
def _grad_modes_kernel(
    grad_ptr, mstar_ptr, emb_ptr, modes_ptr, partial_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp, classes_per_pass,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The partial mode gradient of one chunk of pixels of image b and of
    class pass program_id(2): partial[b * chunks + chunk] rows
    k = 2 (weight_k r_k - (W^T E)_k) of that pass's modes."""
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    channels = tl.arange(0, BLOCK_D)
    columns = tl.arange(0, BLOCK_K)
    own_first = tl.program_id(2) * classes_per_pass
    own_modes = tl.minimum(classes_per_pass, C - own_first) * M
    weighted_emb = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    # sum_p W[p, k], kept per pixel slot and summed across the threads once, after the loop
    weights = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK_P):
        pixels = chunk * CHUNK + start + tl.arange(0, BLOCK_P)
        pixel_ok = pixels < P
        e = _pixel_tile(emb_ptr, b, pixels, channels, P, D, emb_sb, emb_sd, emb_sp)
        one_hot = _one_hot(grad_ptr, mstar_ptr, b, pixels, pixel_ok, own_first, own_modes // M, M, columns,
                           out_sb, out_sc, out_sp, BLOCK_P, BLOCK_K)
        weighted_emb += tl.dot(one_hot, e, input_precision=PRODUCT_PRECISION)
        weights += one_hot
    weight = tl.sum(weights, axis=1)
    # the modes are read only now, so that they hold no registers during the loop
    own_ok = (columns < own_modes)[:, None] & (channels < D)[None, :]
    block = (own_first * M + columns)[:, None] * D + channels[None, :]  # the pass's rows of (C * M, D)
    own_r = tl.load(modes_ptr + block, mask=own_ok, other=0.0)
    chunks = tl.num_programs(0)
    tl.store(partial_ptr + (b * chunks + chunk) * C * M * D + block,
             2.0 * (weight[:, None] * own_r - weighted_emb), mask=own_ok)


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


def forward_slots(C: int, M: int):
    """(mode slots, class slots of a full pass, class slots of the last
    narrower pass or 0): powers of two, MODE_COLUMNS distances per pass."""
    mode_slots = triton.next_power_of_2(M)
    class_slots = max(1, MODE_COLUMNS // mode_slots)
    rest = C % class_slots
    return mode_slots, class_slots, triton.next_power_of_2(rest) if rest else 0


def mode_table(modes):
    """The (C, M, D) modes as a zero-padded (D, mode slots, class columns)
    table: a channel's values of every mode in one contiguous row."""
    C, M, D = modes.shape
    mode_slots, class_slots, tail_slots = forward_slots(C, M)
    columns = C - C % class_slots + tail_slots
    table = torch.nn.functional.pad(modes.permute(2, 1, 0), (0, columns - C, 0, mode_slots - M))
    return table.contiguous()  # a copy only where nothing was padded (pad then keeps the strides)


def forward(emb, modes, dmin, mstar, posterior, posterior_scale, launch=lambda kernel: kernel):
    """Fills dmin, mstar and (if not None) posterior. ``modes`` is fp32, contiguous."""
    bdp, B, shape = _shape_arguments(emb, modes)
    P, C, M, D = shape[:4]
    mode_slots, class_slots, tail_slots = forward_slots(C, M)
    table = mode_table(modes)
    launch(_forward_kernel)[(triton.cdiv(P, FORWARD_PIXELS), B)](
        bdp, table, dmin, mstar, dmin if posterior is None else posterior, *shape, posterior_scale,
        WITH_POSTERIOR=posterior is not None, CLASS_COLUMNS=table.shape[2], MODE_SLOTS=mode_slots,
        CLASS_SLOTS=class_slots, TAIL_SLOTS=tail_slots, BLOCK_P=FORWARD_PIXELS, num_warps=FORWARD_WARPS,
    )


def backward(grad_dmin, mstar, emb, modes, grad_emb, partial, launch=lambda kernel: kernel):
    """Fills ``grad_emb`` (shaped like emb; or None) with dL/de and ``partial``
    (B * chunks, C, M, D; or None) with the per-chunk mode gradients."""
    bdp, B, shape = _shape_arguments(emb, modes)
    P, C, M, D = shape[:4]
    if grad_emb is not None:
        table = mode_table(modes)
        gemb = pixel_view(grad_emb)
        launch(_grad_emb_kernel)[(triton.cdiv(P, GRAD_EMB_PIXELS), B)](
            grad_dmin, mstar, bdp, table, gemb, *shape, *gemb.stride(), CLASS_COLUMNS=table.shape[2],
            MODE_SLOTS=table.shape[1], BLOCK_P=GRAD_EMB_PIXELS, BLOCK_D=GRAD_EMB_CHANNELS, num_warps=GRAD_EMB_WARPS,
        )
    if partial is not None:
        classes_per_pass = _classes_per_pass(C, M)
        launch(_grad_modes_kernel)[(mode_grad_chunks(P), B, triton.cdiv(C, classes_per_pass))](
            grad_dmin, mstar, bdp, modes, partial, *shape, classes_per_pass, CHUNK=MODE_GRAD_CHUNK,
            BLOCK_P=BLOCK_PIXELS, BLOCK_D=channel_block(D), BLOCK_K=mode_block(classes_per_pass * M),
        )


def _classes_per_pass(C: int, M: int) -> int:
    """Whole classes per product of at most MODE_COLUMNS columns (at least one)."""
    return max(1, min(C, MODE_COLUMNS // M))


def mode_grad_chunks(P: int) -> int:
    return triton.cdiv(P, MODE_GRAD_CHUNK)
