"""Fused MMDL losses (docs/method.md §4 Eq. 4 and Eq. 5, §10) and the per-sample
own-class mode used by Eq. 6.

For every sampled embedding e (read in place from (B, D, H, W) at its pixel
index) with label y, one pass computes all C*M squared distances to the mode
centres, dmin[c] and mstar[c] (docs/method.md §3), then
  Eq. 4  triplet = relu(dmin[y] - min_{c != y} dmin[c] + alpha)
  Eq. 5  ce      = -log softmax_c(s * P[c])[y],  P[c] = exp(-dmin[c] / (2 sigma^2))
Backward recomputes the distances, so the extra memory is O(samples): one
gradient row per sample and per-chunk partial mode gradients, never anything
of size samples x C x M x D, and nothing of size samples x C kept between the
passes (the CUDA backward holds one, 5 bytes an entry in fp32, between its kernels).
Gradients flow through the winning modes only (docs/method.md §3).

Operators (``torch.library``):
  drsl_fast::mmdl_losses / mmdl_losses_backward, drsl_fast::label_mode      C++ CPU and CUDA
  drsl_fast::mmdl_losses_triton / mmdl_losses_backward_triton,
  drsl_fast::label_mode_triton                                              Triton (fp32)
The forward operators take the reduction (``mean``) and return the count of
counted samples too, so a call with reduction='mean' is one autograd node;
with the C++ operators it is also one operator, with no Python-side count,
sums or divisions (each a host dispatch and a GPU launch per training step;
the Triton operator still takes them with torch ops inside it).
Every backend sums gradient contributions in a fixed order (per fixed
blocks of samples, then the blocks in order), so gradients are deterministic.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _extension, reference
from ..backends import resolve, triton_import_error
from ..reference import accumulate_dtype, pixel_rows, posterior_scale, valid_samples
from .mode_distance import check_emb_and_modes, check_sigma, check_triton_dtype
from .registration import register_differentiable
from .validation import check_choice, check_integer_tensor, check_real, check_same_device

REDUCTIONS = ("mean", "none")


class MMDLLosses(NamedTuple):
    """Eq. 4 and Eq. 5: means over the valid samples (0 when there are none),
    or per-sample (B, S) values (0 for invalid samples) with reduction='none';
    ``count`` is the number of valid samples (int64 tensor)."""

    triplet: Tensor
    ce: Tensor
    count: Tensor


def mmdl_losses(
    emb: Tensor, index: Tensor, label: Tensor, modes: Tensor, sigma: float = 0.5, alpha: float = 1.0,
    scale: float = 15.0, *, reduction: str = "mean", backend: Optional[str] = None,
) -> MMDLLosses:
    """docs/method.md Eq. 4 (MMDL triplet) and Eq. 5 (MMDL cross-entropy), fused.

    Args:
        emb: embeddings (B, D, H, W) (any strides; read in place) or (N, D)
            (one image); float16, bfloat16, float32 or float64.
        index: (B, S) flat pixel indices (h * W + w); entries outside
            [0, H*W) (e.g. the -1 padding of :func:`sample_per_class`) are ignored.
        label: (B, S) class of each sample; entries outside [0, C) are ignored.
        modes: mode centres (C, M, D), M <= 16.
        sigma, alpha, scale: docs/method.md §3/§4 (0.5, 1.0, 15).
        reduction: 'mean' (over valid samples) or 'none' (per sample).
        backend: 'auto' (default), 'reference', 'cpu', 'cuda' or 'triton'
            (fp32 computation; float64 embeddings raise TypeError there).

    Returns:
        :class:`MMDLLosses`, fp32 (fp64 for fp64 embeddings), differentiable
        in emb and modes. With C = 1 there is no wrong class and Eq. 4 is 0.

    Every backend gives the reference's answer on edge cases:

    - index and label are int tensors of any integer dtype (not bool or
      float); their values are not checked (no host synchronisation):
      out-of-range samples are ignored and do not count.
    - NaN propagates: a NaN (or inf) embedding at a counted sample, or a NaN
      in a mode, gives that sample NaN losses wherever the reference's
      formula does (``min`` and ``relu`` keep NaN; with C = 1 the nearest
      wrong class is at +inf), and NaN means with reduction='mean'. (Their
      gradients are not made identical between backends.)
    - sigma so small that ``1 / (2 sigma^2)`` overflows: posteriors are 1
      where dmin = 0 and 0 elsewhere, as in :func:`mode_distance`.
    - Empty inputs (B, S, H or W = 0) give empty per-sample losses, means 0.
    - Anything else (wrong types, dtypes, shapes or devices; sigma not
      finite and > 0; alpha or scale not finite; an unknown reduction)
      raises TypeError or ValueError naming the argument.
    """
    index, label = check_samples("mmdl_losses", emb, index, label, modes)
    params = check_loss_params(sigma, alpha, scale)
    check_choice("mmdl_losses", "reduction", reduction, REDUCTIONS)
    name = resolve(backend, emb.device)
    mean = reduction == "mean"
    if name == "reference":
        triplet, ce = reference.mmdl_losses(emb, index, label, modes, *params)
        return MMDLLosses(*loss_outputs(triplet, ce, valid_samples(index, label, pixel_rows(emb).shape[2],
                                                                       modes.shape[0]), mean))
    op = torch.ops.drsl_fast.mmdl_losses_triton if name == "triton" else torch.ops.drsl_fast.mmdl_losses
    return MMDLLosses(*op(emb, index, label, modes, *params, mean))


def loss_outputs(triplet: Tensor, ce: Tensor, counted: Tensor, mean: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The per-sample losses (0 where a sample does not count), or with
    ``mean`` their means over the counted samples (0 when none), and the
    count: what the operators return (csrc/host.h flagged_means; on CUDA
    csrc/cuda/flagged_means.h)."""
    count = counted.sum()
    if not mean:
        return triplet, ce, count
    divisor = count.clamp(min=1)
    return triplet.sum() / divisor, ce.sum() / divisor, count


