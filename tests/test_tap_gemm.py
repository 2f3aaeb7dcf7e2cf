"""drsl_fast.models.tap_gemm: the summed dilated 3x3 convolutions as one
matrix product (Eq. 1 of its docstring) against the convolutions
themselves, both shifted sums (the Triton kernels, in the interpreter
without a GPU, and fold), in float64, on maps smaller than, near and larger
than the dilations; gradients (and gradcheck); bf16 under autocast; bad
inputs; the Triton operators under opcheck and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

from drsl_fast.backends import why_unavailable
from drsl_fast.models.tap_gemm import summed_dilated_convs_as_gemm

DILATIONS = (6, 12, 18, 24)


def where(tap_sum):
    """The device a test of ``tap_sum`` runs on: the GPU for the Triton kernels
    when there is one (else the interpreter on the CPU), the CPU for fold."""
    return "cuda" if tap_sum == "triton" and torch.cuda.is_available() else "cpu"


def skip_unless_runs(tap_sum, device):
    reason = why_unavailable("triton", torch.device(device)) if tap_sum == "triton" else None
    if reason is not None:
        pytest.skip(reason)


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
@pytest.mark.parametrize("tap_sum", ["triton", "fold"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_same_function_and_gradients_as_the_convolutions(size, dilations, tap_sum, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    skip_unless_runs(tap_sum, device)
    x, weights, biases = inputs((2, 6, *size), 5, dilations, seed=sum(size), device=device)
    ref = convs(x, weights, biases, dilations)
    out = summed_dilated_convs_as_gemm(x, weights, biases, dilations, tap_sum)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(ref)
    params = [x, *weights, *biases]
    for got, want in zip(torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("tap_sum", ["triton", "fold"])
def test_any_layout_of_the_input(layout, tap_sum):
    skip_unless_runs(tap_sum, where(tap_sum))
    x, weights, biases = inputs((2, 6, 11, 13), 4, DILATIONS, device=where(tap_sum))
    ref = convs(x, weights, biases, DILATIONS)
    y = (x.detach().to(memory_format=torch.channels_last) if layout == "channels_last"
         else x.detach().repeat_interleave(2, dim=3)[..., ::2])
    torch.testing.assert_close(y, x.detach())
    torch.testing.assert_close(summed_dilated_convs_as_gemm(y, weights, biases, DILATIONS, tap_sum), ref,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tap_sum", ["triton", "fold"])
def test_gradcheck(tap_sum):
    skip_unless_runs(tap_sum, where(tap_sum))
    x, weights, biases = inputs((1, 3, 7, 9), 2, (1, 2, 4), device=where(tap_sum))

    def f(x, *params):
        return summed_dilated_convs_as_gemm(x, params[:3], params[3:], (1, 2, 4), tap_sum)

    # fast mode (random directions) for the kernels: the interpreter's launches are slow
    assert torch.autograd.gradcheck(f, (x, *weights, *biases), fast_mode=tap_sum == "triton")


@pytest.mark.parametrize("tap_sum", ["triton", "fold"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_bf16_under_autocast_is_near_the_convolutions_in_float32(tap_sum, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    skip_unless_runs(tap_sum, device)
    x, weights, biases = inputs((2, 16, 17, 19), 7, DILATIONS, dtype=torch.float32, device=device)
    ref = convs(x, weights, biases, DILATIONS)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = summed_dilated_convs_as_gemm(x, weights, biases, DILATIONS, tap_sum)
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
    with pytest.raises(ValueError, match="tap_sum must be one of"):
        summed_dilated_convs_as_gemm(x, weights, biases, (1, 2), "scatter")
    with pytest.raises(ValueError, match=r"biases \(3,\)"):
        summed_dilated_convs_as_gemm(x, weights, [biases[0], biases[1][:2]], (1, 2))
    with pytest.raises(ValueError, match=r"x \(B, 4, H, W\)"):
        summed_dilated_convs_as_gemm(x[:, :3], weights, biases, (1, 2))
    with pytest.raises(ValueError, match=r"x \(B, 4, H, W\)"):
        summed_dilated_convs_as_gemm(x[0], weights, biases, (1, 2))


def test_a_handful_of_operators_forward_and_backward(monkeypatch):
    """Host time per call is per operator on a GPU: the head must stay a few
    dozen calls (one kernel or one col2im per dilation, not a slice
    addition per tap; the convolutions themselves are 16)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    x, weights, biases = inputs((2, 8, 33, 33), 5, DILATIONS, dtype=torch.float32)
    if why_unavailable("triton", x.device) is None:
        # one launch each way, outside the dispatcher on a GPU; the interpreter's copies are not counted
        from drsl_fast.triton_kernels import tap_sum as kernels
        monkeypatch.setattr(kernels, "forward", lambda *args, **kwargs: None)
        monkeypatch.setattr(kernels, "backward", lambda *args, **kwargs: None)
    for tap_sum in [t for t in ("triton", "fold") if t == "fold" or why_unavailable(t, x.device) is None]:
        Count.calls = 0
        with Count():
            out = summed_dilated_convs_as_gemm(x, weights, biases, DILATIONS, tap_sum)
            torch.autograd.grad(out, [x, *weights, *biases], torch.ones_like(out))
        assert Count.calls <= 60, tap_sum


