"""Edge-case rules of the Triton kernels, the same as kernels/nan_rules.h for
the C++ CPU and CUDA kernels, so that every backend gives the reference's
(PyTorch's) answers:

- a running minimum or maximum propagates NaN and keeps the first NaN, as
  torch.min / argmin / max / argmax do (ties keep the first);
- the class posterior exp(dmin * scale), scale = -1 / (2 sigma^2), is 1 where
  dmin = 0 for every sigma, also when the scale overflowed to -inf;
- relu keeps NaN.
"""
import triton
import triton.language as tl


@triton.jit
def replaces_min(candidate, best):
    return (candidate < best) | ((candidate != candidate) & (best == best))


@triton.jit
def replaces_max(candidate, best):
    return (candidate > best) | ((candidate != candidate) & (best == best))


@triton.jit
def posterior_exponent(dmin, scale):
    return tl.where(dmin == 0, 0.0, dmin * scale)


@triton.jit
def relu_keep_nan(value):
    return tl.where((value > 0) | (value != value), value, 0.0)
