"""Per-class pixel sampling for the DRSL losses (docs/method.md §4, "fused triplet
sampling" of §10).

For every image and every class, up to k pixels drawn uniformly without
replacement among the pixels of that class, as a fixed-size (B, C, k) tensor
padded with -1: one call per batch, nothing synchronises with the host.

Fast backends give every pixel an i.i.d. uniform 48-bit key drawn from the
caller's ``torch.Generator`` (``torch.randint`` on the labels' device, so the
draw is reproducible) and keep, per (image, class), the k pixels with the
smallest keys, ordered by key: a uniform k-subset in uniformly random order.
They are distribution-equivalent to the reference loop, not index-identical.

Operator: drsl_fast::sample_per_class(labels, keys, num_classes, k), C++ CPU
(counting sort by class, then nth_element per (image, class)) and CUDA (one
device sort of class-prefixed keys between two kernels); both give the same
samples for the same keys. Selection is a sort, which Triton does not
express at this size, so ``backend='triton'`` runs the same device sort with
plain torch ops (:func:`sort_based_sample_per_class`).
"""
import functools
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _extension, reference
from ..backends import resolve
from .validation import check_dim, check_int, check_integer_tensor, describe

KEY_BITS = 48  # kernels/class_sampling.h kSampleKeyBits
MAX_CLASSES = 1 << (62 - KEY_BITS)


class ClassSamples(NamedTuple):
    """index (B, C, k) int64 flat pixel indices (h * W + w), -1 padded; count (B, C) int64."""

    index: Tensor
    count: Tensor

    def pairs(self) -> Tuple[Tensor, Tensor]:
        """(index, label), each (B, C * k): the input format of :func:`mmdl_losses`."""
        B, C, k = self.index.shape
        return self.index.reshape(B, C * k), _expanded_rows(B, C * k, k, self.index.device)


def repeated_rows(rows: int, width: int, divisor: int, device: torch.device) -> Tensor:
    """(rows, width) int64, contiguous, entry j of every row ``j // divisor``:
    the class of each slot of :meth:`ClassSamples.pairs` (divisor k) or every
    pixel's position (divisor 1), built once per shape and device and then
    reused, so that the ops read it without a copy (an expanded row is copied
    by every op that takes it). For the library's own calls only: the tensor
    is shared, and must not be modified. Not cached while a CUDA graph is
    being captured (the graph's memory pool would own it)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _expanded_rows(rows, width, divisor, device).contiguous()
    return _cached_rows(rows, width, divisor, device)


def _expanded_rows(rows: int, width: int, divisor: int, device: torch.device) -> Tensor:
    """One row of ``j // divisor`` expanded to ``rows`` rows: two operators
    (repeat_interleave dispatches six)."""
    return torch.arange(width, device=device).floor_divide_(max(divisor, 1)).expand(rows, width)


@functools.lru_cache(maxsize=32)
def _cached_rows(rows: int, width: int, divisor: int, device: torch.device) -> Tensor:
    return _expanded_rows(rows, width, divisor, device).contiguous()


def sample_per_class(
    labels: Tensor, num_classes: int, k: int = 300, generator: Optional[torch.Generator] = None, *,
    backend: Optional[str] = None,
) -> ClassSamples:
    """Up to ``k`` pixels per image and class, uniformly without replacement
    (docs/method.md §4, N = 300).

    Args:
        labels: (B, H, W) integer labels at embedding resolution (docs/method.md §2:
            reduced by 2, nearest); 255 and values outside [0, num_classes)
            are ignored.
        num_classes: C.
        k: samples per (image, class).
        generator: a ``torch.Generator`` on the labels' device; the same seed
            gives the same draw on the same backend and device.
        backend: 'auto' (default), 'reference', 'cpu', 'cuda' or 'triton'.

    Returns:
        :class:`ClassSamples` (index (B, C, k) in random order, count (B, C)).

    Edge cases, the same on every backend: labels of any integer dtype (not
    bool or float, which would be truncated); their values are not checked
    (no host synchronisation), so -1, 255 and any id outside [0, C) are
    ignored; empty inputs (B, H or W = 0) give count 0 and index -1 (shape
    (B, C, k)). Wrong types, dtypes or shapes, num_classes outside
    [1, 16383], k < 0 or a generator on another device type raise TypeError
    or ValueError naming the argument.
    """
    num_classes, k = check_inputs(labels, num_classes, k, generator)
    name = resolve(backend, labels.device)
    if name == "reference":
        return ClassSamples(*reference.sample_per_class(labels, num_classes, k, generator))
    keys = random_keys(labels, generator)
    if name == "triton":
        return ClassSamples(*sort_based_sample_per_class(labels, keys, num_classes, k))
    return ClassSamples(*torch.ops.drsl_fast.sample_per_class(labels, keys, num_classes, k))


def random_keys(labels: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """One i.i.d. key per pixel, uniform in [0, 2^48), on the labels' device."""
    B, H, W = labels.shape
    return torch.randint(0, 1 << KEY_BITS, (B, H * W), generator=generator, device=labels.device, dtype=torch.int64)


