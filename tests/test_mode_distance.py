"""The mode-distance op (docs/method.md §3) on every backend available here, against
the float64 reference and an independent formulation."""
import subprocess
import sys

import pytest
import torch

import drsl_fast
from conftest import EMULATED, backend_under_test
from drsl_fast import reference
from drsl_fast.backends import CUDA_KERNEL_VARIANTS, BackendUnavailableError, why_unavailable

SIGMA = 0.5


@pytest.fixture(params=["cpu", "cuda", *CUDA_KERNEL_VARIANTS, "triton", *EMULATED])
def fast_backend(request, monkeypatch):
    """Each fast backend available here, with the device it runs on. "cuda"
    runs the fp32 kernels, the ones older GPUs such as the GTX 1080 Ti run; on
    GPUs of compute capability >= 8.0, "cuda-tc-backward" runs the tensor-core
    backward (DRSL_FAST_TENSOR_CORE_BACKWARD=1) and "cuda-tc-forward" the
    tensor-core forward (DRSL_FAST_TENSOR_CORE_FORWARD=1), each with the fp32
    kernel for the other half: all three are tested there. Everywhere,
    "cuda-emulated" and "cuda-tc-emulated" run the fp32 and the tensor-core
    kernel sets on the CPU, in place of the CPU kernels (tests/cuda_on_cpu):
    their logic is checked without a GPU."""
    name = request.param
    if name in CUDA_KERNEL_VARIANTS:
        if not torch.cuda.is_available():
            pytest.skip(f"{name}: no GPU here")
        if torch.cuda.get_device_capability()[0] < 8:
            pytest.skip(f"{name}: no GPU with tensor cores here")
        monkeypatch.setenv(CUDA_KERNEL_VARIANTS[name], "1")
        name = "cuda"
    yield from backend_under_test(request, name)