def label_mode(emb: Tensor, index: Tensor, label: Tensor, modes: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """``mstar[y](e)`` of every sample (docs/method.md §3: nearest mode of its own class,
    ties to the lowest m) as uint8 (B, S); 255 where the sample does not count.
    Arguments, validation and edge cases as in :func:`mmdl_losses`; NaN
    distances win as in ``torch.argmin`` (a NaN embedding gives mode 0).
    Not differentiable (an argmin)."""
    index, label = check_samples("label_mode", emb, index, label, modes)
    name = resolve(backend, emb.device)
    if name == "reference":
        return reference.label_mode(emb, index, label, modes)
    op = torch.ops.drsl_fast.label_mode_triton if name == "triton" else torch.ops.drsl_fast.label_mode
    return op(emb.detach(), index, label, modes.detach())


def check_samples(op: str, emb, index, label, modes) -> Tuple[Tensor, Tensor]:
    """Validates emb, modes and the (B, S) samples; returns index and label
    as int64. Their values are not checked (no host synchronisation): samples
    out of range are ignored, as documented."""
    check_emb_and_modes(op, emb, modes)
    check_integer_tensor(op, "index", index, "flat pixel indices")
    check_integer_tensor(op, "label", label, "class ids")
    check_same_device(op, "index", index, "emb", emb)
    check_same_device(op, "label", label, "emb", emb)
    batch = emb.shape[0] if emb.dim() == 4 else 1
    if index.dim() != 2 or index.shape[0] != batch:
        raise ValueError(f"{op}: index must be (B, S) with B={batch} (the images of emb), "
                         f"got shape {tuple(index.shape)}")
    if label.shape != index.shape:
        raise ValueError(f"{op}: label must be shaped like index {tuple(index.shape)}, got {tuple(label.shape)}")
    return index.long(), label.long()


def check_loss_params(sigma, alpha, scale) -> Tuple[float, float, float]:
    """sigma finite > 0, alpha and scale finite; returned as floats."""
    op = "mmdl_losses"
    return check_sigma(op, sigma), check_real(op, "alpha", alpha), check_real(op, "scale", scale)


# ---------------------------------------------------------------- registration


def _fake_forward(emb, index, label, modes, sigma, alpha, scale, mean):
    acc, shape = accumulate_dtype(emb.dtype), () if mean else index.shape
    return emb.new_empty(shape, dtype=acc), emb.new_empty(shape, dtype=acc), index.new_empty((), dtype=torch.int64)


def _fake_backward(grad_triplet, grad_ce, emb, index, label, modes, sigma, alpha, scale, emb_requires_grad,
                   modes_requires_grad):
    if emb_requires_grad:
        channels_last = emb.dim() == 4 and emb.is_contiguous(memory_format=torch.channels_last) and not emb.is_contiguous()
        grad_emb = torch.empty_like(emb, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    else:
        grad_emb = emb.new_empty((0,))
    grad_modes = torch.empty_like(modes) if modes_requires_grad else modes.new_empty((0,))
    return grad_emb, grad_modes


def _fake_label_mode(emb, index, label, modes):
    return emb.new_empty(index.shape, dtype=torch.uint8)


def _register_autograd(op_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        emb, index, label, modes, sigma, alpha, scale, mean = inputs
        ctx.params = (sigma, alpha, scale)
        ctx.mark_non_differentiable(output[2])
        ctx.save_for_backward(emb, index, label, modes, output[2] if mean else None)

    def backward(ctx, grad_triplet, grad_ce, _grad_count):
        emb, index, label, modes, count = ctx.saved_tensors
        if grad_triplet is None or grad_ce is None:  # one loss unused: zeros for its gradient
            zeros = torch.zeros((), dtype=accumulate_dtype(emb.dtype), device=index.device)
            grad_triplet = zeros if grad_triplet is None else grad_triplet
            grad_ce = zeros if grad_ce is None else grad_ce
        if count is not None:  # the means: d mean / d sample = 1 / max(count, 1)
            divisor = count.clamp(min=1)
            grad_triplet, grad_ce = grad_triplet / divisor, grad_ce / divisor
        grad_emb, grad_modes = backward_op(
            grad_triplet, grad_ce, emb, index, label, modes, *ctx.params, ctx.needs_input_grad[0],
            ctx.needs_input_grad[3],
        )
        return (
            grad_emb if ctx.needs_input_grad[0] else None, None, None,
            grad_modes if ctx.needs_input_grad[3] else None, None, None, None, None,
        )

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    register_differentiable("mmdl_losses", _fake_forward, _fake_backward)  # autograd: csrc/autograd/
    torch.library.register_fake("drsl_fast::label_mode")(_fake_label_mode)


if triton_import_error() is None:
    from torch.library import triton_op, wrap_triton

    from ..triton_kernels import mmdl_losses as triton_kernels

    @triton_op("drsl_fast::mmdl_losses_triton", mutates_args=())
    def _mmdl_losses_triton(
        emb: Tensor, index: Tensor, label: Tensor, modes: Tensor, sigma: float, alpha: float, scale: float, mean: bool
    ) -> Tuple[Tensor, Tensor, Tensor]:
        check_triton_dtype("mmdl_losses", "emb", emb)
        triplet, ce, _ = _fake_forward(emb, index, label, modes, sigma, alpha, scale, False)
        if triplet.numel() > 0:
            triton_kernels.forward(
                emb, index.contiguous(), label.contiguous(), modes.float().contiguous(), triplet, ce,
                -posterior_scale(sigma, torch.float32), alpha, scale, launch=wrap_triton,
            )
        counted = valid_samples(index, label, pixel_rows(emb).shape[2], modes.shape[0])
        return loss_outputs(triplet, ce, counted, mean)

    @triton_op("drsl_fast::mmdl_losses_backward_triton", mutates_args=())
    def _mmdl_losses_backward_triton(
        grad_triplet: Tensor, grad_ce: Tensor, emb: Tensor, index: Tensor, label: Tensor, modes: Tensor,
        sigma: float, alpha: float, scale: float, emb_requires_grad: bool, modes_requires_grad: bool,
    ) -> Tuple[Tensor, Tensor]:
        check_triton_dtype("mmdl_losses", "emb", emb)
        grad_emb, grad_modes = _fake_backward(grad_triplet, grad_ce, emb, index, label, modes, sigma, alpha, scale,
                                              emb_requires_grad, modes_requires_grad)
        centres = modes.float().contiguous()
        index, label = index.contiguous(), label.contiguous()
        samples = index.numel()
        C, M, D = modes.shape
        rows = centres.new_empty((samples, D)) if emb_requires_grad else None
        partial = (centres.new_empty((triton_kernels.sample_blocks(samples), C, M, D))
                   if modes_requires_grad else None)
        if samples > 0 and (emb_requires_grad or modes_requires_grad):
            triton_kernels.backward(
                grad_triplet.float().expand(index.shape).contiguous(), grad_ce.float().expand(index.shape).contiguous(),
                emb, index, label, centres, rows, partial, -posterior_scale(sigma, torch.float32), alpha, scale,
                launch=wrap_triton,
            )
        if emb_requires_grad:
            grad_emb.zero_()
            if samples > 0:
                triton_kernels.scatter_rows(rows, index, label, C, grad_emb, launch=wrap_triton)
        if modes_requires_grad:
            grad_modes = partial.sum(0).to(modes.dtype)
        return grad_emb, grad_modes

    @triton_op("drsl_fast::label_mode_triton", mutates_args=())
    def _label_mode_triton(emb: Tensor, index: Tensor, label: Tensor, modes: Tensor) -> Tensor:
        check_triton_dtype("label_mode", "emb", emb)
        mode = _fake_label_mode(emb, index, label, modes)
        if mode.numel() > 0:
            triton_kernels.label_mode(
                emb, index.contiguous(), label.contiguous(), modes.float().contiguous(), mode, launch=wrap_triton
            )
        return mode

    # Explicit fake kernels: triton_op derives them by tracing, which the
    # Triton interpreter (CPU tensors) does not support.
    register_differentiable("mmdl_losses", _fake_forward, _fake_backward, _register_autograd, "_triton")
    _label_mode_triton.register_fake(_fake_label_mode)
