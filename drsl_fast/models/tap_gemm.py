"""Summed dilated 3x3 convolutions (DeepLab-v2's classifier, docs/method.md §2)
computed as one matrix product and a shifted sum of its taps.

With the filters W_d of the convolution at dilation d (padding d), the
summed output at pixel p is

    out(p) = sum_d b_d + sum_d sum_{i,j in {0,1,2}} W_d[:, :, i, j] x(p + d (i - 1, j - 1)),

x read as zero outside the map. Each term is a 1x1 convolution of x by one
tap's filter, read at an offset: with Y_{d,ij} = W_d[:, :, i, j] x,

    out(p) = sum_d b_d + sum_d sum_{i,j} Y_{d,ij}(p + d (i - 1, j - 1)).      (1)

Y = [W_d[:, :, i, j]]_{d,i,j} x is one product of a (36 C) x Cin matrix by
the Cin x (H W) map, a shape that matrix units run well (36 x 83 rows in a
DRSL+ step), where the convolutions themselves are products with few output
channels (19 or 83) that run at a few tens of TFLOP/s on an H200
(bench/bench_head_convs.py). The product computes every tap at every pixel,
as the convolutions do at the padded positions too: equal FLOPs. It runs as
a 1x1 convolution, so fp32 gets the tensor-core precision the 3x3
convolutions get (torch.backends.cudnn.allow_tf32).

The shifted sum of (1) runs one of two ways (``tap_sum``):

- ``"triton"``: one kernel reads every tap at its offset and sums
  (drsl_fast/triton_kernels/tap_sum.py); its gradient is one kernel that
  copies the output's gradient to each tap at minus the offset. Both are
  bound by memory: one pass over Y. They run as the operators
  ``drsl_fast::tap_sum_triton`` and ``drsl_fast::tap_sum_backward_triton``
  (``torch.library``, with fake kernels, so ``torch.compile`` traces them).
- ``"fold"``: the inner sum for one d is col2im (torch's fold, the adjoint
  of the im2col that a convolution's lowering reads its input with): fold
  sums cols[(i,j)](p - d (i - 1, j - 1)) over the taps, so reading the taps
  in reverse order, cols[(i,j)] = Y_{d,(2-i)(2-j)}, gives the + of (1). Its
  gradient is im2col of the output's gradient (autograd's unfold). Any
  device; on an H200 torch's col2im runs far from the memory bound
  (bench/NOTES.md, eleventh run).

Both read Y with its rows ordered (d, c, tap), taps reversed.
"""
import contextlib
from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..backends import triton_import_error, why_unavailable
from ..ops.registration import register_differentiable

TAP_SUMS = ("auto", "triton", "fold")


def _on(device: torch.device):
    """Triton launches on the current GPU: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _fake_tap_sum(y: Tensor, dilations: List[int]) -> Tensor:
    return y.new_empty(y.shape[0], y.shape[2], *y.shape[-2:])


def _fake_tap_sum_backward(grad_out: Tensor, dilations: List[int]) -> Tensor:
    batch, channels, h, w = grad_out.shape
    return grad_out.new_empty(batch, len(dilations), channels, 9, h, w)


def _check_taps(taps: Tensor, dilations: Sequence[int], caller: str) -> None:
    if taps.dim() != 6 or taps.shape[3] != 9 or taps.shape[1] != len(dilations):
        raise ValueError(f"{caller}: taps (B, {len(dilations)}, C, 9, H, W) for {len(dilations)} dilations, "
                         f"got {tuple(taps.shape)}")
    if not taps.is_floating_point():
        raise TypeError(f"{caller}: taps must be floating point, got {taps.dtype}")


def _register_autograd(op_name: str, backward_op) -> None:
    """Both operators are linear, each the adjoint of the other, so each one's
    gradient is the other: differentiable to any order."""
    def setup_context(ctx, inputs, output):
        ctx.dilations = inputs[1]

    def forward_gradient(ctx, grad_out):
        return backward_op(grad_out, ctx.dilations), None

    def backward_gradient(ctx, grad_grad_y):
        return torch.ops.drsl_fast.tap_sum_triton(grad_grad_y, ctx.dilations), None

    torch.library.register_autograd(op_name, forward_gradient, setup_context=setup_context)
    torch.library.register_autograd("drsl_fast::tap_sum_backward_triton", backward_gradient,
                                    setup_context=setup_context)


if triton_import_error() is None:
    from torch.library import triton_op, wrap_triton

    from ..triton_kernels import tap_sum as triton_kernels

    def _launched(launcher, source: Tensor, dilations: List[int], out: Tensor) -> Tensor:
        """``out``, filled by ``launcher`` (a tap_sum launcher) from the
        contiguous ``source`` on the tensors' GPU; no launch when empty."""
        if out.numel() > 0:
            with _on(out.device):
                launcher(source, dilations, out, launch=wrap_triton)
        return out

    @triton_op("drsl_fast::tap_sum_triton", mutates_args=())
    def _tap_sum_triton(y: Tensor, dilations: List[int]) -> Tensor:
        """The inner sums of Eq. (1) over taps and dilations: Y (B, D, C, 9,
        H, W) -> (B, C, H, W). Its gradient is drsl_fast::tap_sum_backward_triton,
        whose gradient is this operator again. The first call compiles the
        kernels: under CUDA graphs, make it before capturing."""
        _check_taps(y, dilations, "tap_sum_triton")
        return _launched(triton_kernels.forward, y.contiguous(), dilations, _fake_tap_sum(y, dilations))

    @triton_op("drsl_fast::tap_sum_backward_triton", mutates_args=())
    def _tap_sum_backward_triton(grad_out: Tensor, dilations: List[int]) -> Tensor:
        """The gradient of Eq. (1): each tap is the output's gradient read at minus its offset."""
        if grad_out.dim() != 4 or not grad_out.is_floating_point():
            raise ValueError(f"tap_sum_backward_triton: grad_out a floating (B, C, H, W) tensor, got "
                             f"{grad_out.dtype} {tuple(grad_out.shape)}")
        return _launched(triton_kernels.backward, grad_out.contiguous(), dilations,
                         _fake_tap_sum_backward(grad_out, dilations))

    # Explicit fake kernels: triton_op derives them by tracing, which the
    # Triton interpreter (CPU tensors) does not support.
    register_differentiable("tap_sum", _fake_tap_sum, _fake_tap_sum_backward, _register_autograd, "_triton")


