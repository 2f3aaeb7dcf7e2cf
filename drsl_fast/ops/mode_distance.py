"""Per-pixel mode distance and max-over-modes class posterior (docs/method.md §3, §10).

Replaces ``((e[:, None] - R[None]) ** 2).sum(-1)`` followed by a max over modes:
the fast backends read (B, D, H, W) embeddings in place (no permute copy), never
build the (N, C, M, D) difference tensor, and save only the winning mode index
``mstar`` (uint8, (N, C)) for backward, which flows through the winning mode
only. The mode gradient is summed over fixed pixel chunks in a fixed order, so
it is deterministic on every backend.

Operators (``torch.library``, traceable by ``torch.compile``):
  drsl_fast::mode_distance / mode_distance_backward          C++ CPU and CUDA
  drsl_fast::mode_distance_triton / mode_distance_backward_triton   Triton
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _extension, reference
from ..backends import resolve, triton_import_error
from ..reference import accumulate_dtype, posterior_scale
from .registration import register_differentiable
from .validation import check_dim, check_float_tensor, check_real, check_same_device

MAX_MODES = 16


class ModeDistance(NamedTuple):
    """dmin and mstar shaped (B, C, H, W) or (N, C); posterior likewise, or None."""

    dmin: Tensor
    mstar: Tensor
    posterior: Optional[Tensor]


def mode_distance(
    emb: Tensor, modes: Tensor, sigma: Optional[float] = None, *, backend: Optional[str] = None
) -> ModeDistance:
    """docs/method.md §3: ``dmin[c] = min_m ||e - r[c, m]||^2``, ``mstar[c]`` its
    argmin (ties: lowest m), and with ``sigma`` the class posterior
    ``P[c] = exp(-dmin[c] / (2 sigma^2))``, fused.

    Args:
        emb: embeddings (B, D, H, W) (contiguous or channels-last, read in
            place) or (N, D); float16, bfloat16, float32 or float64.
        modes: mode centres R viewed as (C, M, D), M <= 16.
        sigma: posterior width (docs/method.md §3: 0.5), a finite number > 0; None
            skips the posterior.
        backend: 'auto' (default), 'reference', 'cpu', 'cuda' or 'triton'
            (fp32 computation; float64 inputs raise TypeError there);
            see :mod:`drsl_fast.backends`.

    Returns:
        :class:`ModeDistance` with fp32 dmin/posterior (fp64 for fp64 input)
        and uint8 mstar. Differentiable in emb and modes.

    Every backend gives the reference's answer on edge cases:

    - NaN propagates as in ``torch.min``: a NaN embedding makes its pixel's
      dmin and posterior NaN for every class (mstar 0); a NaN in mode m of
      class c makes dmin[c] NaN with mstar[c] = the first such m. (Gradients
      are then NaN or inf at that pixel and its winning modes, but which
      other entries they reach differs between backends.)
    - The posterior is 1 where dmin = 0, for every sigma > 0 (the limit), also
      when ``1 / (2 sigma^2)`` overflows fp32 (sigma < ~4e-20; the posterior
      is then 0 wherever dmin > 0).
    - Empty inputs (B, H, W or N = 0) give empty outputs; D = 0 gives dmin = 0.
    - Anything else (wrong types, dtypes, shapes or devices; sigma NaN, inf,
      <= 0 or not a number) raises TypeError or ValueError naming the argument.
    """
    sigma = check_inputs(emb, modes, sigma)
    name = resolve(backend, emb.device)
    if name == "reference":
        return ModeDistance(*reference.mode_distance(emb, modes, sigma))
    op = torch.ops.drsl_fast.mode_distance_triton if name == "triton" else torch.ops.drsl_fast.mode_distance
    dmin, mstar, posterior = op(emb, modes, sigma)
    return ModeDistance(dmin, mstar, posterior if sigma is not None else None)


def mode_posterior(emb: Tensor, modes: Tensor, sigma: float = 0.5, *, backend: Optional[str] = None) -> Tensor:
    """docs/method.md §3 class posterior ``P[c] = max_m exp(-||e - r[c, m]||^2 / (2 sigma^2))``;
    validation and edge cases as in :func:`mode_distance` (sigma is required)."""
    check_emb_and_modes("mode_posterior", emb, modes)
    sigma = check_sigma("mode_posterior", sigma)
    return mode_distance(emb, modes, sigma, backend=backend).posterior


def check_inputs(emb: Tensor, modes: Tensor, sigma: Optional[float]) -> Optional[float]:
    """The validation of :func:`mode_distance`; returns sigma as a float (or None)."""
    check_emb_and_modes("mode_distance", emb, modes)
    return None if sigma is None else check_sigma("mode_distance", sigma)


def check_emb_and_modes(op: str, emb: Tensor, modes: Tensor) -> None:
    """emb (B, D, H, W) or (N, D) and modes (C, M, D), floating point, on
    one device, with the same D, C >= 1 and 1 <= M <= 16."""
    check_float_tensor(op, "emb", emb)
    check_float_tensor(op, "modes", modes)
    check_dim(op, "emb", emb, (2, 4), "(B, D, H, W) or (N, D)")
    check_dim(op, "modes", modes, (3,), "(C, M, D)")
    check_same_device(op, "emb", emb, "modes", modes)
    if emb.shape[1] != modes.shape[2]:
        raise ValueError(f"{op}: emb has D={emb.shape[1]} channels (dim 1) but modes have D={modes.shape[2]} (dim 2); "
                         f"they must match")
    if modes.shape[0] < 1 or not 1 <= modes.shape[1] <= MAX_MODES:
        raise ValueError(f"{op}: modes must have C >= 1 and 1 <= M <= {MAX_MODES}, got shape {tuple(modes.shape)}")


def check_sigma(op: str, sigma) -> float:
    """sigma: a finite real number > 0 (tiny values are fine, see
    :func:`drsl_fast.reference.class_posterior`)."""
    return check_real(op, "sigma", sigma, positive=True)


def check_triton_dtype(op: str, name: str, value: Tensor) -> None:
    """The Triton kernels compute in fp32 and refuse float64 inputs."""
    if value.dtype == torch.float64:
        raise TypeError(f"{op}: {name} is float64 and the triton backend computes in fp32; "
                        f"use backend 'cpu' or 'cuda' for float64")


# ---------------------------------------------------------------- registration


def _per_class_shape(emb: Tensor, C: int) -> Tuple[int, ...]:
    return (emb.shape[0], C) if emb.dim() == 2 else (emb.shape[0], C, emb.shape[2], emb.shape[3])


def empty_like_pixel_viewable(emb: Tensor) -> Tensor:
    """Like emb, contiguous or channels-last (mirrors csrc/host.h)."""
    if emb.dim() == 2:
        return torch.empty_like(emb)
    channels_last = emb.is_contiguous(memory_format=torch.channels_last) and not emb.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty_like(emb, memory_format=fmt)


def _fake_forward(emb: Tensor, modes: Tensor, sigma: Optional[float]):
    shape = _per_class_shape(emb, modes.shape[0])
    acc = accumulate_dtype(emb.dtype)
    return (
        emb.new_empty(shape, dtype=acc),
        emb.new_empty(shape, dtype=torch.uint8),
        emb.new_empty(shape if sigma is not None else (0,), dtype=acc),
    )


def _fake_backward(grad_dmin, emb, modes, mstar, emb_requires_grad: bool, modes_requires_grad: bool):
    grad_emb = empty_like_pixel_viewable(emb) if emb_requires_grad else emb.new_empty((0,))
    grad_modes = torch.empty_like(modes) if modes_requires_grad else modes.new_empty((0,))
    return grad_emb, grad_modes


def _register_autograd(op_name: str, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        emb, modes, sigma = inputs
        _, mstar, posterior = output
        ctx.sigma = sigma
        ctx.save_for_backward(emb, modes, mstar, posterior)

    def backward(ctx, grad_dmin, grad_mstar, grad_posterior):
        emb, modes, mstar, posterior = ctx.saved_tensors
        grad = grad_dmin
        if ctx.sigma is not None and grad_posterior is not None:
            # P = exp(-dmin / (2 sigma^2))  =>  dP/ddmin = -P / (2 sigma^2)
            through_posterior = grad_posterior * posterior * posterior_scale(ctx.sigma, posterior.dtype)
            grad = through_posterior if grad is None else grad + through_posterior
        if grad is None:
            grad = torch.zeros(mstar.shape, dtype=posterior.dtype, device=mstar.device)
        grad_emb, grad_modes = backward_op(
            grad, emb, modes, mstar, ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        )
        return (
            grad_emb if ctx.needs_input_grad[0] else None,
            grad_modes if ctx.needs_input_grad[1] else None,
            None,
        )

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)


if _extension.has_cpu_kernels():
    register_differentiable("mode_distance", _fake_forward, _fake_backward)  # autograd: csrc/autograd/


if triton_import_error() is None:
    from torch.library import triton_op, wrap_triton

    from ..triton_kernels import mode_distance as triton_kernels

    @triton_op("drsl_fast::mode_distance_triton", mutates_args=())
    def _mode_distance_triton(emb: Tensor, modes: Tensor, sigma: Optional[float]) -> Tuple[Tensor, Tensor, Tensor]:
        check_triton_dtype("mode_distance", "emb", emb)
        dmin, mstar, posterior = _fake_forward(emb, modes, sigma)
        scale = 0.0 if sigma is None else posterior_scale(sigma, torch.float32)
        if dmin.numel() > 0:
            triton_kernels.forward(
                emb, modes.float().contiguous(), dmin, mstar, posterior if sigma is not None else None, scale,
                launch=wrap_triton,
            )
        return dmin, mstar, posterior

    @triton_op("drsl_fast::mode_distance_backward_triton", mutates_args=())
    def _mode_distance_backward_triton(
        grad_dmin: Tensor, emb: Tensor, modes: Tensor, mstar: Tensor, emb_requires_grad: bool,
        modes_requires_grad: bool,
    ) -> Tuple[Tensor, Tensor]:
        grad_emb, grad_modes = _fake_backward(grad_dmin, emb, modes, mstar, emb_requires_grad, modes_requires_grad)
        pixels = emb.shape[0] if emb.dim() == 2 else emb.shape[2] * emb.shape[3]
        batch = 1 if emb.dim() == 2 else emb.shape[0]
        chunks = triton_kernels.mode_grad_chunks(pixels)
        partial = (modes.new_empty((batch * chunks,) + tuple(modes.shape), dtype=torch.float32)
                   if modes_requires_grad else None)
        if pixels * batch > 0 and (emb_requires_grad or modes_requires_grad):
            triton_kernels.backward(
                grad_dmin.float().contiguous(), mstar.contiguous(), emb, modes.float().contiguous(),
                grad_emb if emb_requires_grad else None, partial, launch=wrap_triton,
            )
        if modes_requires_grad:
            grad_modes = partial.sum(0).to(modes.dtype)
        return grad_emb, grad_modes

    # Explicit fake kernels: triton_op derives them by tracing, which the
    # Triton interpreter (CPU tensors) does not support.
    register_differentiable("mode_distance", _fake_forward, _fake_backward, _register_autograd, "_triton")