def sort_based_sample_per_class(labels: Tensor, keys: Tensor, num_classes: int, k: int) -> Tuple[Tensor, Tensor]:
    """The selection with device-side torch ops only: sort every image's pixels
    by (class, key) in one int64 key, count pixels per class with a scatter,
    and read the first k of each class's run. Ignored pixels sort last."""
    B = labels.shape[0]
    flat = labels.flatten(1).long()
    ignored = (flat < 0) | (flat >= num_classes)
    cls = torch.where(ignored, torch.full_like(flat, num_classes), flat)
    _, order = torch.sort((cls << KEY_BITS) | keys, dim=1)
    per_class = torch.zeros(B, num_classes + 1, dtype=torch.int64, device=labels.device)
    per_class.scatter_add_(1, cls, torch.ones_like(cls))
    start = (per_class.cumsum(1) - per_class)[:, :num_classes]
    count = per_class[:, :num_classes].clamp(max=k)
    slot = torch.arange(k, device=labels.device)
    position = (start[:, :, None] + slot).clamp(max=max(flat.shape[1] - 1, 0)).reshape(B, num_classes * k)
    if flat.shape[1] == 0:
        index = torch.full((B, num_classes, k), -1, dtype=torch.int64, device=labels.device)
    else:
        index = order.gather(1, position).view(B, num_classes, k)
        index = torch.where(slot < count[:, :, None], index, torch.full_like(index, -1))
    return index, count


def check_inputs(labels: Tensor, num_classes: int, k: int, generator: Optional[torch.Generator]) -> Tuple[int, int]:
    """The validation of :func:`sample_per_class`; returns num_classes and k as ints."""
    op = "sample_per_class"
    check_integer_tensor(op, "labels", labels, "class ids")
    check_dim(op, "labels", labels, (3,), "(B, H, W)")
    num_classes = check_int(op, "num_classes", num_classes, 1, MAX_CLASSES - 1)
    k = check_int(op, "k", k, 0)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"{op}: generator must be a torch.Generator or None, got {describe(generator)}")
    if generator is not None and generator.device.type != labels.device.type:
        raise ValueError(f"{op}: generator is on {generator.device} but labels are on {labels.device}; "
                         f"the keys are drawn on the labels' device")
    return num_classes, k


def _fake_sample_per_class(labels: Tensor, keys: Tensor, num_classes: int, k: int):
    B = labels.shape[0]
    return labels.new_empty((B, num_classes, k), dtype=torch.int64), labels.new_empty((B, num_classes), dtype=torch.int64)


if _extension.has_cpu_kernels():
    torch.library.register_fake("drsl_fast::sample_per_class")(_fake_sample_per_class)