def resolve_tap_sum(tap_sum: str, device: torch.device) -> str:
    """The shifted sum ``tap_sum`` names on ``device`` ("auto" resolved); raises where it cannot run."""
    if tap_sum not in TAP_SUMS:
        raise ValueError(f"summed_dilated_convs_as_gemm: tap_sum must be one of {TAP_SUMS}, got {tap_sum!r}")
    if tap_sum == "auto":
        return "triton" if device.type == "cuda" and why_unavailable("triton", device) is None else "fold"
    if tap_sum == "triton":
        reason = why_unavailable("triton", device)
        if reason is not None:
            raise RuntimeError(f"summed_dilated_convs_as_gemm: tap_sum='triton' cannot run on {device}: {reason}")
    return tap_sum


def summed_dilated_convs_as_gemm(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Tensor],
                                 dilations: Sequence[int], tap_sum: str = "auto") -> Tensor:
    """sum_d conv2d(x, weights[d], biases[d], padding=d, dilation=d), Eq. (1):
    one product of x by every tap's filter (a 1x1 convolution), then the
    shifted sum of the taps. weights: (C, Cin, 3, 3) each; biases: (C,) each;
    x: (B, Cin, H, W). ``tap_sum``: "triton" (one kernel each way, GPUs of
    compute capability >= 8.0), "fold" (one col2im per dilation, any device),
    or "auto": triton where it runs on a GPU, else fold."""
    method = resolve_tap_sum(tap_sum, x.device)
    if not weights or not (len(weights) == len(biases) == len(dilations)):
        raise ValueError("summed_dilated_convs_as_gemm: one weight and one bias per dilation")
    if any(w.dim() != 4 or w.shape != weights[0].shape or w.shape[-2:] != (3, 3) for w in weights):
        raise ValueError(f"summed_dilated_convs_as_gemm: 3x3 filters of one shape, got {[tuple(w.shape) for w in weights]}")
    if any(b.shape != weights[0].shape[:1] for b in biases):
        raise ValueError(f"summed_dilated_convs_as_gemm: biases ({weights[0].shape[0]},), got {[tuple(b.shape) for b in biases]}")
    if x.dim() != 4 or x.shape[1] != weights[0].shape[1]:
        raise ValueError(f"summed_dilated_convs_as_gemm: x (B, {weights[0].shape[1]}, H, W), got {tuple(x.shape)}")
    channels, in_channels = weights[0].shape[:2]
    batch, _, h, w = x.shape
    # rows ordered (d, c, tap), taps reversed
    filters = torch.stack(list(weights)).flip(-2, -1).permute(0, 1, 3, 4, 2).reshape(-1, in_channels)
    y = F.conv2d(x, filters[:, :, None, None])
    taps = y.reshape(batch, len(dilations), channels, 9, h, w)
    return _summed_taps(taps, dilations, method) + torch.stack(list(biases)).sum(0).to(y.dtype)[:, None, None]


def summed_taps(taps: Tensor, dilations: Sequence[int], tap_sum: str = "auto") -> Tensor:
    """The shifted sum of Eq. (1) without the biases: ``taps`` (B, D, C, 9, H, W),
    row r of dilation k the tap (2 - r // 3, 2 - r % 3) of W_k -> (B, C, H, W)."""
    method = resolve_tap_sum(tap_sum, taps.device)
    _check_taps(taps, dilations, "summed_taps")
    return _summed_taps(taps, dilations, method)


def _summed_taps(taps: Tensor, dilations: Sequence[int], method: str) -> Tensor:
    """:func:`summed_taps` with ``method`` resolved ("triton" or "fold") and the taps' shape checked."""
    if method == "triton":
        return torch.ops.drsl_fast.tap_sum_triton(taps, list(dilations))
    batch, _, channels, _, h, w = taps.shape
    out = None
    for cols, d in zip(taps.reshape(batch, len(dilations), channels * 9, h * w).unbind(1), dilations):
        y = F.fold(cols, (h, w), 3, dilation=d, padding=d)
        out = y if out is None else out + y
    return out
