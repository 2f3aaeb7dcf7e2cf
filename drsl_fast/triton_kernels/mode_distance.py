"""Triton kernels of the mode-distance op (docs/method.md §3), and their launchers.

Imported as ``drsl_fast.triton_kernels.mode_distance``. Every kernel loads its
inputs in their storage dtype and computes in fp32. Embeddings are addressed
as (b, channel, pixel) with explicit strides, so (B, D, H, W), channels-last
and (N, D) inputs are all read in place.
"""
import triton
import triton.language as tl

from .layout import channel_block, pixel_view
from .rules import posterior_exponent, replaces_min

BLOCK_PIXELS = 64
# Pixels summed by one program of the mode-gradient kernel (fixed, so the
# summation order, and the result, do not depend on the launch).
MODE_GRAD_CHUNK = 1024


@triton.jit
def _load_pixel_tile(emb_ptr, P, D, emb_sb, emb_sd, emb_sp, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's image, pixels and channels, and its fp32 embedding tile
    (BLOCK_D, BLOCK_P), 0 outside (D, P): padded channels are 0 in e and r."""
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    channels = tl.arange(0, BLOCK_D)
    tile_ok = (channels < D)[:, None] & (pixels < P)[None, :]
    e = tl.load(
        emb_ptr + b * emb_sb + channels[:, None] * emb_sd + pixels[None, :] * emb_sp, mask=tile_ok, other=0.0
    ).to(tl.float32)
    return b, pixels, channels, tile_ok, e


@triton.jit
def _forward_kernel(
    emb_ptr, modes_ptr, dmin_ptr, mstar_ptr, posterior_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp,
    posterior_scale,
    WITH_POSTERIOR: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, pixels, channels, _, e = _load_pixel_tile(emb_ptr, P, D, emb_sb, emb_sd, emb_sp, BLOCK_P, BLOCK_D)
    pixel_ok = pixels < P
    channel_ok = channels < D
    for c in range(0, C):
        r = tl.load(modes_ptr + c * M * D + channels, mask=channel_ok, other=0.0)
        diff = e - r[:, None]
        best = tl.sum(diff * diff, axis=0)
        winner = tl.zeros([BLOCK_P], dtype=tl.int32)
        for m in range(1, M):
            r = tl.load(modes_ptr + (c * M + m) * D + channels, mask=channel_ok, other=0.0)
            diff = e - r[:, None]
            dist = tl.sum(diff * diff, axis=0)
            closer = replaces_min(dist, best)  # ties keep the lowest mode; NaN wins
            best = tl.where(closer, dist, best)
            winner = tl.where(closer, m, winner)
        out = b * out_sb + c * out_sc + pixels * out_sp
        tl.store(dmin_ptr + out, best, mask=pixel_ok)
        tl.store(mstar_ptr + out, winner.to(tl.uint8), mask=pixel_ok)
        if WITH_POSTERIOR:
            tl.store(posterior_ptr + out, tl.exp(posterior_exponent(best, posterior_scale)), mask=pixel_ok)


@triton.jit
def _grad_emb_kernel(
    grad_ptr, mstar_ptr, emb_ptr, modes_ptr, grad_emb_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp,
    gemb_sb, gemb_sd, gemb_sp,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b, pixels, channels, tile_ok, e = _load_pixel_tile(emb_ptr, P, D, emb_sb, emb_sd, emb_sp, BLOCK_P, BLOCK_D)
    pixel_ok = pixels < P
    acc = tl.zeros([BLOCK_D, BLOCK_P], dtype=tl.float32)
    for c in range(0, C):
        out = b * out_sb + c * out_sc + pixels * out_sp
        g = tl.load(grad_ptr + out, mask=pixel_ok, other=0.0)
        winner = tl.load(mstar_ptr + out, mask=pixel_ok, other=0).to(tl.int32)
        r = tl.load(modes_ptr + (c * M + winner)[None, :] * D + channels[:, None], mask=tile_ok, other=0.0)
        acc += g[None, :] * (e - r)
    tl.store(
        grad_emb_ptr + b * gemb_sb + channels[:, None] * gemb_sd + pixels[None, :] * gemb_sp,
        (2.0 * acc).to(grad_emb_ptr.dtype.element_ty), mask=tile_ok,
    )


@triton.jit
def _grad_modes_kernel(
    grad_ptr, mstar_ptr, emb_ptr, modes_ptr, partial_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp,
    CHUNK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """partial[b * chunks + chunk, c] = 2 * sum over the chunk's pixels with
    mstar == m of g * (r[c, m] - e), for every m, as a (M, D) block."""
    chunk = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    channels = tl.arange(0, BLOCK_D)
    mode_ids = tl.arange(0, BLOCK_M)
    weighted_emb = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    weight = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK_P):
        pixels = chunk * CHUNK + start + tl.arange(0, BLOCK_P)
        pixel_ok = pixels < P
        out = b * out_sb + c * out_sc + pixels * out_sp
        g = tl.load(grad_ptr + out, mask=pixel_ok, other=0.0)
        winner = tl.load(mstar_ptr + out, mask=pixel_ok, other=0).to(tl.int32)
        one_hot = tl.where(winner[None, :] == mode_ids[:, None], g[None, :], 0.0)  # (BLOCK_M, BLOCK_P)
        e = tl.load(
            emb_ptr + b * emb_sb + pixels[:, None] * emb_sp + channels[None, :] * emb_sd,
            mask=pixel_ok[:, None] & (channels < D)[None, :], other=0.0,
        ).to(tl.float32)  # (BLOCK_P, BLOCK_D)
        weighted_emb += tl.dot(one_hot, e, input_precision="ieee")
        weight += tl.sum(one_hot, axis=1)
    block_ok = (mode_ids < M)[:, None] & (channels < D)[None, :]
    centre = (c * M + mode_ids)[:, None] * D + channels[None, :]
    r = tl.load(modes_ptr + centre, mask=block_ok, other=0.0)
    result = 2.0 * (r * weight[:, None] - weighted_emb)
    chunks = tl.num_programs(0)
    tl.store(partial_ptr + (b * chunks + chunk) * C * M * D + centre, result, mask=block_ok)


def _shape_arguments(emb, modes):
    """emb viewed as (B, D, P), B, and the arguments every kernel takes after
    its pointers: P, C, M, D, the embedding's and the per-class outputs' strides."""
    bdp = pixel_view(emb)
    B, D, P = bdp.shape
    C, M, _ = modes.shape
    out_strides = (0, 1, C) if emb.dim() == 2 else (C * P, P, 1)
    return bdp, B, (P, C, M, D, *bdp.stride(), *out_strides)


def forward(emb, modes, dmin, mstar, posterior, posterior_scale, launch=lambda kernel: kernel):
    """Fills dmin, mstar and (if not None) posterior. ``modes`` is fp32, contiguous."""
    bdp, B, shape = _shape_arguments(emb, modes)
    launch(_forward_kernel)[(triton.cdiv(shape[0], BLOCK_PIXELS), B)](
        bdp, modes, dmin, mstar, dmin if posterior is None else posterior, *shape, posterior_scale,
        WITH_POSTERIOR=posterior is not None, BLOCK_P=BLOCK_PIXELS, BLOCK_D=channel_block(shape[3]),
    )


def grad_emb(grad_dmin, mstar, emb, modes, out, launch=lambda kernel: kernel):
    """Fills ``out`` (shaped like emb) with dL/de."""
    bdp, B, shape = _shape_arguments(emb, modes)
    out_bdp = pixel_view(out)
    launch(_grad_emb_kernel)[(triton.cdiv(shape[0], BLOCK_PIXELS), B)](
        grad_dmin, mstar, bdp, modes, out_bdp, *shape, *out_bdp.stride(),
        BLOCK_P=BLOCK_PIXELS, BLOCK_D=channel_block(shape[3]),
    )


def grad_modes_partials(grad_dmin, mstar, emb, modes, partial, launch=lambda kernel: kernel):
    """Fills ``partial`` (B * chunks, C, M, D) with per-chunk mode gradients."""
    bdp, B, shape = _shape_arguments(emb, modes)
    P, C, M, D = shape[:4]
    launch(_grad_modes_kernel)[(mode_grad_chunks(P), C, B)](
        grad_dmin, mstar, bdp, modes, partial, *shape,
        CHUNK=MODE_GRAD_CHUNK, BLOCK_P=BLOCK_PIXELS, BLOCK_D=channel_block(D),
        BLOCK_M=max(16, triton.next_power_of_2(M)),
    )


def mode_grad_chunks(P: int) -> int:
    return triton.cdiv(P, MODE_GRAD_CHUNK)