def test_auto_picks_the_kernel_only_on_a_gpu_and_a_forced_kernel_says_why_it_cannot_run(monkeypatch):
    from drsl_fast.models import tap_gemm

    assert tap_gemm.resolve_tap_sum("auto", torch.device("cpu")) == "fold"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="tap_sum='triton' cannot run on cpu: .*TRITON_INTERPRET"):
        tap_gemm.resolve_tap_sum("triton", torch.device("cpu"))


@pytest.mark.parametrize("tap_sum", ["triton", "fold"])
def test_an_empty_batch_gives_an_empty_sum_and_gradient(tap_sum):
    skip_unless_runs(tap_sum, where(tap_sum))
    from drsl_fast.models.tap_gemm import summed_taps

    taps = torch.randn(0, 2, 3, 9, 5, 4, dtype=torch.float64, device=where(tap_sum), requires_grad=True)
    out = summed_taps(taps, (1, 2), tap_sum)
    assert out.shape == (0, 3, 5, 4)
    (grad,) = torch.autograd.grad(out, taps, torch.ones_like(out))
    assert grad.shape == taps.shape


def test_more_planes_than_one_launch_holds(monkeypatch):
    """Batch x channels above the grid's 65535 planes per launch: launched in
    chunks (made small here), each plane summed once."""
    skip_unless_runs("triton", where("triton"))
    from drsl_fast.models.tap_gemm import summed_taps
    from drsl_fast.triton_kernels import tap_sum as kernels

    assert kernels._plane_chunks(70000) == [(0, 65535), (65535, 4465)]
    taps = torch.randn(3, 2, 5, 9, 6, 7, dtype=torch.float64, device=where("triton"), requires_grad=True)
    grad = torch.randn(3, 5, 6, 7, dtype=torch.float64, device=where("triton"))
    want = summed_taps(taps, (1, 3), "fold")
    (want_grad,) = torch.autograd.grad(want, taps, grad)
    original = kernels._plane_chunks
    monkeypatch.setattr(kernels, "_plane_chunks", lambda planes: original(planes, most=4))
    got = summed_taps(taps, (1, 3), "triton")
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, taps, grad)[0], want_grad, rtol=1e-12, atol=1e-12)


