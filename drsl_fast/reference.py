"""The float64 oracles of every op (docs/method.md): pure PyTorch (NumPy for
Fourier domain adaptation), readable first, following the method line by
line. The tests compare each fast backend with these; they are also the
``reference`` backend. One section per op, under the op's name.
"""
import math
from typing import List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


# ---------------------------------------------------------------- Mode distance
# Reference for the per-pixel mode model of docs/method.md §3.


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 accumulation for fp16/bf16/fp32 inputs, fp64 for fp64 (docs/method.md §10)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def posterior_scale(sigma: float, dtype: torch.dtype) -> float:
    """``-1 / (2 sigma^2)`` as a value of ``dtype``: -inf where it overflows
    (sigma below ~4e-20 in float32), as every backend computes it."""
    scale = -0.5 / sigma / sigma
    return -math.inf if -scale > torch.finfo(dtype).max else scale


def class_posterior(dmin: torch.Tensor, sigma: float) -> torch.Tensor:
    """docs/method.md §3 ``P = exp(-dmin / (2 sigma^2))``, computed as
    ``exp(dmin * posterior_scale(sigma))`` in dmin's dtype. ``P = 1`` where
    ``dmin = 0`` for every sigma > 0 (the limit), also where the scale
    overflows to -inf (there P is 0 elsewhere); NaN where dmin is NaN."""
    scale = posterior_scale(sigma, dmin.dtype)
    if math.isinf(scale):
        return torch.exp(torch.where(dmin == 0, torch.zeros_like(dmin), dmin * scale))
    return torch.exp(dmin * scale)


