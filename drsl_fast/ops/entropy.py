"""Fused ADVENT/IntraDA entropy map (docs/method.md §7, §10).

Replaces ``p = softmax(x); -p * log2(p + 1e-30) / log2(C)`` then ``.sum(1)``
and ``.mean()`` as separate passes: one pass over the logits gives the
C-channel map (the discriminator's input), the pixel entropy (the entropy
loss is its mean) and the per-image mean used for ranking. Backward
recomputes the softmax from the logits: nothing but the logits is saved.

Operators (``torch.library``, traceable by ``torch.compile``):
  drsl_fast::entropy_map / entropy_map_backward                 C++ CPU and CUDA
  drsl_fast::entropy_map_triton / entropy_map_backward_triton   Triton
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _extension, reference
from ..backends import resolve, triton_import_error
from ..reference import accumulate_dtype
from .mode_distance import check_triton_dtype
from .registration import register_differentiable
from .validation import check_bool, check_class_maps


class EntropyMaps(NamedTuple):
    """map (B, C, H, W) or None, pixel entropy (B, H, W), image score (B,)."""

    map: Optional[Tensor]
    pixel_entropy: Tensor
    image_score: Tensor


def entropy_map(logits: Tensor, with_map: bool = True, *, backend: Optional[str] = None) -> EntropyMaps:
    """docs/method.md §7: with p = softmax over C of ``logits`` (B, C, H, W),

    - ``map[c] = -p_c log2(p_c + 1e-30) / log2(C)`` (skipped without ``with_map``),
    - ``pixel_entropy = sum_c map[c]``,
    - ``image_score = mean of map over C, H, W`` (IntraDA's ranking score).

    fp32 results (fp64 for fp64 logits); differentiable in ``logits``
    through all three. ``backend``: see :mod:`drsl_fast.backends` (triton
    computes in fp32 and refuses float64 logits).

    Edge cases, the same on every backend as in the reference: a pixel with a
    NaN or +inf logit (or all logits -inf) gets NaN map and entropy, and its
    image a NaN score; empty inputs give empty outputs, and an image without
    pixels (H or W = 0) the score NaN (a mean over nothing). Wrong types,
    dtypes or shapes, C < 2 and a with_map that is not a bool raise TypeError
    or ValueError naming the argument.
    """
    check_class_maps("entropy_map", "logits", logits, 2, None, "it divides by log2 C")
    with_map = check_bool("entropy_map", "with_map", with_map)
    name = resolve(backend, logits.device)
    if name == "reference":
        return EntropyMaps(*reference.entropy_map(logits, with_map))
    op = torch.ops.drsl_fast.entropy_map_triton if name == "triton" else torch.ops.drsl_fast.entropy_map
    entropy, pixel, score = op(logits, with_map)
    return EntropyMaps(entropy if with_map else None, pixel, score)


# ---------------------------------------------------------------- registration


def _fake_forward(logits: Tensor, with_map: bool) -> Tuple[Tensor, Tensor, Tensor]:
    acc = accumulate_dtype(logits.dtype)
    B, _, H, W = logits.shape
    return (
        logits.new_empty(logits.shape if with_map else (0,), dtype=acc),
        logits.new_empty((B, H, W), dtype=acc),
        logits.new_empty((B,), dtype=acc),
    )


def _fake_backward(logits: Tensor, grad_map: Tensor, grad_pixel: Tensor) -> Tensor:
    channels_last = logits.is_contiguous(memory_format=torch.channels_last) and not logits.is_contiguous()
    return torch.empty_like(logits, memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _register_autograd(op_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        logits, _ = inputs
        ctx.save_for_backward(logits)

    def backward(ctx, grad_map, grad_pixel, grad_score):
        (logits,) = ctx.saved_tensors
        B, C, H, W = logits.shape
        acc = accumulate_dtype(logits.dtype)
        # score = sum over H, W of the pixel entropy / (C H W)
        total = torch.zeros((B, H, W), dtype=acc, device=logits.device) if grad_pixel is None else grad_pixel
        if grad_score is not None:
            total = total + grad_score[:, None, None] / (C * H * W)
        if grad_map is None or grad_map.numel() == 0:
            grad_map = logits.new_empty((0,), dtype=acc)
        return backward_op(logits, grad_map, total), None

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    register_differentiable("entropy_map", _fake_forward, _fake_backward)  # autograd: csrc/autograd/


if triton_import_error() is None:
    from torch.library import triton_op, wrap_triton

    from ..triton_kernels import entropy as triton_kernels

    @triton_op("drsl_fast::entropy_map_triton", mutates_args=())
    def _entropy_map_triton(logits: Tensor, with_map: bool) -> Tuple[Tensor, Tensor, Tensor]:
        check_triton_dtype("entropy_map", "logits", logits)
        entropy, pixel, _ = _fake_forward(logits, with_map)
        if pixel.numel() > 0:
            triton_kernels.forward(logits, entropy if with_map else None, pixel, launch=wrap_triton)
        score = pixel.flatten(1).mean(1) / logits.shape[1]
        return entropy, pixel, score

    @triton_op("drsl_fast::entropy_map_backward_triton", mutates_args=())
    def _entropy_map_backward_triton(logits: Tensor, grad_map: Tensor, grad_pixel: Tensor) -> Tensor:
        check_triton_dtype("entropy_map", "logits", logits)
        grad_logits = _fake_backward(logits, grad_map, grad_pixel)
        if grad_logits.numel() > 0:
            triton_kernels.backward(
                logits, grad_map.float().contiguous() if grad_map.numel() > 0 else None,
                grad_pixel.float().contiguous(), grad_logits, launch=wrap_triton,
            )
        return grad_logits

    register_differentiable("entropy_map", _fake_forward, _fake_backward, _register_autograd, "_triton")