def test_second_derivatives_through_the_kernels_match_fold():
    """Each kernel is the other's adjoint, so the gradient of the gradient
    (with respect to the output's gradient) is the forward sum again."""
    skip_unless_runs("triton", where("triton"))
    from drsl_fast.models.tap_gemm import summed_taps

    generator = torch.Generator().manual_seed(6)
    taps = torch.randn(1, 2, 3, 9, 5, 4, generator=generator, dtype=torch.float64).to(where("triton"))
    grad_out = torch.randn(1, 3, 5, 4, generator=generator, dtype=torch.float64).to(where("triton"))
    weights = torch.randn(taps.shape, generator=generator, dtype=torch.float64).to(where("triton"))
    results = []
    for tap_sum in ("triton", "fold"):
        t, g = taps.clone().requires_grad_(), grad_out.clone().requires_grad_()
        (grad_taps,) = torch.autograd.grad(summed_taps(t, (1, 2), tap_sum), t, g, create_graph=True)
        results.append(torch.autograd.grad((grad_taps * weights).sum(), g)[0])
    torch.testing.assert_close(results[0], results[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(results[0], summed_taps(weights, (1, 2), "fold"), rtol=1e-12, atol=1e-12)
    t, g = taps.clone().requires_grad_(), grad_out.clone().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda x: summed_taps(x, (1, 2), "triton"), (t,), (g,), fast_mode=True)


def test_taps_of_another_shape_or_dtype_are_refused():
    skip_unless_runs("triton", where("triton"))
    from drsl_fast.models.tap_gemm import summed_taps

    taps = torch.randn(1, 2, 3, 9, 5, 4, dtype=torch.float64, device=where("triton"))
    for tap_sum in ("triton", "fold"):
        with pytest.raises(ValueError, match=r"taps \(B, 3, C, 9, H, W\) for 3 dilations, got \(1, 2, 3, 9, 5, 4\)"):
            summed_taps(taps, (1, 2, 3), tap_sum)
        with pytest.raises(ValueError, match=r"taps \(B, 2, C, 9, H, W\)"):
            summed_taps(taps[:, :, :, :8], (1, 2), tap_sum)
        with pytest.raises(TypeError, match="taps must be floating point, got torch.int64"):
            summed_taps(taps.long(), (1, 2), tap_sum)
    with pytest.raises(ValueError, match=r"tap_sum_triton: taps \(B, 1, C, 9, H, W\) for 1 dilations"):
        torch.ops.drsl_fast.tap_sum_triton(taps, [1])
    with pytest.raises(ValueError, match=r"tap_sum_backward_triton: grad_out a floating \(B, C, H, W\) tensor"):
        torch.ops.drsl_fast.tap_sum_backward_triton(taps, [1, 2])


def test_opcheck_triton_operators():
    skip_unless_runs("triton", where("triton"))
    generator = torch.Generator().manual_seed(5)
    taps = torch.randn(2, 2, 3, 9, 5, 7, generator=generator, dtype=torch.float64).to(where("triton"))
    grad = torch.randn(2, 3, 5, 7, generator=generator, dtype=torch.float64).to(where("triton"))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.drsl_fast.tap_sum_triton.default, (taps.requires_grad_(), [1, 3]),
                          test_utils=utils)
    torch.library.opcheck(torch.ops.drsl_fast.tap_sum_backward_triton.default, (grad, [1, 3]), test_utils=utils)


@pytest.mark.parametrize("tap_sum", ["triton", "fold"])
def test_torch_compile_fullgraph(tap_sum):
    device = where(tap_sum)
    skip_unless_runs(tap_sum, device)
    if tap_sum == "triton" and device == "cpu":
        pytest.skip("torch.compile traces triton_op bodies, which the Triton CPU interpreter cannot run")
    x, weights, biases = inputs((2, 6, 13, 11), 5, DILATIONS, dtype=torch.float32, device=device)

    def loss_fn(*params):
        return (summed_dilated_convs_as_gemm(params[0], params[1:5], params[5:], DILATIONS, tap_sum) ** 2).sum()

    params = [x, *weights, *biases]
    eager = torch.autograd.grad(loss_fn(*params), params)
    traced = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(*params), params)
    for got, want in zip(traced, eager):
        torch.testing.assert_close(got, want)