def mode_distance(
    emb: torch.Tensor, modes: torch.Tensor, sigma: Optional[float] = None
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """docs/method.md §3: squared distance to the nearest mode of every class.

    ``d[c, m] = ||e - r[c, m]||^2``, ``dmin[c] = min_m d[c, m]``,
    ``mstar[c] = argmin_m d[c, m]`` (ties: lowest m), and, when ``sigma`` is
    given, the class posterior ``P[c] = exp(-dmin[c] / (2 sigma^2))``
    (:func:`class_posterior`). NaN propagates: a NaN distance is the minimum
    and the first NaN mode wins, as in ``torch.min``.

    emb: (B, D, H, W) or (N, D); modes: (C, M, D). Returns dmin and mstar shaped
    (B, C, H, W) or (N, C) (mstar as uint8), and the posterior or None.
    Differentiable by plain autograd; the gradient flows only through the
    winning mode because it is gathered. Materialises (N, C, M, D): it is the
    oracle, not the fast path.
    """
    acc = accumulate_dtype(emb.dtype)
    x = emb.to(acc)
    if x.dim() == 4:
        x = x.permute(0, 2, 3, 1)  # (B, H, W, D)
    r = modes.to(acc)
    diff = x[..., None, None, :] - r  # (..., C, M, D)
    dist = (diff * diff).sum(-1)  # (..., C, M)
    mstar = dist.argmin(-1, keepdim=True)  # first minimum: ties keep the lowest mode
    dmin = dist.gather(-1, mstar).squeeze(-1)
    mstar = mstar.squeeze(-1).to(torch.uint8)
    if emb.dim() == 4:
        dmin = dmin.permute(0, 3, 1, 2).contiguous()
        mstar = mstar.permute(0, 3, 1, 2).contiguous()
    posterior = None if sigma is None else class_posterior(dmin, sigma)
    return dmin, mstar, posterior


# ---------------------------------------------------------------- Per-class sampling
# Reference for the per-class sampling of docs/method.md §4: per image and per class,
# up to k pixels drawn uniformly without replacement.


def sample_per_class(
    labels: torch.Tensor, num_classes: int, k: int, generator: Optional[torch.Generator] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A plain loop over images x classes with ``nonzero`` and ``randperm``.

    labels: (B, H, W) integer class ids; 255 and any value outside
    [0, num_classes) are ignored. Returns ``index`` (B, C, k) int64 flat pixel
    indices (h * W + w) in random order, padded with -1, and ``count`` (B, C)
    int64, the number of valid entries per row (min(k, pixels of the class)).
    Synchronises with the host once per (image, class): it is the oracle.
    """
    B = labels.shape[0]
    flat = labels.flatten(1)
    index = torch.full((B, num_classes, k), -1, dtype=torch.int64, device=labels.device)
    count = torch.zeros((B, num_classes), dtype=torch.int64, device=labels.device)
    for b in range(B):
        for c in range(num_classes):
            pixels = (flat[b] == c).nonzero().squeeze(1)
            order = torch.randperm(pixels.numel(), generator=generator,
                                   device=generator.device if generator is not None else "cpu").to(labels.device)
            chosen = pixels[order[:k]]
            index[b, c, : chosen.numel()] = chosen
            count[b, c] = chosen.numel()
    return index, count


# ---------------------------------------------------------------- Entropy map
# Reference for the ADVENT/IntraDA entropy map of docs/method.md §7, written as
# ADVENT's separate ops: softmax, log2, mul, mean.


EPS = 1e-30


def entropy_map(logits: Tensor, with_map: bool = True) -> Tuple[Optional[Tensor], Tensor, Tensor]:
    """docs/method.md §7 for logits (B, C, H, W):

    - map[c] = -p_c log2(p_c + 1e-30) / log2(C), p = softmax over C
      (the discriminator's input), or None without ``with_map``;
    - pixel entropy = sum_c map[c] (B, H, W) (the entropy loss is its mean);
    - image score = mean of map over C, H, W (B,) (IntraDA's ranking).

    fp32 (fp64 for fp64 logits); differentiable by plain autograd.
    """
    C = logits.shape[1]
    p = torch.softmax(logits.to(accumulate_dtype(logits.dtype)), dim=1)
    m = -torch.mul(p, torch.log2(p + EPS)) / math.log2(C)
    return (m if with_map else None), m.sum(1), m.mean((1, 2, 3))


# ---------------------------------------------------------------- Fourier domain adaptation
# Reference for Fourier domain adaptation (docs/method.md §6, ISA), written
# apart from the op: NumPy, float64, one image and channel at a time, the full
# centred spectrum and an explicit loop over the window.


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H', W') -> (height, width), bilinear with half-pixel centres and the
    edge pixels repeated (PyTorch's ``align_corners=False``, no antialias)."""

    def taps(size_in: int, size_out: int):
        position = np.maximum((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0.0)
        low = np.floor(position).astype(int)
        return low, np.minimum(low + 1, size_in - 1), position - low

    r0, r1, fr = taps(image.shape[0], height)
    c0, c1, fc = taps(image.shape[1], width)
    rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


def fda_image(source: np.ndarray, target: np.ndarray, beta: float) -> np.ndarray:
    """One channel (H, W): the centred amplitudes within b = floor(beta min(H, W))
    of the centre taken from ``target`` (resized first), the phase of ``source``."""
    height, width = source.shape
    if beta == 0:
        return source.copy()
    target = resize_bilinear(target, height, width)
    spectrum = np.fft.fftshift(np.fft.fft2(source))
    amplitude, phase = np.abs(spectrum), np.angle(spectrum)
    target_amplitude = np.abs(np.fft.fftshift(np.fft.fft2(target)))
    half = math.floor(beta * min(height, width))
    for row in range(height // 2 - half, height // 2 + half + 1):
        for column in range(width // 2 - half, width // 2 + half + 1):
            if 0 <= row < height and 0 <= column < width:
                amplitude[row, column] = target_amplitude[row, column]
    mixed = amplitude * np.exp(1j * phase)
    return np.fft.ifft2(np.fft.ifftshift(mixed)).real


def fourier_domain_adaptation(source: Tensor, target: Tensor, beta: float = 0.01) -> Tensor:
    """docs/method.md §6 on (B, C, H, W) and (B, C, H', W') tensors; float64 result."""
    s = source.detach().cpu().double().numpy()
    t = target.detach().cpu().double().numpy()
    out = np.empty_like(s)
    for b in range(s.shape[0]):
        for c in range(s.shape[1]):
            out[b, c] = fda_image(s[b, c], t[b, c], beta)
    return torch.from_numpy(out)


# ---------------------------------------------------------------- MMDL losses and label_mode
# Reference for the MMDL losses of docs/method.md §4: Eq. 4 (triplet) and Eq. 5
# (cross-entropy over the scaled class posteriors), per sampled embedding.


def pixel_rows(emb: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) as (B, D, P); (N, D) as (1, D, N)."""
    return emb.t().unsqueeze(0) if emb.dim() == 2 else emb.flatten(2)


def valid_samples(index: torch.Tensor, label: torch.Tensor, pixels: int, num_classes: int) -> torch.Tensor:
    """Samples that count: pixel index in [0, P) and label in [0, C)."""
    return (index >= 0) & (index < pixels) & (label >= 0) & (label < num_classes)


def gather_samples(emb: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The sampled embeddings (B, S, D); invalid samples read 0."""
    bdp = pixel_rows(emb)
    if bdp.shape[2] == 0:  # no pixels: no sample is valid
        return bdp.new_zeros((index.shape[0], index.shape[1], bdp.shape[1]))
    safe = torch.where(valid, index, torch.zeros_like(index))
    rows = bdp.gather(2, safe[:, None, :].expand(-1, bdp.shape[1], -1)).transpose(1, 2)
    return torch.where(valid[..., None], rows, torch.zeros_like(rows))


def mmdl_losses(
    emb: torch.Tensor, index: torch.Tensor, label: torch.Tensor, modes: torch.Tensor,
    sigma: float = 0.5, alpha: float = 1.0, scale: float = 15.0,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Eq. 4 and Eq. 5.

    emb (B, D, H, W) or (N, D) (then B = 1); index (B, S) flat pixel indices;
    label (B, S) class ids; modes (C, M, D). For every valid sample e with label y:
      dmin[c]   = min_m ||e - r[c, m]||^2                          (docs/method.md §3)
      triplet   = relu(dmin[y] - min_{c != y} dmin[c] + alpha)      (Eq. 4; 0 when C = 1)
      ce        = -log softmax_c(scale * exp(-dmin[c] / (2 sigma^2)))[y]   (Eq. 5)
    Invalid samples (index outside [0, P), label outside [0, C)) give 0.
    NaN propagates (``min`` and ``relu`` keep it; with C = 1 the nearest wrong
    class is at +inf, so Eq. 4 is NaN only for a NaN or inf dmin[y]).
    Returns (triplet, ce), each (B, S) in the accumulation dtype.
    Materialises (B, S, C, M, D): it is the oracle.
    """
    acc = accumulate_dtype(emb.dtype)
    C = modes.shape[0]
    valid = valid_samples(index, label, pixel_rows(emb).shape[2], C)
    e = gather_samples(emb, index, valid).to(acc)
    r = modes.to(acc)
    dist = ((e[:, :, None, None, :] - r) ** 2).sum(-1)  # (B, S, C, M)
    dmin = dist.min(-1).values  # (B, S, C)
    y = torch.where(valid, label, torch.zeros_like(label)).long()
    positive = dmin.gather(-1, y[..., None]).squeeze(-1)
    is_label = F.one_hot(y, C).bool()
    negative = dmin.masked_fill(is_label, float("inf")).min(-1).values
    triplet = torch.relu(positive - negative + alpha)
    logits = scale * class_posterior(dmin, sigma)
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view_as(positive)
    zero = torch.zeros((), dtype=acc, device=emb.device)
    return torch.where(valid, triplet, zero), torch.where(valid, ce, zero)


def label_mode(emb: torch.Tensor, index: torch.Tensor, label: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """``mstar[y]`` of every sample (docs/method.md §3: the nearest mode of its own
    class, ties to the lowest m) as uint8 (B, S); 255 for invalid samples."""
    acc = accumulate_dtype(emb.dtype)
    C = modes.shape[0]
    valid = valid_samples(index, label, pixel_rows(emb).shape[2], C)
    e = gather_samples(emb, index, valid).to(acc)
    y = torch.where(valid, label, torch.zeros_like(label)).long()
    r = modes.to(acc)[y]  # (B, S, M, D)
    mode = ((e[:, :, None, :] - r) ** 2).sum(-1).argmin(-1).to(torch.uint8)
    return torch.where(valid, mode, torch.full_like(mode, 255))


# ---------------------------------------------------------------- Eq. 6 triplets
# Reference for the cross-domain triplet draw of docs/method.md §4 Eq. 6 (DRSL+).


def consistency_triplets(
    anchor_index: Tensor, anchor_label: Tensor, anchor_mode: Tensor, source_label: Tensor, source_mode: Tensor,
    draws: Tensor, num_classes: int, num_modes: int, target_pixels: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Eq. 6 triplets (docs/method.md §4) with plain torch ops, the outputs of
    ``drsl_fast::consistency_triplets`` (kernels/consistency_triplets.h states
    the rule): anchors (Bt, S) with their mode (uint8, 255: does not count),
    source pixels (Bs, P) with theirs, uniform draws (2, Bt, S) in [0, 1).

    The source pixels are ordered by group g = label * M + mode (pixels that do
    not count last) with one stable sort; group sizes come from a scatter; the
    positive is entry floor(u+ n+) of the anchor's group's run, the negative
    entry floor(u- n-) of the labelled pixels outside its class's run.
    Returns flat anchor, positive, negative positions (-1 where absent), valid,
    and the skip counts (no positive, no negative) as int64 (2,)."""
    C, M, device = num_classes, num_modes, anchor_index.device
    groups = C * M
    label = source_label.reshape(-1).long()
    mode = source_mode.reshape(-1)
    counts = (label >= 0) & (label < C) & (mode < M)
    source_group = torch.where(counts, label * M + mode, groups)
    order = torch.sort(source_group, stable=True).indices  # flat source positions, grouped by (class, mode)
    group_size = torch.zeros(groups + 1, dtype=torch.int64, device=device)
    group_size.scatter_add_(0, source_group, torch.ones_like(source_group))
    group_start = group_size.cumsum(0) - group_size
    class_size = group_size[:groups].view(C, M).sum(1)
    class_start = group_start[: groups : M]
    labelled = class_size.sum()

    has_label = (anchor_mode < M) & (anchor_label >= 0) & (anchor_label < C)
    y = torch.where(has_label, anchor_label, 0)
    group = y * M + torch.where(has_label, anchor_mode, 0)
    n_positive = group_size[group]
    n_negative = labelled - class_size[y]
    # draws lie in [0, 1) and counts below 2^53, so draw * n rounds to below n: picks in [0, n) (0 when n = 0)
    pick_positive = (draws[0] * n_positive).long()
    pick_negative = (draws[1] * n_negative).long()
    # The i-th pixel outside class y's run: runs of the other classes before it, then after.
    negative_slot = torch.where(pick_negative < class_start[y], pick_negative, pick_negative + class_size[y])
    last = max(order.numel() - 1, 0)
    positive = order[(group_start[group] + pick_positive).clamp(max=last)] if order.numel() else pick_positive
    negative = order[negative_slot.clamp(max=last)] if order.numel() else pick_negative

    has_positive, has_negative = n_positive > 0, n_negative > 0
    valid = has_label & has_positive & has_negative
    absent = torch.full_like(positive, -1)
    batch = torch.arange(anchor_index.shape[0], device=device)[:, None]
    anchor = torch.where(has_label, batch * target_pixels + anchor_index, absent)
    skipped = torch.stack(((has_label & ~has_positive).sum(), (has_label & ~has_negative).sum()))
    return anchor, torch.where(valid, positive, absent), torch.where(valid, negative, absent), valid, skipped


def consistency_hinge(
    target_emb: Tensor, source_emb: Tensor, anchor: Tensor, positive: Tensor, negative: Tensor, beta: float = 1.0,
) -> Tuple[Tensor, Tensor]:
    """Eq. 6 over drawn triplets (flat positions ``b * P + p``; a triplet
    counts when its three positions lie in their maps):
        loss = mean over counted triplets of relu(||e_t - e_p||^2 - ||e_t - e_n||^2 + beta)
    (0 when none counts), in the accumulation dtype, and the number counted
    (int64). Plain autograd; rows of triplets that do not count are replaced by
    zeros before any arithmetic, so whatever such positions point at gets an
    exact 0 gradient."""
    acc = accumulate_dtype(target_emb.dtype)
    target, source = pixel_rows(target_emb), pixel_rows(source_emb)
    in_map = lambda flat, bdp: (flat >= 0) & (flat < bdp.shape[0] * bdp.shape[2])
    counted = (in_map(anchor, target) & in_map(positive, source) & in_map(negative, source)).reshape(-1)

    def rows(bdp: Tensor, flat: Tensor) -> Tensor:
        if bdp.shape[0] * bdp.shape[2] == 0:
            return bdp.new_zeros((counted.numel(), bdp.shape[1]), dtype=acc)
        safe = torch.where(counted, flat.reshape(-1), 0)
        picked = bdp[safe // bdp.shape[2], :, safe % bdp.shape[2]].to(acc)
        return torch.where(counted[:, None], picked, 0.0)

    e_t, e_p, e_n = rows(target, anchor), rows(source, positive), rows(source, negative)
    hinge = ((e_t - e_p) ** 2).sum(-1) - ((e_t - e_n) ** 2).sum(-1) + beta
    used = counted.sum()
    return torch.where(counted, hinge.relu(), 0.0).sum() / used.clamp(min=1).to(acc), used


# ---------------------------------------------------------------- Class-balanced pseudo-labels
# References for the class-balanced pseudo-labels of docs/method.md §5.
#
# Two oracles:
# - the exact, sort-based thresholds (:class:`SortedThresholds`): keeps every
#   pixel's (class, confidence) and sorts them per class, as CBST/CRST do;
# - the confidence histogram and the label selection in plain PyTorch, against
#   which the fast backends are compared bit for bit.


IGNORE_LABEL = 255
# bits(2^-24) as an fp32 pattern; see kernels/confidence_bins.h.
SMALLEST_GAP = 2.0**-24
SMALLEST_GAP_BITS = 103 << 23


def num_confidence_bins(mantissa_bits: int) -> int:
    return 1 + (24 << mantissa_bits)


def pixel_confidence(scores: Tensor, from_logits: bool) -> Tuple[Tensor, Tensor]:
    """Per pixel of (B, C, H, W) scores: (argmax class (ties: lowest; the
    first NaN, as ``torch.max``), fp32 confidence max_c prob[c]), both
    flattened. For logits the confidence is ``1 / sum_c exp(l_c - max l)``,
    the softmax probability of the argmax (NaN when a logit is NaN or +inf)."""
    x = scores.float()
    best, cls = x.max(1)
    conf = 1.0 / torch.exp(x - best[:, None]).sum(1) if from_logits else best
    return cls.flatten(), conf.flatten()


def confidence_bin(conf: Tensor, mantissa_bits: int) -> Tensor:
    """Bin of each fp32 confidence (kernels/confidence_bins.h): by the bit
    pattern of ``1 - conf``; bin 0 is the most confident."""
    gap = 1.0 - conf.float()
    bits = gap.contiguous().view(torch.int32).long()
    fine = 1 + ((bits - SMALLEST_GAP_BITS) >> (23 - mantissa_bits))
    last = num_confidence_bins(mantissa_bits) - 1
    return torch.where(gap < SMALLEST_GAP, 0, torch.where(gap < 1.0, fine, last))


def confidence_histogram(scores: Tensor, from_logits: bool, mantissa_bits: int) -> Tensor:
    """(C, num_bins) int64 pixel counts per (argmax class, confidence bin)."""
    C = scores.shape[1]
    nbins = num_confidence_bins(mantissa_bits)
    cls, conf = pixel_confidence(scores, from_logits)
    index = cls * nbins + confidence_bin(conf, mantissa_bits)
    return torch.bincount(index, minlength=C * nbins).view(C, nbins)


def select_labels(probs: Tensor, thresholds: Tensor) -> Tensor:
    """docs/method.md §5: ``y = argmax_c prob[c] / t[c]`` (ties: lowest c), 255 where
    ``max_c prob[c] / t[c] < 1``, or NaN (``torch.max`` keeps a NaN ratio).
    (B, C, H, W) -> (B, H, W) uint8."""
    ratio = probs.float() / thresholds.float().to(probs.device)[None, :, None, None]
    best, label = ratio.max(1)
    return torch.where(best >= 1.0, label, IGNORE_LABEL).to(torch.uint8)


def rank_threshold(values: Tensor, portion: float) -> float:
    """docs/method.md §5 for one class: the value at rank floor(n * portion) of the
    descending order (1-based); 1 when the class has no pixels, +inf (nothing
    selected) when the rank is 0."""
    n = values.numel()
    if n == 0:
        return 1.0
    rank = math.floor(n * portion)
    if rank == 0:
        return math.inf
    return float(values.sort(descending=True).values[rank - 1])


class SortedThresholds:
    """Exact CBST/CRST thresholds: keeps every pixel's confidence per class
    (memory grows with the data) and sorts at the end. ``stride`` keeps every
    stride-th pixel only, as CRST's code does with stride 4."""

    def __init__(self, num_classes: int, stride: int = 1):
        self.num_classes = num_classes
        self.stride = stride
        self.classes: List[Tensor] = []
        self.confidences: List[Tensor] = []

    def update(self, scores: Tensor, from_logits: bool = False) -> None:
        cls, conf = pixel_confidence(scores, from_logits)
        self.classes.append(cls[:: self.stride])
        self.confidences.append(conf[:: self.stride])

    def thresholds(self, portion: float) -> Tensor:
        cls = torch.cat(self.classes) if self.classes else torch.zeros(0, dtype=torch.long)
        conf = torch.cat(self.confidences) if self.confidences else torch.zeros(0)
        values = [rank_threshold(conf[cls == c], portion) for c in range(self.num_classes)]
        return torch.tensor(values, dtype=torch.float32)
