"""drsl_fast.models.tap_gemm: the summed dilated 3x3 convolutions as one
matrix product (Eq. 1 of its docstring) against the convolutions
themselves, in float64, on maps smaller than, near and larger than the
dilations; gradients (and gradcheck); bf16 under autocast; bad inputs."""
import pytest
import torch
import torch.nn.functional as F

from drsl_fast.models.tap_gemm import summed_dilated_convs_as_gemm

DILATIONS = (6, 12, 18, 24)


def convs(x, weights, biases, dilations):
    out = None
    for w, b, d in zip(weights, biases, dilations):
        y = F.conv2d(x, w, b, padding=d, dilation=d)
        out = y if out is None else out + y
    return out


def inputs(shape, channels, dilations, dtype=torch.float64, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)

    def draw(*size):
        return torch.randn(*size, generator=generator, dtype=dtype).to(device).requires_grad_()

    return draw(*shape), [draw(channels, shape[1], 3, 3) for _ in dilations], [draw(channels) for _ in dilations]


@pytest.mark.parametrize("size", [(1, 1), (5, 7), (6, 6), (13, 30), (25, 24), (65, 65)])
@pytest.mark.parametrize("dilations", [DILATIONS, (1,), (2, 2), (1, 3)])
@pytest.mark.parametrize("product", ["conv", "matmul"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_same_function_and_gradients_as_the_convolutions(size, dilations, product, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    x, weights, biases = inputs((2, 6, *size), 5, dilations, seed=sum(size), device=device)
    ref = convs(x, weights, biases, dilations)
    out = summed_dilated_convs_as_gemm(x, weights, biases, dilations, product)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    params = [x, *weights, *biases]
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_any_layout_of_the_input(layout):
    x, weights, biases = inputs((2, 6, 11, 13), 4, DILATIONS)
    ref = convs(x, weights, biases, DILATIONS)
    y = (x.detach().to(memory_format=torch.channels_last) if layout == "channels_last"
         else x.detach().repeat_interleave(2, dim=3)[..., ::2])
    torch.testing.assert_close(y, x.detach())
    torch.testing.assert_close(summed_dilated_convs_as_gemm(y, weights, biases, DILATIONS), ref,
                               rtol=1e-12, atol=1e-12)


def test_gradcheck():
    x, weights, biases = inputs((1, 3, 7, 9), 2, (1, 2, 4))

    def f(x, *params):
        return summed_dilated_convs_as_gemm(x, params[:3], params[3:], (1, 2, 4))

    assert torch.autograd.gradcheck(f, (x, *weights, *biases))


@pytest.mark.parametrize("product", ["conv", "matmul"])
def test_bf16_under_autocast_is_near_the_convolutions_in_float32(product):
    x, weights, biases = inputs((2, 16, 17, 19), 7, DILATIONS, dtype=torch.float32)
    ref = convs(x, weights, biases, DILATIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = summed_dilated_convs_as_gemm(x, weights, biases, DILATIONS, product)
    assert out.dtype == torch.bfloat16
    assert ((out.float() - ref).abs().max() / ref.abs().max()) < 2e-2  # bf16 inputs: 8 bits of mantissa
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in (x, *weights, *biases))


def test_bad_inputs_are_refused():
    x, weights, biases = inputs((1, 4, 9, 9), 3, (1, 2))
    with pytest.raises(ValueError, match="one weight and one bias per dilation"):
        summed_dilated_convs_as_gemm(x, weights, biases[:1], (1, 2))
    with pytest.raises(ValueError, match="one weight and one bias per dilation"):
        summed_dilated_convs_as_gemm(x, [], [], ())
    with pytest.raises(ValueError, match="3x3 filters of one shape"):
        summed_dilated_convs_as_gemm(x, [weights[0], weights[1][:2]], biases, (1, 2))
    with pytest.raises(ValueError, match="3x3 filters of one shape"):
        summed_dilated_convs_as_gemm(x, [w[..., :2, :2] for w in weights], biases, (1, 2))
    with pytest.raises(ValueError, match="product must be one of"):
        summed_dilated_convs_as_gemm(x, weights, biases, (1, 2), "einsum")
    with pytest.raises(ValueError, match=r"biases \(3,\)"):
        summed_dilated_convs_as_gemm(x, weights, [biases[0], biases[1][:2]], (1, 2))
    with pytest.raises(ValueError, match=r"x \(B, 4, H, W\)"):
        summed_dilated_convs_as_gemm(x[:, :3], weights, biases, (1, 2))
    with pytest.raises(ValueError, match=r"x \(B, 4, H, W\)"):
        summed_dilated_convs_as_gemm(x[0], weights, biases, (1, 2))


def test_a_handful_of_operators_forward_and_backward():
    """Host time per call is per operator on a GPU: the head must stay a few
    dozen calls (col2im per dilation, not a slice addition per tap; the
    convolutions themselves are 16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    x, weights, biases = inputs((2, 8, 33, 33), 5, DILATIONS, dtype=torch.float32)
    for product in ("conv", "matmul"):
        Count.calls = 0
        with Count():
            out = summed_dilated_convs_as_gemm(x, weights, biases, DILATIONS, product)
            torch.autograd.grad(out, [x, *weights, *biases], torch.ones_like(out))
        assert Count.calls <= 60, product