# name -> (embedding factory(generator, dtype), C, M)
SHAPES = {
    "bdhw": (lambda g, dt: torch.randn(2, 5, 7, 9, generator=g).to(dt), 3, 2),
    "bdhw_channels_last": (
        lambda g, dt: torch.randn(2, 16, 5, 6, generator=g).to(dt).contiguous(memory_format=torch.channels_last), 19, 3),
    "bdhw_strided": (lambda g, dt: torch.randn(1, 6, 9, 11, generator=g).to(dt)[:, :, ::2, 1:], 4, 3),
    "nd": (lambda g, dt: torch.randn(37, 8, generator=g).to(dt), 4, 1),
    "nd_transposed": (lambda g, dt: torch.randn(8, 37, generator=g).to(dt).t(), 2, 5),
    "max_modes_one_channel": (lambda g, dt: torch.randn(3, 1, 2, 5, generator=g).to(dt), 2, 16),
    # more modes than one product of the Triton kernels takes: several passes
    "many_classes": (lambda g, dt: torch.randn(1, 6, 5, 7, generator=g).to(dt), 23, 5),
    # more channels than one staging step of the GPU kernels and more pixels than one
    # mode-gradient chunk, neither a whole number of them
    "wide_many_pixels": (lambda g, dt: torch.randn(2, 70, 19, 23, generator=g).to(dt), 19, 3),
    # mode rows past the 48 KiB that the CUDA dL/de kernel stages in shared
    # memory (40 x 4 rows of 81 floats): it reads them from global memory
    "modes_beyond_shared": (lambda g, dt: torch.randn(1, 80, 3, 5, generator=g).to(dt), 40, 4),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def make_case(name, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    factory, C, M = SHAPES[name]
    emb = factory(g, dtype).to(device)
    modes = (torch.randn(C, M, emb.shape[1], generator=g) * 0.7).to(dtype).to(device)
    return emb, modes


def skip_unsupported(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend computes in fp32")


def as_rows(t):
    """Per-class output (B, C, H, W) or (N, C) as (N, C)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]) if t.dim() == 4 else t


def independent_distances(emb, modes):
    """All squared distances (N, C, M) in float64 via torch.cdist (no broadcasting
    of the difference tensor): an independent formulation of docs/method.md §3."""
    x = emb.detach().double().cpu()
    x = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]) if x.dim() == 4 else x
    C, M, D = modes.shape
    d = torch.cdist(x, modes.detach().double().cpu().reshape(C * M, D),
                    compute_mode="donot_use_mm_for_euclid_dist") ** 2
    return d.reshape(-1, C, M)


def tolerance(dtype):
    """Absolute/relative tolerance on distances computed from the same stored
    inputs: only the accumulation differs (fp32, or fp64 for fp64 input)."""
    return (1e-11, 1e-11) if dtype == torch.float64 else (2e-5, 2e-5)


def assert_forward_close(result, emb, modes, sigma):
    dist = independent_distances(emb, modes)  # (N, C, M)
    atol, rtol = tolerance(emb.dtype)
    expected_dmin = dist.min(-1).values
    dmin, mstar = as_rows(result.dmin).cpu().double(), as_rows(result.mstar).cpu().long()
    torch.testing.assert_close(dmin, expected_dmin, atol=atol, rtol=rtol)
    # The chosen mode must be a minimiser (up to rounding, for near-ties).
    chosen = dist.gather(-1, mstar.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(chosen, expected_dmin, atol=atol, rtol=rtol)
    if sigma is None:
        assert result.posterior is None
    else:
        expected_post = torch.exp(-expected_dmin / (2 * sigma**2))
        torch.testing.assert_close(as_rows(result.posterior).cpu().double(), expected_post, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_reference_matches_independent_formulation(shape):
    emb, modes = make_case(shape, torch.float64, "cpu")
    result = drsl_fast.mode_distance(emb, modes, SIGMA, backend="reference")
    assert result.dmin.dtype == torch.float64 and result.mstar.dtype == torch.uint8
    assert_forward_close(result, emb, modes, SIGMA)
    # and the winner is exactly the first minimum
    dist = independent_distances(emb, modes)
    assert torch.equal(as_rows(result.mstar).long(), dist.argmin(-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_forward_matches_float64(fast_backend, shape, dtype):
    backend, device = fast_backend
    skip_unsupported(backend, dtype)
    emb, modes = make_case(shape, dtype, device, seed=1)
    for sigma in (None, SIGMA):
        result = drsl_fast.mode_distance(emb, modes, sigma, backend=backend)
        expected_shape = (emb.shape[0], modes.shape[0]) + tuple(emb.shape[2:])
        assert result.dmin.shape == expected_shape and result.mstar.shape == expected_shape
        assert result.dmin.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert result.mstar.dtype == torch.uint8
        assert_forward_close(result, emb, modes, sigma)


def test_forward_odd_sizes_many_classes(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(3, 13, 17, 5, generator=g).to(device)
    modes = torch.randn(19, 3, 13, generator=g).to(device)
    assert_forward_close(drsl_fast.mode_distance(emb, modes, SIGMA, backend=backend), emb, modes, SIGMA)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_near_modes_of_large_norm(fast_backend, dtype):
    """Embeddings on or next to modes far from the origin, where ||e||^2 - 2 e.r
    + ||r||^2 cancels: dmin still matches float64, and is exactly 0 (posterior
    1) where e is a mode. 16 modes, and pixel counts that fill no whole tile."""
    backend, device = fast_backend
    skip_unsupported(backend, dtype)
    g = torch.Generator().manual_seed(12)
    C, M, D, B, H, W = 5, 16, 24, 2, 13, 11
    modes = torch.randn(C, M, D, generator=g, dtype=torch.float64) * 30 + 100
    pick = torch.randint(0, C * M, (B * H * W,), generator=g)
    emb = modes.reshape(C * M, D)[pick] + 1e-3 * torch.randn(B * H * W, D, generator=g, dtype=torch.float64)
    on_mode = torch.arange(B * H * W) % 3 == 0
    emb[on_mode] = modes.reshape(C * M, D)[pick[on_mode]]
    emb = emb.to(dtype).reshape(B, H, W, D).permute(0, 3, 1, 2).contiguous().to(device)
    modes = modes.to(dtype).to(device)
    result = drsl_fast.mode_distance(emb, modes, SIGMA, backend=backend)
    assert_forward_close(result, emb, modes, SIGMA)
    own_class = pick[on_mode] // M
    dmin, posterior = as_rows(result.dmin).cpu()[on_mode], as_rows(result.posterior).cpu()[on_mode]
    assert (dmin.gather(1, own_class[:, None]) == 0).all()
    assert (posterior.gather(1, own_class[:, None]) == 1).all()


@pytest.mark.parametrize("shape", [(0, 4, 3, 3), (2, 4, 0, 5), (0, 4)])
def test_empty_inputs(fast_backend, shape):
    backend, device = fast_backend
    emb = torch.randn(shape, device=device, requires_grad=True)
    modes = torch.randn(3, 2, 4, device=device, requires_grad=True)
    result = drsl_fast.mode_distance(emb, modes, SIGMA, backend=backend)
    assert result.dmin.numel() == 0
    (result.dmin.sum() + result.posterior.sum()).backward()
    assert emb.grad.shape == emb.shape
    torch.testing.assert_close(modes.grad, torch.zeros_like(modes))


def test_embeddings_near_their_modes_far_from_the_origin(fast_backend):
    """Cancellation: ||e||^2 - 2 e.r + ||r||^2 would lose every digit of a
    distance of ~1e-4 at norms of ~1e3; dmin must still match float64."""
    backend, device = fast_backend
    g = torch.Generator().manual_seed(5)
    modes = 1000.0 + torch.randn(4, 3, 16, generator=g)
    nearest = torch.randint(0, 12, (2 * 5 * 6,), generator=g)
    rows = modes.reshape(12, 16)[nearest] + 1e-3 * torch.randn(60, 16, generator=g)
    emb = rows.reshape(2, 5, 6, 16).permute(0, 3, 1, 2).contiguous()
    emb[0, :, 0, 0] = modes[2, 1]  # exactly on a mode: dmin 0, posterior 1
    result = drsl_fast.mode_distance(emb.to(device), modes.to(device), SIGMA, backend=backend)
    assert_forward_close(result, emb, modes, SIGMA)
    assert result.dmin[0, 2, 0, 0] == 0 and result.posterior[0, 2, 0, 0] == 1 and result.mstar[0, 2, 0, 0] == 1


def test_close_modes_far_apart_classes(fast_backend):
    """Modes of a class ~0.3 apart, classes ~2000 apart: a product over all
    modes rounds by far more than the gaps between a class's distances, yet
    the winner must be the true nearest mode wherever the gap is clear."""
    backend, device = fast_backend
    g = torch.Generator().manual_seed(6)
    modes = 0.05 * torch.randn(2, 3, 16, generator=g)
    modes[0] += 1000.0
    modes[1] -= 1000.0
    emb = (modes[0].mean(0) + 0.05 * torch.randn(3, 7, 5, 16, generator=g)).permute(0, 3, 1, 2).contiguous()
    result = drsl_fast.mode_distance(emb.to(device), modes.to(device), backend=backend)
    assert_forward_close(result, emb, modes, None)
    dist = independent_distances(emb, modes)[:, 0]  # (N, M) of class 0
    top2 = dist.topk(2, dim=-1, largest=False).values
    clear = (top2[:, 1] - top2[:, 0]) > 1e-5
    assert clear.sum() > 90
    assert torch.equal(as_rows(result.mstar)[:, 0].cpu().long()[clear], dist.argmin(-1)[clear])


@pytest.mark.parametrize("C,M", [(16, 3), (32, 3), (1, 1), (64, 1), (5, 64), (9, 7)])
def test_triton_forward_class_passes(C, M):
    """The Triton forward's passes over the classes: whole passes only
    (16 or 32 classes of 3 modes, 64 of 1), one narrow pass only (1 class),
    one class per pass (64 modes) and a narrow last pass (9 classes of 7)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = why_unavailable("triton", device)
    if reason is not None:
        pytest.skip(f"triton: {reason}")
    from drsl_fast.ops.mode_distance import ModeDistance
    from drsl_fast.triton_kernels import mode_distance as kernels

    g = torch.Generator().manual_seed(C * 100 + M)
    emb = torch.randn(2, 6, 5, 7, generator=g).to(device)
    modes = (torch.randn(C, M, 6, generator=g) * 0.7).to(device)
    shape = (emb.shape[0], C, emb.shape[2], emb.shape[3])
    dmin = torch.full(shape, float("nan"), device=device)
    mstar = torch.full(shape, 255, dtype=torch.uint8, device=device)
    posterior = torch.full(shape, float("nan"), device=device)
    kernels.forward(emb, modes, dmin, mstar, posterior, -1 / (2 * SIGMA**2))
    assert_forward_close(ModeDistance(dmin, mstar, posterior), emb, modes, SIGMA)
    assert torch.equal(as_rows(mstar).cpu().long(), independent_distances(emb, modes).argmin(-1))


def test_ties_pick_the_lowest_mode(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(2, 6, 4, 5, generator=g)
    far = torch.full((6,), 100.0)
    centre = torch.randn(6, generator=g)
    # class 0: modes 0 and 1 identical (tie -> 0); class 1: mode 0 far, 1 and 2 identical (tie -> 1)
    modes = torch.stack([
        torch.stack([centre, centre, far]),
        torch.stack([far, centre, centre]),
    ]).to(device)
    result = drsl_fast.mode_distance(emb.to(device), modes, backend=backend)
    assert (result.mstar[:, 0] == 0).all()
    assert (result.mstar[:, 1] == 1).all()
    # every pixel equidistant from all modes of a class: all ties -> mode 0
    zero = torch.zeros(2, 6, 4, 5, device=device)
    tied = torch.zeros(1, 4, 6, device=device)
    assert (drsl_fast.mode_distance(zero, tied, backend=backend).mstar == 0).all()


@pytest.mark.parametrize("tensor_cores", [True, False], ids=["tensor-cores", "fp32"])
@pytest.mark.parametrize("shape", ["bdhw_channels_last", "nd_transposed", "many_classes", "wide_many_pixels"])
def test_emulated_cuda_kernels_have_no_races(emulated_cuda, shape, tensor_cores):
    """The emulation runs a block's threads between two barriers one after
    another, and the blocks one after another, in ascending or descending
    order: a thread that reads what another writes with no barrier between
    them, or a block what another block writes, would see different values
    under the two orders. Both give the same bits, forward and backward."""
    emb, modes = make_case(shape, torch.float32, "cpu", seed=4)
    grad = torch.randn((emb.shape[0], modes.shape[0], *emb.shape[2:]), generator=torch.Generator().manual_seed(9))
    runs = []
    for reverse in (False, True):
        dmin, mstar, posterior = emulated_cuda.forward(emb, modes, SIGMA, tensor_cores=tensor_cores, reverse=reverse)
        grads = emulated_cuda.backward(grad, emb, modes, mstar, tensor_cores=tensor_cores, reverse=reverse)
        runs.append((dmin, mstar, posterior, *grads))
    for ascending, descending in zip(*runs):
        assert torch.equal(ascending, descending)


def weighted_loss(result, seed=11):
    g = torch.Generator().manual_seed(seed)
    w_dmin = torch.randn(result.dmin.shape, generator=g).to(result.dmin)
    w_post = torch.randn(result.dmin.shape, generator=g).to(result.dmin)
    return (result.dmin * w_dmin).sum() + (result.posterior * w_post).sum()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", ["bdhw", "bdhw_channels_last", "nd_transposed", "bdhw_strided", "many_classes",
                                   "wide_many_pixels"])
def test_backward_matches_reference(fast_backend, shape, dtype):
    backend, device = fast_backend
    skip_unsupported(backend, dtype)
    emb, modes = make_case(shape, dtype, device, seed=5)
    emb.requires_grad_(True)
    modes.requires_grad_(True)
    weighted_loss(drsl_fast.mode_distance(emb, modes, SIGMA, backend=backend)).backward()

    emb64 = emb.detach().cpu().double().requires_grad_(True)
    modes64 = modes.detach().cpu().double().requires_grad_(True)
    weighted_loss(drsl_fast.mode_distance(emb64, modes64, SIGMA, backend="reference")).backward()

    assert emb.grad.dtype == dtype and emb.grad.shape == emb.shape
    assert modes.grad.dtype == dtype and modes.grad.shape == modes.shape
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(emb.grad.cpu().double(), emb64.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(modes.grad.cpu().double(), modes64.grad, atol=tol, rtol=tol)


def test_backward_with_an_infinite_mode_no_pixel_wins(fast_backend):
    """A mode at infinity never wins: the embedding gradient stays the finite
    2 sum_c g[c] (e - r[c, mstar[c]]) (docs/method.md §3), and so does every
    other mode's gradient (the infinite mode's own is left undefined)."""
    backend, device = fast_backend
    emb, modes = make_case("wide_many_pixels", torch.float32, "cpu", seed=3)
    modes[4, 1] = float("inf")
    modes[7, 0, 5] = -float("inf")
    emb, modes = emb.to(device).requires_grad_(True), modes.to(device).requires_grad_(True)
    result = drsl_fast.mode_distance(emb, modes, backend=backend)
    g = torch.randn(result.dmin.shape, generator=torch.Generator().manual_seed(4))
    (result.dmin * g.to(device)).sum().backward()

    mstar = as_rows(result.mstar).cpu().long()  # (N, C)
    assert (mstar[:, 4] != 1).all() and (mstar[:, 7] != 0).all()
    x = as_rows(emb.detach().cpu().double())  # (N, D)
    C, M, D = modes.shape
    winners = modes.detach().cpu().double()[torch.arange(C), mstar]  # (N, C, D)
    g_rows = as_rows(g).double()
    expected_emb = 2 * (g_rows[:, :, None] * (x[:, None, :] - winners)).sum(1)
    torch.testing.assert_close(as_rows(emb.grad.cpu().double()), expected_emb, atol=1e-4, rtol=1e-4)
    weights = torch.zeros(x.shape[0], C, M, dtype=torch.float64).scatter_(2, mstar[:, :, None], g_rows[:, :, None])
    finite = torch.ones(C, M, dtype=torch.bool)
    finite[4, 1] = finite[7, 0] = False
    expected_modes = 2 * (weights.sum(0)[:, :, None] * modes.detach().cpu().double()
                          - torch.einsum("ncm,nd->cmd", weights, x))
    torch.testing.assert_close(modes.grad.cpu().double()[finite], expected_modes[finite], atol=1e-4, rtol=1e-4)


def test_backward_only_one_input(fast_backend):
    backend, device = fast_backend
    emb, modes = make_case("bdhw", torch.float32, device)
    modes.requires_grad_(True)
    drsl_fast.mode_distance(emb, modes, backend=backend).dmin.sum().backward()
    modes_ref = modes.detach().clone().requires_grad_(True)
    drsl_fast.mode_distance(emb, modes_ref, backend="reference").dmin.sum().backward()
    torch.testing.assert_close(modes.grad, modes_ref.grad, atol=1e-4, rtol=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    modes = torch.randn(3, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for backend in ("reference", "cpu"):

        def f(e, r):
            out = drsl_fast.mode_distance(e, r, SIGMA, backend=backend)
            return out.dmin, out.posterior

        assert torch.autograd.gradcheck(f, (emb, modes))
        emb2d = emb.detach()[0].reshape(3, -1).t().contiguous().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda e, r: drsl_fast.mode_distance(e, r, backend=backend).dmin, (emb2d, modes))


def test_opcheck_cpu_operator():
    from drsl_fast import _extension

    if not _extension.has_cpu_kernels():
        pytest.skip(f"extension missing: {_extension.LOAD_ERROR}")
    g = torch.Generator().manual_seed(4)
    for sigma in (None, SIGMA):
        for emb in (torch.randn(2, 4, 3, 5, generator=g), torch.randn(7, 4, generator=g)):
            modes = torch.randn(3, 2, 4, generator=g)
            args = (emb.requires_grad_(True), modes.requires_grad_(True), sigma)
            torch.library.opcheck(torch.ops.drsl_fast.mode_distance.default, args)
    modes = torch.randn(3, 2, 4, generator=g)
    as_channels_last = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    # contiguous, channels-last, and a channel slice of channels-last (neither: its gradient is contiguous)
    for emb in (torch.randn(2, 4, 3, 5, generator=g), as_channels_last(torch.randn(2, 4, 3, 5, generator=g)),
                as_channels_last(torch.randn(2, 6, 3, 5, generator=g))[:, :4]):
        dmin, mstar, _ = torch.ops.drsl_fast.mode_distance(emb, modes, None)
        torch.library.opcheck(
            torch.ops.drsl_fast.mode_distance_backward.default, (torch.randn_like(dmin), emb, modes, mstar, True, True)
        )


def test_opcheck_triton_operator():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if drsl_fast.backends.why_unavailable("triton", device) is not None:
        pytest.skip(drsl_fast.backends.why_unavailable("triton", device))
    g = torch.Generator().manual_seed(4)
    emb = torch.randn(2, 4, 3, 5, generator=g).to(device).requires_grad_(True)
    modes = torch.randn(3, 2, 4, generator=g).to(device).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.drsl_fast.mode_distance_triton.default, (emb, modes, SIGMA),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_torch_compile_fullgraph(fast_backend):
    backend, device = fast_backend
    if backend == "triton" and device.type == "cpu":
        pytest.skip("torch.compile traces triton_op bodies, which the Triton CPU interpreter cannot run")
    emb, modes = make_case("bdhw", torch.float32, device, seed=9)

    def loss_fn(e, r):
        out = drsl_fast.mode_distance(e, r, SIGMA, backend=backend)
        return (out.dmin * 0.1).sum() - out.posterior.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss_fn, compiled):
        e = emb.clone().requires_grad_(True)
        r = modes.clone().requires_grad_(True)
        loss = fn(e, r)
        loss.backward()
        grads.append((loss.detach(), e.grad, r.grad))
    for eager, traced in zip(*grads):
        torch.testing.assert_close(traced, eager)


def test_mode_gradient_is_deterministic(fast_backend):
    backend, device = fast_backend
    g = torch.Generator().manual_seed(8)
    emb = torch.randn(2, 8, 40, 70, generator=g).to(device)  # several gradient chunks
    modes = torch.randn(5, 3, 8, generator=g).to(device)
    threads = torch.get_num_threads()
    grads = []
    for num_threads in (1, max(2, threads), 1):
        torch.set_num_threads(num_threads)
        r = modes.clone().requires_grad_(True)
        drsl_fast.mode_distance(emb, r, SIGMA, backend=backend).posterior.sum().backward()
        grads.append(r.grad)
    torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])


def test_saves_nothing_of_size_pixels_by_modes(fast_backend):
    """docs/method.md §10: no (N, C, M) or (N, C, M, D) tensor is kept for backward."""
    backend, device = fast_backend
    B, D, H, W, C, M = 2, 8, 6, 7, 5, 3
    emb = torch.randn(B, D, H, W, device=device, requires_grad=True)
    modes = torch.randn(C, M, D, device=device, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = drsl_fast.mode_distance(emb, modes, SIGMA, backend=backend)
    assert max(saved) <= max(emb.numel(), B * C * H * W)
    assert sum(n for n in saved if n == B * C * H * W) <= 2 * B * C * H * W  # mstar and the posterior
    out.posterior.sum().backward()


@pytest.mark.parametrize(
    "emb_shape, modes_shape, dtype, sigma, error, match",
    [
        ((2, 4, 3), (3, 2, 4), torch.float32, None, ValueError, r"\(B, D, H, W\) or \(N, D\)"),
        ((2, 4, 3, 3), (6, 4), torch.float32, None, ValueError, r"\(C, M, D\)"),
        ((2, 4, 3, 3), (3, 2, 5), torch.float32, None, ValueError, "D=4 channels.*D=5"),
        ((2, 4, 3, 3), (3, 17, 4), torch.float32, None, ValueError, "M <= 16"),
        ((2, 4, 3, 3), (3, 2, 4), torch.int64, None, TypeError, "float16, bfloat16, float32 or float64"),
        ((2, 4, 3, 3), (3, 2, 4), torch.float32, float("nan"), ValueError, "sigma must be a finite number > 0, got nan"),
        ((2, 4, 3, 3), (3, 2, 4), torch.float32, -1.0, ValueError, "sigma must be a finite number > 0, got -1.0"),
    ],
)
def test_input_validation(emb_shape, modes_shape, dtype, sigma, error, match):
    emb = torch.ones(emb_shape, dtype=dtype)
    modes = torch.ones(modes_shape)
    with pytest.raises(error, match=match):
        drsl_fast.mode_distance(emb, modes, sigma)


@pytest.mark.skipif(why_unavailable("cpu", torch.device("cpu")) is not None, reason="no C++ CPU backend")
def test_cpu_backward_op_rejects_a_mode_index_out_of_range():
    """The backward operator called directly with an mstar that is no mode
    index (>= M) raises instead of reading past the modes."""
    emb, modes = make_case("bdhw", torch.float32, "cpu")
    dmin, mstar, _ = torch.ops.drsl_fast.mode_distance(emb, modes, None)
    bad = mstar.clone()
    bad[1, 2, 3, 4] = modes.shape[1]
    grad = torch.ones_like(dmin)
    torch.ops.drsl_fast.mode_distance_backward(grad, emb, modes, mstar, True, True)
    for emb_grad, modes_grad in [(True, True), (True, False), (False, True)]:
        with pytest.raises(RuntimeError, match="mstar holds a mode index >= M = 2"):
            torch.ops.drsl_fast.mode_distance_backward(grad, emb, modes, bad, emb_grad, modes_grad)


@pytest.mark.parametrize("tensor_cores", [False, True], ids=["fp32", "tensor-cores"])
def test_emulated_cuda_backward_stops_on_a_mode_index_out_of_range(emulated_cuda, tensor_cores):
    """The CUDA backward kernels check mstar < M before any mode is read by
    it (dL/de, the tensor-core backward) or after their sums (the fp32 mode
    gradient, where such an index only zeroed a weight row): every
    combination of gradients asked for stops, as the CPU backend raises."""
    emb, modes = make_case("bdhw", torch.float32, "cpu")
    dmin, mstar, _ = emulated_cuda.forward(emb, modes, None, tensor_cores=tensor_cores)
    grad = torch.ones_like(dmin)
    emulated_cuda.backward(grad, emb, modes, mstar, tensor_cores=tensor_cores)
    bad = mstar.clone()
    bad[1, 0, 3, 4] = modes.shape[1]  # class 0: the emulation, which runs on, still reads inside the modes
    for emb_grad, modes_grad in [(True, True), (True, False), (False, True)]:
        with pytest.raises(RuntimeError, match="device check failed: mstar < M"):
            emulated_cuda.backward(grad, emb, modes, bad, tensor_cores=tensor_cores, emb_grad=emb_grad,
                                   modes_grad=modes_grad)


STOPPED_ON_A_GPU = r"""
import sys
import torch
import drsl_fast  # noqa: F401  (registers the ops)

emb = torch.randn(2, 5, 7, 9, device="cuda")
modes = torch.randn(3, 2, 5, device="cuda")
dmin, mstar, _ = torch.ops.drsl_fast.mode_distance(emb, modes, None)
emb_grad, modes_grad = sys.argv[1] == "1", sys.argv[2] == "1"
torch.ops.drsl_fast.mode_distance_backward(torch.ones_like(dmin), emb, modes, mstar, emb_grad, modes_grad)
torch.cuda.synchronize()
print("valid mstar: ran")
mstar[1, 0, 3, 4] = 2
try:
    torch.ops.drsl_fast.mode_distance_backward(torch.ones_like(dmin), emb, modes, mstar, emb_grad, modes_grad)
    torch.cuda.synchronize()
except RuntimeError as error:
    print("stopped:", error)
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("tensor_cores", [False, True], ids=["fp32", "tensor-cores"])
@pytest.mark.parametrize("emb_grad, modes_grad", [(True, True), (True, False), (False, True)])
def test_cuda_backward_op_stops_on_a_mode_index_out_of_range(emb_grad, modes_grad, tensor_cores):
    """On a GPU the same call stops the kernels, the fp32 ones and (compute
    capability >= 8.0) the tensor-core backward, where the valid mstar before
    it ran (each in a fresh process: a stopped kernel leaves the CUDA context
    unusable)."""
    import os
    import subprocess
    import sys

    if tensor_cores and torch.cuda.get_device_capability()[0] < 8:
        pytest.skip("no GPU with tensor cores here")
    env = dict(os.environ, DRSL_FAST_TENSOR_CORE_BACKWARD="1" if tensor_cores else "0")
    run = subprocess.run([sys.executable, "-c", STOPPED_ON_A_GPU, str(int(emb_grad)), str(int(modes_grad))],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid mstar: ran" in run.stdout and "stopped:" in run.stdout, run.stdout + run.stderr


def test_device_mismatch_is_reported():
    with pytest.raises(ValueError, match="emb is on cpu but modes is on meta"):
        drsl_fast.mode_distance(torch.ones(2, 4), torch.ones(3, 2, 4, device="meta"))


def test_backend_selection(monkeypatch):
    emb, modes = make_case("nd", torch.float32, "cpu")
    assert drsl_fast.backends.resolve(None, torch.device("cpu")) in ("cpu", "reference")
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run on cpu: it runs on CUDA tensors"):
        drsl_fast.mode_distance(emb, modes, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fastest'"):
        drsl_fast.mode_distance(emb, modes, backend="fastest")
    monkeypatch.setenv("DRSL_FAST_BACKEND", "cuda")
    with pytest.raises(BackendUnavailableError):
        drsl_fast.mode_distance(emb, modes)
    monkeypatch.setenv("DRSL_FAST_BACKEND", "reference")
    assert drsl_fast.backends.resolve(None, torch.device("cpu")) == "reference"
    monkeypatch.delenv("DRSL_FAST_BACKEND")
    assert "reference" in drsl_fast.available_backends("cpu")


def test_import_without_extension_falls_back_to_reference():
    script = (
        "import sys, warnings\n"
        "sys.modules['drsl_fast._C'] = None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import drsl_fast, torch\n"
        "assert any('compiled extension is unavailable' in str(w.message) for w in caught), caught\n"
        "assert drsl_fast.backends.resolve(None, torch.device('cpu')) == 'reference'\n"
        "assert 'cpu' not in drsl_fast.available_backends('cpu')\n"
        "out = drsl_fast.mode_distance(torch.randn(5, 3), torch.randn(2, 2, 3), 0.5)\n"
        "assert out.dmin.shape == (5, 2)\n"
        "try:\n"
        "    drsl_fast.mode_distance(torch.randn(5, 3), torch.randn(2, 2, 3), backend='cpu')\n"
        "except drsl_fast.BackendUnavailableError as e:\n"
        "    assert 'compiled extension is missing' in str(e), e\n"
        "else:\n"
        "    raise AssertionError('forcing cpu without the extension must fail')\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr
