"""Triton kernels of the mode-distance op (docs/method.md §3), and their launchers.

Imported as ``drsl_fast.triton_kernels.mode_distance``. Every kernel loads its
inputs in their storage dtype and computes in fp32. Embeddings are addressed
as (b, channel, pixel) with explicit strides, so (B, D, H, W), channels-last
and (N, D) inputs are all read in place.

Derivation (docs/method.md §3). With the C*M mode centres as the rows of R,

    ||e - r_k||^2 = ||e||^2 - 2 e.r_k + ||r_k||^2,

so for a block of pixels E (BLOCK_P, D) the distances to every mode are one
matrix product E R^T plus a broadcast; ||e||^2 is the same for every mode of a
pixel and does not change the argmin, so the forward ranks modes by
``key = ||r_k||^2 - 2 e.r_k``. The product loses digits when e is close to a
mode relative to their norms (cancellation), and an embedding near its mode is
the usual case for a trained network, so the epilogue recomputes each class's
winning distance directly as sum((e - r[c, m*])^2): dmin is then as exact as
the direct formula, and the product only decides which mode wins. A NaN key
ranks first (torch.min's rule); ties keep the lowest mode.

Backward, with g[p, c] the gradient of dmin[p, c] and the one-hot weights
W[p, c*M + m] = g[p, c] [m*[p, c] = m] built on the fly from mstar:

    dL/de_p    = 2 (sum_c g[p, c]) e_p - 2 (W R)_p
    dL/dr_k    = 2 (sum_p W[p, k]) r_k - 2 (W^T E)_k

two more products; no (pixels, C, M) tensor exists in memory. An element
of dL/de that comes out inf or NaN (an overflow, or an infinite mode that
no pixel wins: its zero weight times inf) is recomputed as the direct sum
over the winning modes, as the other backends compute it. The mode
gradient is summed per fixed chunk of MODE_GRAD_CHUNK pixels (partials reduced
on the host in a fixed order), so it is deterministic.

``precision`` picks tl.dot's input precision for the ranking product:
"tf32x3" (the default: tensor cores, nearly fp32), "ieee" (fp32 FMA) or
"tf32". Whatever it is, a class whose two best keys are closer than the
product's rounding bound is ranked directly, so the winner is the true
nearest mode and dmin the direct formula's; a coarser product only sends
more blocks to the direct ranking. The backward products run in tf32x3.
"""
import triton
import triton.language as tl

from .layout import channel_block, pixel_view
from .rules import posterior_exponent, replaces_min

BLOCK_PIXELS = 64
# Precision of the products (tl.dot input_precision): tf32x3 runs on tensor
# cores with nearly fp32 accuracy; Triton's fp32 FMA products ("ieee") were
# 5-6x slower on an H200 (bench/NOTES.md). The ranking's near-tie bound and
# the direct recomputation of every winner keep dmin exact either way.
PRODUCT_PRECISION: tl.constexpr = tl.constexpr("tf32x3")
# Pixels summed by one program of the backward kernel into one partial of the
# mode gradient (fixed, so the summation order, and the result, do not depend
# on the launch).
MODE_GRAD_CHUNK = 512
# Columns of one pass of the forward's product: classes padded to a power of
# two of modes each, as many as fit (at least one).
MODE_COLUMNS = 64
FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _pixel_tile(emb_ptr, b, pixels, channels, P, D, emb_sb, emb_sd, emb_sp):
    """The fp32 embedding tile (BLOCK_P, BLOCK_D), 0 outside (P, D)."""
    ok = (pixels < P)[:, None] & (channels < D)[None, :]
    return tl.load(emb_ptr + b * emb_sb + pixels[:, None] * emb_sp + channels[None, :] * emb_sd,
                   mask=ok, other=0.0).to(tl.float32)


@triton.jit
def _forward_kernel(
    emb_ptr, modes_ptr, dmin_ptr, mstar_ptr, posterior_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp,
    posterior_scale, rounding,
    WITH_POSTERIOR: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, CLASS_SLOTS: tl.constexpr, MODE_SLOTS: tl.constexpr,
):
    """Column k of a pass's product is mode k % MODE_SLOTS of the pass's class
    k // MODE_SLOTS, so the (BLOCK_P, CLASS_SLOTS, MODE_SLOTS) view of the
    keys ranks every class of the pass in one reduction."""
    b = tl.program_id(1).to(tl.int64)
    pixels = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pixel_ok = pixels < P
    channels = tl.arange(0, BLOCK_D)
    channel_ok = channels < D
    columns = tl.arange(0, CLASS_SLOTS * MODE_SLOTS)
    slots = tl.arange(0, CLASS_SLOTS)
    e = _pixel_tile(emb_ptr, b, pixels, channels, P, D, emb_sb, emb_sd, emb_sp)
    e_finite = (e == e) & (tl.abs(e) < float("inf"))
    pixel_odd = tl.max((~e_finite).to(tl.int32), axis=1) > 0  # a NaN or inf channel
    for first_class in range(0, C, CLASS_SLOTS):
        n_classes = tl.minimum(CLASS_SLOTS, C - first_class)
        mode = columns % MODE_SLOTS
        valid = (columns // MODE_SLOTS < n_classes) & (mode < M)
        row = (first_class + columns // MODE_SLOTS) * M + mode
        r_t = tl.load(modes_ptr + row[None, :] * D + channels[:, None], mask=valid[None, :] & channel_ok[:, None],
                      other=0.0)
        r_finite = (r_t == r_t) & (tl.abs(r_t) < float("inf"))
        class_odd = tl.max(tl.reshape(tl.max((~r_finite).to(tl.int32), axis=0), [CLASS_SLOTS, MODE_SLOTS]), axis=1) > 0
        # the product runs on e - mu and r - mu (mu: the pass's mean finite
        # mode): distances do not change, the numbers (and their rounding) shrink
        r_t = tl.where(r_finite, r_t, 0.0)
        mu = tl.sum(r_t, axis=1) / (n_classes * M)
        r_t = tl.where(valid[None, :], r_t - mu[:, None], 0.0)
        e_centred = tl.where(e_finite, e - mu[None, :], 0.0)
        e_sq = tl.sum(e_centred * e_centred, axis=1)
        r_sq = tl.sum(r_t * r_t, axis=0)
        key = r_sq[None, :] - 2.0 * tl.dot(e_centred, r_t, input_precision=PRECISION)
        key = tl.where(valid[None, :], key, float("inf"))
        key = tl.reshape(key, [BLOCK_P, CLASS_SLOTS, MODE_SLOTS])
        best, winner = tl.min(key, axis=2, return_indices=True, return_indices_tie_break_left=True)
        modes_of_slot = tl.arange(0, MODE_SLOTS)[None, None, :]
        runner_up = tl.min(tl.where(modes_of_slot == winner[:, :, None], float("inf"), key), axis=2)
        # A class is settled by the product where its two best keys differ by
        # more than both keys' rounding (`rounding` times 2 ||e|| ||r|| + ||r||^2)
        # plus the direct formula's own (`rounding` times the distance), so
        # that the direct ranking would pick the same mode. NaN and inf
        # anywhere in the pixel or the class's modes: ranked directly.
        r_norm = tl.sqrt(tl.max(r_sq, axis=0))
        band = rounding * (4.0 * tl.sqrt(e_sq) * r_norm + 2.0 * r_norm * r_norm + 2.0 * e_sq)[:, None] \
            + rounding * 2.0 * tl.abs(best)
        settled = (runner_up > best + band) & (best == best) & (tl.abs(best) < float("inf")) & (band < float("inf"))
        unsettled = (~settled | pixel_odd[:, None] | class_odd[None, :]) & (slots < n_classes)[None, :]
        for j in range(0, n_classes):
            c = first_class + j
            mine = (slots == j)[None, :]
            class_winner = tl.sum(tl.where(mine, winner, 0), axis=1)
            if tl.max(tl.where(mine, unsettled, False).to(tl.int32)) > 0:
                # a near-tie the product cannot settle: rank this class's modes
                # directly, for the whole block (ties keep the lowest mode)
                exact = tl.full([BLOCK_P], float("inf"), tl.float32)
                for m in range(0, M):
                    r = tl.load(modes_ptr + (c * M + m) * D + channels, mask=channel_ok, other=0.0)
                    diff = e - r[None, :]
                    dist = tl.sum(diff * diff, axis=1)
                    closer = replaces_min(dist, exact) | (m == 0)
                    exact = tl.where(closer, dist, exact)
                    class_winner = tl.where(closer, m, class_winner)
            # dmin recomputed directly from the winning mode (no cancellation)
            r = tl.load(modes_ptr + (c * M + class_winner)[:, None] * D + channels[None, :],
                        mask=channel_ok[None, :], other=0.0)
            diff = e - r
            dmin = tl.sum(diff * diff, axis=1)
            out = b * out_sb + c * out_sc + pixels * out_sp
            tl.store(dmin_ptr + out, dmin, mask=pixel_ok)
            tl.store(mstar_ptr + out, class_winner.to(tl.uint8), mask=pixel_ok)
            if WITH_POSTERIOR:
                tl.store(posterior_ptr + out, tl.exp(posterior_exponent(dmin, posterior_scale)), mask=pixel_ok)


@triton.jit
def _one_hot(grad_ptr, mstar_ptr, b, pixels, pixel_ok, first_class, n_classes, M, columns,
             out_sb, out_sc, out_sp, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """W (BLOCK_P, BLOCK_K) of classes first_class .. + n_classes (column
    j * M + m is mode m of class first_class + j), and sum_c g over them."""
    one_hot = tl.zeros([BLOCK_P, BLOCK_K], dtype=tl.float32)
    g_total = tl.zeros([BLOCK_P], dtype=tl.float32)
    for j in range(0, n_classes):
        out = b * out_sb + (first_class + j) * out_sc + pixels * out_sp
        g = tl.load(grad_ptr + out, mask=pixel_ok, other=0.0)
        winner = tl.load(mstar_ptr + out, mask=pixel_ok, other=0).to(tl.int32)
        one_hot = tl.where(columns[None, :] == (j * M + winner)[:, None], g[:, None], one_hot)
        g_total += g
    return one_hot, g_total


@triton.jit
def _direct_grad(grad_ptr, mstar_ptr, modes_ptr, e, b, pixels, pixel_ok, channels, C, M, D, out_sb, out_sc, out_sp):
    """sum_c g[p, c] (e_p - r[c, mstar[p, c]]) summed class by class: half of
    dL/de where the products give inf or NaN (an overflow, or a non-finite
    mode that no pixel wins, whose zero weight times inf is NaN)."""
    direct = tl.zeros_like(e)
    for c in range(0, C):
        out = b * out_sb + c * out_sc + pixels * out_sp
        g = tl.load(grad_ptr + out, mask=pixel_ok, other=0.0)
        winner = tl.load(mstar_ptr + out, mask=pixel_ok, other=0).to(tl.int64)
        r = tl.load(modes_ptr + (c * M + winner)[:, None] * D + channels[None, :],
                    mask=pixel_ok[:, None] & (channels < D)[None, :], other=0.0)
        direct += g[:, None] * (e - r)
    return direct


@triton.jit
def _backward_kernel(
    grad_ptr, mstar_ptr, emb_ptr, modes_ptr, grad_emb_ptr, partial_ptr,
    P, C, M, D, emb_sb, emb_sd, emb_sp, out_sb, out_sc, out_sp,
    gemb_sb, gemb_sd, gemb_sp, classes_per_pass,
    GRAD_EMB: tl.constexpr, GRAD_MODES: tl.constexpr, ONE_PASS: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One chunk of pixels of image b. With GRAD_EMB, dL/de of its pixels (over
    every class, classes_per_pass at a time). With GRAD_MODES, the partial mode
    gradient of class pass program_id(2): partial[b * chunks + chunk] rows
    k = 2 (weight_k r_k - (W^T E)_k) of that pass's modes. ONE_PASS: every
    class fits one pass, whose one-hot tile serves both."""
    chunk = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    channels = tl.arange(0, BLOCK_D)
    columns = tl.arange(0, BLOCK_K)
    own_first = tl.program_id(2) * classes_per_pass
    own_modes = tl.minimum(classes_per_pass, C - own_first) * M
    own_ok = (columns < own_modes)[:, None] & (channels < D)[None, :]
    own_r = tl.load(modes_ptr + (own_first * M + columns)[:, None] * D + channels[None, :], mask=own_ok, other=0.0)
    weighted_emb = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    weight = tl.zeros([BLOCK_K], dtype=tl.float32)
    for start in range(0, CHUNK, BLOCK_P):
        pixels = chunk * CHUNK + start + tl.arange(0, BLOCK_P)
        pixel_ok = pixels < P
        e = _pixel_tile(emb_ptr, b, pixels, channels, P, D, emb_sb, emb_sd, emb_sp)
        if ONE_PASS:
            one_hot, g_total = _one_hot(grad_ptr, mstar_ptr, b, pixels, pixel_ok, own_first, C, M, columns,
                                        out_sb, out_sc, out_sp, BLOCK_P, BLOCK_K)
        if GRAD_EMB:
            if ONE_PASS:
                grad = g_total[:, None] * e - tl.dot(one_hot, own_r, input_precision=PRODUCT_PRECISION)
            else:
                grad = tl.zeros([BLOCK_P, BLOCK_D], dtype=tl.float32)
                for first in range(0, C, classes_per_pass):
                    n_classes = tl.minimum(classes_per_pass, C - first)
                    pass_ok = (columns < n_classes * M)[:, None] & (channels < D)[None, :]
                    r = tl.load(modes_ptr + (first * M + columns)[:, None] * D + channels[None, :],
                                mask=pass_ok, other=0.0)
                    w, w_total = _one_hot(grad_ptr, mstar_ptr, b, pixels, pixel_ok, first, n_classes, M,
                                          columns, out_sb, out_sc, out_sp, BLOCK_P, BLOCK_K)
                    grad += w_total[:, None] * e - tl.dot(w, r, input_precision=PRODUCT_PRECISION)
            bad = ~(tl.abs(grad) <= FLT_MAX)
            if tl.max(bad.to(tl.int32)) > 0:
                grad = tl.where(bad, _direct_grad(grad_ptr, mstar_ptr, modes_ptr, e, b, pixels, pixel_ok, channels,
                                                  C, M, D, out_sb, out_sc, out_sp), grad)
            tl.store(grad_emb_ptr + b * gemb_sb + pixels[:, None] * gemb_sp + channels[None, :] * gemb_sd,
                     (2.0 * grad).to(grad_emb_ptr.dtype.element_ty),
                     mask=pixel_ok[:, None] & (channels < D)[None, :])
        if GRAD_MODES:
            if not ONE_PASS:
                one_hot, g_total = _one_hot(grad_ptr, mstar_ptr, b, pixels, pixel_ok, own_first,
                                            own_modes // M, M, columns, out_sb, out_sc, out_sp, BLOCK_P, BLOCK_K)
            weighted_emb += tl.dot(tl.trans(one_hot), e, input_precision=PRODUCT_PRECISION)
            weight += tl.sum(one_hot, axis=0)
    if GRAD_MODES:
        chunks = tl.num_programs(0)
        block = (own_first * M + columns)[:, None] * D + channels[None, :]
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


# Rounding of the operands of the ranking product, relative: none in fp32
# FMA ("ieee"); tf32x3 (each operand split into two tf32 parts, three
# tensor-core products) drops the low parts' product and rounds the low
# parts, under 3 * 2^-22; plain tf32 rounds (or truncates) both operands to
# 10 mantissa bits.
OPERAND_ROUNDING = {"ieee": 0.0, "tf32x3": 2.0**-20, "tf32": 2.0**-9}


def key_rounding(precision: str, D: int) -> float:
    """A bound, relative to 2 ||e|| ||r|| + ||r||^2, on the error of a key
    ||r||^2 - 2 e.r: the operands' rounding plus fp32 products summed over D
    channels (at most (D + 1) units of 2^-24 relative to the sum of |terms|,
    which Cauchy-Schwarz bounds by ||e|| ||r||), with a factor 2 to spare."""
    return 2.0 * (OPERAND_ROUNDING[precision] + (D + 1) * 2.0**-24)


def forward(emb, modes, dmin, mstar, posterior, posterior_scale, precision="tf32x3", launch=lambda kernel: kernel):
    """Fills dmin, mstar and (if not None) posterior. ``modes`` is fp32, contiguous."""
    bdp, B, shape = _shape_arguments(emb, modes)
    P, C, M, D = shape[:4]
    mode_slots = triton.next_power_of_2(M)
    class_slots = max(1, MODE_COLUMNS // mode_slots)
    while class_slots > 1 and (class_slots // 2) * mode_slots >= 16 and class_slots // 2 >= C:
        class_slots //= 2  # fewer classes than slots: a narrower product
    launch(_forward_kernel)[(triton.cdiv(P, BLOCK_PIXELS), B)](
        bdp, modes, dmin, mstar, dmin if posterior is None else posterior, *shape, posterior_scale,
        key_rounding(precision, D), WITH_POSTERIOR=posterior is not None, PRECISION=precision,
        BLOCK_P=BLOCK_PIXELS, BLOCK_D=channel_block(D), CLASS_SLOTS=class_slots, MODE_SLOTS=mode_slots,
    )


def backward(grad_dmin, mstar, emb, modes, grad_emb, partial, launch=lambda kernel: kernel):
    """Fills ``grad_emb`` (shaped like emb; or None) with dL/de and ``partial``
    (B * chunks, C, M, D; or None) with the per-chunk mode gradients."""
    bdp, B, shape = _shape_arguments(emb, modes)
    P, C, M, D = shape[:4]
    classes_per_pass = _classes_per_pass(C, M)
    passes = triton.cdiv(C, classes_per_pass)
    gemb = pixel_view(grad_emb) if grad_emb is not None else bdp
    with_modes = partial is not None
    args = (grad_dmin, mstar, bdp, modes, gemb, partial if with_modes else grad_dmin,
            *shape, *gemb.stride(), classes_per_pass)
    blocks = dict(CHUNK=MODE_GRAD_CHUNK, BLOCK_P=BLOCK_PIXELS, BLOCK_D=channel_block(D),
                  BLOCK_K=mode_block(classes_per_pass * M))
    if passes == 1:
        launch(_backward_kernel)[(mode_grad_chunks(P), B, 1)](
            *args, GRAD_EMB=grad_emb is not None, GRAD_MODES=with_modes, ONE_PASS=True, **blocks)
        return
    if grad_emb is not None:
        launch(_backward_kernel)[(mode_grad_chunks(P), B, 1)](
            *args, GRAD_EMB=True, GRAD_MODES=False, ONE_PASS=False, **blocks)
    if with_modes:
        launch(_backward_kernel)[(mode_grad_chunks(P), B, passes)](
            *args, GRAD_EMB=False, GRAD_MODES=True, ONE_PASS=False, **blocks)


def _classes_per_pass(C: int, M: int) -> int:
    """Whole classes per product of at most MODE_COLUMNS columns (at least one)."""
    return max(1, min(C, MODE_COLUMNS // M))


def mode_grad_chunks(P: int) -> int:
    return triton.cdiv(P, MODE_GRAD_CHUNK)
